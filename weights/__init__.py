"""Reading checkpoints: config.json, safetensors weights (local or from the hub), tokenizer and chat template."""

from .files import CheckpointError, resolve_checkpoint
from .loader import load_drafter, load_target, parse_device, parse_dtype

__all__ = ["CheckpointError", "load_drafter", "load_target", "parse_device", "parse_dtype", "resolve_checkpoint"]
