"""Model core: configuration, layers, KV cache, loading."""

from depthwave.model.config import HuginnConfig
from depthwave.model.kv_cache import CACHE_MODES, CacheMode, KVPool
from depthwave.model.loading import load_model, save_model
from depthwave.model.model import ModelOutput, RecurrentDepthModel, random_model
from depthwave.model.positions import Positions

__all__ = [
    "CACHE_MODES",
    "CacheMode",
    "HuginnConfig",
    "KVPool",
    "ModelOutput",
    "Positions",
    "RecurrentDepthModel",
    "load_model",
    "random_model",
    "save_model",
]
