"""The speculative loop under greedy decoding: outputs, acceptance bookkeeping, schedules, stops, errors, statistics.

Oracles: target-only greedy decoding of a full sequence without a cache (argmax after argmax), transformers'
`generate(do_sample=False)` of the same weights, and closed-form counts for stub drafters that agree with the
target on a known pattern. Targets are built with our Gemma4Model (tiny configs of `tests/tiny.py`, W = 8, random
weights); prompts plus budgets cross the sliding window several times.
"""

from __future__ import annotations

import functools
import json
import random
from types import SimpleNamespace

import pytest
import torch

from drafter import DrafterConfig
from gemma4 import FULL, SLIDING, Gemma4Config, Gemma4Model
from speculative import MAX_DRAFT_TOKENS, GenerationResult, RoundInfo, generate
from tests import tiny

PROMPT = [5, 6, 7, 8, 9, 10]
LONG_PROMPT = list(range(100, 124))  # longer than a sliding ring: the prefill takes the non-ring path


@functools.cache
def target_for(family: str) -> Gemma4Model:
    torch.manual_seed(0)
    model = Gemma4Model(Gemma4Config(**tiny.TARGET_CONFIGS[family])).eval()
    tiny.randomize(model, seed=0)
    return model


@torch.no_grad()
def full_sequence_greedy(target, prompt: list[int], n: int) -> list[int]:
    """The oracle: re-run the whole sequence without a cache and append the argmax, n times."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, target(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@functools.cache
def reference(family: str, prompt: tuple[int, ...], n: int) -> list[int]:
    """Target-only greedy tokens of our loop (checked against the oracles by the first tests)."""
    return generate(target_for(family), None, list(prompt), max_new_tokens=n, stop_token_ids=[]).tokens


class ScriptedDrafter:
    """A drafter (no nn.Module) that proposes the target's greedy continuation `sequence` (prompt + new tokens)
    when `agree(round, step)` says so and a wrong token otherwise, so acceptance is known in advance. On the first
    step of each round it checks the loop's invariants: the last token, the clean cache view (accepted positions
    [0, position) only) and, with `check_hidden`, that h is the target's hidden state at position - 1."""

    sliding_history = 9  # W_a + 1 of the tiny drafters

    def __init__(self, target, sequence: list[int], agree, num_assistant_tokens: int | None = None,
                 check_hidden: bool = False):
        self.target, self.sequence, self.agree, self.check_hidden = target, sequence, agree, check_hidden
        self.generation_config = {} if num_assistant_tokens is None else {"num_assistant_tokens": num_assistant_tokens}
        self.round, self.j, self._hidden, self._last_draft = -1, 0, None, None

    def context(self, position, views):  # the loop builds a round's context once; this drafter needs none
        return None

    def step(self, target, token, hidden, position, views, context=None):
        position = int(position)  # [1, 1]: one row
        if hidden is self._hidden:  # a later step of the round: it reads its own previous draft
            assert int(token) == self._last_draft
        else:
            self.round, self.j = self.round + 1, 0
            self._check_round_start(token, hidden, position, views)
        self.j += 1
        right = self.sequence[position + self.j]
        d = right if self.agree(self.round, self.j) else (right + 1) % target.config.vocab_size
        logits = torch.zeros(1, 1, target.config.vocab_size)
        logits[..., d] = 10.0
        self._hidden, self._last_draft = torch.zeros(1, 1, target.config.hidden_size), d
        return SimpleNamespace(logits=logits, hidden=self._hidden)

    def _check_round_start(self, token, hidden, position, views):
        assert int(token) == self.sequence[position]  # the last token sits at `position`, outside the cache
        assert torch.equal(views[FULL].positions, torch.arange(position)[None])
        if SLIDING in views:
            seen = views[SLIDING].positions
            seen = seen[seen >= 0]
            assert int(seen.max()) == position - 1
            assert set(range(max(0, position - self.sliding_history), position)) <= set(seen.tolist())
        if self.check_hidden:
            with torch.no_grad():
                want = self.target(torch.tensor([self.sequence[:position]])).hidden_states[:, -1:]
            torch.testing.assert_close(hidden, want, atol=1e-4, rtol=0)


def always(r, j):
    return True


def never(r, j):
    return False


def first(a):
    return lambda r, j: j <= a


def coin(seed, prob=0.6):
    return lambda r, j: random.Random(f"{seed}-{r}-{j}").random() < prob


def run(family, agree, n, prompt=PROMPT, **options) -> tuple[GenerationResult, list[RoundInfo], list[int]]:
    """generate() with a scripted drafter; returns the result, the on_round reports and the reference tokens."""
    target = target_for(family)
    ref = reference(family, tuple(prompt), n)
    drafter = ScriptedDrafter(target, list(prompt) + ref + [0] * (MAX_DRAFT_TOKENS + 2), agree,
                              check_hidden=options.pop("check_hidden", False))
    reports = []
    options.setdefault("stop_token_ids", [])
    options.setdefault("schedule", "constant")  # the closed forms below count the rounds of a fixed k
    result = generate(target, drafter, prompt, max_new_tokens=n, on_round=reports.append, **options)
    return result, reports, ref


# ---- target-only decoding against the oracles -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["e2b", "31b", "moe"])
@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["short", "long"])
def test_target_only_greedy_equals_full_sequence_argmax(family, prompt):
    result = generate(target_for(family), None, prompt, max_new_tokens=30, stop_token_ids=[])
    assert result.tokens == full_sequence_greedy(target_for(family), prompt, 30)
    s = result.stats
    assert (s.target_forward_passes, s.drafter_steps, s.rounds, s.decode_tokens) == (30, 0, [], 29)
    assert s.mean_tokens_per_pass == 1.0 and s.acceptance_rate == 0.0


@pytest.mark.parametrize("family", ["e2b", "31b", "moe"])
def test_target_only_greedy_equals_transformers_generate(family, target_pair):
    """Same checkpoint in both; stop tokens from its generation_config.json (eos [1]) on both sides."""
    hf, ours = target_pair(family)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=30, do_sample=False)[0, len(PROMPT):].tolist()
    assert generate(ours, None, ids, max_new_tokens=30).tokens == want


def test_prompt_forms_are_equivalent():
    target = target_for("31b")
    outs = [generate(target, None, p, max_new_tokens=5, stop_token_ids=[]).tokens
            for p in (PROMPT, torch.tensor(PROMPT), torch.tensor([PROMPT]), tuple(PROMPT))]
    assert all(o == outs[0] for o in outs)


# ---- acceptance pinned by stub drafters ---------------------------------------------------------------------------
def test_always_agreeing_drafter_gets_every_draft_accepted():
    result, reports, ref = run("31b", always, 21, num_draft_tokens=4)
    s = result.stats
    assert result.tokens == ref
    assert s.rounds == [(4, 4)] * 4  # the prefill's token, then 4 rounds of 4 drafts + 1 bonus
    assert (s.target_forward_passes, s.drafter_steps, s.decode_tokens) == (5, 16, 20)
    assert s.mean_tokens_per_pass == 5.0 and s.acceptance_rate == 1.0
    assert [r.emitted for r in reports[1:]] == [ref[i:i + 5] for i in range(1, 21, 5)]
    assert all(r.bonus == r.emitted[-1] and r.drafted == r.emitted[:4] for r in reports[1:])


def test_never_agreeing_drafter_gets_nothing_accepted_and_the_output_is_still_exact():
    result, reports, ref = run("31b", never, 10, num_draft_tokens=3)
    s = result.stats
    assert result.tokens == ref
    # the budget clamps k to (tokens left - 1) at the end; the last step drafts nothing and is no drafting round
    assert s.rounds == [(3, 0)] * 6 + [(2, 0), (1, 0)]
    assert (s.target_forward_passes, s.drafter_steps) == (10, 21)
    assert s.acceptance_rate == 0.0 and s.mean_tokens_per_pass == 1.0
    assert reports[-1] == RoundInfo(drafted=[], accepted=0, bonus=ref[-1], emitted=[ref[-1]])


def test_drafter_agreeing_on_a_pattern_gives_the_expected_rounds():
    result, _, ref = run("e2b", first(2), 16, num_draft_tokens=4)  # 2 of 4 accepted, 3 tokens per round
    s = result.stats
    assert result.tokens == ref
    assert s.rounds == [(4, 2)] * 4 + [(2, 2)]
    assert (s.target_forward_passes, s.drafter_steps) == (6, 18)
    assert s.acceptance_rate == 10 / 18 and s.mean_tokens_per_pass == 3.0


def test_loop_hands_the_drafter_the_right_hidden_state_and_a_clean_view():
    result, _, ref = run("e2b", coin(3), 30, num_draft_tokens=3, check_hidden=True)
    assert result.tokens == ref
    assert 0 < result.stats.acceptance_rate < 1


# ---- schedules ------------------------------------------------------------------------------------------------------
def test_heuristic_schedule_adds_two_after_full_acceptance_and_removes_one_otherwise():
    accepted = [None, None, 0, None, 1, 0, 0, 0, 2, 0, 0, None, None]  # per round; None = all accepted
    agree = lambda r, j: accepted[r] is None or j <= accepted[r]  # noqa: E731
    result, _, ref = run("31b", agree, 32, num_draft_tokens=2, schedule="heuristic")
    assert result.tokens == ref
    assert result.stats.rounds == [(2, 2), (4, 4), (6, 0), (5, 5), (7, 1), (6, 0), (5, 0), (4, 0), (3, 2), (2, 0),
                                   (1, 0), (1, 1), (3, 3)]  # ... 2 -> 1 -> 1: the floor
    assert result.stats.target_forward_passes == 14


def test_heuristic_schedule_stops_growing_at_the_cap():
    result, _, ref = run("31b", always, 98, num_draft_tokens=30, schedule="heuristic")
    assert result.tokens == ref
    assert MAX_DRAFT_TOKENS == 32
    assert result.stats.rounds == [(30, 30), (32, 32), (32, 32)]


def test_constant_schedule_keeps_k():
    result, _, _ = run("31b", first(1), 20, num_draft_tokens=3, schedule="constant")
    assert {d for d, _ in result.stats.rounds[:-1]} == {3}


def test_default_k_comes_from_the_drafters_generation_config():
    target = target_for("31b")
    ref = reference("31b", tuple(PROMPT), 12)
    sequence = PROMPT + ref + [0] * 40
    for config_k, want in [(5, 5), (None, 6)]:
        drafter = ScriptedDrafter(target, sequence, never, num_assistant_tokens=config_k)
        rounds = generate(target, drafter, PROMPT, max_new_tokens=12, stop_token_ids=[],
                          schedule="constant").stats.rounds
        assert rounds[0] == (want, 0)


# ---- greedy equivalence with any drafter ------------------------------------------------------------------------
AGREEMENTS = {"always": always, "never": never, "first-one": first(1), "coin": coin(0)}


CASES = [(PROMPT, a) for a in AGREEMENTS] + [(LONG_PROMPT, "coin")]


@pytest.mark.parametrize("family", ["e2b", "31b"])
@pytest.mark.parametrize("schedule", ["constant", "heuristic"])
@pytest.mark.parametrize("prompt,agreement", CASES, ids=[f"{len(p)}-{a}" for p, a in CASES])
def test_greedy_output_equals_target_only_output(family, agreement, schedule, prompt):
    """6 + 30 positions cross the window W = 8 four times (the 24-token prompt fills a ring at prefill);
    k in {1, 2, 4, 8}."""
    for k in (1, 2, 4, 8):
        result, reports, ref = run(family, AGREEMENTS[agreement], 30, prompt=prompt, num_draft_tokens=k,
                                   schedule=schedule)
        assert result.tokens == ref, f"k={k}"
        assert sum((r.emitted for r in reports), []) == result.tokens
        assert [(len(r.drafted), r.accepted) for r in reports if r.drafted] == result.stats.rounds
        s = result.stats
        assert s.target_forward_passes == len(reports)  # the prefill and one pass per round
        assert s.drafter_steps == sum(d for d, _ in s.rounds)
        assert s.decode_tokens == sum(a for _, a in s.rounds) + s.target_forward_passes - 1


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_real_drafter_from_checkpoints_keeps_greedy_output(family, checkpoint, drafter_checkpoint):
    """load_target / load_drafter of tiny saved checkpoints; k defaults to their num_assistant_tokens (4)."""
    from weights import load_drafter, load_target

    target = load_target(checkpoint(family))
    drafter = load_drafter(drafter_checkpoint(tiny.PAIRS[family]), target=target)
    want = generate(target, None, PROMPT, max_new_tokens=30, stop_token_ids=[]).tokens
    for schedule in ("constant", "heuristic"):
        result = generate(target, drafter, PROMPT, max_new_tokens=30, schedule=schedule, stop_token_ids=[])
        assert result.tokens == want
        assert result.stats.rounds[0][0] == 4
    sampled = [generate(target, drafter, PROMPT, max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.95,
                        seed=1, stop_token_ids=[], schedule="constant") for _ in range(2)]
    assert sampled[0].tokens == sampled[1].tokens and len(sampled[0].tokens) == 12


# ---- stops and budget ---------------------------------------------------------------------------------------------
def test_stop_token_inside_an_accepted_block_ends_the_output_there():
    ref = reference("31b", tuple(PROMPT), 21)
    i = next(i for i in (3, 2, 4) if ref[i] not in ref[:i])  # a token of round 1's block (tokens 1..5)
    result, reports, _ = run("31b", always, 21, num_draft_tokens=4, stop_token_ids=[ref[i]])
    assert result.tokens == ref[: i + 1]
    assert result.stats.rounds == [(4, 4)]  # accepted counts what the target verified, before the cut
    assert reports[-1] == RoundInfo(drafted=ref[1:5], accepted=4, bonus=None, emitted=ref[1 : i + 1])


def test_stop_token_chosen_by_the_prefill_ends_generation():
    ref = reference("31b", tuple(PROMPT), 5)
    result, reports, _ = run("31b", always, 5, num_draft_tokens=4, stop_token_ids=ref[0])
    assert result.tokens == ref[:1] and result.stats.target_forward_passes == 1 and len(reports) == 1


def test_default_stop_tokens_come_from_generation_config_then_config(monkeypatch):
    target = target_for("31b")
    ref = reference("31b", tuple(PROMPT), 10)
    assert ref[2] not in ref[:2] and ref[1] != ref[0]
    monkeypatch.setattr(target.config, "eos_token_id", ref[2])
    assert generate(target, None, PROMPT, max_new_tokens=10).tokens == ref[:3]
    monkeypatch.setattr(target, "generation_config", {"eos_token_id": [100000, ref[1]]}, raising=False)
    assert generate(target, None, PROMPT, max_new_tokens=10).tokens == ref[:2]
    assert generate(target, None, PROMPT, max_new_tokens=10, stop_token_ids=[]).tokens == ref


def test_budget_clamps_the_last_blocks():
    result, _, ref = run("31b", always, 8, num_draft_tokens=4)  # 1 + 5 tokens, then room for 2: k = 1
    assert result.tokens == ref and result.stats.rounds == [(4, 4), (1, 1)]
    result, _, ref = run("31b", always, 5, num_draft_tokens=8)  # k larger than the whole budget
    assert result.tokens == ref and result.stats.rounds == [(3, 3)]


def test_one_new_token_is_the_prefills():
    result, reports, ref = run("31b", always, 1, num_draft_tokens=4)
    s = result.stats
    assert result.tokens == ref[:1] and len(reports) == 1
    assert (s.target_forward_passes, s.drafter_steps, s.rounds, s.mean_tokens_per_pass) == (1, 0, [], 0.0)


# ---- statistics ---------------------------------------------------------------------------------------------------
def test_statistics_are_consistent_and_json_ready():
    result, _, _ = run("31b", first(2), 16, num_draft_tokens=4)
    s = result.stats
    d = json.loads(json.dumps(s.to_dict()))
    assert d["rounds"] == [[4, 2]] * 4 + [[2, 2]]
    assert d["target_forward_passes"] == 6 and d["drafter_steps"] == 18 and d["prompt_tokens"] == len(PROMPT)
    assert s.prefill_seconds > 0 and s.decode_seconds > 0
    assert 0 < s.decode_cpu_seconds <= s.decode_seconds * 1.05  # one thread's CPU time cannot outrun the clock
    assert d["tokens_per_second"] == pytest.approx(15 / s.decode_seconds)
    assert d["prefill_tokens_per_second"] == pytest.approx(len(PROMPT) / s.prefill_seconds)
    assert d["acceptance_rate"] == 10 / 18 and d["mean_tokens_per_pass"] == 3.0


# ---- errors ---------------------------------------------------------------------------------------------------------
V = tiny.TARGET_CONFIGS["31b"]["vocab_size"]
BAD = [
    (dict(num_draft_tokens=0), "num_draft_tokens"),
    (dict(num_draft_tokens=MAX_DRAFT_TOKENS + 1), "num_draft_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(input_ids=[]), "empty"),
    (dict(input_ids=[3, V]), f"token id {V} outside the vocabulary"),
    (dict(input_ids=[-1]), "outside the vocabulary"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long)), "batch size 1 is required"),
    (dict(input_ids=[[1, 2], [3, 4]]), "batch size 1 is required"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=131_072), "max_position_embeddings"),
    (dict(schedule="linear"), "unknown schedule 'linear'"),
]


@pytest.mark.parametrize("options,message", BAD, ids=[m for _, m in BAD])
def test_bad_options_raise_value_errors_naming_them(options, message):
    kwargs = dict(input_ids=PROMPT, max_new_tokens=4) | options
    drafter = ScriptedDrafter(target_for("31b"), [0] * 64, always)
    with pytest.raises(ValueError, match=message):
        generate(target_for("31b"), drafter, kwargs.pop("input_ids"), **kwargs)


@pytest.mark.parametrize("config", [SimpleNamespace(vocab_size=V + 1),
                                    SimpleNamespace(text=SimpleNamespace(vocab_size=V * 2))])
def test_drafter_with_another_vocabulary_is_refused(config):
    drafter = ScriptedDrafter(target_for("31b"), [0] * 64, always)
    drafter.config = config
    with pytest.raises(ValueError, match="drafter vocab_size=.* differs from the target's vocab_size=512"):
        generate(target_for("31b"), drafter, PROMPT, max_new_tokens=4)


def test_real_drafter_vocabulary_is_checked():
    cfg = DrafterConfig.from_dict(dict(tiny.DRAFTER_CONFIGS["ordered"], model_type="gemma4_assistant"))
    cfg.text.vocab_size = 256
    with pytest.raises(ValueError, match="vocab_size=256"):
        generate(target_for("31b"), SimpleNamespace(config=cfg, sliding_history=9), PROMPT, max_new_tokens=4)


def test_nan_logits_stop_generation_with_a_clear_error():
    """A NaN that appears mid-generation (a token whose per-layer embedding is NaN; its main embedding is also the
    tied head, which would poison every logit row at once) raises instead of emitting garbage."""
    from speculative import NumericalError

    target = target_for("e2b")
    clean = generate(target, None, PROMPT, max_new_tokens=3).tokens
    broken = Gemma4Model(target.config).eval()
    broken.load_state_dict(target.state_dict())
    with torch.no_grad():
        broken.embed_tokens_per_layer.weight[clean[0]] = float("nan")
    with pytest.raises(NumericalError, match=f"logits at position {len(PROMPT)} contain NaN or inf"):
        generate(broken, None, PROMPT, max_new_tokens=3)
    with torch.no_grad():
        broken.embed_tokens_per_layer.weight[PROMPT[0]] = float("nan")
    with pytest.raises(NumericalError, match=f"position {len(PROMPT) - 1}"):
        generate(broken, None, PROMPT, max_new_tokens=3)


def test_incompatible_drafter_is_refused_by_generate(checkpoint, drafter_checkpoint):
    from drafter import IncompatibleDrafterError
    from weights import load_drafter, load_target

    target = load_target(checkpoint("31b"))
    drafter = load_drafter(drafter_checkpoint("e2b"))  # built for the E2B-like target
    with pytest.raises(IncompatibleDrafterError, match="drafter does not fit the target"):
        generate(target, drafter, PROMPT, max_new_tokens=4)


def test_a_drafter_in_another_dtype_is_refused_by_generate(checkpoint, drafter_checkpoint):
    """The drafter reads the target's embeddings, K/V and hidden states: a float32 drafter beside a bfloat16 target
    is named as such, before any matmul fails on the mixed dtypes."""
    from drafter import IncompatibleDrafterError
    from weights import load_drafter, load_target

    target = load_target(checkpoint("e2b"), dtype=torch.bfloat16)
    drafter = load_drafter(drafter_checkpoint("e2b"), target=target)  # float32: the loader's default
    with pytest.raises(IncompatibleDrafterError, match="drafter's dtype torch.float32 differs from the target's "
                                                       "torch.bfloat16"):
        generate(target, drafter, PROMPT, max_new_tokens=4)
    same = load_drafter(drafter_checkpoint("e2b"), target=target, dtype=target.dtype)
    options = dict(max_new_tokens=6, stop_token_ids=[])
    assert generate(target, same, PROMPT, **options).tokens == generate(target, None, PROMPT, **options).tokens


def test_a_continued_cache_prefills_only_the_new_tokens_and_gives_the_fresh_output():
    """generate(..., cache=...) across calls (a conversation): turn 2 processes only what turn 1 did not, and its
    greedy tokens equal a fresh generate over the whole history; a stop inside an accepted block leaves the cache
    holding exactly prompt + output but the last token."""
    from speculative import new_session_cache

    target = target_for("e2b")
    free = reference("e2b", tuple(LONG_PROMPT), 30)
    drafter = ScriptedDrafter(target, LONG_PROMPT + free, always)
    stop = free[5]  # inside the second block of 4 accepted drafts + 1
    cache = new_session_cache(target, drafter)
    first = generate(target, drafter, LONG_PROMPT, max_new_tokens=30, num_draft_tokens=4, cache=cache,
                     stop_token_ids=[stop])
    assert first.tokens == free[: free.index(stop) + 1] and first.stats.prompt_tokens_reused == 0
    assert cache.length == len(LONG_PROMPT) + len(first.tokens) - 1
    history = LONG_PROMPT + first.tokens + PROMPT
    second = generate(target, None, history, max_new_tokens=10, cache=cache, stop_token_ids=[])
    assert second.tokens == reference("e2b", tuple(history), 10)
    assert (second.stats.prompt_tokens_reused, second.stats.prompt_tokens_processed) == (len(history) - 7, 7)
    with pytest.raises(ValueError, match="roll it back"):
        generate(target, None, history[:5], max_new_tokens=2, cache=cache)
    with pytest.raises(ValueError, match="one-row cache"):
        generate(target, None, history, max_new_tokens=2, cache=target.new_cache(batch_size=2))
