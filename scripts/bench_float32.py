#!/usr/bin/env python
"""What row-invariant float32 products cost (gemma4/kernels.py, `set_row_invariant_float32`) on the CPU.

    python scripts/bench_float32.py                  # bundled target and an E2B-shaped model, 1 thread
    python scripts/bench_float32.py --only bundled --threads 2 --reps 21

"default" is float32's default path (row blocks for a few tokens, F.linear otherwise: MKL, whose rows depend on the
row count); "invariant" is oneDNN's inner product, the path bfloat16 always takes. Timed: a one-token decode step
and a 5-token verify pass after a 100-token prompt (the forwards of a generation loop), and, on the bundled pair, a
whole greedy speculative `generate` (128 new tokens, N = 8). The paths take turns, one call each, so that a slow
spell of a shared machine hits both alike; the table gives medians and the machine's load average. The E2B-shaped
model has E2B's geometry and vocabulary with 5 layers (4 sliding + 1 full) and random weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from gemma4.kernels import set_row_invariant_float32  # noqa: E402
from speculative import generate  # noqa: E402
from weights import load_drafter, load_target  # noqa: E402


@torch.inference_mode()
def forward_seconds(model, prompt: torch.Tensor, tokens: int, invariant: bool) -> float:
    set_row_invariant_float32(invariant)
    cache = model.new_cache(max_length=prompt.shape[1] + tokens, max_rollback=tokens)
    model(prompt, cache, logits_to_keep=1)
    ids = prompt[:, :tokens]
    start = time.perf_counter()
    model(ids, cache)
    return time.perf_counter() - start


def generate_seconds(target, drafter, prompt: list[int], invariant: bool) -> float:
    set_row_invariant_float32(invariant)
    start = time.perf_counter()
    generate(target, drafter, prompt, max_new_tokens=128, num_draft_tokens=8, schedule="constant", stop_token_ids=[])
    return time.perf_counter() - start


def row(name: str, what: str, timings: dict) -> str:
    default, invariant = statistics.median(timings[False]) * 1e3, statistics.median(timings[True]) * 1e3
    return f"| {name} | {what} | {default:.2f} | {invariant:.2f} | {invariant / default:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["bundled", "e2b"], help="one model (default: both)")
    parser.add_argument("--reps", type=int, default=11, help="calls per path and case (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), {args.reps} calls per cell, load average at start {os.getloadavg()[0]:.1f}\n")
    print("| model | call | default ms | invariant ms | invariant / default |")
    print("|---|---|---:|---:|---:|")
    prompt = torch.randint(2, 4000, (1, 100), generator=torch.Generator().manual_seed(0))
    for name in ["bundled", "e2b"] if args.only is None else [args.only]:
        if name == "bundled":
            model = load_target(ROOT / "tiny_gemma4" / "target")
        else:
            from bench_linear import e2b_model

            model = e2b_model(torch.float32)
        for tokens, what in ((1, "decode step"), (5, "verify pass, 5 tokens")):
            timings = {False: [], True: []}
            for rep in range(args.reps + 1):
                for invariant in (False, True):
                    seconds = forward_seconds(model, prompt, tokens, invariant)
                    if rep:  # the first of each is a warm-up
                        timings[invariant].append(seconds)
            print(row(name, what, timings), flush=True)
        if name == "bundled":
            drafter = load_drafter(ROOT / "tiny_gemma4" / "drafter", target=model, dtype=model.dtype)
            timings = {False: [], True: []}
            for rep in range(max(3, args.reps // 3) + 1):
                for invariant in (False, True):
                    seconds = generate_seconds(model, drafter, prompt[0].tolist(), invariant)
                    if rep:
                        timings[invariant].append(seconds)
            print(row(name, "speculative generate, 128 tokens", timings), flush=True)
        del model
    set_row_invariant_float32(False)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
