"""Model core: configuration, layers, KV cache, loading."""

from depthwave.model.cache import CACHE_MODES, CacheMode, KVCache
from depthwave.model.config import HuginnConfig
from depthwave.model.loading import load_model, save_model
from depthwave.model.model import ModelOutput, RecurrentDepthModel, random_model

__all__ = [
    "CACHE_MODES",
    "CacheMode",
    "HuginnConfig",
    "KVCache",
    "ModelOutput",
    "RecurrentDepthModel",
    "load_model",
    "random_model",
    "save_model",
]
