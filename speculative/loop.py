"""The speculative decoding loop (batch 1): prefill, then rounds of draft -> verify -> accept -> commit.

State between rounds, kept by every phase (docs/loop.md): the sequence is prompt + out, of length L;
- `token` [1, 1] is its last token, at position L - 1; the target's cache holds every position before it, [0, L-1);
- `h` [1, 1, H] is the target's post-norm hidden state at position L - 2 (the one whose logits chose `token`).
A round drafts k tokens at the constant position L - 1, verifies [token, d_1..d_k] in ONE target forward (rows
0..k at positions L-1..L-1+k), accepts n drafts plus one target token, and rolls the cache back over the k - n
rejected drafts (no copies): the invariant holds again with L += n + 1 and h = hidden row n.

Target-only decoding (drafter=None) is the same loop with k = 0: the verify pass over [token] is a plain decode step
and the "bonus" is the target's next token. So both modes share prefill, sampling, stops and statistics.
Each round syncs with the host once (a single .tolist() of drafts, n and the new token). Drafted tokens never count
toward max_new_tokens; the emitted block is cut after the first stop token and at the budget.
"""

from __future__ import annotations

import torch

from gemma4 import SLIDING
from gemma4.cache import SLIDING_SLACK, sliding_capacity

from . import sampling
from .options import check_drafter, check_options, first_num_draft_tokens, prompt_ids, stop_tokens
from .sampling import Sampler, accept_greedy, accept_sampled
from .schedule import max_num_draft_tokens, next_num_draft_tokens
from .stats import GenerationResult, GenerationStats, RoundInfo, Stopwatch


@torch.inference_mode()
def generate(target, drafter, input_ids, *, max_new_tokens: int, num_draft_tokens: int | None = None,
             schedule: str = "constant", temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_token_ids=None,
             on_round=None) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `input_ids` (list[int], [S] or [1, S]) with `target`, drafting
    with `drafter` (None: target-only decoding). Greedy when temperature == 0, else lossless speculative sampling
    from the target's temperature / top-k / top-p distribution, reproducible with `seed`. `on_round(RoundInfo)` is
    called for the prefill's token and after every round. Returns the new tokens and statistics."""
    config = target.config
    prompt = prompt_ids(input_ids, config.vocab_size)
    check_options(prompt_len=len(prompt), max_positions=config.max_position_embeddings,
                  max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, schedule=schedule,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if drafter is not None:
        check_drafter(drafter, target)
    stops = stop_tokens(target, stop_token_ids)
    sampler = Sampler(float(temperature), top_k, top_p)
    k = first_num_draft_tokens(drafter, num_draft_tokens) if drafter is not None else 0
    k_max = min(max_num_draft_tokens(schedule, k), max_new_tokens - 1)
    history = getattr(drafter, "sliding_history", 0)
    check_ring(config, history, k_max)
    # The cache's geometry depends on the config alone, not on k, the schedule or the drafter: the same key layout
    # in a target-only and a speculative run is half of why greedy outputs agree bit for bit (gemma4/cache.py).
    cache = target.new_cache(batch_size=1, max_length=len(prompt) + max_new_tokens, max_rollback=k_max + 1,
                             min_sliding_history=history)
    generator = new_generator(target.device, seed)
    stats = GenerationStats(prompt_tokens=len(prompt))
    watch = Stopwatch(target.device)

    token, h, finite = prefill(target, cache, prompt, sampler, generator)
    first, finite = torch.cat([token.view(1), finite.view(1)]).tolist()
    check_finite(finite, len(prompt) - 1)
    out = [first]
    stats.target_forward_passes += 1
    stats.prefill_seconds = watch.lap()
    _report(on_round, RoundInfo(drafted=[], accepted=0, bonus=out[0], emitted=list(out)))
    while out[-1] not in stops and len(out) < max_new_tokens:
        # k <= room - 1 keeps the block within the budget, and so the verify pass within max_position_embeddings
        # (its last position is L - 1 + k <= len(prompt) + max_new_tokens - 2).
        k_round = min(k, max_new_tokens - len(out) - 1)
        drafts, q = draft(drafter, target, token, h, cache, k_round, sampler, generator)
        logits, hidden = verify(target, cache, token, drafts)
        n, bonus = accept(sampler, logits, drafts, q, generator)
        *drafted, n_accepted, bonus_id, finite = torch.cat(  # the host sync
            [drafts, n.view(1), bonus.view(1), torch.isfinite(logits).all().view(1)]).tolist()
        check_finite(finite, len(prompt) + len(out) - 1)
        emitted = cut(drafted[:n_accepted] + [bonus_id], stops, max_new_tokens - len(out))
        token, h = commit(cache, hidden, bonus, k_round, n_accepted)
        out += emitted
        record(stats, k_round, n_accepted, len(emitted))
        _report(on_round, RoundInfo(drafted=drafted, accepted=n_accepted,
                                    bonus=bonus_id if len(emitted) == n_accepted + 1 else None, emitted=emitted))
        k = next_num_draft_tokens(schedule, k, k_round, n_accepted)
    stats.decode_seconds = watch.lap()
    return GenerationResult(tokens=out, stats=stats)


def check_ring(config, history: int, k_max: int) -> None:
    """The sliding ring (`sliding_capacity(config)` slots) must keep, after rolling back a round of k_max drafts and
    the bonus token, the W - 1 positions the target reads and the `history` positions the drafter reads."""
    if SLIDING not in config.layer_types:
        return
    kept, capacity = max(config.sliding_window - 1, history), sliding_capacity(config)
    if kept + k_max + 1 > capacity:
        raise ValueError(
            f"the drafter reads {history} sliding-window positions and rounds draft up to {k_max} tokens: the "
            f"target's sliding ring holds {capacity} slots (sliding_window - 1 + SLIDING_SLACK = "
            f"{config.sliding_window - 1} + {SLIDING_SLACK}), which allows at most {capacity - kept - 1} draft "
            "tokens with this drafter"
        )


def prefill(target, cache, prompt: list[int], sampler: Sampler, generator):
    """Run the whole prompt (logits of the last row only) and choose the first new token.
    Returns token [1, 1], h [1, 1, H] (hidden state at the prompt's last position) and whether the logits were
    finite (a 0-d bool, checked with the caller's host sync)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=target.device)  # [1, P]
    result = target(ids, cache, logits_to_keep=1)
    token = sampler.choose(result.logits[:, -1], generator)  # [1]
    return token.view(1, 1), result.hidden_states[:, -1:], torch.isfinite(result.logits).all()


def draft(drafter, target, token, h, cache, k: int, sampler: Sampler, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k drafter steps at the constant position L - 1 over the cache's clean view (accepted positions only).
    Step 1 reads (token, h); step j > 1 reads (d_{j-1}, the drafter's own hidden). Returns drafts [k] and, under
    sampling, q [k, V]: the processed distributions the drafts were sampled from (empty when greedy or k = 0)."""
    position = cache.length
    views = cache.views() if k > 0 else None  # taken once: the cache does not change while drafting
    context = drafter.context(position, views) if k > 0 else None  # masks and RoPE: the same for every step
    drafts, q = [], []
    for _ in range(k):
        step = drafter.step(target, token, h, position, views, context)
        logits = step.logits[:, -1]  # [1, V]
        if sampler.greedy:
            d = logits.argmax(dim=-1)  # [1]
        else:
            q.append(sampler.probs(logits))  # [1, V]
            d = sampling.draft_token(q[-1], generator)  # [1]
        drafts.append(d)
        token, h = d.view(1, 1), step.hidden
    device, V = target.device, target.config.vocab_size
    drafts = torch.cat(drafts) if drafts else torch.zeros(0, dtype=torch.long, device=device)  # [k]
    q = torch.cat(q) if q else torch.zeros(0, V, device=device)  # [k, V]
    return drafts, q


def verify(target, cache, token, drafts) -> tuple[torch.Tensor, torch.Tensor]:
    """ONE target forward over [token, d_1..d_k] at positions L-1..L-1+k. Returns logits [k+1, V] (row j scores
    the token after d_j) and post-norm hidden states [1, k+1, H]."""
    ids = torch.cat([token, drafts.view(1, -1)], dim=1)  # [1, k+1]
    result = target(ids, cache)
    return result.logits[0], result.hidden_states


def accept(sampler: Sampler, logits, drafts, q, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n accepted drafts, the target's token after them) as 0-d tensors: greedy matching or rejection sampling."""
    if sampler.greedy:
        return accept_greedy(logits, drafts)
    return accept_sampled(sampler.probs(logits), q, drafts, generator)  # p: [k+1, V]


class NumericalError(RuntimeError):
    """The target produced NaN or infinite logits: generation stops instead of emitting garbage."""


def check_finite(finite: bool, position: int) -> None:
    if not finite:
        raise NumericalError(
            f"the target's logits at position {position} contain NaN or inf; the weights are broken or the dtype "
            "overflowed (float16 overflows where bfloat16 and float32 do not)"
        )


def cut(block: list[int], stops: frozenset[int], room: int) -> list[int]:
    """What of an accepted block reaches the output: at most `room` tokens, ending at the first stop token."""
    block = block[:room]
    for i, t in enumerate(block):
        if t in stops:
            return block[: i + 1]
    return block


def commit(cache, hidden, bonus, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forget the k - n rejected drafts (no copies); the new last token is the bonus, and h is the hidden state of
    the position before it (row n). Returns token [1, 1], h [1, 1, H]."""
    cache.rollback(k - n)
    return bonus.view(1, 1), hidden[:, n : n + 1]


def record(stats: GenerationStats, k: int, n: int, emitted: int) -> None:
    stats.target_forward_passes += 1
    stats.drafter_steps += k
    stats.decode_tokens += emitted
    if k > 0:
        stats.rounds.append((k, n))


def new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The one random stream of a generation (drafts, acceptance tests, target draws), on the target's device."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _report(on_round, info: RoundInfo) -> None:
    if on_round is not None:
        on_round(info)
