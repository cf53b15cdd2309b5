"""The `auto` schedule (speculative/schedule.py): the draft length that maximises expected tokens per second.

Oracles: closed forms of the cost model. With acceptance a at every position, a round of k drafts emits
E(k) = (1 - a^(k+1)) / (1 - a) tokens on average (k + 1 when a = 1) and costs k c_d + c_v(k + 1). With a = 1 and an
affine verify cost v0 + v1 (k + 1), (k + 1) / (k (c_d + v1) + v0 + v1) rises with k iff c_d < v0: the best k is
the largest when the drafter step is cheaper than the verify pass's fixed part, and 0 when it is dearer, whatever
the acceptance. The loop's choices are checked against these with `FixedCosts` (deterministic) and drafters whose
acceptance is scripted (tests/test_speculative.py's ScriptedDrafter); exactness against target-only output, and the
output law under sampling with a chi-square test (tests/test_sampling_lossless.py's machinery).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from speculative import generate, schedule
from speculative.schedule import (CARRIED_TRIALS, DECAY, MAX_DRAFT_TOKENS, PRIOR_WEIGHT, PROBE_AFTER,
                                  PROBE_MAX, PROBE_SHARE, SAMPLES_KEPT, STALE_DECAY, Acceptance, AutoPlanner,
                                  FixedCosts, MeasuredCosts, RoundClock, best_draft_length, fit_line, fit_plane)
from tests.test_sampling_lossless import (GOOD_P, TableDrafter, chi_square_p_value, exact_joint_t2_t3,
                                          sample_t2_t3)
from tests.test_sampling_lossless import target as target  # noqa: F401 (the fixture)
from tests.test_speculative import always, first, never, run


def expected(a: float, K: int) -> list[float]:
    return [k + 1.0 if a == 1 else (1 - a ** (k + 1)) / (1 - a) for k in range(K + 1)]


@pytest.mark.parametrize("a", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("c_d,v0,v1", [(0.05, 1.0, 0.0), (0.3, 1.0, 0.02), (1.5, 1.0, 0.0), (0.01, 1.0, 0.3)])
def test_best_draft_length_is_the_cost_models_optimum(a, c_d, v0, v1):
    K = 8
    k, tokens, seconds = best_draft_length([expected(a, K)], lambda B, j: j * c_d, lambda B, S: v0 + v1 * B * S)
    rates = [e / (j * c_d + v0 + v1 * (j + 1)) for j, e in enumerate(expected(a, K))]
    # brute force over the closed form: the best rate's k (the smallest on a tie)
    assert k == min(j for j in range(K + 1) if rates[j] >= max(rates) * (1 - 1e-9))
    assert tokens / seconds == pytest.approx(rates[k])
    if a == 1:  # the closed form: the largest k iff c_d < v0, else 0
        assert k == (K if c_d < v0 else 0)
    if a == 0:
        assert k == 0  # nothing is ever accepted: any draft only costs


def test_the_best_rate_wins_and_a_tie_goes_to_the_smaller_k():
    """Rates 1.00, 1.01, 1.015 (k = 0, 1, 2): k = 2, however small its lead; 1.0, 1.5, 1.5: k = 1 (a larger k that
    brings nothing more is not drafted)."""
    rest, free, dear = (lambda B, S: 1.0), (lambda B, k: 0.0), (lambda B, k: 0.1 * k)
    assert best_draft_length([[1.0, 1.01, 1.015]], free, rest)[0] == 2
    assert best_draft_length([[1.0, 1.5, 1.5]], free, rest)[0] == 1
    assert best_draft_length([[1.0, 1.5, 1.5]], dear, rest)[0] == 1


def test_a_batch_chooses_one_k_for_the_sum_of_its_rows():
    """Two rows, one accepting everything, one nothing: sum_b E_b(k) = (k + 1) + 1; frozen rows add to the cost."""
    c_d, v = 0.4, (lambda B, S: 1.0 + 0.05 * B * S)
    drafting = (lambda B, k: k * c_d)
    K = 6
    k, _, _ = best_draft_length([expected(1.0, K), expected(0.0, K)], drafting, v)
    rates = [(j + 2) / (j * c_d + v(2, j + 1)) for j in range(K + 1)]
    assert k == min(j for j in range(K + 1) if rates[j] >= max(rates) * (1 - 1e-9))
    k3, _, seconds = best_draft_length([expected(1.0, K), expected(0.0, K)], drafting, v, frozen=3)
    assert seconds == pytest.approx(k3 * c_d + v(5, k3 + 1))


def test_measured_costs_drop_each_shapes_first_round_and_fit_a_line():
    costs = MeasuredCosts()
    step, rest = (lambda B: 0.002 * B), (lambda T: 0.01 + 0.003 * T)
    done = []
    for _ in range(6):
        k = costs.calibration(4, 8)
        if k is None:
            break
        done.append(k)
        costs.add(4, k, k * step(4), rest(4 * (k + 1)))
    assert done == [8, 8, 0, 0]  # a drafter step and the longest verify pass, then decode; each twice
    assert costs.drafter_step(4) == pytest.approx(0.008)
    # never drafted at 8 rows: 4 rows' step, scaled as decode scales from 4 to 8 rows (0.034 / 0.022)
    assert costs.drafter_step(8) == pytest.approx(0.008 * rest(8) / rest(4))
    for S in (1, 2, 5, 9):  # exact costs on a line: the fit reproduces them, measured or not
        assert costs.rest(4, S) == pytest.approx(rest(4 * S))
    assert costs.rest(4, 12) == pytest.approx(rest(4 * 9))  # beyond the longest pass measured: flat (optimistic)
    assert costs.rest(2, 3) == pytest.approx(rest(6))  # a batch size never seen: the line in T = B x S
    for _ in range(SAMPLES_KEPT):  # a count measured often enough is its own median, off the line
        costs.add(4, 2, 2 * step(4), 1.0)
    assert costs.rest(4, 3) == 1.0 and costs.rest(4, 1) < 1.0
    costs.add(2, 0, 0.0, 5.0)  # batch 2's own rounds at two sizes: its own line in S, not the line in T
    costs.add(2, 0, 0.0, 5.0)
    costs.add(2, 2, 2 * step(2), 6.0)
    costs.add(2, 2, 2 * step(2), 6.0)
    assert costs.rest(2, 2) == pytest.approx(5.5) and costs.rest(2, 5) == pytest.approx(6.0)
    assert fit_line({1: (5.0, 3), 2: (4.0, 1)})(7) == pytest.approx(4.75)  # a falling fit: flat at the mean


def test_drafting_is_a_line_in_k_with_a_fixed_part_per_round():
    """A round's drafting costs a part paid once per round (the inputs every step reads) plus one part per step:
    exact costs F + s k measured at k = 8, 2 and 3 are reproduced at every k, measured or not (flat beyond the
    longest measured, as the rest's line). k times the median cost per step of those rounds would spread F over
    the k of the rounds measured and overestimate long drafts. A batch size drafted at one length only scales it
    in proportion to k."""
    F, s = 0.5e-3, 0.3e-3
    costs = MeasuredCosts()
    for k in (8, 2, 3):
        for _ in range(3):  # the first of each (B, k) is dropped
            costs.add(1, k, F + s * k, 0.003)
    assert costs.drafting(1, 0) == 0.0
    for k in range(1, 9):
        assert costs.drafting(1, k) == pytest.approx(F + s * k)
    assert costs.drafting(1, 12) == pytest.approx(F + s * 8)
    assert 8 * costs.drafter_step(1) > 1.25 * (F + 8 * s)  # the per-step median: (F + 3 s) / 3 here
    for _ in range(3):
        costs.add(4, 4, 4e-3, 0.01)
    assert costs.drafting(4, 2) == pytest.approx(2e-3)
    assert costs.drafting(4, 6) == pytest.approx(6e-3)


def test_the_cpu_round_clock_counts_this_threads_work_and_not_its_waits():
    """A wait for a core (another program's turn) is time this thread does not run, as in a sleep: the clock that
    times `auto`'s rounds on the CPU leaves it out, while the wall clock counts it."""
    clock = RoundClock(torch.device("cpu"))
    x = torch.randn(256, 256)
    clock.start()
    wall = time.perf_counter()
    busy = time.thread_time()
    while time.thread_time() - busy < 0.05:  # at least 50 ms of this thread's work
        x = torch.tanh(x @ x / 256)
    clock.drafted()
    time.sleep(0.2)
    drafting, rest = clock.stop()
    assert time.perf_counter() - wall >= 0.25
    assert 0.05 <= drafting < 0.2
    assert rest < 0.02


def test_a_batch_size_without_its_own_line_takes_the_plane_through_all_batch_sizes():
    """Exact costs a + b B + c B (k + 1) measured at (B, k + 1) = (1, 1), (1, 9), (16, 9): the plane reproduces
    them at any batch size (flat beyond the longest pass measured), where the line in T alone cannot (it has no
    cost per row). A fit with a negative slope falls back to the line in T."""
    y = (lambda B, S: 0.02 + 0.004 * B + 0.001 * B * S)
    costs = MeasuredCosts()
    for B, S in ((1, 1), (1, 9), (16, 9)):
        for _ in range(3):  # the first is dropped
            costs.add(B, S - 1, 0.001 * (S - 1), y(B, S))
    for B, S in ((8, 3), (16, 1), (4, 9), (2, 5)):
        assert costs.rest(B, S) == pytest.approx(y(B, S))
    assert costs.rest(8, 12) == pytest.approx(y(8, 9))
    assert fit_plane({(1, 1): (1.0, 1), (1, 9): (2.0, 1), (16, 9): (1.5, 1)}) is None  # b < 0
    assert fit_plane({(1, 1): (1.0, 1), (2, 1): (2.0, 1), (4, 1): (3.0, 1)}) is None  # (B, T) on one line


def test_a_generation_starts_from_the_pairs_recent_acceptance():
    """MeasuredCosts pools acceptance per position across generations; a new planner starts its batch's pool from
    it, each position scaled to at most CARRIED_TRIALS trials (with FixedCosts: nothing, the prior 1/2)."""
    costs = MeasuredCosts()
    assert AutoPlanner(4, costs, torch.device("cpu")).pool.trials == [0.0] * 4
    for drafted, accepted in ((3, 3), (3, 1)):  # (one row each round)
        round_ = Acceptance(MAX_DRAFT_TOKENS)
        round_.count(drafted, accepted)
        costs.observe(round_)
    # position 1: hit, hit; position 2: hit, miss; position 3: hit, untried (faded once in between)
    hits, trials = [DECAY + 1, DECAY, DECAY, 0], [DECAY + 1, DECAY + 1, DECAY, 0]
    pool = AutoPlanner(4, costs, torch.device("cpu")).pool
    for j in range(4):
        scale = min(1.0, CARRIED_TRIALS / trials[j]) if trials[j] else 0.0
        assert pool.hits[j] == pytest.approx(hits[j] * scale) and pool.trials[j] == pytest.approx(trials[j] * scale)
    assert AutoPlanner(4, FixedCosts(1.0, lambda T: 1.0), torch.device("cpu")).pool.trials == [0.0] * 4


def test_each_rows_estimate_borrows_the_batchs_rate_at_the_same_position():
    """Brute force of the estimates: r = the batch's rate over all positions, shrunk to 1/2; the other rows' alpha_j
    = (H_j - h_{b,j} + W r) / (T_j - t_{b,j} + W); row b's alpha_{b,j} = (h_{b,j} + W alpha_j) / (t_{b,j} + W),
    W = PRIOR_WEIGHT. A row that has not drafted yet (row 2) takes the batch's estimates from the first round on."""
    K, W = 4, PRIOR_WEIGHT
    planner = AutoPlanner(K, FixedCosts(0.1, lambda T: 1.0 + 0.01 * T), torch.device("cpu"))
    rows = [planner.new_row() for _ in range(3)]
    outcomes = [[(4, 4), (4, 1)], [(4, 2), (4, 4)], [(0, 0), (0, 0)]]  # (drafted, accepted) per round
    for r in range(2):
        planner.plan(rows, [10] * 3)
        planner.clock.drafted()
        for row, rounds in zip(rows, outcomes):
            planner.record(row, *rounds[r])
        planner.finish(3, 4)
    plan = planner.plan(rows, [10] * 3)

    def counts(rounds):  # decayed (hits, trials) per position, brute force over the rounds
        h, t = [0.0] * K, [0.0] * K
        for drafted, accepted in rounds:
            if drafted:
                h, t = [x * DECAY for x in h], [x * DECAY for x in t]
                for j in range(K):
                    reached = j < drafted and j <= accepted
                    t[j] += reached
                    h[j] += reached and j < accepted
        return h, t

    H = [0.0] * K
    T = [0.0] * K
    for r in range(2):  # the pool fades once per round and adds every row's round
        H, T = [x * DECAY for x in H], [x * DECAY for x in T]
        for rounds in outcomes:
            h, t = counts([rounds[r]])
            H, T = [a + b for a, b in zip(H, h)], [a + b for a, b in zip(T, t)]
    rate = (sum(H) + 1) / (sum(T) + 2)
    batch = [(H[j] + W * rate) / (T[j] + W) for j in range(K)]
    E = []
    for rounds in outcomes:
        h, t = counts(rounds)
        others = [(H[j] - h[j] + W * rate) / (T[j] - t[j] + W) for j in range(K)]  # the batch less this row
        alphas = [(h[j] + W * others[j]) / (t[j] + W) for j in range(K)]
        E.append([1 + sum(math.prod(alphas[: i + 1]) for i in range(k)) for k in range(K + 1)])
    seconds = [k * 0.1 + 1.0 + 0.01 * 3 * (k + 1) for k in range(K + 1)]
    rates = [sum(e[k] for e in E) / seconds[k] for k in range(K + 1)]
    best = min(k for k in range(K + 1) if rates[k] >= max(rates) * (1 - 1e-9))
    assert plan.k == best
    assert plan.rates == pytest.approx([e[best] / seconds[best] for e in E])
    assert E[2] == pytest.approx([1 + sum(math.prod(batch[: i + 1]) for i in range(k)) for k in range(K + 1)])


def stale_position_rounds(stale_decay: float, monkeypatch) -> tuple[list[int], AutoPlanner]:
    """Four rows, K = 4, c_d = 0.3, v(T) = 1 + 0.02 T: two rounds in which every row accepts draft 1 and rejects
    draft 2, then ten in which every row accepts all it drafts. Returns the k of each round and the planner."""
    monkeypatch.setattr(schedule, "STALE_DECAY", stale_decay)
    planner = AutoPlanner(4, FixedCosts(0.3, lambda T: 1.0 + 0.02 * T), torch.device("cpu"))
    rows = [planner.new_row() for _ in range(4)]
    ks = []
    for r in range(12):
        k = planner.plan(rows, [100] * 4).k
        ks.append(k)
        planner.clock.drafted()
        for row in rows:
            planner.record(row, k, min(k, 1) if r < 2 else k)
        planner.finish(4, k)
    return ks, planner


def test_a_position_no_row_reached_fades_faster_so_an_old_rejection_does_not_hold_k_down(monkeypatch):
    """Position 2 was rejected by every row, so `auto` drafts 1; the text then turns predictable, but rounds of
    k = 1 never reach position 2, so its estimate would only fade at DECAY a round, as if rejections ten rounds old
    still held. The batch's counts at a position no row reached fade by DECAY * STALE_DECAY instead (brute force of
    the counts below), and `auto` drafts past position 1 again after one round of k = 1; with STALE_DECAY = 1 it
    stayed at k = 1 for six (a bfloat16 grid cell of 16 rows drafted k = 1 for 13 rounds where N = 3 was best)."""
    ks, planner = stale_position_rounds(STALE_DECAY, monkeypatch)
    assert ks[2] == 1 and min(ks[3:]) >= 2, ks  # k = 1 after the rejections, more from the next round on
    H, T = [0.0] * 4, [0.0] * 4
    for r, k in enumerate(ks):  # the pool's counts, brute force: 4 rows a round, each reaching min(accepted + 1, k)
        accepted = min(k, 1) if r < 2 else k
        reached = min(accepted + 1, k)
        decay = [DECAY if j < reached else DECAY * STALE_DECAY for j in range(4)]
        H = [h * d + 4 * (j < accepted) for j, (h, d) in enumerate(zip(H, decay))]
        T = [t * d + 4 * (j < reached) for j, (t, d) in enumerate(zip(T, decay))]
    assert planner.pool.hits == pytest.approx(H) and planner.pool.trials == pytest.approx(T)
    old, _ = stale_position_rounds(1.0, monkeypatch)
    assert old[2:8] == [1] * 6, old  # the old fade: k = 1 for six rounds of fully accepted drafts


def test_auto_drafts_the_largest_k_when_the_drafter_is_cheap_and_drafts_are_accepted():
    """c_d = 0.05 < v0 = 1: with a = 1 the optimum is K. The estimates start at 1/2 and climb."""
    result, reports, ref = run("31b", always, 60, num_draft_tokens=5, schedule="auto",
                               costs=FixedCosts(0.05, lambda T: 1.0))
    assert result.tokens == ref
    ks = result.stats.draft_lengths
    assert ks[-1] <= ks[-2] and all(k == 5 for k in ks[3:-2]), ks  # the end is the budget's
    assert all(r.expected_tokens_per_second > 0 for r in reports[1:])


def test_auto_never_drafts_when_the_drafter_cannot_pay_however_good_its_drafts():
    """c_d > v0 = 1: k = 0 is optimal for any acceptance, so auto decodes and drafts one token only in the probes:
    after PROBE_AFTER rounds of k = 0, then twice as many, ... up to PROBE_MAX, and never before the probe's extra
    cost (c_d + v(2) - v(1) = c_d) is within PROBE_SHARE of the rounds waited (c_d / 0.02 rounds)."""
    for agree, step in ((always, 1.1), (never, 1.5)):
        result, _, ref = run("31b", agree, 200, num_draft_tokens=4, schedule="auto",
                             costs=FixedCosts(step, lambda T: 1.0))
        assert result.tokens == ref
        probes, wait, idle = [], PROBE_AFTER, 0
        for r in range(len(result.stats.draft_lengths)):
            idle += 1
            if idle >= max(wait, step / PROBE_SHARE):
                probes.append(r)
                idle, wait = 0, min(2 * wait, PROBE_MAX)
        ks = result.stats.draft_lengths
        assert set(ks) == {0, 1} and [r for r, k in enumerate(ks) if k] == probes[: ks.count(1)], ks


def test_auto_settles_on_the_optimum_of_the_acceptance_it_sees():
    """Drafts 1 and 2 always accepted, 3 never: the optimum of E(k) / (0.2 k + 1) with alpha = (1, 1, 0, ...) is
    k = 2 (E = 3; k = 3 adds no token and costs 0.2). (With a far cheaper drafter the estimate of alpha_3, which
    never falls below ~0.2 with 4 pseudo-trials against ~10 rounds of memory, can tip it to 3 at a cost of ~1%.)"""
    result, _, ref = run("e2b", first(2), 90, num_draft_tokens=6, schedule="auto",
                         costs=FixedCosts(0.2, lambda T: 1.0))
    assert result.tokens == ref
    E = [1, 2, 3, 3, 3, 3, 3]
    optimum = max(range(7), key=lambda k: (E[k] / (0.2 * k + 1), -k))
    assert optimum == 2
    late = result.stats.draft_lengths[10:-2]
    assert max(set(late), key=late.count) == optimum and min(late) >= optimum, result.stats.draft_lengths


def test_auto_sampling_matches_the_target_distribution(target):  # noqa: F811
    """k chosen from earlier rounds (round 1 drafts 1 from the prior, where k = 1 and 2 tie; round
    2 none or 2, as round 1's outcome makes worthwhile): the joint law of (t2, t3) is still the target's."""
    costs = FixedCosts(0.2, lambda T: 1.0)
    exact = exact_joint_t2_t3(target, temperature=1.0)
    counts, accepted = sample_t2_t3(target, TableDrafter(), 600, num_draft_tokens=2, temperature=1.0,
                                    schedule="auto", costs=costs)
    assert accepted > 60
    assert chi_square_p_value(counts, exact) > GOOD_P
    lengths = {tuple(generate(target, TableDrafter(), [1, 2, 3, 4, 5], max_new_tokens=12, seed=seed,
                              stop_token_ids=[], num_draft_tokens=2, temperature=1.0, schedule="auto",
                              costs=costs).stats.draft_lengths[:3]) for seed in range(20)}
    assert len(lengths) > 1 and {0, 1, 2} <= {k for ks in lengths for k in ks}  # k follows each run's history


def test_auto_with_fixed_costs_repeats_seeded_sampling_draw_for_draw(target):  # noqa: F811
    def once(seed):
        r = generate(target, TableDrafter(), [1, 2, 3, 4, 5], max_new_tokens=20, num_draft_tokens=3,
                     temperature=1.0, seed=seed, stop_token_ids=[], costs=FixedCosts(0.2, lambda T: 1.0))
        return r.tokens, r.stats.draft_lengths

    assert once(4) == once(4)


def test_costs_apply_to_auto_only():
    with pytest.raises(ValueError, match="costs applies to schedule='auto' only"):
        run("31b", always, 4, schedule="heuristic", costs=FixedCosts(1.0, lambda T: 1.0))
