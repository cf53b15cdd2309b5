#!/usr/bin/env python
"""How long `generate(..., compile=True)` takes to warm up, in a first process (empty caches) and a second one.

    python scripts/bench_warmup.py                       # float32, 1 thread, schedules auto and heuristic
    python scripts/bench_warmup.py --schedule auto --processes 3

Each process is a fresh Python that loads the bundled pair and runs one compiled speculative generation; it reports
`stats.compile_seconds` (the warm-up inside `generate`), its own wall time from start to exit, its CPU time, and the
graphs dynamo compiled. All processes of one schedule share a cache folder that starts empty (inductor's on-disk
cache, `speculative.compiled.cache_dir()`), so the first process compiles everything and the later ones show what
the cache saves. Run it on a quiet machine: wall seconds on a loaded one are mostly waiting for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(schedule: str, threads: int, dtype: str) -> None:
    """One process's warm-up, printed as a JSON line."""
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import torch
    from torch._dynamo.utils import counters

    from speculative import generate
    from weights import load_drafter, load_target

    torch.set_num_threads(threads)
    target = load_target(ROOT / "tiny_gemma4" / "target", dtype=getattr(torch, dtype))
    drafter = load_drafter(ROOT / "tiny_gemma4" / "drafter", target=target, dtype=target.dtype)
    imported = time.perf_counter() - start
    ids = list(range(2, 122))
    result = generate(target, drafter, ids, max_new_tokens=32, schedule=schedule, stop_token_ids=[], compile=True)
    print(json.dumps({"compile_seconds": result.stats.compile_seconds, "import_and_load_seconds": imported,
                      "graphs": counters["stats"]["unique_graphs"], "tokens": result.tokens}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", action="append", choices=["auto", "heuristic", "constant"],
                        help="schedules to measure (default: auto and heuristic)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    schedules = args.schedule or ["auto", "heuristic"]
    if args.child:
        child(schedules[0], args.threads, args.dtype)
        return
    print(f"load average before: {os.getloadavg()}")
    for schedule in schedules:
        folder = tempfile.mkdtemp(prefix="warmup-")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=folder + "/inductor", XDG_CACHE_HOME=folder + "/xdg")
        tokens = None
        for n in range(1, args.processes + 1):
            t0, c0 = time.perf_counter(), os.times()
            out = subprocess.run([sys.executable, __file__, "--child", "--schedule", schedule, "--threads",
                                  str(args.threads), "--dtype", args.dtype], env=env, check=True,
                                 capture_output=True, text=True).stdout
            wall, c1 = time.perf_counter() - t0, os.times()
            report = json.loads(out.strip().splitlines()[-1])
            same = tokens is None or report["tokens"] == tokens
            tokens = tokens or report["tokens"]
            cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
            print(f"{schedule} process {n}: compile_seconds {report['compile_seconds']:.1f} s, process wall "
                  f"{wall:.1f} s (import and load {report['import_and_load_seconds']:.1f} s), CPU {cpu:.1f} s, "
                  f"graphs {report['graphs']}, same tokens as process 1: {same}, load {os.getloadavg()[0]:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
