#!/usr/bin/env python
"""The CPU product `gemma4.kernels.linear` before and after its oneDNN path, and a cut-down E2B's decode and verify.

    python scripts/bench_linear.py                 # products + model, 1 and 2 threads (about 3-4 minutes)
    python scripts/bench_linear.py --only products --threads 2
    python scripts/bench_linear.py --only model --profile   # + where a bf16 decode step spends its time

"before" is the row-block `linear` this script carries a copy of (the code before the oneDNN path); "after" is
`gemma4.kernels.linear`. Every product reads a weight that is not in cache, as in a generation loop (each forward
reads every layer once, more than the L3 holds): each call takes the next weight of a pool of copies larger than
the L3. Before and after take turns call by call, so that a slow spell of a shared machine hits both alike; the
tables give medians. The model section builds an E2B-shaped model (E2B's layer geometry and vocabulary, 5 layers,
random weights) in memory and times a one-token decode and a 5-token verify pass after a 64-token prompt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gemma4.kernels  # noqa: E402
import gemma4.layers  # noqa: E402
import gemma4.model  # noqa: E402
import gemma4.moe  # noqa: E402
from gemma4 import Gemma4Config, Gemma4Model  # noqa: E402

E2B_PRODUCTS = {  # name: (out, in) of every product of one E2B forward, and its output head
    "q (sliding)": (2048, 1536), "k/v (sliding)": (256, 1536), "o (sliding)": (1536, 2048),
    "q (full)": (4096, 1536), "k/v (full)": (512, 1536), "o (full)": (1536, 4096),
    "gate/up": (6144, 1536), "down": (1536, 6144), "gate/up (double-wide)": (12288, 1536),
    "down (double-wide)": (1536, 12288), "head": (262144, 1536),
}
POOL_BYTES = 96 << 20  # the weights one timing cycles through: 3x this machine's L3, so each call reads from DRAM


def linear_before(x, weight, bias=None, *, contiguous=True):
    """`gemma4.kernels.linear` as it was before the oneDNN path (a copy, the baseline): a CPU product of up to 16
    tokens with a weight of 64K elements or more runs as a batch of 8 row blocks, [8, out/8, in] @ [in, T]."""
    tokens = x.numel() // x.shape[-1]
    out, inp = weight.shape
    if (x.device.type != "cpu" or tokens > 16 or weight.numel() < (1 << 14) or out % 8
            or not weight.is_contiguous()):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    blocks = weight.view(8, out // 8, inp)
    columns = x.as_strided((8, inp, tokens), (0, 1, inp))
    y = torch.bmm(blocks, columns)
    if tokens == 1:
        y = y.view(1, out)
    else:
        y = y.view(out, tokens).t()
        if contiguous:
            y = y.contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out)


IMPLS = {"before": linear_before, "after": gemma4.kernels.linear}


def use_linear(fn) -> None:
    """Every module that calls `linear` by name calls `fn` from now on."""
    for module in (gemma4.layers, gemma4.model, gemma4.moe):
        module.linear = fn
    if "drafter.model" in sys.modules:
        sys.modules["drafter.model"].linear = fn


def turns(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median ms of each fn over `reps` rounds of one call each (after `warmup` rounds)."""
    times = {k: [] for k in fns}
    for rep in range(warmup + reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@torch.inference_mode()
def section_products(threads: int, dtypes, tokens: list[int], reps: int, skip_head: bool) -> list[str]:
    lines = [f"### One product, weight from DRAM, {threads} thread(s): median ms, before / after (x = after's "
             f"speed-up)", "", "| product | out x in | dtype | " + " | ".join(f"{t} tok" for t in tokens)
             + " | after: 5 tok / 1 tok |", "|---|---|---|" + "---|" * (len(tokens) + 1)]
    gen = torch.Generator().manual_seed(0)
    for name, (out, inp) in E2B_PRODUCTS.items():
        if name == "head" and skip_head:
            continue
        for dtype in dtypes:
            count = max(1, min(8, -(-POOL_BYTES // (out * inp * dtype.itemsize))))
            pool = [(torch.randn(out, inp, generator=gen) * 0.02).to(dtype) for _ in range(count)]
            cells, after = [], {}
            for t in tokens:
                x = torch.randn(t, inp, generator=gen).to(dtype)
                at = {k: 0 for k in IMPLS}

                def call(k):
                    at[k] += 1
                    IMPLS[k](x, pool[at[k] % count], contiguous=name != "head")

                ms = turns({k: (lambda k=k: call(k)) for k in IMPLS}, 3 if name == "head" else reps)
                after[t] = ms["after"]
                cells.append(f"{ms['before']:.2f} / {ms['after']:.2f} ({ms['before'] / ms['after']:.1f}x)")
            ratio = f"{after[5] / after[1]:.2f}" if 1 in after and 5 in after else "-"
            lines.append(f"| {name} | {out} x {inp} | {str(dtype)[6:]} | " + " | ".join(cells) + f" | {ratio} |")
            del pool
    return lines


def e2b_model(dtype: torch.dtype, layers: int = 5) -> Gemma4Model:
    """E2B's geometry with `layers` layers (4 sliding + 1 full per 5, no KV sharing), N(0, 0.02) weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark import e2b_config  # the benchmark's E2B-shaped config.json

    model = Gemma4Model(Gemma4Config.from_dict(e2b_config(layers, 0)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


@torch.inference_mode()
def section_model(threads: int, dtypes, reps: int, profile: bool) -> list[str]:
    lines = [f"### E2B-shaped model (5 layers, vocabulary 262144), {threads} thread(s): median ms per forward, "
             "before / after", "", "| dtype | decode (1 token) | verify (5 tokens) | after: verify / decode |",
             "|---|---|---|---|"]
    ids = torch.randint(3, 262144, (1, 64 + 5), generator=torch.Generator().manual_seed(1))
    for dtype in dtypes:
        model = e2b_model(dtype)
        caches = {}
        for k in IMPLS:
            caches[k] = model.new_cache(max_length=128, max_rollback=16)
            model(ids[:, :64], caches[k], logits_to_keep=1)

        def step(k, n):
            use_linear(IMPLS[k])
            model(ids[:, 64:64 + n], caches[k])
            caches[k].rollback(n)

        ms = turns({(k, n): (lambda k=k, n=n: step(k, n)) for k in IMPLS for n in (1, 5)}, reps)
        use_linear(IMPLS["after"])
        cell = {n: f"{ms['before', n]:.1f} / {ms['after', n]:.1f}" for n in (1, 5)}
        lines.append(f"| {str(dtype)[6:]} | {cell[1]} | {cell[5]} | {ms['after', 5] / ms['after', 1]:.2f} |")
        if profile:
            lines += profile_decode(model, caches["after"], ids, dtype)
        del model, caches
    return lines


def profile_decode(model, cache, ids, dtype) -> list[str]:
    """The ops a one-token decode spends its time in (torch.profiler, 10 steps, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            model(ids[:, 64:65], cache)
            cache.rollback(1)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return ["", f"Profile of 10 decode steps, {str(dtype)[6:]}:", "", "```text", table.rstrip(), "```", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["products", "model"], help="one section (default: both)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default: 1 2)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9])
    ap.add_argument("--reps", type=int, default=15, help="timed rounds per measurement")
    ap.add_argument("--no-head", action="store_true", help="skip the 262144 x 1536 head product (3.2 GB)")
    ap.add_argument("--profile", action="store_true", help="profile a decode step of the model section")
    args = ap.parse_args(argv)
    dtypes = (torch.bfloat16, torch.float32)
    print(f"torch {torch.__version__}, {torch.backends.mkldnn.is_available() and 'oneDNN' or 'no oneDNN'}, "
          f"threads {args.threads}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        if args.only in (None, "products"):
            print("\n".join(["", *section_products(threads, dtypes, args.tokens, args.reps, args.no_head)]),
                  flush=True)
        if args.only in (None, "model"):
            print("\n".join(["", *section_model(threads, dtypes, args.reps, args.profile)]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
