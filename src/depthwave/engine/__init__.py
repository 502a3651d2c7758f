"""The batched engine: requests, scheduling, the pass over many rows, token selection, outputs."""

from depthwave.engine.engine import Engine, EngineConfig, EngineStats
from depthwave.engine.request import FinishReason, GenerationResult, GenerationStats, Request, StepOutput
from depthwave.engine.selection import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "GenerationResult",
    "GenerationStats",
    "Request",
    "SamplingParams",
    "StepOutput",
]
