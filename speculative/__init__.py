"""Speculative decoding with a Gemma 4 target and its MTP drafter: the loop, lossless sampling, schedules, stats."""

from .loop import NumericalError, generate, generate_batch, new_session_cache
from .schedule import MAX_DRAFT_TOKENS, SCHEDULES
from .stats import GenerationResult, GenerationStats, RoundInfo

__all__ = ["MAX_DRAFT_TOKENS", "NumericalError", "SCHEDULES", "GenerationResult", "GenerationStats", "RoundInfo",
           "generate", "generate_batch", "new_session_cache"]
