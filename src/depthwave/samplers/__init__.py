"""The samplers: policies that the engine runs for many requests at once, and their one-prompt front ends."""

from depthwave.engine.request import GenerationResult, GenerationStats
from depthwave.engine.selection import SamplingParams
from depthwave.samplers.adaptive import AdaptiveParams, AdaptiveSampler, AdaptiveStats
from depthwave.samplers.base import GenerationStream, Sampler
from depthwave.samplers.diffusion import DiffusionParams, DiffusionSampler, DiffusionStats
from depthwave.samplers.speculative import SpeculativeParams, SpeculativeSampler, SpeculativeStats
from depthwave.samplers.static import StaticParams, StaticSampler, StaticStats

SAMPLERS: dict[str, tuple[type[Sampler], type]] = {
    "static": (StaticSampler, StaticParams),
    "adaptive": (AdaptiveSampler, AdaptiveParams),
    "speculative": (SpeculativeSampler, SpeculativeParams),
    "diffusion": (DiffusionSampler, DiffusionParams),
}

__all__ = [
    "SAMPLERS",
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
    "SamplingParams",
    "SpeculativeParams",
    "SpeculativeSampler",
    "SpeculativeStats",
    "StaticParams",
    "StaticSampler",
    "StaticStats",
]
