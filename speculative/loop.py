"""The speculative decoding loop: prefill, then rounds of draft -> verify -> accept -> commit, for one prompt
(`generate`) or a batch of prompts of different lengths (`generate_batch`). Both run `_generate`: one loop.

State between rounds, kept by every phase (docs/loop.md), for each row b of the batch: its sequence is prompt +
out, of length L_b;
- `token[b]` is its last token, at position L_b - 1; the target's cache row b holds every position before it,
  [0, L_b - 1) (the cache keeps one length per row);
- `h[b]` is the target's post-norm hidden state at position L_b - 2 (the one whose logits chose `token[b]`).
A round drafts k tokens per row, each row at its constant position L_b - 1, verifies [token, d_1..d_k] of every row
in ONE target forward (row b's tokens at positions L_b - 1..L_b - 1 + k), accepts n_b drafts plus one target token
per row, and rolls row b back over its k - n_b rejected drafts (no copies): the invariant holds again with
L_b += n_b + 1 and h[b] = hidden row n_b of b.

A batch has one k per round (the verify pass has one shape). Under `auto` (default) the schedule chooses that k
for the whole batch from the rows' acceptance and the measured costs, and every row may accept all of it up to its
budget (speculative/schedule.py). Under `constant` and `heuristic` every row keeps its own schedule: with
`draft_length="max"` (default) k is the largest draft length any row asks for and row b accepts at most its own
k_b of the k drafts (the rest are computed and ignored), so each row's rounds are exactly those it would have alone;
with "min", k is the smallest, and every row drafts that many. A row that has finished (stop token or budget) is
dropped from the batch (`finished="drop"`, default: its cache row is released, one copy of the kept rows), or
stays in it frozen (`finished="keep"`: it re-computes its last position every round and rolls it back).
scripts/benchmark.py measures both choices.

Target-only decoding (drafter=None) is the same loop with k = 0: the verify pass over [token] is a plain decode step
and the "bonus" is the target's next token. So both modes share prefill, sampling, stops and statistics.
Each round syncs with the host once (a single .tolist() of drafts, n, the new tokens and a finiteness flag per row).
Drafted tokens never count toward max_new_tokens; each row's emitted block is cut after its first stop token and at
its budget. A batch's prompts are prefilled one at a time: prompts of different lengths need no padding, and each
row's prefill is exactly the computation its single-prompt generation does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from gemma4 import SLIDING
from gemma4.cache import SLIDING_SLACK, KVCache, sliding_capacity
from gemma4.kernels import KEY_BLOCK

from . import sampling
from .compiled import compiled_steps, mark_static
from .options import check_drafter, check_options, first_num_draft_tokens, prompt_ids, stop_tokens
from .sampling import Sampler, accept_greedy, accept_sampled
from .schedule import (DEFAULT_SCHEDULE, MAX_DRAFT_TOKENS, Acceptance, AutoPlanner, max_num_draft_tokens,
                       measured_costs, next_num_draft_tokens)
from .stats import GenerationResult, GenerationStats, RoundInfo, Stopwatch

FINISHED_ROWS = ("drop", "keep")
DRAFT_LENGTHS = ("max", "min")


@torch.inference_mode()
def generate(target, drafter, input_ids, *, max_new_tokens: int, num_draft_tokens: int | None = None,
             schedule: str = DEFAULT_SCHEDULE, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_token_ids=None,
             on_round=None, cache=None, compile: bool = False,
             image_features: torch.Tensor | None = None, costs=None) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `input_ids` (list[int], [S] or [1, S]) with `target`, drafting
    with `drafter` (None: target-only decoding). Greedy when temperature == 0, else lossless speculative sampling
    from the target's temperature / top-k / top-p distribution, reproducible with `seed`. `on_round(RoundInfo)` is
    called for the prefill's token and after every round. Returns the new tokens and statistics.

    `cache` continues an earlier generation (a conversation): a cache from `new_session_cache(target)` whose
    `length` positions hold the K/V of the first `length` tokens of `input_ids` (the caller keeps track of which
    tokens those are, and rolls the cache back to the common prefix first). Only the rest of `input_ids` is
    prefilled (`stats.prompt_tokens_reused` counts the others); on return the cache holds exactly input_ids + the
    new tokens but the last.

    `compile=True` runs the decode, verify and draft steps through torch.compile (speculative/compiled.py): the
    same tokens, faster after a warm-up that compiles each step's shape once per machine (about a minute for the
    bundled pair on 2 cores the first time, seconds in later processes; `stats.compile_seconds`), with a static
    cache; a continued `cache` must then be static too (`new_session_cache(..., static=True)`).

    `image_features` [N, H]: the embeddings of the N image tokens of `input_ids` (a prompt with images:
    `weights.images.image_prompt`), used by the prefill only. Decoding, drafting and verifying after the prompt are
    the text loop as it is: an image's positions are positions of the target's cache like any other.

    `schedule`: "auto" (default) chooses each round's k in 0..num_draft_tokens (default: the drafter's
    num_assistant_tokens) for the most expected tokens per second, from this process's measured round costs and
    the acceptance seen so far; `costs=FixedCosts(...)` replaces the measured costs (then the choices, and seeded
    sampling, repeat exactly). "constant" drafts num_draft_tokens every round; "heuristic" adapts it
    (speculative/schedule.py)."""
    prompt = prompt_ids(input_ids, target.config.vocab_size)
    report = None if on_round is None else (lambda row, info: on_round(info))
    return _generate(target, drafter, [prompt], max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens,
                     schedule=schedule, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     stop_token_ids=stop_token_ids, on_round=report, cache=cache, compile=compile,
                     images=[image_features], costs=costs)[0]


def new_session_cache(target, drafter=None, *, static: bool = False) -> KVCache:
    """An empty cache for `generate(..., cache=...)` across calls: room for any schedule's rollbacks (k up to
    MAX_DRAFT_TOKENS) and the drafter's sliding history, with the config's ring geometry (the same as a fresh
    `generate`); the full-attention buffers grow as the conversation does (`static=True`, for `compile=True`:
    before each generation, never within one)."""
    with torch.inference_mode():  # as `generate`'s own caches (a compiled step's guards tell the two kinds apart)
        return target.new_cache(batch_size=1, max_length=KEY_BLOCK, max_rollback=MAX_DRAFT_TOKENS + 1,
                                min_sliding_history=getattr(drafter, "sliding_history", 0), static=static)


@torch.inference_mode()
def generate_batch(target, drafter, prompts, *, max_new_tokens: int, num_draft_tokens: int | None = None,
                   schedule: str = DEFAULT_SCHEDULE, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None, stop_token_ids=None,
                   finished: str = "drop", draft_length: str = "max", on_round=None,
                   compile: bool = False, image_features=None, costs=None) -> list[GenerationResult]:
    """`generate` for several prompts at once: `prompts` is a list of token-id lists (or [S] tensors) of any
    lengths. Returns one GenerationResult per prompt, in order, each with its own tokens and statistics (its
    rounds, acceptance, target passes; `decode_seconds` runs until that row finished). Every row's greedy output is
    its single-prompt output. Under sampling each row is an independent lossless sample; one `seed` reproduces the
    whole batch. `finished` and `draft_length`: see the module docstring. `on_round(index, RoundInfo)` reports
    each row's rounds. `compile=True`: as in `generate`; finished rows are then kept (frozen), so that the batch
    keeps one shape. `image_features`: one entry per prompt, its image embeddings [N_b, H] or None (see
    `generate`)."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    ids = []
    for i, prompt in enumerate(prompts):
        try:
            ids.append(prompt_ids(prompt, target.config.vocab_size))
        except ValueError as error:
            raise ValueError(f"prompts[{i}]: {error}") from None
    if finished not in FINISHED_ROWS:
        raise ValueError(f"finished must be one of {list(FINISHED_ROWS)}, got {finished!r}")
    if draft_length not in DRAFT_LENGTHS:
        raise ValueError(f"draft_length must be one of {list(DRAFT_LENGTHS)}, got {draft_length!r}")
    images = [None] * len(ids) if image_features is None else list(image_features)
    if len(images) != len(ids):
        raise ValueError(f"image_features has {len(images)} entries for {len(ids)} prompts (None for a prompt "
                         "without images)")
    return _generate(target, drafter, ids, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens,
                     schedule=schedule, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     stop_token_ids=stop_token_ids, finished="keep" if compile else finished,
                     draft_length=draft_length, on_round=on_round, compile=compile, images=images, costs=costs)


@dataclass
class _Row:
    """One prompt's generation inside a batch."""

    index: int  # its place in the caller's list
    prompt_len: int
    k: int  # the draft length its schedule asks for next (constant, heuristic)
    acceptance: Acceptance | None = None  # its acceptance estimates (auto)
    out: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    done: bool = False


def _generate(target, drafter, prompts: list[list[int]], *, max_new_tokens, num_draft_tokens, schedule, temperature,
              top_k, top_p, seed, stop_token_ids, finished="drop", draft_length="max",
              on_round=None, cache=None, compile=False, images=None, costs=None) -> list[GenerationResult]:
    config = target.config
    longest = max(len(p) for p in prompts)
    check_options(prompt_len=longest, max_positions=config.max_position_embeddings,
                  max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, schedule=schedule,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if drafter is not None:
        check_drafter(drafter, target)
    if costs is not None and schedule != "auto":
        raise ValueError(f"costs applies to schedule='auto' only, not {schedule!r}")
    stops = stop_tokens(target, stop_token_ids)
    sampler = Sampler(float(temperature), top_k, top_p)
    k0 = first_num_draft_tokens(drafter, num_draft_tokens) if drafter is not None else 0
    k_max = min(max_num_draft_tokens(schedule, k0), max_new_tokens - 1)
    history = getattr(drafter, "sliding_history", 0)
    check_ring(config, history, k_max)
    # The cache's geometry depends on the config alone, not on k, the schedule, the drafter or the batch: the same
    # key layout in a target-only and a speculative run is half of why greedy outputs agree bit for bit
    # (gemma4/cache.py). Room for k_max more positions: a row may verify drafts beyond its own budget.
    reused, continued = [0] * len(prompts), cache is not None
    if not continued:
        cache = target.new_cache(batch_size=len(prompts), max_length=longest + max_new_tokens + k_max,
                                 max_rollback=k_max + 1, min_sliding_history=history, static=compile,
                                 position_slack=k_max)
    elif compile and not cache.static:
        raise ValueError("compile=True continues only a static cache (new_session_cache(..., static=True)): the "
                         "compiled steps read buffers of one shape")
    else:
        reused = [check_continued_cache(cache, target, len(prompts[0]), k_max, history)]
        if cache.static:  # one buffer shape for the whole generation: room for all of it now
            cache.reserve(longest + max_new_tokens + k_max)
    steps = Steps(target, drafter, compile)
    if compile and target.device.type == "cuda":
        mark_static(cache)
    generator = new_generator(target.device, seed)
    planner = None  # auto's choices (speculative/schedule.py)
    if schedule == "auto" and k_max > 0:
        planner = AutoPlanner(k_max, costs or measured_costs(target, drafter, compile), target.device)
    rows = [_Row(b, len(p), k0, stats=GenerationStats(prompt_tokens=len(p), prompt_tokens_reused=r),
                 acceptance=planner and planner.new_row()) for b, (p, r) in enumerate(zip(prompts, reused))]
    watch = Stopwatch(target.device)

    images = [prompt_images(target, p, start, f, i if len(prompts) > 1 else None)
              for i, (p, start, f) in enumerate(zip(prompts, reused, images or [None] * len(prompts)))]
    firsts = []
    for row, prompt, start, features in zip(rows, prompts, reused, images):
        firsts.append(prefill(target, cache, prompt[start:], sampler, generator, row=row.index,
                              image_features=features))
        row.stats.prefill_seconds = watch.lap()
    token = torch.cat([t for t, _, _ in firsts])  # [B, 1]
    h = torch.cat([h for _, h, _ in firsts])  # [B, 1, H]
    host = torch.cat([token.view(-1), torch.stack([f for _, _, f in firsts])]).tolist()
    for row, first, finite in zip(rows, host[: len(rows)], host[len(rows):]):
        check_finite(finite, row.prompt_len - 1)
        row.out.append(first)
        row.stats.target_forward_passes += 1
        row.done = first in stops or max_new_tokens == 1
    if compile and not all(row.done for row in rows) and steps.cold(cache, k_max):
        warm_up(steps, target, cache, token, h, k_max, sampler)  # compile every shape the loop runs, untimed
        for row in rows:
            row.stats.compile_seconds = watch.lap()
    for row in rows:
        _report(on_round, row.index, RoundInfo(drafted=[], accepted=0, bonus=row.out[0], emitted=list(row.out)))
    decode = Stopwatch(target.device)
    active = rows  # the cache's rows, in order
    if finished == "drop":
        active, token, h = drop_finished(cache, active, token, h)
    while any(not row.done for row in active):
        live = [not row.done for row in active]
        # Each row's own k, within its budget (k_b <= room - 1 keeps its block within max_new_tokens, and so its
        # positions within max_position_embeddings: check_options); the batch's k is the largest or the smallest.
        # A row that accepts at most k_b < k verifies positions it will not keep, which may lie past the limit: the
        # cache allows k_max of them (position_slack), so that one row's limit never shortens another's drafts.
        rooms = [max_new_tokens - len(row.out) - 1 for row in active]
        if planner is not None:
            plan = planner.plan([row.acceptance if ok else None for row, ok in zip(active, live)], rooms)
        wants = [min(plan.k if planner else row.k, room) if ok else 0 for row, room, ok in zip(active, rooms, live)]
        k = (max if draft_length == "max" else min)(w for w, ok in zip(wants, live) if ok)
        caps = [min(w, k) if draft_length == "max" else k * ok for w, ok in zip(wants, live)]
        drafts, q = draft(steps.drafter, target, token, h, cache, k, sampler, generator)  # [B, k], [B, k, V]
        if planner is not None:
            planner.clock.drafted()
        logits, hidden = verify(steps.target, cache, token, drafts)  # [B, k+1, V], [B, k+1, H]
        cap = torch.tensor(caps, device=target.device)
        n, bonus = accept(sampler, logits, drafts, q, cap, generator)  # [B], [B]
        finite = torch.isfinite(logits).flatten(1).all(dim=1)  # [B]
        host = torch.cat([drafts.flatten(), n, bonus, finite]).tolist()  # the host sync
        B = len(active)
        drafted = [host[i * k:(i + 1) * k] for i in range(B)]
        accepted, bonuses, finites = host[B * k: B * k + B], host[B * k + B: B * k + 2 * B], host[B * k + 2 * B:]
        back = []
        for i, row in enumerate(active):
            if not live[i]:  # frozen (finished="keep"): forget the whole pass, token and h stay as they are
                back.append(k + 1)
                continue
            check_finite(finites[i], row.prompt_len + len(row.out) - 1)
            n_i = accepted[i]
            emitted = cut(drafted[i][:n_i] + [bonuses[i]], stops, max_new_tokens - len(row.out))
            row.out += emitted
            rate = plan.rates[i] if planner is not None else None
            record(row.stats, caps[i], n_i, len(emitted), rate)
            _report(on_round, row.index, RoundInfo(drafted=drafted[i][:caps[i]], accepted=n_i,
                                                   bonus=bonuses[i] if len(emitted) == n_i + 1 else None,
                                                   emitted=emitted, expected_tokens_per_second=rate))
            if planner is not None:
                planner.record(row.acceptance, caps[i], n_i)
            else:
                row.k = next_num_draft_tokens(schedule, row.k, caps[i], n_i)
            back.append(k - n_i)
            if emitted[-1] in stops or len(row.out) >= max_new_tokens:
                row.done = True
                row.stats.decode_seconds = decode.since_start()
                row.stats.decode_cpu_seconds = decode.cpu_since_start()
        new_token, new_h = commit(cache, hidden, bonus, back, n)
        if planner is not None:
            planner.finish(B, k)
        if all(live):
            token, h = new_token, new_h
        else:  # frozen rows keep their token and h
            frozen = torch.tensor([not ok for ok in live], device=target.device)
            token = torch.where(frozen[:, None], token, new_token)
            h = torch.where(frozen[:, None, None], h, new_h)
        if finished == "drop":
            active, token, h = drop_finished(cache, active, token, h)
    if continued:  # forget accepted drafts that a stop or the budget cut: the cache holds prompt + out[:-1]
        cache.rollback(cache.length - (rows[0].prompt_len + len(rows[0].out) - 1))
    return [GenerationResult(tokens=row.out, stats=row.stats) for row in rows]


def check_continued_cache(cache, target, prompt_len: int, k_max: int, history: int) -> int:
    """A cache handed to `generate` to continue: one row of this target's geometry, with room for the rounds, and
    shorter than the prompt (its last token must be processed). Returns how many prompt tokens it holds."""
    if cache.batch_size != 1 or cache.config != target.config:
        raise ValueError("cache must be a one-row cache of this target (speculative.new_session_cache)")
    if cache.max_rollback < k_max + 1 or cache.history < history:
        raise ValueError(f"cache was built for rollbacks of {cache.max_rollback} and a history of {cache.history}: "
                         f"this generation needs {k_max + 1} and {history} (speculative.new_session_cache)")
    if cache.length >= prompt_len:
        raise ValueError(f"cache holds {cache.length} positions but input_ids has {prompt_len} tokens: roll it back "
                         "to a prefix shorter than input_ids first")
    return cache.length


class Steps:
    """What the loop calls to run the target over new tokens (`target(ids, cache)`) and a drafter step
    (`drafter.context`, `drafter.step`): the models themselves, or their compiled forwards."""

    def __init__(self, target, drafter, compile: bool):
        self.target, self.drafter = target, drafter
        self._compiled = None
        if compile:
            compiled = self._compiled = compiled_steps(target, drafter)
            generation = object()  # this generation's calls check each region's guards once per shape
            self.target = functools.partial(compiled.forward, generation=generation)
            if drafter is not None:
                self.drafter = _CompiledDrafter(drafter, functools.partial(compiled.step, generation=generation))

    def cold(self, cache, k_max: int) -> bool:
        """(compile=True only) Whether `warm_up` must run before this generation's loop: not when an earlier
        generation of this pair warmed the same shapes (rows, longest draft, the cache's buffers) with the same number
        of threads, as every graph it would call is compiled. A warm-up costs a target pass per verify length: 43 ms
        of a 212 ms speculative generate of 64 tokens (bundled pair, 1 thread). The thread count belongs to the key
        because every compiled graph's guards hold it (inductor writes it into its parallel loops): after
        `torch.set_num_threads` each region compiles a variant for the new count, in the warm-up and not inside
        the timed loop (without it, a generation after a switch from 1 to 2 threads spent 18-37 s compiling there,
        unreported). On CUDA always: its graphs are recorded for the addresses of this cache's buffers."""
        shapes = (cache.batch_size, k_max, tuple(tuple(b.shape) for b in cache.buffers()), torch.get_num_threads())
        if cache.device.type != "cuda" and shapes in self._compiled.warmed:
            return False
        self._compiled.warmed.add(shapes)
        return True


class _CompiledDrafter:
    def __init__(self, drafter, step):
        self.context, self.step = drafter.context, step


def warm_up(steps: Steps, target, cache, token, h, k_max: int, sampler) -> None:
    """Run every shape the loop can meet once and forget it: a decode step, a verify pass of each length 2..k_max+1
    and a drafter step, so that compiling happens here and not inside the timed loop. The verify length is symbolic
    in the compiled graphs, so lengths 3.. reuse the graphs of length 2 (a forward each); running them all keeps
    that true should the code ever take another path by length (a branch on the token count compiles a graph)."""
    B = token.shape[0]
    for S in range(1, k_max + 2):  # contiguous ids, as the loop's: a stride is part of a graph's guards
        steps.target(token.expand(B, S).contiguous(), cache)
        cache.rollback(S)
    if k_max > 0:
        draft(steps.drafter, target, token, h, cache, 1, sampler, torch.Generator(target.device).manual_seed(0))


def drop_finished(cache, active: list[_Row], token, h):
    """Release the cache rows of finished generations (one copy of the others' K/V, once per finishing round)."""
    keep = [i for i, row in enumerate(active) if not row.done]
    if len(keep) == len(active) or not keep:
        return active, token, h
    cache.keep_rows(keep)
    index = torch.tensor(keep, device=token.device)
    return [active[i] for i in keep], token[index], h[index]


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


def prompt_images(target, prompt: list[int], start: int, features, index: int | None):
    """The image embeddings a prefill of prompt[start:] needs (None: no image tokens there), after checking that
    `features` covers the prompt's image tokens one for one and that the cached part does not end inside an
    image (its positions attend to each other: an image is prefilled whole)."""
    where = "" if index is None else f"prompts[{index}]: "
    image_token = target.config.image_token_id
    count = prompt.count(image_token) if image_token is not None else 0
    if features is None:
        if count and image_token in prompt[start:]:
            raise ValueError(f"{where}the prompt holds {count} image tokens (id {image_token}) but no image "
                             "embeddings were given")
        return None
    if image_token is None:
        raise ValueError(f"{where}image embeddings were given, but this target's checkpoint takes text only")
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != count \
            or features.shape[1] != target.config.hidden_size:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{where}image embeddings must be [{count}, {target.config.hidden_size}] (one per image "
                         f"token of the prompt), got {shape}")
    if 0 < start < len(prompt) and prompt[start - 1] == image_token == prompt[start]:
        raise ValueError(f"{where}the cache ends inside an image (position {start}): roll it back to before it")
    before = prompt[:start].count(image_token)
    return features[before:].to(target.device) if before < count else None


def prefill(target, cache, prompt: list[int], sampler: Sampler, generator, row: int = 0, image_features=None):
    """Run the whole prompt into cache row `row` (logits of the last position only) and choose the first new token.
    Returns token [1, 1], h [1, 1, H] (hidden state at the prompt's last position) and whether the logits were
    finite (a 0-d bool, checked with the caller's host sync). `image_features`: the embeddings of the prompt's
    image tokens (`Gemma4Model.embed_prompt`)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=target.device)  # [1, P]
    result = target(ids, cache, logits_to_keep=1, rows=slice(row, row + 1), image_features=image_features)
    token = sampler.choose(result.logits[:, -1], generator)  # [1]
    return token.view(1, 1), result.hidden_states[:, -1:], torch.isfinite(result.logits).all()


def draft(drafter, target, token, h, cache, k: int, sampler: Sampler, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k drafter steps per row, row b at its constant position L_b - 1, over the cache's clean view (accepted
    positions only). Step 1 reads (token, h) [B, 1], [B, 1, H]; step j > 1 reads (d_{j-1}, the drafter's own
    hidden). Returns drafts [B, k] and, under sampling, q [B, k, V]: the processed distributions the drafts were
    sampled from (empty when greedy or k = 0)."""
    B, device, V = token.shape[0], target.device, target.config.vocab_size
    if k == 0:
        return torch.zeros(B, 0, dtype=torch.long, device=device), torch.zeros(B, 0, V, device=device)
    position = torch.tensor(cache.lengths, device=device)[:, None]  # [B, 1]
    views = cache.views()  # taken once: the cache does not change while drafting
    context = drafter.context(position, views)  # masks and RoPE: the same for every step
    drafts, q = [], []
    for _ in range(k):
        step = drafter.step(target, token, h, position, views, context)
        logits = step.logits[:, -1]  # [B, V]
        if sampler.greedy:
            d = logits.argmax(dim=-1)  # [B]
        else:
            q.append(sampler.probs(logits))  # [B, V]
            d = sampling.draft_token(q[-1], generator)  # [B]
        drafts.append(d)
        token, h = d.view(B, 1), step.hidden
    q = torch.stack(q, dim=1) if q else torch.zeros(B, 0, V, device=device)  # [B, k, V]
    return torch.stack(drafts, dim=1), q  # [B, k]


def verify(target, cache, token, drafts) -> tuple[torch.Tensor, torch.Tensor]:
    """ONE target forward over [token, d_1..d_k] of every row, row b at positions L_b-1..L_b-1+k (`target`: the
    model or its compiled forward). Returns logits [B, k+1, V] (row j scores the token after d_j) and post-norm
    hidden states [B, k+1, H]."""
    result = target(torch.cat([token, drafts], dim=1), cache)  # [B, k+1]
    return result.logits, result.hidden_states


def accept(sampler: Sampler, logits, drafts, q, caps, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n accepted drafts, the target's token after them), each [B]: greedy matching or rejection sampling, row b
    considering only its first caps[b] drafts."""
    if sampler.greedy:
        return accept_greedy(logits, drafts, caps)
    return accept_sampled(sampler.probs(logits), q, drafts, generator, caps)  # p: [B, k+1, V]


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


def commit(cache, hidden, bonus, back, n) -> tuple[torch.Tensor, torch.Tensor]:
    """Forget each row's rejected positions (`back[b]` of row b: k - n_b; no copies); the new last token of row b is
    its bonus, and h its hidden state of the position before it (row n_b). Returns token [B, 1], h [B, 1, H]."""
    cache.rollback(back)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return bonus.view(-1, 1), hidden[rows, n][:, None]


def record(stats: GenerationStats, k: int, n: int, emitted: int, rate: float | None = None) -> None:
    stats.target_forward_passes += 1
    stats.draft_lengths.append(k)
    if rate is not None:
        stats.expected_tokens_per_second.append(rate)
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


def _report(on_round, index: int, info: RoundInfo) -> None:
    if on_round is not None:
        on_round(index, info)
