"""Generation algorithms for recurrent-depth models, one file each, sharing `base`."""

from depthwave.samplers.base import (
    GenerationResult,
    GenerationStats,
    GenerationStream,
    Sampler,
    SamplingParams,
    TokenSelector,
)
from depthwave.samplers.diffusion import DiffusionParams, DiffusionSampler
from depthwave.samplers.static import StaticParams, StaticSampler

__all__ = [
    "DiffusionParams",
    "DiffusionSampler",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "Sampler",
    "SamplingParams",
    "StaticParams",
    "StaticSampler",
    "TokenSelector",
]
