#!/usr/bin/env python
"""The draft-length schedules compared without timing noise: record what a round accepts and costs, then replay.

    python scripts/replay_schedules.py --record replay.json      # measure (a few minutes, 1 thread), then replay
    python scripts/replay_schedules.py --replay replay.json      # replay a recording again (seconds)

On a shared 2-core machine the same computation runs up to 15 % faster or slower from one run to the next, more than
the differences between good draft lengths (BENCHMARKS.md section 10). But under greedy decoding most of what a
schedule's tokens/s depends on is not noisy at all:
- the text is the target's greedy text whatever the schedule, and so are the drafts: the drafter proposes from the
  accepted text alone, one draft after another, so the first j of K drafts at a position are the j drafts a round of
  j would propose. A row's accepted count at position p is min(k, A(p)), where A(p) is how many of K drafts agree
  with the target there: a property of the text, recorded once per position (one round of K drafts after a prefill
  of the prompt and the first p - 1 new tokens: prefill and decode give the same bits, docs/loop.md);
- a round's seconds depend on the batch's rows B and on k alone: measured once per (B, k), as the median of
  interleaved repeats and then the least-squares line in k per B (a line, because each extra draft adds one drafter
  step and one verify row). The seconds are the generating thread's CPU time, as `auto` times its rounds, so that
  other programs' load does not enter the recording.
A replay then runs each schedule's own decisions (the real `AutoPlanner` for `auto`, with the recorded costs in
place of its measured ones) against those counts and costs, in arithmetic: every cell's tokens/s without noise, so
that what `auto` loses to the best constant N is the policy's loss, not the machine's. What it leaves out is what
the measured runs add: `auto`'s own noisy measurements of the costs, and the run-to-run spread.

Each cell replays as the measured grid runs it: the first B prompts as one batch, rows dropped as they finish (B
shrinks: costs between measured batch sizes are interpolated), and `auto` replays two generations in a row (the
second starts from the first's acceptance, as a process's later generations do); the second one counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from speculative import generate_batch  # noqa: E402
from speculative.schedule import AutoPlanner, MeasuredCosts, fit_line  # noqa: E402

BATCHES = (1, 4, 8, 16)
COST_BATCHES = (1, 2, 4, 8, 16)


def accepted_counts(target, drafter, prompts: list[list[int]], new: int, k_max: int) -> list[list[int]]:
    """A[b][p]: how many of k_max drafts the target accepts in row b's round after its first p new tokens
    (p = 1..new - 1; A[b][0] is unused: the prefill chooses the first token)."""
    reference = [r.tokens for r in generate_batch(target, None, prompts, max_new_tokens=new, stop_token_ids=[])]
    counts = [[0] * new for _ in prompts]
    for p in range(1, new):
        rounds: dict[int, list[int]] = {}
        generate_batch(target, drafter, [prompt + ref[:p - 1] for prompt, ref in zip(prompts, reference)],
                       max_new_tokens=k_max + 2, stop_token_ids=[], schedule="constant", num_draft_tokens=k_max,
                       on_round=lambda b, info: rounds.setdefault(b, []).append(info.accepted))
        for b in range(len(prompts)):
            counts[b][p] = rounds[b][1]  # report 0 is the prefill's token, report 1 the first round
    return counts


def round_costs(target, drafter, prompts: list[list[int]], k_max: int, repeats: int) -> dict[int, list[float]]:
    """{B: [seconds of a round with k drafts, k = 0..k_max]}: medians of `repeats` interleaved generations (rows
    kept, so that B stays), smoothed to the least-squares line in k (never falling: `fit_line`). Seconds of the
    generating thread's CPU time, as `auto` measures its rounds (speculative/schedule.py, `RoundClock`): other
    programs' load does not enter the recording."""
    samples: dict[tuple[int, int], list[float]] = {}
    for _ in range(repeats):
        for batch in COST_BATCHES:
            for k in range(k_max + 1):
                out = generate_batch(target, drafter if k else None, prompts[:batch],
                                     max_new_tokens=4 * (k + 1) + 2, stop_token_ids=[], finished="keep",
                                     schedule="constant", num_draft_tokens=max(k, 1))
                stats = out[0].stats
                samples.setdefault((batch, k), []).append(stats.decode_cpu_seconds / len(stats.draft_lengths))
    costs = {}
    for batch in COST_BATCHES:
        line = fit_line({k: (statistics.median(samples[batch, k]), 1) for k in range(k_max + 1)})
        costs[batch] = [line(k) for k in range(k_max + 1)]
    return costs


def record(args) -> dict:
    from benchmark import held_out_prompts, prose_prompts
    from weights import load_drafter, load_target

    torch.set_num_threads(args.threads)
    models = ROOT / "tiny_gemma4"
    dtype = getattr(torch, args.dtype)
    target = load_target(models / "target", dtype=dtype)
    drafter = load_drafter(models / "drafter", target=target, dtype=dtype)
    prompts = {"code": held_out_prompts(models, max(BATCHES), args.prompt),
               "prose": prose_prompts(models, max(BATCHES), args.prompt)}
    load = [os.getloadavg()[0]]
    counts = {name: accepted_counts(target, drafter, p, args.new, args.k_max) for name, p in prompts.items()}
    costs = round_costs(target, drafter, prompts["code"], args.k_max, args.repeats)
    load.append(os.getloadavg()[0])
    return {"dtype": args.dtype, "new": args.new, "k_max": args.k_max, "load": load, "counts": counts,
            "costs": {str(b): c for b, c in costs.items()}}


def cost(costs: dict[int, list[float]], batch: int, k: int) -> float:
    """Seconds of a round of `batch` rows and k drafts, interpolated between the measured batch sizes."""
    if batch in costs:
        return costs[batch][k]
    low, high = max(b for b in costs if b < batch), min(b for b in costs if b > batch)
    return costs[low][k] + (costs[high][k] - costs[low][k]) * (batch - low) / (high - low)


class RecordedCosts(MeasuredCosts):
    """`auto`'s costs taken from the recording (its acceptance carried across generations as MeasuredCosts does)."""

    def __init__(self, costs: dict[int, list[float]]):
        super().__init__()
        self.recorded = costs

    def add(self, batch: int, k: int, draft_seconds: float, rest_seconds: float) -> None:
        pass

    def calibration(self, batch: int, k_max: int) -> None:
        return None

    def drafting(self, batch: int, k: int) -> float:
        return 0.0  # the recorded seconds are whole rounds: all of it in `rest`

    def rest(self, batch: int, size: int) -> float:
        return cost(self.recorded, batch, size - 1)


def replay(counts: list[list[int]], costs: dict[int, list[float]], new: int, k_max: int, n: int | None,
           auto_costs: RecordedCosts | None = None, log: dict | None = None) -> tuple[float, list[int]]:
    """(decode tokens/s, the k of every round) of one generation: constant N = n, or `auto` (n None), as the loop
    runs it (speculative/loop.py): row b may accept min(k, its room) drafts, finished rows are dropped. `log`
    collects each row's accepted counts, round by round."""
    planner = AutoPlanner(k_max, auto_costs, torch.device("cpu")) if n is None else None
    rows = [{"out": 1, "acceptance": planner.new_row() if planner else None} for _ in counts]
    seconds, ks = 0.0, []
    while active := [b for b, row in enumerate(rows) if row["out"] < new]:
        rooms = [new - rows[b]["out"] - 1 for b in active]
        k_each = planner.plan([rows[b]["acceptance"] for b in active], rooms).k if planner else n
        wants = [min(k_each, room) for room in rooms]
        k = max(wants)
        if planner:
            planner.clock.drafted()
        for b, want in zip(active, wants):
            accepted = min(want, counts[b][rows[b]["out"]])
            if planner:
                planner.record(rows[b]["acceptance"], want, accepted)
            rows[b]["out"] = min(new, rows[b]["out"] + accepted + 1)
            if log is not None:
                log.setdefault(b, []).append(accepted)
        seconds += cost(costs, len(active), k)
        ks.append(k)
        if planner:
            planner.finish(len(active), k)
    return (new - 1) * len(counts) / seconds, ks


def report(data: dict) -> list[str]:
    new, k_max = data["new"], data["k_max"]
    costs = {int(b): c for b, c in data["costs"].items()}
    lines = ["| prompts | B | target only | " + " | ".join(f"N={n}" for n in range(1, k_max + 1))
             + " | auto (mean k) | auto / target only | auto / best N |", "|---" * (k_max + 6) + "|"]
    ratios = []
    for scenario, counts in data["counts"].items():
        for batch in BATCHES:
            rows = counts[:batch]
            rates = {n: replay(rows, costs, new, k_max, n)[0] for n in range(k_max + 1)}
            auto_costs = RecordedCosts(costs)
            for _ in range(2):  # the second generation starts from the first's acceptance
                auto, ks = replay(rows, costs, new, k_max, None, auto_costs)
            best = max(range(1, k_max + 1), key=rates.get)
            ratios.append((auto / rates[best], auto / rates[0], scenario, batch))
            lines.append(f"| {scenario} | {batch} | {rates[0]:.1f} | "
                         + " | ".join(f"{rates[n]:.1f}" for n in range(1, k_max + 1))
                         + f" | {auto:.1f} ({statistics.mean(ks):.1f}) | {auto / rates[0]:.2f} | "
                         f"{auto / rates[best]:.3f} (N={best}) |")
    worst = min(ratios)
    lines += ["", f"auto / best N: worst {worst[0]:.3f} ({worst[2]}, B = {worst[3]}), mean "
              f"{statistics.mean(r[0] for r in ratios):.3f}; auto / target only: worst "
              f"{min(r[1] for r in ratios):.2f}. Recording: {data['dtype']}, {new} new tokens per row, K = {k_max}, "
              f"load {data['load'][0]:.1f} -> {data['load'][1]:.1f}."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", type=Path, help="measure the bundled pair and write the recording here")
    p.add_argument("--replay", type=Path, help="replay a recording")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (as the measured grid)")
    p.add_argument("--new", type=int, default=64, help="new tokens per row (as the measured grid)")
    p.add_argument("--k-max", type=int, default=8, help="the largest k: auto's and the constant N's")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each cost measurement")
    args = p.parse_args(argv)
    if (args.record is None) == (args.replay is None):
        p.error("give one of --record FILE and --replay FILE")
    if args.record:
        data = record(args)
        args.record.write_text(json.dumps(data))
    else:
        if not args.replay.is_file():
            p.error(f"--replay: no such file: {args.replay}")
        data = json.loads(args.replay.read_text())
    print("\n".join(report(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
