"""depthwave: fast, faithful inference for recurrent-depth language models.

The names below load on first use (PEP 562), so that importing one part (`depthwave.engine`, `depthwave.runtime`)
does not load the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "depthwave.llm",
    "Engine": "depthwave.engine",
    "EngineConfig": "depthwave.engine",
    "Request": "depthwave.engine",
    "GenerationResult": "depthwave.engine",
    "SamplingParams": "depthwave.engine.selection",
    "CheckpointError": "depthwave.errors",
    "ConfigError": "depthwave.errors",
    "DepthwaveError": "depthwave.errors",
    "InvalidParameterError": "depthwave.errors",
    "PromptError": "depthwave.errors",
    "HuginnConfig": "depthwave.model",
    "KVPool": "depthwave.model",
    "RecurrentDepthModel": "depthwave.model",
    "load_model": "depthwave.model",
    "random_model": "depthwave.model",
    "save_model": "depthwave.model",
    "Tokenizer": "depthwave.model.tokenizer",
    "load_tokenizer": "depthwave.model.tokenizer",
    "AdaptiveParams": "depthwave.samplers",
    "AdaptiveSampler": "depthwave.samplers",
    "DiffusionParams": "depthwave.samplers",
    "DiffusionSampler": "depthwave.samplers",
    "SpeculativeParams": "depthwave.samplers",
    "SpeculativeSampler": "depthwave.samplers",
    "StaticParams": "depthwave.samplers",
    "StaticSampler": "depthwave.samplers",
}

__all__ = [
    "LLM",
    "AdaptiveParams",
    "AdaptiveSampler",
    "CheckpointError",
    "ConfigError",
    "DepthwaveError",
    "DiffusionParams",
    "DiffusionSampler",
    "Engine",
    "EngineConfig",
    "GenerationResult",
    "HuginnConfig",
    "InvalidParameterError",
    "KVPool",
    "PromptError",
    "RecurrentDepthModel",
    "Request",
    "SamplingParams",
    "SpeculativeParams",
    "SpeculativeSampler",
    "StaticParams",
    "StaticSampler",
    "Tokenizer",
    "load_model",
    "load_tokenizer",
    "random_model",
    "save_model",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'depthwave' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from depthwave.engine import Engine, EngineConfig, GenerationResult, Request
    from depthwave.engine.selection import SamplingParams
    from depthwave.errors import CheckpointError, ConfigError, DepthwaveError, InvalidParameterError, PromptError
    from depthwave.llm import LLM
    from depthwave.model import HuginnConfig, KVPool, RecurrentDepthModel, load_model, random_model, save_model
    from depthwave.model.tokenizer import Tokenizer, load_tokenizer
    from depthwave.samplers import (
        AdaptiveParams,
        AdaptiveSampler,
        DiffusionParams,
        DiffusionSampler,
        SpeculativeParams,
        SpeculativeSampler,
        StaticParams,
        StaticSampler,
    )
