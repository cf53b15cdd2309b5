"""The Gemma 4 text model (target), its configuration and its KV cache."""

from .cache import CacheError, KVCache, KVView
from .config import FULL, SLIDING, ConfigError, Gemma4Config, LayerSpec, RopeParams
from .model import Gemma4Model, ModelOutput

__all__ = [
    "FULL", "SLIDING", "CacheError", "ConfigError", "Gemma4Config", "Gemma4Model", "KVCache", "KVView",
    "LayerSpec", "ModelOutput", "RopeParams",
]
