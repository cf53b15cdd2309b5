"""Batched speculative decoding (`speculative.generate_batch`): each row is exactly its own single-prompt run.

Oracles: the same prompt's batch-1 target-only output (greedy tokens), its batch-1 speculative run (per-round
drafted / accepted counts, which the per-row caps keep identical), a per-row recomputation without any batch (the
target's hidden state and K/V at every round, checked by a stub drafter: the bug class of per-row cache corruption
under ragged acceptance), and the exact target distribution with a chi-square test (sampling).
Float32 runs with `set_row_invariant_float32(True)`, as tests/test_dtype_equivalence.py does: then every dtype must
give the single-prompt tokens bit for bit, not only within rounding.
"""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace

import pytest
import torch

import speculative.sampling as sampling
from gemma4 import FULL
from speculative import generate, generate_batch
from speculative.sampling import accept_sampled
from tests import tiny
from tests.test_sampling_lossless import PROMPT as SAMPLING_PROMPT
from tests.test_sampling_lossless import V as SAMPLING_V
from tests.test_sampling_lossless import build_sampling_target, chi_square_p_value, exact_joint_t2_t3
from weights import load_drafter, load_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GOOD_P, BROKEN_P = 1e-3, 1e-6


pytestmark = pytest.mark.usefixtures("row_invariant_float32")  # tests/conftest.py


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(family, dtype) -> (target, drafter): a tiny family pair biased so that drafts are often accepted."""

    @functools.cache
    def make(family: str, dtype: str):
        folder = folders(family)
        target = load_target(folder / "target", dtype=DTYPES[dtype])
        return target, load_drafter(folder / "drafter", target=target, dtype=DTYPES[dtype])

    @functools.cache
    def folders(family: str):
        target, drafter = tiny.build_target(family, seed=0), tiny.build_drafter(tiny.PAIRS[family], seed=1)
        tiny.bias_vocab(target, drafter, [10, 11, 12], amount=0.3)
        folder = tmp_path_factory.mktemp(f"batch-{family}")
        tiny.save(target, folder / "target", eos_token_id=())
        tiny.save(drafter, folder / "drafter", eos_token_id=())
        return folder

    return make


@pytest.fixture(scope="module")
def sampling_target():
    return build_sampling_target()


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=gen).tolist() for n in lengths]


# Prompt lengths: under one sliding window (W = 8), a few windows, and past the ring (71 slots: its prefill takes
# the long path); with 16 new tokens rows finish at different rounds.
LENGTHS = (5, 30, 80, 13)
CASES = [(family, dtype) for dtype in ("float32", "bfloat16") for family in ("e2b", "e4b", "31b", "moe")]
CASES += [("e2b", "float16"), ("moe", "float16")]


@pytest.mark.parametrize("family,dtype", CASES)
def test_every_row_equals_its_single_prompt_run(family, dtype, pair):
    target, drafter = pair(family, dtype)
    batch = prompts(LENGTHS, seed=1)
    want = [generate(target, None, p, max_new_tokens=16, stop_token_ids=[]).tokens for p in batch]
    got = generate_batch(target, None, batch, max_new_tokens=16, stop_token_ids=[])
    assert [r.tokens for r in got] == want, "target-only batch"
    accepted = 0
    # the heuristic schedule gives the rows different k within a round (the per-row caps); float32 also constant k
    schedules = [{"num_draft_tokens": 3, "schedule": "constant"}] if dtype == "float32" else []
    for options in schedules + [{"schedule": "heuristic"}]:
        single = [generate(target, drafter, p, max_new_tokens=16, stop_token_ids=[], **options) for p in batch]
        rows = generate_batch(target, drafter, batch, max_new_tokens=16, stop_token_ids=[], **options)
        for i, (row, alone) in enumerate(zip(rows, single)):
            assert row.tokens == want[i], f"row {i} {options}"
            assert row.stats.rounds == alone.stats.rounds, f"row {i} {options}: per-row caps keep each row's rounds"
            assert row.stats.target_forward_passes == alone.stats.target_forward_passes
            assert row.stats.prompt_tokens == len(batch[i])
        accepted += sum(n for row in rows for _, n in row.stats.rounds)
    assert accepted > 0


@pytest.mark.parametrize("finished,draft_length", [("drop", "max"), ("keep", "max"), ("drop", "min"),
                                                   ("keep", "min")])
def test_rows_that_stop_early_leave_the_others_unchanged(finished, draft_length, pair):
    """Rows stop at a stop token at different rounds; whether finished rows are dropped or kept frozen, and
    whatever the batch's k rule, every row gives its single-prompt tokens (the k rule may change its rounds)."""
    target, drafter = pair("e2b", "bfloat16")
    batch = prompts((9, 40, 17, 3, 25), seed=2)
    free = generate(target, None, batch[1], max_new_tokens=24, stop_token_ids=[]).tokens
    stops = [free[6]]  # row 1 stops at its 7th token at the latest; the others wherever this token appears
    want = [generate(target, None, p, max_new_tokens=24, stop_token_ids=stops).tokens for p in batch]
    assert len({len(w) for w in want}) > 1, "rows must finish at different rounds"
    rows = generate_batch(target, drafter, batch, max_new_tokens=24, stop_token_ids=stops, schedule="heuristic",
                          finished=finished, draft_length=draft_length)
    assert [r.tokens for r in rows] == want
    if draft_length == "max":
        for row, prompt in zip(rows, batch):
            alone = generate(target, drafter, prompt, max_new_tokens=24, stop_token_ids=stops, schedule="heuristic")
            assert row.stats.rounds == alone.stats.rounds


def test_auto_rows_that_decode_beside_drafting_rows_are_exact(pair):
    """`auto` over a ragged batch: every row's greedy tokens are its single-prompt target-only tokens, including
    rounds where a row drafts nothing (k = 0: one token left in its budget) while others draft. The batch drafts
    one k for all rows (each row is allowed all of it, up to its budget: speculative/schedule.py), so such rounds
    come from the budgets: several budgets make sure some happen."""
    from speculative.schedule import FixedCosts

    target, drafter = pair("e4b", "bfloat16")
    batch = prompts((9, 40, 17, 3, 25), seed=4)
    mixed = 0
    for budget in (18, 19, 20, 21):
        want = [generate(target, None, p, max_new_tokens=budget, stop_token_ids=[]).tokens for p in batch]
        rows = generate_batch(target, drafter, batch, max_new_tokens=budget, stop_token_ids=[], num_draft_tokens=5,
                              costs=FixedCosts(0.1, lambda T: 1.0 + 0.002 * T))
        assert [r.tokens for r in rows] == want, budget
        passes = [r.stats.draft_lengths for r in rows]  # row b's k in every round (all rows start together)
        rounds = range(max(map(len, passes)))
        mixed += sum({ks[r] == 0 for ks in passes if r < len(ks)} == {True, False} for r in rounds)
        assert sum(n for r in rows for _, n in r.stats.rounds) > 0
    assert mixed > 0


def test_a_batch_of_one_is_generate(pair):
    target, drafter = pair("31b", "float32")
    prompt = prompts((21,), seed=3)[0]
    for options in ({}, {"temperature": 0.8, "top_k": 50, "seed": 5}):
        alone = generate(target, drafter, prompt, max_new_tokens=16, schedule="heuristic", stop_token_ids=[],
                         **options)
        [row] = generate_batch(target, drafter, [prompt], max_new_tokens=16, schedule="heuristic",
                               stop_token_ids=[], **options)
        assert (row.tokens, row.stats.rounds) == (alone.tokens, alone.stats.rounds)


def test_bad_batches_are_refused_naming_the_problem(pair):
    target, drafter = pair("31b", "float32")
    with pytest.raises(ValueError, match=r"prompts\[1\]: input_ids is empty"):
        generate_batch(target, drafter, [[5, 6], [], [7]], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[0\]: input_ids holds token id 99999"):
        generate_batch(target, drafter, [[99999]], max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty list"):
        generate_batch(target, drafter, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="finished must be one of"):
        generate_batch(target, drafter, [[5]], max_new_tokens=4, finished="pad")
    with pytest.raises(ValueError, match="draft_length must be one of"):
        generate_batch(target, drafter, [[5]], max_new_tokens=4, draft_length="mean")


# ---- the per-row state after every round ------------------------------------------------------------------------
class ScriptedBatchDrafter:
    """A batched stub drafter. Row b proposes its greedy continuation `sequences[b]` where `agree(b, round, step)`
    says so and a wrong token otherwise. Which cache row is which prompt follows from the rows' budgets (`on_round`
    counts what each has emitted; finished rows leave the batch unless `finished == "keep"`)."""

    sliding_history = 9
    generation_config: dict = {}

    def __init__(self, sequences, agree, budget: int, finished: str = "drop"):
        self.sequences, self.agree, self.budget, self.finished = sequences, agree, budget, finished
        self.emitted = [0] * len(sequences)
        self.rounds = [-1] * len(sequences)
        self._hidden = None

    def on_round(self, index, info):
        self.emitted[index] += len(info.emitted)

    def context(self, position, views):
        return None

    def step(self, target, token, hidden, position, views, context=None):
        B, V = token.shape[0], target.config.vocab_size
        if hidden is not self._hidden:  # a new round: which cache row is which prompt
            self.rows = [b for b in range(len(self.sequences))
                         if self.finished == "keep" or self.emitted[b] < self.budget]
            assert len(self.rows) == B
            self.j = 0
            for i, b in enumerate(self.rows):
                self.rounds[b] += 1
                self.new_round(i, b, token, hidden, position, views)
        self.j += 1
        logits = torch.zeros(B, 1, V)
        for i, b in enumerate(self.rows):
            at = int(position[i]) + self.j
            right = self.sequences[b][at] if at < len(self.sequences[b]) else 0
            logits[i, 0, right if self.agree(b, self.rounds[b], self.j) else (right + 1) % V] = 10.0
        self._hidden = torch.zeros(B, 1, target.config.hidden_size)
        return SimpleNamespace(logits=logits, hidden=self._hidden)

    def new_round(self, i, b, token, hidden, position, views):
        """Called for cache row i (prompt b) at the start of every round."""


class RowCheckingDrafter(ScriptedBatchDrafter):
    """`ScriptedBatchDrafter` that, at the start of every round, recomputes each row on its own, without a batch,
    and checks what the loop hands it: the row's last token, the target's hidden state before it and the K/V of
    exactly the row's accepted positions (a rejected draft or another row's data fails it)."""

    def __init__(self, target, sequences, agree, budget: int, finished: str):
        super().__init__(sequences, agree, budget, finished)
        self.target, self.checked = target, 0

    def new_round(self, i, b, token, hidden, position, views):
        self._check_row(i, b, int(token[i]), hidden[i], int(position[i]), views)

    def _check_row(self, i, b, token, hidden, position, views):
        seq = self.sequences[b]
        assert token == seq[position], f"row {b}: its last token sits at its own position"
        ref = self.reference(b, position)
        torch.testing.assert_close(hidden, ref["hidden"], atol=1e-4, rtol=1e-5)
        for kind, view in views.items():
            held = view.positions[i]
            visible = held[held >= 0].tolist()
            if kind == FULL:
                assert visible == list(range(position)), f"row {b}: exactly its accepted positions"
            else:
                assert max(visible) == position - 1 and set(range(max(0, position - 9), position)) <= set(visible)
            for slot, p in zip(torch.nonzero(held >= 0).flatten().tolist(), visible):
                torch.testing.assert_close(view.k[i, :, slot], ref[kind][0][:, p], atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(view.v[i, :, slot], ref[kind][1][:, p], atol=1e-4, rtol=1e-5)
        self.checked += 1

    @functools.cache
    def reference(self, b: int, position: int) -> dict:
        """Row b alone: hidden state at position - 1 and every position's K/V (a ring that holds them all)."""
        ids = torch.tensor([self.sequences[b][:position]])
        cache = self.target.new_cache(max_length=position, max_rollback=0, min_sliding_history=position)
        out = {"hidden": self.target(ids, cache).hidden_states[0, -1:]}
        for kind, view in cache.views().items():
            order = view.positions[0].argsort()[-position:]  # the slots of positions 0..position-1, in order
            out[kind] = (view.k[0][:, order], view.v[0][:, order])
        return out


@pytest.mark.parametrize("family", ["e2b", "moe"])
@pytest.mark.parametrize("finished", ["drop", "keep"])
def test_every_rows_state_equals_a_per_row_recomputation_after_every_round(family, finished, pair):
    target, _ = pair(family, "float32")
    lengths = (4, 27, 12, 75)
    batch = prompts(lengths, seed=4)
    budget = 18
    sequences = [p + generate(target, None, p, max_new_tokens=budget + 40, stop_token_ids=[]).tokens
                 for p in batch]
    patterns = [random.Random(f"{family}-{b}") for b in range(len(batch))]
    table = {}

    def agree(b, r, j):  # a random per-row pattern, the same whenever asked again
        if (b, r, j) not in table:
            table[b, r, j] = patterns[b].random() < (0.2, 0.5, 0.8, 0.95)[b]
        return table[b, r, j]

    with torch.inference_mode():
        stub = RowCheckingDrafter(target, sequences, agree, budget, finished)
        rows = generate_batch(target, stub, batch, max_new_tokens=budget, num_draft_tokens=4, schedule="heuristic",
                              stop_token_ids=[], finished=finished, on_round=stub.on_round)
    for b, row in enumerate(rows):
        assert row.tokens == sequences[b][len(batch[b]):][:budget]
        assert len({n for _, n in row.stats.rounds}) > 1  # ragged: partial acceptances
    assert stub.checked >= sum(len(r.stats.rounds) for r in rows)


# ---- sampling ---------------------------------------------------------------------------------------------------
class BatchTableDrafter:
    """TableDrafter of tests/test_sampling_lossless.py for a batch: logits from a fixed random table indexed by
    (position, step, input token), row by row."""

    sliding_history = 9
    generation_config: dict = {}

    def __init__(self, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(32, 8, SAMPLING_V, SAMPLING_V, generator=gen) * 1.5
        self._hidden, self._step = None, 0

    def context(self, position, views):
        return None

    def step(self, target, token, hidden, position, views, context=None):
        self._step = self._step + 1 if hidden is self._hidden else 0
        self._hidden = torch.zeros(token.shape[0], 1, target.config.hidden_size)
        logits = self.table[position[:, 0], self._step, token[:, 0]]  # [B, V]
        return SimpleNamespace(logits=logits[:, None], hidden=self._hidden)


def sample_batches(target, n_batches: int, batch: int) -> torch.Tensor:
    """[n_batches, batch, 2] tokens (t2, t3) of every row."""
    out = []
    for seed in range(n_batches):
        rows = generate_batch(target, BatchTableDrafter(), [SAMPLING_PROMPT] * batch, max_new_tokens=4,
                              num_draft_tokens=2, schedule="constant", temperature=1.0, seed=seed, stop_token_ids=[])
        out.append(torch.tensor([r.tokens[1:3] for r in rows]))
    return torch.stack(out)


def _pair_counts(t2: torch.Tensor) -> torch.Tensor:
    """[V, V] counts of (t2 of row 2i, t2 of row 2i + 1) over all batches."""
    pairs = t2.reshape(-1, 2)
    return torch.bincount(pairs[:, 0] * SAMPLING_V + pairs[:, 1], minlength=SAMPLING_V ** 2).view(SAMPLING_V, -1)


def test_batched_sampling_gives_each_row_the_target_distribution_independently(sampling_target):
    """40 rows x 20 seeds: the rows' (t2, t3) follow the exact joint law, and pairs of rows are independent
    (their t2 pairs follow the product of the exact marginals)."""
    exact = exact_joint_t2_t3(sampling_target, temperature=1.0)
    tokens = sample_batches(sampling_target, 20, 40)
    counts = torch.bincount(tokens[..., 0].flatten() * SAMPLING_V + tokens[..., 1].flatten(),
                            minlength=SAMPLING_V ** 2).view(SAMPLING_V, -1)
    assert chi_square_p_value(counts, exact) > GOOD_P
    marginal = exact.sum(1)
    assert chi_square_p_value(_pair_counts(tokens[..., 0]), marginal[:, None] * marginal[None, :]) > GOOD_P


def test_rows_sharing_one_draw_are_detected(sampling_target, monkeypatch):
    """The broken variant: one token drawn per round for the whole batch (rows not independent)."""
    real = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda probs, gen: real(probs[:1], gen).expand(probs.shape[0]))
    exact = exact_joint_t2_t3(sampling_target, temperature=1.0)
    tokens = sample_batches(sampling_target, 10, 30)
    marginal = exact.sum(1)
    assert chi_square_p_value(_pair_counts(tokens[..., 0]), marginal[:, None] * marginal[None, :]) < BROKEN_P


def test_a_capped_row_is_rejection_sampling_over_its_own_drafts():
    """A row with caps = 1 of a batch that drafted 2: after accepting its one draft, its next token comes from p_1
    (what it would draw had it drafted 1), not from the residual max(0, p_1 - q_1) of the draft it never made."""
    p = torch.tensor([[[0.1, 0.8, 0.1], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4]]])  # [1, k+1 = 3, V]
    q = torch.tensor([[[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]])  # [1, k = 2, V]: draft 0 always accepted (p = q)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        drafts = torch.stack([sampling.draft_token(q[:, j], gen) for j in range(2)], dim=1)  # [1, 2]
        n, token = accept_sampled(p, q, drafts, gen, caps=torch.tensor([1]))
        assert int(n) <= 1
        if int(n) == 1:
            counts[int(token)] += 1
    assert chi_square_p_value(counts, p[0, 1]) > GOOD_P


# ---- near max_position_embeddings -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_target(tmp_path_factory):
    """The e2b family with max_position_embeddings = 64."""
    folder = tiny.save(tiny.build_target("e2b", seed=0, max_position_embeddings=64),
                       tmp_path_factory.mktemp("short") / "target", eos_token_id=())
    return load_target(folder)


@pytest.mark.parametrize("finished", ["drop", "keep"])
def test_a_row_near_the_position_limit_does_not_shorten_the_others_drafts(finished, short_target):
    """Row 0 ends exactly at max_position_embeddings (prompt 40 + 24 new tokens = 64) and accepts every draft;
    row 1 is short and rejects every draft, so it lags behind. Each row drafts what it drafts alone, round for
    round: row 0's nearness to the limit (or, kept frozen, its being at it) does not clamp row 1's k."""
    target, budget, k = short_target, 24, 8
    batch = prompts((40, 5), seed=5)
    sequences = [p + generate(target, None, p, max_new_tokens=budget, stop_token_ids=[]).tokens for p in batch]
    agree = [True, False]
    alone = [generate(target, ScriptedBatchDrafter([s], lambda *_, a=a: a, budget), p, max_new_tokens=budget,
                      num_draft_tokens=k, schedule="constant", stop_token_ids=[])
             for s, a, p in zip(sequences, agree, batch)]
    stub = ScriptedBatchDrafter(sequences, lambda b, *_: agree[b], budget, finished)
    rows = generate_batch(target, stub, batch, max_new_tokens=budget, num_draft_tokens=k, schedule="constant",
                          stop_token_ids=[], finished=finished, on_round=stub.on_round)
    for b, (row, single) in enumerate(zip(rows, alone)):
        assert row.tokens == single.tokens == sequences[b][len(batch[b]):], f"row {b}"
        assert row.stats.rounds == single.stats.rounds, f"row {b}: the rounds it has alone"
        assert row.stats.target_forward_passes == single.stats.target_forward_passes
    assert alone[1].stats.rounds == [(min(k, budget - 1 - n), 0) for n in range(1, budget - 1)], "k, or the budget"
