"""The Gemma 4 text model (target), its configuration and its KV cache."""

from .cache import CacheError, KVCache, KVView
from .config import FULL, SLIDING, ConfigError, Gemma4Config, LayerSpec, RopeParams
from .layers import RMSNorm
from .model import DecoderLayer, Gemma4Model, ModelOutput

__all__ = [
    "FULL", "SLIDING", "CacheError", "ConfigError", "DecoderLayer", "Gemma4Config", "Gemma4Model", "KVCache", "KVView",
    "LayerSpec", "ModelOutput", "RMSNorm", "RopeParams",
]
