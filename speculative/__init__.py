"""Speculative decoding with a Gemma 4 target and its MTP drafter: the loop, lossless sampling, schedules, stats."""

from .loop import NumericalError, generate, generate_batch, new_session_cache
from .schedule import MAX_DRAFT_TOKENS, SCHEDULES
from .session import ContextLimitError, Session, Turn
from .stats import GenerationResult, GenerationStats, RoundInfo

__all__ = ["MAX_DRAFT_TOKENS", "NumericalError", "SCHEDULES", "ContextLimitError", "GenerationResult",
           "GenerationStats", "RoundInfo", "Session", "Turn", "generate", "generate_batch", "new_session_cache"]
