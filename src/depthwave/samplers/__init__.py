"""The samplers: policies that the engine runs for many requests at once, their parameters (one registry for
every front end), and the one-prompt front end."""

from depthwave.engine.request import GenerationResult, GenerationStats
from depthwave.engine.selection import SamplingParams
from depthwave.samplers.adaptive import AdaptiveParams, AdaptiveStats
from depthwave.samplers.diffusion import DiffusionParams, DiffusionStats
from depthwave.samplers.frontend import (
    AdaptiveSampler,
    DiffusionSampler,
    GenerationStream,
    Sampler,
    SpeculativeSampler,
    StaticSampler,
)
from depthwave.samplers.registry import DEFAULT_SAMPLER, PARAMS, SamplerSpec, make, parse_specs
from depthwave.samplers.speculative import SpeculativeParams, SpeculativeStats
from depthwave.samplers.static import StaticParams, StaticStats

__all__ = [
    "DEFAULT_SAMPLER",
    "PARAMS",
    "AdaptiveParams",
    "AdaptiveSampler",
    "AdaptiveStats",
    "DiffusionParams",
    "DiffusionSampler",
    "DiffusionStats",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "Sampler",
    "SamplerSpec",
    "SamplingParams",
    "SpeculativeParams",
    "SpeculativeSampler",
    "SpeculativeStats",
    "StaticParams",
    "StaticSampler",
    "StaticStats",
    "make",
    "parse_specs",
]
