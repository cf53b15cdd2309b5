#!/usr/bin/env python
"""How many threads, and which OpenMP wait policy, for scripts/generate.py on a CPU that may be shared.

    python scripts/bench_threads.py                   # about 3 minutes on a quiet 2-core machine
    python scripts/bench_threads.py --repeats 5 --new-tokens 128

Decodes the bundled tiny pair (tiny_gemma4/, greedy, the bundled prompt) target-only and speculatively, and reports
tokens/s for each candidate setting, with the cores to itself ("quiet") and with busy-loop processes beside it
("busy"; --busy of them, started and killed by this script, each stopping by itself after --busy-seconds anyway).

Each candidate runs in its own worker process, started once: OpenMP reads OMP_WAIT_POLICY when it initialises, so a
policy cannot be changed inside a process. The workers take turns, one at a time, in an order rotated every repeat,
so slow drift of the machine hits every candidate alike. The figures are the median (min-max) over the repeats.
Nothing else should run meanwhile: any other load is an unplanned "busy" process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("target only", "speculative")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="measurements per candidate, mode and load (default 3)")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per measurement (default 96)")
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes in the 'busy' measurements (default 1)")
    p.add_argument("--busy-seconds", type=float, default=300.0,
                   help="a busy loop stops by itself after this long, even if this script is killed (default 300)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: run as a worker
    return p.parse_args(argv)


def candidates(cores: int) -> list[tuple[str, int, dict]]:
    """(label, threads, environment changes); None as a value removes the variable (OpenMP's own default).
    threads 0: generate.py's default, chosen before each measurement as a fresh run would."""
    out = [("generate.py default (free cores)", 0, {"OMP_WAIT_POLICY": None}),
           ("1 thread", 1, {"OMP_WAIT_POLICY": None}),
           (f"{cores} threads (all cores)", cores, {"OMP_WAIT_POLICY": None}),
           (f"{cores} threads, OMP_WAIT_POLICY=PASSIVE", cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
           ("free cores, OMP_WAIT_POLICY=PASSIVE", 0, {"OMP_WAIT_POLICY": "PASSIVE"})]
    if cores > 2:
        out.insert(1, (f"{cores - 1} threads", cores - 1, {"OMP_WAIT_POLICY": None}))
        out.insert(1, (f"{cores // 2} threads", cores // 2, {"OMP_WAIT_POLICY": None}))
    return out


def worker(threads: int, new_tokens: int) -> None:
    """Load the bundled pair, warm up, then answer each line on stdin ('target only' or 'speculative') with one
    JSON line holding the decode tokens/s."""
    sys.path.insert(0, str(ROOT))
    import torch

    from speculative import generate
    from weights import load_drafter, load_target, load_tokenizer

    sys.path.insert(0, str(ROOT / "scripts"))
    from generate import BUNDLED_PROMPT, default_threads

    torch.set_num_threads(threads or default_threads())
    target = load_target(ROOT / "tiny_gemma4" / "target")
    drafter = load_drafter(ROOT / "tiny_gemma4" / "drafter", target=target, dtype=target.dtype)

    ids = load_tokenizer(target.checkpoint_dir).encode(BUNDLED_PROMPT, add_bos=True)
    for d in (None, drafter):  # warm-up
        generate(target, d, ids, max_new_tokens=8)
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        mode = line.strip()
        if mode not in MODES:
            break
        if not threads:
            torch.set_num_threads(default_threads())
        result = generate(target, drafter if mode == "speculative" else None, ids, max_new_tokens=new_tokens,
                          stop_token_ids=())  # no stop token: every measurement decodes the same number of tokens
        print(json.dumps({"tokens_per_second": result.stats.tokens_per_second,
                          "threads": torch.get_num_threads()}), flush=True)


class Worker:
    def __init__(self, label: str, threads: int, env_changes: dict, new_tokens: int):
        env = dict(os.environ)
        for key, value in env_changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env.pop("OMP_NUM_THREADS", None)
        self.label, self.chooses = label, threads == 0
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(threads), "--new-tokens",
                                      str(new_tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        ready = json.loads(self.proc.stdout.readline())
        assert threads == 0 or ready["threads"] == threads, (label, ready)
        self.threads_used: dict = {}  # load -> the thread counts a default worker chose

    def measure(self, mode: str, load: str) -> float:
        self.proc.stdin.write(mode + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        self.threads_used.setdefault(load, []).append(answer["threads"])
        return answer["tokens_per_second"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def start_busy(n: int, seconds: float) -> list[subprocess.Popen]:
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.new_tokens)
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores; load average before starting {os.getloadavg()[0]:.2f}; {args.new_tokens} new tokens, "
          f"{args.repeats} repeats, {args.busy} busy loop(s) in the busy measurements", file=sys.stderr, flush=True)
    start = time.perf_counter()
    workers, busy = [], []
    results: dict = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop the busy loops and the workers
    try:
        workers = [Worker(label, threads, env, args.new_tokens) for label, threads, env in candidates(cores)]
        for r in range(args.repeats):
            for load in ("quiet", "busy"):
                busy = start_busy(args.busy, args.busy_seconds) if load == "busy" else []
                time.sleep(0.5 if busy else 0.0)  # let the scheduler spread the busy loops
                order = workers[r % len(workers):] + workers[: r % len(workers)]
                for w in order:
                    for mode in MODES:
                        results.setdefault((w.label, load, mode), []).append(w.measure(mode, load))
                stop(busy)
                busy = []
            print(f"repeat {r + 1}/{args.repeats} done after {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
            if r + 1 < args.repeats:
                print(table(results, [w.label for w in workers]), file=sys.stderr, flush=True)  # so far
    finally:
        stop(busy)
        for w in workers:
            w.close()
    print(table(results, [w.label for w in workers]))
    for w in workers:
        if w.chooses:
            print(f"threads chosen by '{w.label}': " + "; ".join(f"{load}: {n}" for load, n in w.threads_used.items()))
    print(f"took {time.perf_counter() - start:.0f} s")
    return 0


def table(results: dict, labels: list[str]) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    head = ["candidate"] + [f"{load}: {mode}" for load in ("quiet", "busy") for mode in MODES]
    rows = [[label] + [cell(results[(label, load, mode)]) for load in ("quiet", "busy") for mode in MODES]
            for label in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "tokens/s, median (min-max)\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
