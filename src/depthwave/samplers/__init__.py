"""Generation algorithms for recurrent-depth models, one file each, sharing `base`."""

from depthwave.samplers.adaptive import AdaptiveParams, AdaptiveSampler
from depthwave.samplers.base import (
    GenerationResult,
    GenerationStats,
    GenerationStream,
    Sampler,
    SamplingParams,
    TokenSelector,
)
from depthwave.samplers.diffusion import DiffusionParams, DiffusionSampler
from depthwave.samplers.speculative import SpeculativeParams, SpeculativeSampler
from depthwave.samplers.static import StaticParams, StaticSampler

__all__ = [
    "AdaptiveParams",
    "AdaptiveSampler",
    "DiffusionParams",
    "DiffusionSampler",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "Sampler",
    "SamplingParams",
    "SpeculativeParams",
    "SpeculativeSampler",
    "StaticParams",
    "StaticSampler",
    "TokenSelector",
]
