"""The MTP drafter: configuration, compatibility with a target, and the model."""

from .config import DrafterConfig, IncompatibleDrafterError, check_compatible
from .model import DraftOutput, Drafter, MaskedEmbedding

__all__ = ["DraftOutput", "Drafter", "DrafterConfig", "IncompatibleDrafterError", "MaskedEmbedding", "check_compatible"]
