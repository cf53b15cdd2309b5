"""Checking `generate`'s arguments up front, so that a bad option fails with a message naming it (ValueError)
instead of deep inside a forward pass, and resolving the defaults that come from the models' generation configs."""

from __future__ import annotations

import math

import torch

from drafter import DrafterConfig, IncompatibleDrafterError, check_compatible

from .schedule import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, SCHEDULES

# Sampling divides float32 logits by the temperature: below 1e-5 only tokens within ~1e-3 of the top logit keep any
# probability (exp(-gap / T) underflows), so the draw is the argmax but for near-ties, and at ~1e-37 the quotient
# itself overflows to inf (NaN probabilities). Refusing the range costs nothing: 0 is greedy.
MIN_TEMPERATURE = 1e-5
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range without wrapping (it maps negative seeds onto it)


def prompt_ids(input_ids, vocab_size: int) -> list[int]:
    """list[int], LongTensor [S] or [1, S] -> list[int], checked against the vocabulary."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(f"input_ids has batch size {input_ids.shape[0]}: batch size 1 is required for now")
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must have shape [S] or [1, S], got {list(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        ids = input_ids.reshape(-1).tolist()
    else:
        ids = list(input_ids)
        if ids and all(isinstance(x, (list, tuple)) for x in ids):
            if len(ids) != 1:
                raise ValueError(f"input_ids has batch size {len(ids)}: batch size 1 is required for now")
            ids = list(ids[0])
        bad = [x for x in ids if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise ValueError(f"input_ids must be integer token ids, found {bad[0]!r}")
    if not ids:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    outside = [x for x in ids if not 0 <= x < vocab_size]
    if outside:
        raise ValueError(f"input_ids holds token id {outside[0]} outside the vocabulary [0, {vocab_size})")
    return ids


def check_options(*, prompt_len: int, max_positions: int, max_new_tokens, num_draft_tokens, schedule, temperature,
                  top_k, top_p, seed) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prompt_len + max_new_tokens > max_positions:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the target's "
            f"max_position_embeddings={max_positions}"
        )
    if num_draft_tokens is not None and (
        not _is_int(num_draft_tokens) or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS
    ):
        raise ValueError(f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], got {num_draft_tokens!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(SCHEDULES)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}: a "
                         "smaller one samples the argmax anyway but for near-ties, and far smaller ones overflow "
                         "logits / temperature")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1] or None, got {seed!r}")


def check_drafter(drafter, target) -> None:
    """A real drafter must fit the target (check_compatible names the mismatch); any drafter, stubs included,
    proposes token ids the target verifies, so both must index the same vocabulary."""
    config = getattr(drafter, "config", None)
    if isinstance(config, DrafterConfig):
        check_compatible(config, target.config)
    weight = next(drafter.parameters(), None) if isinstance(drafter, torch.nn.Module) else None
    if weight is not None and weight.dtype != target.dtype:  # it reads the target's embeddings, K/V, hidden states
        raise IncompatibleDrafterError(
            f"the drafter's dtype {weight.dtype} differs from the target's {target.dtype}: load both in one dtype "
            f"(load_drafter(..., dtype=target.dtype))")
    vocab_size = target.config.vocab_size
    for source in (config, getattr(config, "text", None)):  # Drafter keeps it on config.text
        found = getattr(source, "vocab_size", None)
        if found is not None:
            if found != vocab_size:
                raise ValueError(f"drafter vocab_size={found} differs from the target's vocab_size={vocab_size}")
            return


def stop_tokens(target, stop_token_ids) -> frozenset[int]:
    """The user's stop tokens, else generation_config.json's eos_token_id, else the config's (int or list)."""
    if stop_token_ids is None:
        stop_token_ids = (getattr(target, "generation_config", None) or {}).get("eos_token_id")
    if stop_token_ids is None:
        stop_token_ids = target.config.eos_token_id
    if stop_token_ids is None:
        return frozenset()
    if _is_int(stop_token_ids):
        stop_token_ids = [stop_token_ids]
    ids = list(stop_token_ids)
    bad = [x for x in ids if not _is_int(x)]
    if bad:
        raise ValueError(f"stop_token_ids must be integer token ids, found {bad[0]!r}")
    return frozenset(ids)


def first_num_draft_tokens(drafter, num_draft_tokens: int | None) -> int:
    """The user's k, else the drafter's generation_config `num_assistant_tokens`, else DEFAULT_DRAFT_TOKENS."""
    if num_draft_tokens is not None:
        return num_draft_tokens
    k = (getattr(drafter, "generation_config", None) or {}).get("num_assistant_tokens")
    return min(int(k), MAX_DRAFT_TOKENS) if _is_int(k) and k >= 1 else DEFAULT_DRAFT_TOKENS


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
