#!/usr/bin/env python
"""How often greedy speculative decoding differs from target-only greedy decoding, per dtype.

    python scripts/mismatch_rate.py                                   # every pair, float32/bfloat16/float16
    python scripts/mismatch_rate.py --pairs bundled --prompts 20 --dtypes bfloat16
    python scripts/mismatch_rate.py --pairs e2b,moe --row-invariant-float32

Greedy speculative decoding emits exactly the target-only tokens as long as every position's logits come out the
same bits in both runs: a one-token decode step in one, a row of a k + 1-token verify pass in the other. Where they
do not, a near-tie between the two best logits can flip and the outputs part from there on. For each pair and
dtype this runs target-only greedy decoding from many prompts and then speculative greedy decoding with several
draft lengths N (and the heuristic schedule), and reports the fraction of generations that differ and where the
first difference falls (index of the new token).

Pairs: `bundled` (tiny_gemma4/, prompts cut from the held-out files that training.json lists) and the tiny random
families of tests/tiny.py (`e2b`, `e4b`, `31b`, `moe`: random token prompts; the target and drafter are biased
towards a few tokens with `tiny.bias_vocab`, so that drafts are accepted part of the time and verify passes use
many row counts). Needs transformers for the tiny families (it builds their checkpoints). Memory: well under 1 GB.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from speculative import generate  # noqa: E402
from weights import load_drafter, load_target  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAMILIES = ("e2b", "e4b", "31b", "moe")


def bundled_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` tokens from random offsets of the bundled pair's held-out files."""
    from scripts.eval_tiny import held_out_token_files
    from weights.tokenizer import load_tokenizer

    folder = ROOT / "tiny_gemma4"
    files = [f for f in held_out_token_files(folder, load_tokenizer(folder / "target")) if len(f) > length]
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        f = files[i % len(files)]
        start = rng.randrange(len(f) - length)
        prompts.append(f[start : start + length])
    return prompts


def tiny_pair(family: str, folder: Path) -> tuple[Path, Path]:
    """Save a biased tiny target/drafter pair of `family` (tests/tiny.py) under `folder`."""
    from tests import tiny

    target, drafter = tiny.build_target(family, seed=0), tiny.build_drafter(tiny.PAIRS[family], seed=1)
    tiny.bias_vocab(target, drafter, [10, 11, 12], amount=0.3)
    return (tiny.save(target, folder / f"{family}-target", eos_token_id=()),
            tiny.save(drafter, folder / f"{family}-drafter", eos_token_id=()))


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(target, drafter, prompts, *, max_new_tokens: int, modes: list[str]) -> dict:
    """Per mode ("N=4", "heuristic"): generations that differ from target-only, and their first differences."""
    out = {m: {"differ": 0, "total": 0, "first_difference": []} for m in modes}
    for prompt in prompts:
        want = generate(target, None, prompt, max_new_tokens=max_new_tokens, stop_token_ids=[]).tokens
        for mode in modes:
            options = ({"schedule": "heuristic", "num_draft_tokens": 2} if mode == "heuristic"
                       else {"num_draft_tokens": int(mode[2:]), "schedule": "constant"})
            got = generate(target, drafter, prompt, max_new_tokens=max_new_tokens, stop_token_ids=[],
                           **options).tokens
            where = first_difference(got, want)
            out[mode]["total"] += 1
            if where is not None:
                out[mode]["differ"] += 1
                out[mode]["first_difference"].append(where)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="bundled," + ",".join(FAMILIES))
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--prompts", type=int, default=50, help="prompts per pair (default 50)")
    parser.add_argument("--bundled-prompts", type=int, default=None,
                        help="prompts for the bundled pair (default: --prompts)")
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: 128 for the bundled pair (2 sliding windows), 40 for tiny families (5)")
    parser.add_argument("--draft-lengths", default="1,2,4,8", help="constant N values, plus the heuristic schedule")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--row-invariant-float32", action="store_true",
                        help="float32 products through gemma4.kernels.set_row_invariant_float32(True)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures to this file (rewritten after every pair and dtype)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.row_invariant_float32:
        from gemma4 import kernels

        kernels.set_row_invariant_float32(True)
    modes = [f"N={n}" for n in args.draft_lengths.split(",")] + ["heuristic"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs.split(","):
            if pair == "bundled":
                folders = ROOT / "tiny_gemma4" / "target", ROOT / "tiny_gemma4" / "drafter"
                prompts = bundled_prompts(args.bundled_prompts or args.prompts, args.prompt_tokens, args.seed)
                new = args.max_new_tokens or 128
            elif pair in FAMILIES:
                folders = tiny_pair(pair, Path(tmp))
                rng = random.Random(f"{args.seed}-{pair}")
                prompts = [[rng.randrange(2, 512) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
                new = args.max_new_tokens or 40
            else:
                parser.error(f"unknown pair {pair!r}; expected bundled or one of {list(FAMILIES)}")
            for name in args.dtypes.split(","):
                started = time.perf_counter()
                target = load_target(folders[0], dtype=DTYPES[name])
                drafter = load_drafter(folders[1], target=target, dtype=DTYPES[name])
                figures = measure(target, drafter, prompts, max_new_tokens=new, modes=modes)
                differ = sum(f["differ"] for f in figures.values())
                total = sum(f["total"] for f in figures.values())
                cells = "  ".join(f"{m} {f['differ']}/{f['total']}" for m, f in figures.items())
                print(f"{pair:8s} {name:9s} differ {differ}/{total} ({differ / total:.1%})  {cells}  "
                      f"[{time.perf_counter() - started:.0f} s]", flush=True)
                firsts = sorted(w for f in figures.values() for w in f["first_difference"])
                if firsts:
                    print(f"{'':18s} first differences at new token {firsts}", flush=True)
                results.append({"pair": pair, "dtype": name, "max_new_tokens": new, "prompts": len(prompts),
                                "modes": figures})
                if args.json:  # after every pair and dtype: a long run stopped early keeps what it measured
                    args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
