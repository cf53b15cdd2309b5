"""What a generation returns: the new tokens, per-round records and statistics, and a CUDA-aware stopwatch.

Counting conventions (every test's closed forms rely on them):
- `rounds` holds one [drafted, accepted] pair per *drafting* round (a round whose k is 0, because the budget left
  room for the target's own token only, drafted nothing and is not listed). `accepted` is what the target verified,
  before the emitted block is cut at a stop token or the budget.
- `target_forward_passes` counts the prefill and every decode pass (one per round, drafting or not);
  `draft_lengths` holds the k of every decode pass (0 included), and under `auto` `expected_tokens_per_second` what
  each choice expected (RoundInfo).
- `decode_tokens` counts the tokens emitted by decode passes: all new tokens but the first, which the prefill chose.
  So `mean_tokens_per_pass` is 1.0 for target-only decoding and k + 1 when every draft is accepted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class RoundInfo:
    """Reported to `on_round` once per round (and for the prefill's token): what the drafter proposed, how many
    the target accepted, its bonus token, and the tokens actually added to the output (after stop/budget cuts).
    `bonus` is None when the cut removed it."""

    drafted: list[int]
    accepted: int
    bonus: int | None
    emitted: list[int]
    # schedule "auto": the expected new tokens per second of the round's choice of k (len(drafted)) for this row,
    # from the cost model and the row's acceptance estimates; None for the other schedules and calibration rounds
    expected_tokens_per_second: float | None = None


@dataclass
class GenerationStats:
    rounds: list[tuple[int, int]] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)  # the k of every decode pass, 0 included
    expected_tokens_per_second: list[float] = field(default_factory=list)  # auto: of each round's choice
    target_forward_passes: int = 0
    drafter_steps: int = 0
    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0  # prompt tokens whose K/V a continued cache already held (not prefilled again)
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    compile_seconds: float = 0.0  # generate(..., compile=True): compiling the steps' shapes, before decoding
    decode_seconds: float = 0.0
    # the calling thread's CPU seconds over the same span: on a CPU that other programs share, the decode's cost
    # without the time it waited for a core (scripts/benchmark.py times the schedules with both)
    decode_cpu_seconds: float = 0.0

    @property
    def drafted(self) -> int:
        return sum(d for d, _ in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(a for _, a in self.rounds)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_tokens_per_pass(self) -> float:
        """Tokens emitted per decode target pass (prefill excluded)."""
        passes = self.target_forward_passes - 1
        return self.decode_tokens / passes if passes > 0 else 0.0

    @property
    def prompt_tokens_processed(self) -> int:
        """Prompt tokens the prefill ran (all of them unless a cache was continued)."""
        return self.prompt_tokens - self.prompt_tokens_reused

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens_processed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens emitted by decode passes per decode second."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """Plain JSON-ready dict: the fields plus the derived rates."""
        out = asdict(self)
        out["rounds"] = [list(r) for r in self.rounds]
        for name in ("prompt_tokens_processed", "acceptance_rate", "mean_tokens_per_pass", "prefill_tokens_per_second",
                     "tokens_per_second"):
            out[name] = getattr(self, name)
        return out


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only, the prompt excluded
    stats: GenerationStats


class Stopwatch:
    """Wall-clock laps with time.perf_counter; on CUDA, waits for queued kernels first so a lap holds their time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.last = self._now()
        self.cpu_start = time.thread_time()

    def since_start(self) -> float:
        return self._now() - self.start

    def cpu_since_start(self) -> float:
        """The calling thread's CPU seconds since the watch started (time.thread_time)."""
        return time.thread_time() - self.cpu_start

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
