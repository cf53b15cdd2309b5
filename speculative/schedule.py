"""How many tokens to draft each round (docs/loop.md#schedules; transformers ignores its own, docs/transformers.md).

- `auto` (default): before every round, the k that maximises the expected new tokens per second, from measured
  costs and each row's own acceptance (below).
- `constant`: k every round.
- `heuristic`: all drafted tokens accepted -> k + 2; any rejected -> max(1, k - 1). A round that drafted nothing
  (the budget allowed only the target's own token) leaves k unchanged.
k never exceeds MAX_DRAFT_TOKENS: a verify pass over k + 1 tokens costs about one decode step only while k is small
(the weights are read once for all rows), and the cache reserves max_rollback = k_max + 1 ring slots per sliding
layer. The loop additionally clamps each round's k to the remaining budget and positions.

`auto`, in three parts:
- **Costs** (`MeasuredCosts`): the drafting of a round as a function of the rows B and the draft length k, and the
  rest of a round (the verify pass, acceptance, the host sync, the bookkeeping) as a function of B and the verify
  length k + 1. Both are medians of the latest rounds of this process with this target and drafter, timed around the
  phases the loop runs anyway (`RoundClock`: no extra host sync; on the CPU the calling thread's CPU time, which the
  load of other programs does not inflate; on CUDA the drafting phase is timed with events that the round's one sync
  completes). A (B, k) or (B, k + 1) with fewer rounds than half of SAMPLES_KEPT takes the least-squares line in k
  through that B's medians instead (on a busy machine a few rounds are noisy; the line pools them). Drafting is a line
  with an intercept, not k times a step: a round first builds what every step reads (the cache's views, their masks
  and rotary tables: `Drafter.context`), once. Measured (compiled, bundled pair, 1 thread): 0.80 ms for k = 1 and
  2.80 ms for k = 8, ~0.5 ms a round plus ~0.29 ms a step; k times the cost per step of rounds of 3 drafts (0.46 ms)
  would put k = 8 at 3.7 ms. A B measured at fewer than two draft lengths scales its drafting in proportion to k, and
  its rest takes the plane a + b B + c B (k + 1) through every measured (B, k + 1)'s median (a cost per row, such as
  its cache and bookkeeping, and one per token row; the line in T = B (k + 1) alone while the plane is not
  determined). Drafting at a batch size never drafted is the nearest measured size's, scaled as the target's decode
  step scales between them. Beyond the longest round measured the lines stay flat: an optimistic guess, which the
  round that tries it measures (a pessimistic one would never be tried, and never corrected). A process's first rounds
  with a pair measure what is missing: k = K, then k = 0, twice each (the first time a shape runs holds one-off costs,
  so it is not kept). `FixedCosts` takes the costs as given instead: then `auto`'s choices depend on past acceptance
  alone (deterministic: the tests, and seeded sampling that must repeat draw for draw; with measured costs a seed
  repeats the law, not every draw).
- **Acceptance** (`Acceptance`): alpha_j, the probability that draft j is accepted given that drafts 1..j-1 were,
  per row, from that row's rounds: position j counts one trial whenever drafts 1..j-1 were accepted, a hit when j was
  too. All counts fade by DECAY per round that brings evidence, so a row follows its text (code, then prose); the
  batch's counts at a position that no row reached in a round fade STALE_DECAY times more, so that rejections seen
  before a run of short drafts, which never reach that position, do not hold k down once the text turns
  predictable (a bfloat16 grid cell of 16 rows drafted 1 token for 13 rounds where 3 were best). Each
  row's estimate at position j is shrunk towards the batch's estimate at position j (the other rows' counts pooled:
  a row shrunk towards its own counts would count them twice, and alone in its batch it would trust one round as
  if it were three), and that towards the batch's rate over all positions, itself shrunk to 1/2 (PRIOR_WEIGHT
  pseudo-trials each; one pseudo-hit in two trials): from the first round a row borrows what the other rows show at
  each position (16 rows gather 16 rows' evidence a round), and its own rounds then move it. The batch's counts start
  from the pair's recent acceptance per position in this process (`MeasuredCosts.prior`, at most CARRIED_TRIALS
  trials a position: a new generation does not start blind); with `FixedCosts`, from nothing.
- **The choice** (`AutoPlanner.plan`): a round with k drafts costs d(B, k) + c_v(B (k + 1)) whatever each row's
  acceptance, and row b expects E_b(k) = 1 + sum_{i<=k} prod_{j<=i} alpha_{b,j} tokens from it (the bonus token
  included). E_b grows with k, so a row gets every draft the round computes (up to its budget): the batch's k is
  the k in 0..K with the largest sum_b E_b(k) / (d + c_v) (the smallest such k on a tie). k = 0 is a plain
  decode step. A rule that took the smallest k within 2% of the largest rate (the rate is often flat across several
  k, where the argmax follows the estimates' noise) drafted too little, and so did PRIOR_WEIGHT 2 (one rejection
  moved a row's estimate too far): replayed without timing noise on recorded acceptance and costs
  (scripts/replay_schedules.py, BENCHMARKS.md section 10), the argmax with PRIOR_WEIGHT 4 came closer to the best
  constant N of each cell, on average and in the worst cell.
  Exploration: after k = 0 was chosen PROBE_AFTER rounds in a row, one round drafts 1 token (a probe), so a row
  whose text became predictable shows it; the wait doubles after each probe (up to PROBE_MAX rounds) and comes back
  to PROBE_AFTER once `auto` drafts by itself, and it is never shorter than what keeps the probes' extra time
  within PROBE_SHARE of the decoding time (a costly drafter probes rarely).
Exactness: k only decides how many drafts the target verifies; greedy output is the target's for any k, and under
sampling every token's law is the target's given the tokens before it for any k fixed before the round's draws
(docs/loop.md#lossless-rejection-sampling); `auto`'s k is a function of earlier rounds and of clock readings,
never of this round's draws.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch

MAX_DRAFT_TOKENS = 32  # the largest k any schedule (or the user) may ask for
DEFAULT_DRAFT_TOKENS = 6  # when the drafter's generation_config has no num_assistant_tokens (released drafters: 6)
SCHEDULES = ("auto", "constant", "heuristic")
DEFAULT_SCHEDULE = "auto"

DECAY = 0.9  # auto: a row's acceptance counts fade by this per round with evidence (a memory of ~10 rounds)
PRIOR_WEIGHT = 4.0  # auto: pseudo-trials of the prior each estimate is shrunk towards
PROBE_AFTER, PROBE_MAX = 8, 64  # auto: rounds of k = 0 before a 1-token probe; the wait doubles up to PROBE_MAX
PROBE_SHARE = 0.02  # auto: and is long enough that probes take at most this share of the decoding time
SAMPLES_KEPT = 16  # auto: a cost is the median of this many latest rounds
CARRIED_TRIALS = 4.0  # auto: a generation starts from the pair's recent pooled acceptance, worth this many trials
STALE_DECAY = 0.1  # auto: the batch's counts at a position no row reached in a round fade by DECAY * STALE_DECAY


def next_num_draft_tokens(schedule: str, k: int, drafted: int, accepted: int) -> int:
    """The k of the next round, given this round's scheduled k and its [drafted, accepted] counts (constant and
    heuristic; `auto` plans each round with AutoPlanner)."""
    if schedule != "heuristic" or drafted == 0:
        return k
    if accepted == drafted:
        return min(k + 2, MAX_DRAFT_TOKENS)
    return max(1, k - 1)


def max_num_draft_tokens(schedule: str, k: int) -> int:
    """The largest k a round can use under this schedule (it sizes the cache's rollback room): `auto` chooses in
    0..k, `constant` drafts k, `heuristic` may grow to MAX_DRAFT_TOKENS."""
    return MAX_DRAFT_TOKENS if schedule == "heuristic" else k


# ---- costs --------------------------------------------------------------------------------------------------------
class MeasuredCosts:
    """Seconds of a round's drafting (by batch rows B and draft length k) and of the rest of a round (by B and the
    verify length k + 1), medians of the latest SAMPLES_KEPT rounds per count; kept per (target, drafter) for the
    whole process (`measured_costs`)."""

    fixed = False

    def __init__(self):
        self._step: dict[int, deque] = {}  # B -> seconds per drafter step (a round's drafting / k)
        self._drafting: dict[tuple[int, int], deque] = {}  # (B, k) -> seconds of a round's k drafter steps
        self._rest: dict[int, deque] = {}  # T -> seconds of verify + acceptance + sync + bookkeeping
        self._seen: set = set()  # keys whose first (warm-up) sample was dropped
        self._rest_by_batch: dict[tuple[int, int], deque] = {}  # (B, k + 1) -> seconds of the rest
        self._tables: tuple[dict, dict] | None = None
        self._lines: dict = {}  # ("rest" | "drafting", B): B's own line; "plane": across B (while no round is added)
        self.acceptance = Acceptance(MAX_DRAFT_TOKENS)  # pooled over the pair's latest rounds, every generation

    def observe(self, round_: "Acceptance") -> None:
        """A round's counts per draft position, all rows together (faded as a row's counts are)."""
        self.acceptance.fade()
        self.acceptance.add(round_)

    def prior(self, k_max: int) -> "Acceptance":
        """The counts a new generation starts its batch's pool from: the pair's recent acceptance per position,
        each position scaled down to at most CARRIED_TRIALS trials (a hint that the generation's own rounds soon
        outweigh)."""
        carried = Acceptance(k_max)
        for j, (hit, trial) in enumerate(zip(self.acceptance.hits[:k_max], self.acceptance.trials[:k_max])):
            scale = min(1.0, CARRIED_TRIALS / trial) if trial else 0.0
            carried.hits[j], carried.trials[j] = hit * scale, trial * scale
        return carried

    def add(self, batch: int, k: int, draft_seconds: float, rest_seconds: float) -> None:
        """One round of `batch` rows that drafted k tokens each."""
        if k > 0:
            self._keep(self._step, ("step", batch), batch, draft_seconds / k)
            self._keep(self._drafting, ("drafting", batch, k), (batch, k), draft_seconds)
        self._keep(self._rest, ("rest", batch * (k + 1)), batch * (k + 1), rest_seconds)
        self._keep(self._rest_by_batch, ("rest", batch, k + 1), (batch, k + 1), rest_seconds)

    def _keep(self, table: dict, key, count: int | tuple[int, int], seconds: float) -> None:
        if key not in self._seen:  # a shape's first run holds one-off costs (allocation, kernel selection)
            self._seen.add(key)
            return
        table.setdefault(count, deque(maxlen=SAMPLES_KEPT)).append(seconds)
        self._tables, self._lines = None, {}

    def tables(self) -> tuple[dict, dict]:
        """({B: median seconds per drafter step}, {T: median seconds of the rest}) as measured so far."""
        if self._tables is None:
            self._tables = ({b: statistics.median(s) for b, s in self._step.items()},
                            {t: statistics.median(s) for t, s in self._rest.items()})
        return self._tables

    def calibration(self, batch: int, k_max: int) -> int | None:
        """The k a round must run to measure what is still missing (a drafter step and the longest verify pass,
        then a decode step: the line in k + 1 spans every length it is asked for), or None when every cost can be
        estimated."""
        step, rest = self.tables()
        if not step or len(rest) < 2 and batch * (k_max + 1) not in rest:
            return k_max
        if len(rest) < 2:
            return 0
        return None

    def drafter_step(self, batch: int) -> float:
        """Seconds per drafter step: the median at `batch` of a round's drafting over its k, else the nearest
        measured batch size's, scaled as the target's decode step scales between the two (both are small
        transformers run over the same rows)."""
        table = self.tables()[0]
        if batch in table:
            return table[batch]
        near = min(table, key=lambda b: (abs(b - batch), b))
        return table[near] * self.rest(batch, 1) / self.rest(near, 1)

    def drafting(self, batch: int, k: int) -> float:
        """Seconds of a round's k drafter steps over `batch` rows: this batch size's own median or line in k when
        it drafted at two lengths (a fixed part per round and one per step: see the module docstring), else k
        steps (`drafter_step`)."""
        if k == 0:
            return 0.0
        own = self._own("drafting", self._drafting, batch, k)
        return own if own is not None else k * self.drafter_step(batch)

    def rest(self, batch: int, size: int) -> float:
        """The rest of a round of `batch` rows verifying `size` = k + 1 tokens each: this batch size's own median
        or line in k when it has rounds at two sizes, else an estimate across batch sizes (`_across_batches`)."""
        own = self._own("rest", self._rest_by_batch, batch, size)
        return own if own is not None else self._across_batches(batch, size)

    def _own(self, name: str, table: dict, batch: int, x: int) -> float | None:
        """A batch size's estimate at x from its own rounds in `table` ({(B, x): seconds}): the median at x once x
        has SAMPLES_KEPT / 2 rounds, else the least-squares line in x through its medians (weighted by rounds,
        never falling, flat beyond the largest x measured); None while it has rounds at fewer than two x."""
        if (name, batch) not in self._lines:
            own = {n: s for (b, n), s in table.items() if b == batch}
            if len(own) < 2:
                self._lines[name, batch] = None
            else:
                medians = {n: statistics.median(s) for n, s in own.items()}
                line = fit_line({n: (medians[n], len(s)) for n, s in own.items()})
                self._lines[name, batch] = (medians, {n: len(s) for n, s in own.items()}, line)
        entry = self._lines[name, batch]
        if entry is None:
            return None
        medians, counts, line = entry
        return medians[x] if counts.get(x, 0) >= SAMPLES_KEPT // 2 else line(min(x, max(counts)))

    def _across_batches(self, batch: int, size: int) -> float:
        """A batch size measured at fewer than two lengths: its own median once it has SAMPLES_KEPT / 2 rounds,
        else the plane a + b B + c B (k + 1) through every measured (B, k + 1)'s median (weighted by rounds; flat
        beyond the longest pass measured), which keeps the cost of a row (its cache, its bookkeeping) apart from
        that of a token row; while fewer than two batch sizes are measured, or the plane's fit makes either slope
        negative, the line in T = B (k + 1)."""
        own = self._rest_by_batch.get((batch, size), ())
        if len(own) >= SAMPLES_KEPT // 2:
            return statistics.median(own)
        if "plane" not in self._lines:
            self._lines["plane"] = fit_plane({key: (statistics.median(s), len(s))
                                              for key, s in self._rest_by_batch.items()})
        plane = self._lines["plane"]
        if plane is None:
            return self._estimate(self._rest, 1, batch * size)
        return plane(batch, min(size, max(n for _, n in self._rest_by_batch)))

    def _estimate(self, samples: dict, which: int, x: int) -> float:
        """The median at x once x has SAMPLES_KEPT / 2 rounds, else the least-squares line through every count's
        median (weighted by its rounds, slope >= 0): a single count's few rounds on a busy machine are noisy,
        the line pools them."""
        table = self.tables()[which]
        if len(samples.get(x, ())) >= SAMPLES_KEPT // 2:
            return table[x]
        return fit_line({c: (table[c], len(s)) for c, s in samples.items()})(min(x, max(samples)))


class FixedCosts:
    """Costs given instead of measured: `drafter_step` seconds per drafter step (a number, or a function of the batch
    rows B; k drafts cost k steps, no part per round) and `rest`, the seconds of the rest of a round as a function of
    the verify pass's token rows T = B (k + 1). With these, `auto` is deterministic."""

    fixed = True

    def __init__(self, drafter_step, rest):
        self._step = drafter_step if callable(drafter_step) else (lambda batch: drafter_step)
        self._rest = rest

    def add(self, batch: int, k: int, draft_seconds: float, rest_seconds: float) -> None:
        pass

    def observe(self, round_: "Acceptance") -> None:
        pass

    def prior(self, k_max: int) -> "Acceptance":
        return Acceptance(k_max)

    def calibration(self, batch: int, k_max: int) -> None:
        return None

    def drafting(self, batch: int, k: int) -> float:
        return k * float(self._step(batch))

    def rest(self, batch: int, size: int) -> float:
        return float(self._rest(batch * size))


def fit_line(points: dict[int, tuple[float, int]]):
    """x -> a + b x, the weighted least-squares line through {x: (y, weight)} with b >= 0 (costs do not fall with
    more rows; a flat line through the weighted mean when the fit says they do, or there is one x)."""
    w = sum(n for _, n in points.values())
    mx = sum(x * n for x, (_, n) in points.items()) / w
    my = sum(y * n for y, n in points.values()) / w
    sxx = sum(n * (x - mx) ** 2 for x, (_, n) in points.items())
    slope = max(0.0, sum(n * (x - mx) * (y - my) for x, (y, n) in points.items()) / sxx) if sxx > 0 else 0.0
    return lambda x: max(1e-9, my + slope * (x - mx))


def fit_plane(points: dict[tuple[int, int], tuple[float, int]]):
    """(B, S) -> a + b B + c B S, the weighted least-squares plane through {(B, S): (y, weight)}, or None when the
    points do not determine it (fewer than two batch sizes, or lengths that do not vary apart from B) or the fit
    has b < 0 or c < 0 (costs do not fall with more rows)."""
    xy = [(b, b * n) for b, n in points]  # (B, T): the plane is determined iff these are not on one line
    (b0, t0), other = xy[0], next((q for q in xy if q != xy[0]), None)
    if other is None or all((b - b0) * (other[1] - t0) == (t - t0) * (other[0] - b0) for b, t in xy):
        return None
    rows = [((1.0, float(b), float(t)), y, w) for (b, t), (y, w) in zip(xy, points.values())]
    normal = torch.tensor([[sum(w * x[i] * x[j] for x, _, w in rows) for j in range(3)] for i in range(3)],
                          dtype=torch.float64)
    rhs = torch.tensor([sum(w * x[i] * y for x, y, w in rows) for i in range(3)], dtype=torch.float64)
    a, b, c = torch.linalg.solve(normal, rhs).tolist()
    if b < 0 or c < 0:
        return None
    return lambda batch, size: max(1e-9, a + b * batch + c * batch * size)


def measured_costs(target, drafter, compiled: bool) -> MeasuredCosts:
    """The process's MeasuredCosts of this pair (eager and compiled apart), kept on the target."""
    store = target.__dict__.setdefault("_round_costs", {})
    key = (id(drafter), compiled)
    if key not in store or store[key][0] is not drafter:
        store[key] = (drafter, MeasuredCosts())
    return store[key][1]


class RoundClock:
    """Times a round's drafting and the rest of it without a host sync of its own.

    On the CPU it reads the calling thread's CPU time (`time.thread_time`), not the wall clock. On a machine that
    other programs share, a round's wall time also holds the time this thread waited for a core: that depends on
    the others' load, not on k, and it drifts over minutes, so a length measured in a busy minute looked dearer
    than one measured in a quiet one, and `auto` never went back to it (scripts/replay_schedules.py; BENCHMARKS.md,
    section 10). The thread's CPU time leaves the wait out: one generation repeated at 1 thread beside two other
    busy processes spread 13-20 % (coefficient of variation) in wall time and 2-3 % in CPU time. With several
    intra-op threads the calling thread does its share of each op and waits at the op's end for the others, so
    its CPU time still follows the op's duration. On CUDA the drafting phase is timed with events (queued work,
    read after the round's sync, which completes them) and the rest with the host clock (the host waits for the
    device there); other devices use the host clock throughout."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.now = time.thread_time if device.type == "cpu" else time.perf_counter

    def start(self) -> None:
        self.t0 = self.now()
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e0.record()

    def drafted(self) -> None:
        if self.cuda:
            self.e1 = torch.cuda.Event(enable_timing=True)
            self.e1.record()
        else:
            self.t1 = self.now()

    def stop(self) -> tuple[float, float]:
        """(drafting seconds, rest seconds); call after the round's host sync."""
        total = self.now() - self.t0
        drafting = self.e0.elapsed_time(self.e1) / 1000 if self.cuda else self.t1 - self.t0
        return drafting, max(total - drafting, 0.0)


# ---- acceptance ---------------------------------------------------------------------------------------------------
class Acceptance:
    """Decayed acceptance counts per draft position 1..K: one row's, or pooled over rows (see the module
    docstring)."""

    def __init__(self, k_max: int):
        self.hits, self.trials = [0.0] * k_max, [0.0] * k_max  # index j - 1 for position j

    def fade(self, tried: int | None = None) -> None:
        """Every position fades by DECAY, tried or not, so that an old verdict is re-examined; with `tried`, the
        positions after the first `tried` (which the round did not reach) fade STALE_DECAY times more."""
        for j in range(len(self.hits)):
            decay = DECAY if tried is None or j < tried else DECAY * STALE_DECAY
            self.hits[j] *= decay
            self.trials[j] *= decay

    def tried(self) -> int:
        """How many positions have trials: a round's counts reach positions 1..j, those of every row together."""
        return sum(t > 0 for t in self.trials)

    def count(self, drafted: int, accepted: int) -> None:
        """A row's round that let it accept up to `drafted` drafts and accepted `accepted`: position j is a trial
        when drafts 1..j-1 were accepted, a hit when j was too."""
        for j in range(min(accepted + 1, drafted)):
            self.trials[j] += 1.0
            self.hits[j] += j < accepted

    def add(self, other: "Acceptance") -> None:
        for j in range(min(len(self.hits), len(other.hits))):
            self.hits[j] += other.hits[j]
            self.trials[j] += other.trials[j]

    def update(self, drafted: int, accepted: int) -> None:
        """A row's round (a round that drafted nothing for it brings no evidence and fades nothing)."""
        if drafted:
            self.fade()
            self.count(drafted, accepted)

    def rates(self, prior: list[float]) -> list[float]:
        """alpha_j per position: the counts shrunk towards prior[j] (PRIOR_WEIGHT pseudo-trials)."""
        return [(h + PRIOR_WEIGHT * p) / (t + PRIOR_WEIGHT) for h, t, p in zip(self.hits, self.trials, prior)]

    def rates_without(self, row: "Acceptance", rate: float) -> list[float]:
        """alpha_j of these pooled counts less one row's own (a row is not shrunk towards its own evidence: with
        one row that would count it twice), shrunk towards `rate`."""
        return [(max(0.0, h - rh) + PRIOR_WEIGHT * rate) / (max(0.0, t - rt) + PRIOR_WEIGHT)
                for h, t, rh, rt in zip(self.hits, self.trials, row.hits, row.trials)]

    def pooled_rate(self) -> float:
        """All positions together, shrunk to 1/2 (one pseudo-hit in two trials)."""
        return (sum(self.hits) + 1.0) / (sum(self.trials) + 2.0)


def expected_tokens(alphas: list[float]) -> list[float]:
    """[E(0), ..., E(K)]: expected tokens of a round with k drafts, 1 + sum_{i<=k} prod_{j<=i} alpha_j."""
    out, product = [1.0], 1.0
    for alpha in alphas:
        product *= alpha
        out.append(out[-1] + product)
    return out


@dataclass
class Plan:
    """A round's draft length k, and per row the expected tokens per second of the choice (None for rows that do
    not generate)."""

    k: int
    rates: list[float | None]


def best_draft_length(expected: list[list[float]], drafting, rest, frozen: int = 0) -> tuple[int, float, float]:
    """(k, sum_b E_b(k), seconds): the k in 0..K with the largest sum_b E_b(k) / (drafting(B, k) + rest(B, k + 1))
    (the smallest on a tie), where expected[b] = [E_b(0), ..., E_b(K)] (a row with less room repeats its last
    value), B = len(expected) + frozen rows that run without generating."""
    rows = len(expected) + frozen
    choices = [(k, sum(e[k] for e in expected), drafting(rows, k) + rest(rows, k + 1)) for k in range(len(expected[0]))]
    return max(choices, key=lambda c: (c[1] / c[2], -c[0]))


class AutoPlanner:
    """`auto` for one generation: the batch's pooled acceptance, the probe state, the costs and the round clock.
    Per round: `plan` (before drafting; starts the clock), `clock.drafted()`, then after the host sync `record` for
    every generating row and `finish` once."""

    def __init__(self, k_max: int, costs, device: torch.device):
        self.k_max, self.costs, self.clock = k_max, costs, RoundClock(device)
        self.pool = costs.prior(k_max)  # the batch's counts per position, all rows pooled
        self._round = Acceptance(k_max)  # this round's counts, all rows
        self.idle, self.wait = 0, PROBE_AFTER  # rounds with k = 0 since the last draft; rounds before a probe

    def new_row(self) -> Acceptance:
        return Acceptance(self.k_max)

    def plan(self, rows: list[Acceptance | None], rooms: list[int]) -> Plan:
        """The round's k for `rows` (None: a frozen row, which runs without generating), row b allowed `rooms[b]`
        drafts by its budget."""
        self.clock.start()
        live = [(row, room) for row, room in zip(rows, rooms) if row is not None]
        batch, frozen = len(rows), len(rows) - len(live)
        k_max = max(0, min(self.k_max, max(room for _, room in live)))
        calibration = self.costs.calibration(batch, self.k_max)
        if calibration is not None:
            return Plan(min(k_max, calibration), [None] * batch)
        rate = self.pool.pooled_rate()
        expected = []
        for row, room in live:
            e = expected_tokens(row.rates(self.pool.rates_without(row, rate)))[: min(room, k_max) + 1]
            expected.append(e + [e[-1]] * (k_max + 1 - len(e)))  # no drafts past the row's budget
        k, _, seconds = best_draft_length(expected, self.costs.drafting, self.costs.rest, frozen)
        if k > 0:
            self.idle, self.wait = 0, PROBE_AFTER
        elif k_max > 0:  # (k_max = 0: the budget leaves no room to draft; no choice was made)
            self.idle += 1
            # one draft, so that a row whose text turned predictable shows it
            probe = self.costs.drafting(batch, 1) + self.costs.rest(batch, 2)
            if self.idle >= max(self.wait, (probe - seconds) / (PROBE_SHARE * seconds)):
                k, self.idle, self.wait, seconds = 1, 0, min(2 * self.wait, PROBE_MAX), probe
        rates, i = [], 0
        for row in rows:
            rates.append(None if row is None else expected[i][k] / seconds)
            i += row is not None
        return Plan(k, rates)

    def record(self, row: Acceptance, drafted: int, accepted: int) -> None:
        """A generating row's round: it could accept up to `drafted` drafts and accepted `accepted`."""
        row.update(drafted, accepted)
        self._round.count(drafted, accepted)

    def finish(self, batch: int, k: int) -> None:
        """After the round's host sync (and its bookkeeping): the round's costs, and the pooled counts fade."""
        self.costs.add(batch, k, *self.clock.stop())
        if k:
            self.pool.fade(self._round.tried())
            self.pool.add(self._round)
            self.costs.observe(self._round)
        self._round = Acceptance(self.k_max)
