"""Reading checkpoints: config.json, safetensors weights (local or from the hub), tokenizer and chat template."""

from .chat_template import ChatTemplateError, load_chat_template, render_chat
from .files import CheckpointError, resolve_checkpoint
from .loader import load_drafter, load_target, load_vision, parse_device, parse_dtype
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ChatTemplateError", "CheckpointError", "Tokenizer", "load_chat_template", "load_drafter", "load_target",
    "load_tokenizer", "load_vision", "parse_device", "parse_dtype", "render_chat", "resolve_checkpoint",
]
