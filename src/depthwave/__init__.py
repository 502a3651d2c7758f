"""depthwave: fast, faithful inference for recurrent-depth language models."""

from depthwave.engine import Engine, EngineConfig, Request
from depthwave.errors import (
    CheckpointError,
    ConfigError,
    DepthwaveError,
    InvalidParameterError,
    PromptError,
)
from depthwave.llm import LLM
from depthwave.model import HuginnConfig, KVPool, RecurrentDepthModel, load_model, random_model, save_model
from depthwave.model.tokenizer import Tokenizer, load_tokenizer
from depthwave.samplers import (
    AdaptiveParams,
    AdaptiveSampler,
    DiffusionParams,
    DiffusionSampler,
    GenerationResult,
    SamplingParams,
    SpeculativeParams,
    SpeculativeSampler,
    StaticParams,
    StaticSampler,
)

__version__ = "0.1.0"

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
