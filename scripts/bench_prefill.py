#!/usr/bin/env python
"""What the CPU prefill in pieces costs (gemma4/kernels.py, `prefill_pieces`) against one pass over the prompt.

    python scripts/bench_prefill.py                       # bundled target and an E2B-shaped model, 300 and 2048
    python scripts/bench_prefill.py --only bundled --lengths 300 --reps 7

"pieces" is the library as it is: a prompt of more than 64 positions runs as pieces of 64, each computed as a verify
pass is, so that a position's K/V and logits do not depend on how the prompt was split. "one pass" is the code
before that: the whole prompt in one forward (products over all its rows, attention through SDPA over the sliding
layers' [ring; prompt] keys). Both prefill a fresh cache and keep the last position's logits, as `generate` does.
The two take turns, one prefill each, so that a slow spell of a shared machine hits both alike; the table gives
medians and the machine's load average. The E2B-shaped model has E2B's geometry and vocabulary with 5 layers
(4 sliding + 1 full, no KV sharing) and random weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import gemma4.model  # noqa: E402
from bench_linear import e2b_model  # noqa: E402  (E2B's geometry, 5 layers, random weights)
from weights import load_target  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor, one_pass: bool) -> float:
    cache = model.new_cache(max_length=ids.shape[1])
    with mock.patch.object(gemma4.model, "prefill_pieces", lambda *a: None) if one_pass else _nothing():
        start = time.perf_counter()
        model(ids, cache, logits_to_keep=1)
        return time.perf_counter() - start


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["bundled", "e2b"], help="one model (default: both)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[300, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bundled bfloat16 float16 "
                        "float32, e2b bfloat16")
    parser.add_argument("--reps", type=int, default=3, help="prefills per path and case (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), {args.reps} prefills per cell, load average at start "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| model | dtype | prompt | one pass ms | pieces ms | pieces / one pass |")
    print("|---|---|---|---:|---:|---:|")
    for name in ["bundled", "e2b"] if args.only is None else [args.only]:
        dtypes = args.dtypes or (["bfloat16", "float16", "float32"] if name == "bundled" else ["bfloat16"])
        for dtype in dtypes:
            model = (load_target(ROOT / "tiny_gemma4" / "target", dtype=DTYPES[dtype]) if name == "bundled"
                     else e2b_model(DTYPES[dtype]))
            for length in args.lengths:
                ids = torch.randint(2, 4000, (1, length), generator=torch.Generator().manual_seed(length))
                prefill_seconds(model, ids, True), prefill_seconds(model, ids, False)  # warm-up
                times = {True: [], False: []}
                for _ in range(args.reps):
                    for one_pass in (True, False):
                        times[one_pass].append(prefill_seconds(model, ids, one_pass))
                one, pieces = statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3
                print(f"| {name} | {dtype} | {length} | {one:.0f} | {pieces:.0f} | {pieces / one:.2f} |", flush=True)
            del model
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
