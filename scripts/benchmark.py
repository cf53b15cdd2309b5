#!/usr/bin/env python
"""Benchmarks: this implementation next to transformers 5.24, the draft-length trade-off, and loading memory.

    python scripts/benchmark.py                  # every section -> <temporary directory>/gemma4-benchmarks/
    python scripts/benchmark.py --write          # -> the committed BENCHMARKS.md and benchmarks/*.png
    python scripts/benchmark.py --only spec,tradeoff      # some sections (the others are kept or say "not run")
    python scripts/benchmark.py --quick                   # smoke run -> <temporary directory>/BENCHMARKS.quick.md

A run writes its report (and plots) outside the repository unless `--write` (or `--out`) says where: a run on a
busy or different machine must not replace the committed figures by accident. Sections a run does not measure are
kept from the report it replaces, else from the committed BENCHMARKS.md.

Sections, one function each:
- forward:  prefill tokens/s and decode ms/token, ours vs transformers, on the bundled tiny target and on an
            E2B-shaped model (E2B's layer geometry, fewer layers, random weights written on the fly), and the cost
            of one verify pass over N+1 new tokens as a ratio to a one-token decode, N = 0..8.
- spec:     speculative decoding with the bundled pair, ours vs transformers' assisted generation: greedy, the
            same held-out prompts and draft length N; tokens/s, acceptance, target passes per token, equal outputs.
- tradeoff: N = 1..8 and the heuristic schedule, measured, next to the speedup predicted from the measured
            acceptance and step costs: E[N] = 1 + sum_{i<=N} prod_{j<=i} alpha_j tokens per round, at a cost of
            N c_d + c_v(N) against c_t per token without drafting.
- memory:   peak resident memory (VmHWM) of a fresh process loading a full-size E2B-shaped bf16 checkpoint.
- cuda:     forward costs on a GPU in bf16 with the full E2B geometry (only when CUDA is available).
- e2b:      the real E2B text geometry (35 layers, the released config's values, random weights) on CPU, one fresh
            process per implementation and dtype: load seconds, peak resident memory, prefill, decode ms/token and
            a verify forward over 5 tokens, ours and transformers, bfloat16 and (where memory allows) float32.
            Needs ~10 GB of temporary disk and ~11 GB of free memory (transformers in bf16; ours in fp32 ~10 GB;
            transformers in fp32 would need ~28 GB and runs only if that much is available).
- training: kept from BENCHMARKS.md as it is (a drafter trained by scripts/train_drafter.py; measured by that script,
            which takes half an hour, so this one never reruns it).
- batch:    batched decoding (speculative.generate_batch) at batch sizes 1, 2, 4, 8: tokens/s of the bundled pair,
            speculative and target-only, the speed-up of speculation per batch size, the finished-row policy and
            the batch's draft-length rule; on an E2B-shaped model (bfloat16) decode and verify cost per batch size.
- compiled: generate(..., compile=True) against the eager loop and transformers' assisted generation on the bundled
            pair (greedy, after the warm-up; its compile seconds reported), and a compiled decode step and 5-token
            verify on an E2B-shaped model next to eager and transformers (on CUDA too when a GPU is present).
- schedules: the draft-length schedules (auto, constant N = 1..8, heuristic) next to target-only decoding, on a grid:
            code prompts (high acceptance) and English prose (low), and a deliberately costly drafter; batch sizes 1,
            4, 8, 16; float32 and bfloat16. Decode tokens/s per cell, outputs checked equal to target-only; the k
            `auto` chooses over a generation that goes from code to prose.
Timing hygiene: a fixed torch thread count, warm-up runs, medians, torch.inference_mode(); float32 on CPU.
Random checkpoints are written tensor by tensor into a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import weights  # noqa: E402,F401  (the memory baseline is taken after `import torch, weights`)
from gemma4 import Gemma4Config, Gemma4Model  # noqa: E402
from speculative import generate, generate_batch  # noqa: E402
from weights import load_drafter, load_target, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
S, F = "sliding_attention", "full_attention"
SECTIONS = ("forward", "spec", "tradeoff", "memory", "cuda", "e2b", "training", "batch", "compiled", "schedules",
            "llamacpp")
MEASURED_ELSEWHERE = {"training"}  # written from scripts/train_drafter.py's report: kept as it is in BENCHMARKS.md
CPU_DTYPE = torch.float32


def e2b_config(num_layers: int, num_kv_shared: int) -> dict:
    """config.json of an E2B-shaped text model (E2B's released values) with `num_layers` = 5 k layers (4 s + 1 f)."""
    return {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "vocab_size": 262144,
            "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": num_layers,
            "num_attention_heads": 8, "num_key_value_heads": 1, "num_global_key_value_heads": None, "head_dim": 256,
            "global_head_dim": 512, "layer_types": ([S] * 4 + [F]) * (num_layers // 5), "sliding_window": 512,
            "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144,
            "num_kv_shared_layers": num_kv_shared, "use_double_wide_mlp": True, "final_logit_softcapping": 30.0,
            "attention_k_eq_v": False, "enable_moe_block": False, "max_position_embeddings": 131072,
            "rope_parameters": {S: {"rope_type": "default", "rope_theta": 10_000.0},
                                F: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                    "rope_theta": 1_000_000.0}},
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "attention_bias": False, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "dtype": "bfloat16"}


def write_random_checkpoint(folder: Path, config: dict, dtype: torch.dtype = torch.bfloat16,
                            shard_bytes: int | None = None) -> int:
    """config.json + model.safetensors (text-only keys `model.*`, which our loader and transformers'
    Gemma4ForCausalLM both read) with random weights, streamed tensor by tensor so that writing a 10 GB file holds
    32 MB: matrices cycle through a pool of N(0, 0.02) values, each from its own offset, vectors (norms, layer
    scalars) are 1. With `shard_bytes`: shards of at most that much (a tensor larger than it gets its own) and a
    model.safetensors.index.json, as save_pretrained writes them. Returns the bytes of tensor data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1]}))
    with torch.device("meta"):
        model = Gemma4Model(Gemma4Config.from_dict(config))
    shapes = {"model." + k: list(v.shape) for k, v in model.state_dict().items()}  # the checkpoint's keys
    shards: list[list[str]] = [[]]
    size = {key: math.prod(shape) * dtype.itemsize for key, shape in shapes.items()}
    for key in shapes:
        if shard_bytes and shards[-1] and sum(size[k] for k in shards[-1]) + size[key] > shard_bytes:
            shards.append([])
        shards[-1].append(key)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    pool = memoryview(pool.view(torch.uint8).numpy())  # [32 MB]
    order = {key: i for i, key in enumerate(shapes)}
    for name, keys in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            header[key] = {"dtype": {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype], "shape": shapes[key],
                           "data_offsets": [offset, offset + size[key]]}
            offset += size[key]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for key in keys:
                if len(shapes[key]) == 1:
                    f.write(torch.ones(shapes[key], dtype=dtype).view(torch.uint8).numpy().tobytes())
                    continue
                left, at = size[key], (order[key] * 4099 * dtype.itemsize) % len(pool)
                while left:
                    chunk = pool[at : at + left]
                    f.write(chunk)
                    left, at = left - len(chunk), 0
    if len(shards) > 1:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(size.values())}, "weight_map": weight_map}, indent=2))
    return sum(size.values())


# ---- timing -----------------------------------------------------------------------------------------------------
def timed(fn: Callable, device: str) -> float:
    """Wall seconds of one fn() call; on CUDA, queued kernels are waited for before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def round_robin(fns: dict, reps: int, warmup: int = 0, device: str = "cpu") -> dict[object, list[float]]:
    """Wall seconds of each fn, `reps` times after `warmup` untimed rounds, one call of each per round: a slow spell
    of a shared machine then hits every measurement alike instead of skewing one of them."""
    times = {key: [] for key in fns}
    for rep in range(warmup + reps):
        for key, fn in fns.items():
            t = timed(fn, device)
            if rep >= warmup:
                times[key].append(t)
    return times


@dataclass
class Impl:
    """One implementation behind the same calls: an empty cache, a forward returning logits, a rollback."""

    name: str
    new_cache: Callable  # (max_length, rollback: bool) -> cache
    forward: Callable  # (ids [1, S], cache, logits_to_keep or None) -> logits [1, S_kept, V]
    rollback: Callable  # (cache, r): forget the last r positions
    model: object = None  # the loaded module, for its weights' bytes


def load_impl(name: str, folder: Path, dtype: torch.dtype, device: str) -> Impl:
    if name == "ours":
        m = load_target(folder, dtype=dtype, device=device)
        return Impl(name, lambda n, rollback: m.new_cache(max_length=n, max_rollback=16),
                    lambda ids, cache, keep: m(ids, cache, logits_to_keep=keep).logits,
                    lambda cache, r: cache.rollback(r), m)
    from transformers import DynamicCache, Gemma4ForCausalLM

    m = Gemma4ForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()  # default attention: sdpa

    def new_cache(n: int, rollback: bool) -> DynamicCache:
        cache = DynamicCache(config=m.config)
        if rollback:  # sliding layers keep their past until crop(), as in assisted generation
            cache.activate_past_recording()
        return cache

    return Impl(name, new_cache,
                lambda ids, cache, keep: m(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=keep or 0).logits,
                lambda cache, r: cache.crop(-r), m)


@torch.inference_mode()
def forward_costs(impls: list[Impl], vocab: int, q: dict, device: str) -> dict:
    """Per implementation: prefill tokens/s over a q["prompt"]-token prompt (last row's logits only, as generation
    does) and the median ms of q["decode"] one-token decode steps that follow it (after 4 untimed ones). The
    implementations take turns, one prefill or one decode step each, so that a slow spell of a shared machine
    hits them alike instead of skewing their ratio."""
    prompt = torch.randint(3, vocab, (1, q["prompt"]), generator=torch.Generator().manual_seed(0)).to(device)
    caches = {}

    def prefill(impl: Impl) -> None:
        caches[impl.name] = impl.new_cache(q["prompt"] + q["decode"] + 8, False)
        impl.forward(prompt, caches[impl.name], 1)

    def decode(impl: Impl) -> None:
        impl.forward(prompt[:, -1:], caches[impl.name], None)

    prefill_s = round_robin({i.name: functools.partial(prefill, i) for i in impls}, q["reps"], 1, device)
    decode_s = round_robin({i.name: functools.partial(decode, i) for i in impls}, q["decode"], 4, device)
    return {i.name: {"prefill_tokens_per_s": q["prompt"] / statistics.median(prefill_s[i.name]),
                     "decode_ms": statistics.median(decode_s[i.name]) * 1e3} for i in impls}


@torch.inference_mode()
def verify_costs(impls: list[Impl], vocab: int, q: dict, device: str) -> dict[str, dict[int, float]]:
    """Per implementation, median ms of one forward over N+1 new tokens (all rows' logits) at a cache of
    q["context"] positions, for N in q["ns"]; the measurements go round-robin over N and implementations."""
    ns, context = q["ns"], q["context"]
    ids = torch.randint(3, vocab, (1, context + max(ns) + 1), generator=torch.Generator().manual_seed(1)).to(device)
    caches = {}
    for impl in impls:
        caches[impl.name] = impl.new_cache(context + max(ns) + 2, True)
        impl.forward(ids[:, :context], caches[impl.name], 1)

    def verify(impl: Impl, n: int) -> None:
        impl.forward(ids[:, context : context + n + 1], caches[impl.name], None)
        impl.rollback(caches[impl.name], n + 1)

    fns = {(i.name, n): functools.partial(verify, i, n) for n in ns for i in impls}
    times = round_robin(fns, q["verify_reps"], 2, device)
    return {i.name: {n: statistics.median(times[i.name, n]) * 1e3 for n in ns} for i in impls}


def compare_forward(models: list[tuple[str, Path]], dtype: torch.dtype, device: str, q: dict) -> dict:
    """{label: {impl: forward costs}} for every (label, folder), one model at a time (ours and transformers'
    loaded side by side), and both implementations' verify costs on the last model, under "verify"."""
    out = {}
    for label, folder in models:
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        impls = [load_impl(name, folder, dtype, device) for name in ("ours", "transformers")]
        out[label] = forward_costs(impls, vocab, q, device)
        if label == models[-1][0]:
            out["verify"] = verify_costs(impls, vocab, q, device)
        del impls
    return out


def forward_markdown(res: dict, q: dict) -> tuple[list[str], float]:
    """The two tables of a compare_forward result, and ours' verify ratio at N = 4."""
    lines = [f"| model | prefill tokens/s ({q['prompt']}-token prompt): ours | transformers | decode ms/token (median "
             f"of {q['decode']}): ours | transformers | decode: ours faster by |", "|---|---|---|---|---|---|"]
    for label, r in res.items():
        if label != "verify":
            o, t = r["ours"], r["transformers"]
            lines.append(f"| {label} | {o['prefill_tokens_per_s']:.1f} | {t['prefill_tokens_per_s']:.1f} | "
                         f"{o['decode_ms']:.2f} | {t['decode_ms']:.2f} | {t['decode_ms'] / o['decode_ms']:.2f}x |")
    o, t = res["verify"]["ours"], res["verify"]["transformers"]
    lines += ["", f"Verify cost on the last model: one forward over N+1 new tokens (logits for every row) at a cache "
              f"of {q['context']} positions, ms and ratio to a one-token forward (N = 0).", "",
              "| N | ours ms | ours ratio | transformers ms | transformers ratio | ours / transformers' decode |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {o[n]:.1f} | {o[n] / o[0]:.2f}x | {t[n]:.1f} | {t[n] / t[0]:.2f}x | {o[n] / t[0]:.2f}x |"
              for n in q["ns"]]
    return lines, o.get(4, math.nan) / o[0]


@torch.inference_mode()
def product_cost(q: dict) -> dict:
    """What bounds verification: median ms of one product with the E2B geometry's largest layer weight (the
    double-wide MLP of a KV-shared layer, 12288 x 1536 float32, 75 MB: more than the L3 holds, so it is read from
    memory every time) for 1, 4 and 5 rows through `gemma4.kernels.linear`; next to it what the machine can do: the
    GB/s of a sum over 256 MB (reading memory) and the GFLOP/s of a 1024^3 product (BLAS at its best)."""
    from gemma4.kernels import linear

    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(12288, 1536, generator=gen)
    rows = {t: torch.randn(1, t, 1536, generator=gen) for t in (1, 4, 5)}
    square, big = torch.randn(1024, 1024, generator=gen), torch.randn(1 << 26, generator=gen)
    fns = {t: functools.partial(linear, x, weight) for t, x in rows.items()}
    fns |= {"square": lambda: square @ square, "sum": big.sum}
    out = {k: statistics.median(t) for k, t in round_robin(fns, q["verify_reps"] * 3, 2).items()}
    return {"ms": {t: out[t] * 1e3 for t in rows}, "weight_gb": weight.numel() * 4 / 1e9,
            "gflops": {t: 2 * weight.numel() * t / out[t] / 1e9 for t in rows},
            "square_gflops": 2 * 1024**3 / out["square"] / 1e9, "read_gbs": big.numel() * 4 / out["sum"] / 1e9}


def product_markdown(p: dict) -> list[str]:
    ms, gf = p["ms"], p["gflops"]
    return ["", f"One product with the E2B geometry's largest layer weight (the double-wide MLP of a KV-shared layer, "
            f"12288 x 1536 float32, {p['weight_gb'] * 1e3:.0f} MB, read from memory every time), through "
            "`gemma4.kernels.linear`:", "",
            "| rows | ms | ratio to 1 row | weight read at (GB/s) | GFLOP/s |", "|---|---|---|---|---|"] + [
            f"| {t} | {ms[t]:.2f} | {ms[t] / ms[1]:.2f}x | {p['weight_gb'] / ms[t] * 1e3:.1f} | {gf[t]:.1f} |"
            for t in ms] + ["", f"On the same threads a sum over 256 MB reads memory at {p['read_gbs']:.1f} GB/s and "
                             f"a 1024 x 1024 x 1024 product computes at {p['square_gflops']:.0f} GFLOP/s."]


def section_forward(args, q: dict) -> list[str]:
    layers, shared = (5, 0) if args.quick else (10, 5)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        folder = Path(tmp) / "e2b_shaped"
        write_random_checkpoint(folder, e2b_config(layers, shared))
        label = f"E2B-shaped, {layers} layers ({shared} KV-shared), random"
        res = compare_forward([("bundled tiny target", args.models / "target"), (label, folder)], CPU_DTYPE, "cpu", q)
    lines, ratio4 = forward_markdown(res, q)
    product = product_cost(q)
    lines += product_markdown(product)
    ours, theirs = res["verify"]["ours"], res["verify"]["transformers"]
    ratio3 = ours[3] / ours[0]
    worst = max(ratio3, ratio4)
    gf, ms, read = product["gflops"], product["ms"], product["weight_gb"] / product["ms"][1] * 1e3
    return lines + ["", f"**Reading:** ours runs a forward over 4 new tokens (N = 3) at {ratio3:.2f}x its own "
                    f"one-token decode, and verifies 4 drafts (N = 4: 5 tokens) at {ratio4:.2f}x: target <= 1.3x, "
                    + ("met" if worst <= 1.3 else f"missed by {worst - 1.3:.2f}x") +
                    f". The 5-token forward costs {ours[4] / theirs[0]:.2f}x transformers' one-token decode (a "
                    "faster decode raises our ratio without making verification slower). The products set the "
                    f"ratio: with one row the weight streams at {read:.1f} GB/s ({read / product['read_gbs']:.0%} "
                    f"of a plain sum's), but with 5 rows BLAS computes at {gf[5]:.0f} GFLOP/s, far from the "
                    f"{product['square_gflops']:.0f} it reaches on a large product, so 5 rows cost "
                    f"{ms[5] / ms[1]:.2f}x one row; every layer's products and the output head behave alike."]


# ---- speculative decoding ---------------------------------------------------------------------------------------
def held_out_prompts(models: Path, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens (<bos> included) of the first `count` long-enough held-out files of training.json."""
    record = json.loads((models / "training.json").read_text())
    tokenizer, root = load_tokenizer(models / "target"), Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for rel in record["corpus"]["held_out_files"]:
        ids = [tokenizer.bos_id] + tokenizer.encode((root / rel).read_text(encoding="utf-8"))
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise RuntimeError(f"only {len(prompts)} held-out files of {models / 'training.json'} have {length} tokens")


def load_pair(models: Path):
    target = load_target(models / "target", dtype=CPU_DTYPE)
    return target, load_drafter(models / "drafter", target=target, dtype=CPU_DTYPE)


def section_spec(args, q: dict) -> list[str]:
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    target, drafter = load_pair(args.models)
    n = args.draft_tokens or drafter.generation_config.get("num_assistant_tokens", 6)
    hf_target = Gemma4ForCausalLM.from_pretrained(args.models / "target", dtype=CPU_DTYPE).eval()
    hf_drafter = Gemma4AssistantForCausalLM.from_pretrained(args.models / "drafter", dtype=CPU_DTYPE).eval()
    hf_drafter.generation_config.num_assistant_tokens = n  # transformers reads it only here (docs/transformers.md)
    hf_drafter.generation_config.num_assistant_tokens_schedule = "constant"
    calls = {"target": 0, "drafter": 0}
    hf_target.register_forward_hook(lambda *_: calls.__setitem__("target", calls["target"] + 1))
    hf_drafter.register_forward_hook(lambda *_: calls.__setitem__("drafter", calls["drafter"] + 1))

    def ours(ids):
        res = generate(target, drafter, ids, max_new_tokens=q["new_tokens"], num_draft_tokens=n, schedule="constant")
        return res.tokens, res.stats.target_forward_passes, res.stats.drafted, res.stats.accepted

    @torch.inference_mode()
    def theirs(ids):
        calls.update(target=0, drafter=0)
        out = hf_target.generate(torch.tensor([ids]), assistant_model=hf_drafter, max_new_tokens=q["new_tokens"],
                                 do_sample=False)
        tokens = out[0, len(ids):].tolist()  # each pass emits its accepted drafts + 1 (the prefill: 1)
        return tokens, calls["target"], calls["drafter"], len(tokens) - calls["target"]

    prompts = held_out_prompts(args.models, q["prompts"], q["prompt_tokens"])
    runs = {"ours": ours, "transformers": theirs}
    for fn in runs.values():
        fn(prompts[0][:16])  # warm-up
    walls = {(name, i): [] for name in runs for i in range(len(prompts))}
    results = {}
    for _ in range(q["repeats"]):
        for i, ids in enumerate(prompts):
            for name, fn in runs.items():
                start = time.perf_counter()
                results[name, i] = fn(ids)
                walls[name, i].append(time.perf_counter() - start)
    rows = {}
    for name in runs:
        per = [results[name, i] for i in range(len(prompts))]
        tokens = sum(len(r[0]) for r in per)
        rows[name] = {"tps": tokens / sum(statistics.median(walls[name, i]) for i in range(len(prompts))),
                      "acc": sum(r[3] for r in per) / max(1, sum(r[2] for r in per)),
                      "passes": sum(r[1] for r in per) / tokens, "tokens": tokens}
    equal = sum(results["ours", i][0] == results["transformers", i][0] for i in range(len(prompts)))
    ratio = rows["ours"]["tps"] / rows["transformers"]["tps"]
    lines = [f"{len(prompts)} held-out prompts of {q['prompt_tokens']} tokens, up to {q['new_tokens']} new tokens, "
             f"greedy, N = {n}, float32; tokens/s = new tokens / wall time of the whole generate call (prefill "
             f"included), median of {q['repeats']} runs per prompt.", "",
             "| implementation | tokens/s | acceptance | target passes per token | new tokens |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['tps']:.1f} | {r['acc']:.3f} | {r['passes']:.3f} | {r['tokens']} |"
              for name, r in rows.items()]
    lines += ["", f"Outputs equal on {equal}/{len(prompts)} prompts.",
              f"**Reading:** ours runs at {ratio:.2f}x transformers' tokens/s: target >= 1.5x, "
              + ("met." if ratio >= 1.5 else f"missed by {1.5 - ratio:.2f}x.")]
    return lines


# ---- draft-length trade-off -------------------------------------------------------------------------------------
class StepCosts:
    """c_t (one-token target decode), c_d (one drafter step + argmax) and c_v(N) (one verify forward over N+1
    tokens) at the cache a prompt leaves, measured in rounds of one each. The rounds are spread over the generation
    runs whose speed they predict, so that a slow spell of a shared machine hits the costs and the runs alike."""

    @torch.inference_mode()
    def __init__(self, target, drafter, prompt: list[int], ns: list[int]):
        cache = target.new_cache(max_length=len(prompt) + 64, max_rollback=max(ns) + 2,
                                 min_sliding_history=drafter.sliding_history)
        out = target(torch.tensor([prompt]), cache, logits_to_keep=1)
        token, h, views = torch.tensor([[prompt[-1]]]), out.hidden_states[:, -1:], cache.views()
        context = drafter.context(cache.length, views)

        def verify(k: int) -> None:
            target(torch.full((1, k), prompt[-1]), cache)
            cache.rollback(k)

        self.ns = ns
        self.fns = {"c_t": lambda: verify(1),
                    "c_d": lambda: drafter.step(target, token, h, cache.length, views, context).logits.argmax(-1)}
        self.fns.update({("c_v", n): (lambda n=n: verify(n + 1)) for n in ns})
        self.times = {key: [] for key in self.fns}

    @torch.inference_mode()
    def measure(self, rounds: int, keep: bool = True) -> None:
        for key, times in round_robin(self.fns, rounds).items():
            if keep:
                self.times[key] += times

    def medians(self) -> dict:
        """Median seconds: {"c_t": s, "c_d": s, "c_v": {N: s}}."""
        median = {key: statistics.median(t) for key, t in self.times.items()}
        return {"c_t": median["c_t"], "c_d": median["c_d"], "c_v": {n: median["c_v", n] for n in self.ns}}


def acceptance_per_position(rounds: list[tuple[int, int]], n: int) -> list[float]:
    """Position j (1..n) accepted iff a round accepted >= j drafts, over the rounds that drafted >= j."""
    out = []
    for j in range(1, n + 1):
        drafted = [a for d, a in rounds if d >= j]
        out.append(sum(a >= j for a in drafted) / len(drafted) if drafted else math.nan)
    return out


def conditional_alpha(rounds: list[tuple[int, int]], n: int) -> list[float]:
    """alpha_j = P(draft j accepted | drafts 1..j-1 accepted), over rounds that drafted >= j: the factors of E[N]."""
    out = []
    for j in range(1, n + 1):
        reached = [a for d, a in rounds if d >= j and a >= j - 1]
        out.append(sum(a >= j for a in reached) / len(reached) if reached else math.nan)
    return out


def predicted_speedup(alpha: list[float], n: int, costs: dict) -> tuple[float, float]:
    """(E[N], speedup): E[N] = 1 + sum_{i<=N} prod_{j<=i} alpha_j; speedup = E[N] / (N c_d + c_v(N)) * c_t."""
    expected = 1 + sum(math.prod(alpha[:i]) for i in range(1, n + 1))
    return expected, expected / (n * costs["c_d"] + costs["c_v"][n]) * costs["c_t"]


def section_tradeoff(args, q: dict) -> list[str]:
    target, drafter = load_pair(args.models)
    prompts = held_out_prompts(args.models, q["prompts"], q["prompt_tokens"])
    ns = q["tradeoff_ns"]
    timer = StepCosts(target, drafter, prompts[0], ns)
    timer.measure(3, keep=False)  # warm-up
    rounds_per_prompt = math.ceil(q["cost_reps"] / (q["repeats"] * len(prompts)))
    start_k = drafter.generation_config.get("num_assistant_tokens", 6)
    modes = [("target only", None, "constant"), *((str(n), n, "constant") for n in ns),
             (f"heuristic (from {start_k})", start_k, "heuristic")]
    generate(target, drafter, prompts[0], max_new_tokens=8, num_draft_tokens=2)  # warm-up
    stats = {(m, i): [] for m, _, _ in modes for i in range(len(prompts))}
    for _ in range(q["repeats"]):  # interleaved, so background load hits every mode alike
        for i, ids in enumerate(prompts):
            for label, k, schedule in modes:
                res = generate(target, drafter if k else None, ids, max_new_tokens=q["new_tokens"],
                               num_draft_tokens=k, schedule=schedule)
                stats[label, i].append(res.stats)
            timer.measure(rounds_per_prompt)
    costs = timer.medians()
    measured = {}
    for label, k, _ in modes:
        runs = [sorted(stats[label, i], key=lambda s: s.decode_seconds)[len(stats[label, i]) // 2]  # median run
                for i in range(len(prompts))]
        tokens, seconds = sum(s.decode_tokens for s in runs), sum(s.decode_seconds for s in runs)
        rounds = [r for s in runs for r in s.rounds]
        measured[label] = {"tps": tokens / seconds, "rounds": rounds,
                           "per_pass": tokens / sum(s.target_forward_passes - 1 for s in runs),
                           "acc": sum(a for _, a in rounds) / max(1, sum(d for d, _ in rounds))}
    base = measured["target only"]["tps"]
    alpha = conditional_alpha([r for n in ns for r in measured[str(n)]["rounds"]], max(ns))  # pooled over N
    table = [f"Costs (median ms, measured between the generation runs): c_t = {costs['c_t'] * 1e3:.2f} (one-token "
             f"decode), c_d = {costs['c_d'] * 1e3:.2f} (drafter step), c_v(N) = "
             + ", ".join(f"{costs['c_v'][n] * 1e3:.2f}" for n in ns) + f" for N = {ns}.",
             f"alpha_j (P(draft j accepted | drafts < j accepted), pooled over N = {ns[0]}..{ns[-1]}): "
             + " ".join(f"{a:.3f}" for a in alpha), "",
             "| N | acceptance per position j = 1..N | tokens per pass | E[N] predicted | tokens/s | speedup | "
             "predicted speedup | measured / predicted |", "|---|---|---|---|---|---|---|---|",
             f"| target only | | 1.00 | | {base:.1f} | 1.00x | | |"]
    points = []
    for label, k, schedule in modes[1:]:
        m = measured[label]
        shown = min(max(ns), max(d for d, _ in m["rounds"]))  # the heuristic may draft more than max(ns)
        per = " ".join(f"{a:.2f}" for a in acceptance_per_position(m["rounds"], shown))
        speedup = m["tps"] / base
        if schedule == "constant":
            expected, predicted = predicted_speedup(alpha, k, costs)
            points.append((k, speedup, predicted, m["acc"]))
            pred = f"{expected:.2f} | {m['tps']:.1f} | {speedup:.2f}x | {predicted:.2f}x | {speedup / predicted:.0%}"
        else:
            pred = f" | {m['tps']:.1f} | {speedup:.2f}x | | "
        table.append(f"| {label} | {per} | {m['per_pass']:.2f} | {pred} |")
    best = max(points, key=lambda p: p[1])
    ratio = best[1] / best[2]
    table += ["", f"**Reading:** the best N is {best[0]} ({best[1]:.2f}x over target-only); measured / predicted "
              f"there is {ratio:.0%}: target >= 85%, "
              + ("met." if ratio >= 0.85 else f"missed by {0.85 - ratio:.0%} points.")]
    table += plot_tradeoff(points, measured[modes[-1][0]]["tps"] / base, alpha, args.plot, args.out.parent)
    return table


def plot_tradeoff(points, heuristic: float, alpha: list[float], path: Path, report_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["", "(no plot: matplotlib is not installed; `pip install -e .[plot]`)"]
    ns, measured, predicted, acc = zip(*points)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ns, measured, "o-", label="measured")
    a.plot(ns, predicted, "s--", label="predicted")
    a.axhline(heuristic, color="gray", ls=":", label="heuristic schedule")
    a.axhline(1.0, color="black", lw=0.5)
    a.set(xlabel="draft length N", ylabel="speedup over target-only", title="Speedup")
    a.legend()
    b.plot(ns, acc, "o-", label="acceptance rate (accepted / drafted) at N")
    b.plot(range(1, len(alpha) + 1), alpha, "s--", label="alpha_j: position j | j-1 accepted")
    b.set(xlabel="N or draft position j", ylabel="acceptance", ylim=(0, 1), title="Acceptance")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return ["", f"![speedup and acceptance vs N]({os.path.relpath(path, report_dir)})"]


# ---- loading memory ---------------------------------------------------------------------------------------------
def status_kb(field: str, pid: str = "self", file: str = "status") -> int:
    """A kB field of /proc/<pid>/status (or of /proc/meminfo with file="meminfo", pid ignored)."""
    path = Path("/proc/meminfo") if file == "meminfo" else Path(f"/proc/{pid}/status")
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_load(name: str, folder: str) -> None:
    """In a fresh process (--measure-load): print JSON with the RSS after the imports (the baseline), the peak RSS
    (VmHWM) right after loading `folder` in bfloat16 and again after reading every weight once (transformers maps
    the file and reads it on first use; the first forward would), and the bytes of the parameters and buffers."""
    if name == "transformers":
        from transformers import Gemma4ForCausalLM
    baseline, start = status_kb("VmRSS"), time.perf_counter()
    if name == "ours":
        model = load_target(folder, dtype=torch.bfloat16)
    else:
        model = Gemma4ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    seconds, loaded = time.perf_counter() - start, status_kb("VmHWM")
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    for t in tensors.values():
        torch.amax(t)  # touches every byte, allocates nothing big
    print(json.dumps({"baseline_kb": baseline, "loaded_kb": loaded, "touched_kb": status_kb("VmHWM"),
                      "rss_file_kb": status_kb("RssFile"), "seconds": seconds,
                      "model_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}))


def run_measure_load(name: str, folder: Path, limit_gb: float, flags: tuple = ("--measure-load",)) -> dict | None:
    """measure_load (or the measurement `flags` name) in a subprocess, stopped (None) if its resident memory passes
    limit_gb."""
    proc = subprocess.Popen([sys.executable, __file__, *flags, name, str(folder)], stdout=subprocess.PIPE)
    while proc.poll() is None:
        try:
            if status_kb("VmRSS", str(proc.pid)) > limit_gb * 2**20:
                proc.kill()
                proc.wait()
                return None
        except (FileNotFoundError, KeyError):
            pass
        time.sleep(0.05)
    return json.loads(proc.stdout.read().decode().strip().splitlines()[-1])


def section_memory(args, q: dict) -> list[str]:
    layers, shared = q["memory_layers"]
    limit = min(20.0, status_kb("MemAvailable", file="meminfo") / 2**20 - 2.0)  # GiB: stop transformers there
    lines = [f"E2B-shaped text-only checkpoint, {layers} layers ({shared} KV-shared), bfloat16, random weights "
             "written on the fly. Peak = VmHWM of a fresh process minus its VmRSS after the imports, right after "
             "loading and after reading every weight once (transformers memory-maps the file and reads it lazily; "
             "mapped pages count as resident once read, as page cache shared with the file).", "",
             "| loader | weights (GB) | peak after load (GB) | peak after reading every weight (GB) | "
             "peak / weights | of which file-mapped (GB) | load seconds |", "|---|---|---|---|---|---|---|"]
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        folder = Path(tmp) / "e2b_bf16"
        data = write_random_checkpoint(folder, e2b_config(layers, shared))
        for name in ("ours", "transformers"):
            results[name] = r = run_measure_load(name, folder, limit)
            if r is None:
                lines.append(f"| {name} | {data / 1e9:.2f} | > {limit:.1f} (stopped) | | | | |")
                continue
            loaded, touched = ((r[k] - r["baseline_kb"]) * 1024 for k in ("loaded_kb", "touched_kb"))
            lines.append(f"| {name} | {r['model_bytes'] / 1e9:.2f} | {loaded / 1e9:.2f} | {touched / 1e9:.2f} | "
                         f"{touched / r['model_bytes']:.2f}x | {r['rss_file_kb'] * 1024 / 1e9:.2f} | "
                         f"{r['seconds']:.1f} |")
    ours = results["ours"]
    ratio = (ours["touched_kb"] - ours["baseline_kb"]) * 1024 / ours["model_bytes"]
    lines += ["", f"**Reading:** our loader peaks at {ratio:.2f}x the weights: target <= 1.15x, "
              + ("met." if ratio <= 1.15 else f"missed by {ratio - 1.15:.2f}x.")]
    return lines


# ---- CUDA -------------------------------------------------------------------------------------------------------
def section_cuda(args, q: dict) -> list[str]:
    if not torch.cuda.is_available():
        return ["not measured: no GPU in this run (the prepared GPU check: `python scripts/gpu_check.py`)"]
    layers, shared = (5, 0) if args.quick else (35, 20)
    label = f"E2B-shaped, {layers} layers ({shared} KV-shared)"
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        folder = Path(tmp) / "e2b_bf16"
        write_random_checkpoint(folder, e2b_config(layers, shared))
        res = compare_forward([(label, folder)], torch.bfloat16, "cuda", q)
    lines, ratio4 = forward_markdown(res, q)
    return [f"{torch.cuda.get_device_name()}, bfloat16.", "", *lines, "",
            f"**Reading:** on the GPU ours verifies 5 tokens at {ratio4:.2f}x a one-token decode."]


# ---- the real E2B text geometry ---------------------------------------------------------------------------------
def weight_bytes(model) -> tuple[int, int]:
    """(bytes of every parameter and buffer, bytes of the per-layer-embedding table among them)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    table = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if n.endswith("embed_tokens_per_layer.weight"))
    return sum(t.numel() * t.element_size() for t in tensors.values()), table


def measure_e2b(name: str, folder: str, dtype: str, quick: bool) -> None:
    """In a fresh process (--measure-e2b): load `folder` in `dtype` on CPU, then time prefill, decode and verify
    (`settings()["e2b"]`); print JSON with the RSS after the imports (the baseline), the peak RSS (VmHWM) right
    after loading and after the timing, RssFile, the weights' bytes (and the per-layer table's), and the costs."""
    if name == "transformers":
        from transformers import Gemma4ForCausalLM  # noqa: F401  (imported before the baseline)
    q = settings(quick)["e2b"]
    baseline, start = status_kb("VmRSS"), time.perf_counter()
    impl = load_impl(name, Path(folder), getattr(torch, dtype), "cpu")
    seconds, loaded = time.perf_counter() - start, status_kb("VmHWM")
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    forward = forward_costs([impl], vocab, q, "cpu")[name]
    verify = verify_costs([impl], vocab, q, "cpu")[name]
    total, table = weight_bytes(impl.model)
    print(json.dumps({"baseline_kb": baseline, "loaded_kb": loaded, "after_kb": status_kb("VmHWM"),
                      "rss_file_kb": status_kb("RssFile"), "seconds": seconds, "model_bytes": total,
                      "table_bytes": table, **forward, "verify_ms": {str(n): ms for n, ms in verify.items()}}))


def section_e2b(args, q: dict) -> list[str]:
    layers, shared = (5, 0) if args.quick else (35, 20)
    qe = q["e2b"]
    config = e2b_config(layers, shared)
    label = f"{layers} layers ({shared} KV-shared)" + (" (--quick: not the real geometry)" if args.quick else "")
    lines = [f"E2B text geometry, {label}: the released config's values (hidden 1536, 8 heads, 1 KV head, "
             "head_dim 256/512, double-wide MLP on KV-shared layers, vocab 262144, per-layer inputs 256), random "
             "weights stored in bfloat16, text-only layout in 2 GB shards, written on the fly. One fresh process "
             "per row, so each peak is its own and the implementations did not take turns. Peak = VmHWM minus "
             "the VmRSS after the imports (the absolute VmHWM in brackets), right after loading and after the "
             "timing (every weight used at least once); file-mapped = RssFile at the end (pages of the checkpoint "
             "mapped and read: ours maps the per-layer-embedding table, weights/mapped.py; transformers maps the "
             "file and, when the dtypes match, uses its tensors in place). The ratio divides the peak after the "
             "timing by the weights other than the per-layer table, which a forward only gathers rows of. "
             f"Timings: a {qe['prompt']}-token prefill (last row's logits), median of {qe['decode']} "
             f"one-token decodes after it, and the median of {qe['verify_reps']} forwards over 5 new tokens "
             f"(all rows' logits) at a cache of {qe['context']} positions.", "",
             "| implementation | dtype | weights (GB) | per-layer table (GB) | load s | peak after load (GB) | peak "
             "after the timing (GB) | of which file-mapped (GB) | peak / weights without the table | prefill "
             "tokens/s | decode ms/token | verify 5 tokens ms | verify / decode |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        folder = Path(tmp) / "e2b"
        data = write_random_checkpoint(folder, config, shard_bytes=2 << 30)
        table = config["vocab_size_per_layer_input"] * layers * config["hidden_size_per_layer_input"] * 2
        for dtype in ("bfloat16", "float32"):
            scale = getattr(torch, dtype).itemsize / 2  # the checkpoint is bf16
            for name in ("ours", "transformers"):
                # GiB; transformers converting bf16 to fp32 peaked at 1.5x its weights in a 5-layer run
                need = (data - table if name == "ours" else data) * scale * (1.5 if name != "ours" and scale > 1
                                                                             else 1.15) / 2**30 + 1.0
                free = status_kb("MemAvailable", file="meminfo") / 2**20 - 1.0
                if need > free:
                    lines.append(f"| {name} | {dtype} | not run: needs ~{need:.0f} GB, {free:.0f} GB available "
                                 "|" + " |" * 10)
                    continue
                flags = ("--threads", str(args.threads), *(("--quick",) * args.quick), "--measure-e2b", dtype)
                results[name, dtype] = r = run_measure_load(name, folder, free, flags)
                if r is None:
                    lines.append(f"| {name} | {dtype} | stopped at {free:.1f} GB resident |" + " |" * 10)
                    continue
                loaded, after = ((r[k] - r["baseline_kb"]) * 1024 for k in ("loaded_kb", "after_kb"))
                r["ratio"] = after / (r["model_bytes"] - r["table_bytes"])
                v5 = r["verify_ms"]["4"]
                lines.append(f"| {name} | {dtype} | {r['model_bytes'] / 1e9:.2f} | {r['table_bytes'] / 1e9:.2f} | "
                             f"{r['seconds']:.1f} | {loaded / 1e9:.2f} ({r['loaded_kb'] * 1024 / 1e9:.2f}) | "
                             f"{after / 1e9:.2f} ({r['after_kb'] * 1024 / 1e9:.2f}) | "
                             f"{r['rss_file_kb'] * 1024 / 1e9:.2f} | {r['ratio']:.2f}x | "
                             f"{r['prefill_tokens_per_s']:.1f} | {r['decode_ms']:.0f} | {v5:.0f} | "
                             f"{v5 / r['decode_ms']:.2f}x |")
                print(f"[benchmark] e2b {name} {dtype}: {lines[-1]}", file=sys.stderr, flush=True)
    reading = []
    for dtype in ("bfloat16", "float32"):
        ours, theirs = results.get(("ours", dtype)), results.get(("transformers", dtype))
        if ours is None:
            continue
        ratio = ours["ratio"]
        text = (f"in {dtype} ours peaks at {ratio:.2f}x the weights other than the per-layer table (target <= "
                f"1.15x: " + ("met" if ratio <= 1.15 else f"missed by {ratio - 1.15:.2f}x") + ")")
        if theirs is not None:
            text += (f", transformers at {theirs['ratio']:.2f}x; ours decodes in "
                     f"{ours['decode_ms'] / theirs['decode_ms']:.2f}x transformers' time per token")
        reading.append(text)
    if reading:
        lines += ["", "**Reading:** " + "; ".join(reading) + "."]
    return lines


# ---- main -------------------------------------------------------------------------------------------------------
# ---- batched decoding -------------------------------------------------------------------------------------------
BATCH_SIZES = (1, 2, 4, 8)


def batch_prompts(models: Path, count: int, shortest: int, longest: int) -> list[list[int]]:
    """`count` held-out prompts whose lengths step from `shortest` to `longest` tokens: a ragged batch."""
    full = held_out_prompts(models, count, longest)
    return [ids[: shortest + (longest - shortest) * i // max(1, count - 1)] for i, ids in enumerate(full)]


def run_batches(target, drafter, prompts, size: int, new_tokens: int, **options) -> tuple[float, int, list]:
    """(wall seconds, new tokens, results) of all prompts, `size` at a time, in order."""
    start, results = time.perf_counter(), []
    for i in range(0, len(prompts), size):
        results += generate_batch(target, drafter, prompts[i:i + size], max_new_tokens=new_tokens, **options)
    return time.perf_counter() - start, sum(len(r.tokens) for r in results), results


def section_batch(args, q: dict) -> list[str]:
    target, drafter = load_pair(args.models)
    n = args.draft_tokens or drafter.generation_config.get("num_assistant_tokens", 6)
    prompts = batch_prompts(args.models, max(BATCH_SIZES), q["batch_short"], q["batch_long"])
    new = q["batch_new"]
    modes = {"target only": (None, {}), "speculative": (drafter, {"num_draft_tokens": n, "schedule": "constant"})}
    variants = {"keep finished rows (frozen)": dict(finished="keep"),
                "heuristic, k = rows' max, capped per row": dict(schedule="heuristic"),
                "heuristic, k = rows' min": dict(schedule="heuristic", draft_length="min")}
    run_batches(target, drafter, prompts[:2], 2, 8, num_draft_tokens=n)  # warm-up
    runs = {(mode, b): [] for mode in modes for b in BATCH_SIZES}
    runs.update({(v, 8): [] for v in variants})
    reference = {}
    for _ in range(q["repeats"]):  # interleaved: a slow spell of a shared machine hits every cell alike
        for (mode, b), walls in runs.items():
            model, options = modes.get(mode, (drafter, {"num_draft_tokens": n, "schedule": "constant",
                                                        **variants.get(mode, {})}))
            wall, tokens, results = run_batches(target, model, prompts, b, new, **options)
            walls.append(tokens / wall)
            reference.setdefault(mode, [r.tokens for r in results])
            assert [r.tokens for r in results] == reference["target only"], f"{mode} at batch {b}: outputs differ"
            if mode == "speculative":
                rounds = [r for res in results for r in res.stats.rounds]
                reference["acceptance"] = sum(a for _, a in rounds) / max(1, sum(d for d, _ in rounds))
    tps = {key: statistics.median(v) for key, v in runs.items()}
    lines = [f"{len(prompts)} held-out prompts of {q['batch_short']} to {q['batch_long']} tokens (a ragged batch), up "
             f"to {new} new tokens each (stop tokens end rows early), greedy, N = {n}, float32, "
             f"{torch.get_num_threads()} threads; every prompt generated at each batch size (`generate_batch` over "
             f"chunks of B prompts); tokens/s = all new tokens / wall time (prefills included), median of "
             f"{q['repeats']} interleaved runs. Every run's outputs equal the target-only batch-1 outputs "
             f"(checked). Acceptance (speculative, N = {n}): {reference['acceptance']:.3f}.", "",
             "| batch size | target only tokens/s | speculative tokens/s | speed-up of speculation |",
             "|---|---|---|---|"]
    for b in BATCH_SIZES:
        t, sp = tps["target only", b], tps["speculative", b]
        lines.append(f"| {b} | {t:.1f} | {sp:.1f} | {sp / t:.2f}x |")
    lines += ["", "Choices inside a batch (batch size 8, tokens/s):", "",
              "| variant | tokens/s | vs the default |", "|---|---|---|",
              f"| default: finished rows dropped, constant N = {n} | {tps['speculative', 8]:.1f} | 1.00x |"]
    base = tps["speculative", 8]
    lines += [f"| {v} | {tps[v, 8]:.1f} | {tps[v, 8] / base:.2f}x |" for v in variants]
    e2b = e2b_batch_costs(args, q)
    lines += ["", *e2b]
    lines += plot_batch(tps, args.out.parent / "benchmarks" / "batch.png" if not args.quick
                        else args.out.with_name("batch.quick.png"), args.out.parent)
    first, last = tps["speculative", 1] / tps["target only", 1], tps["speculative", 8] / tps["target only", 8]
    lines += ["", f"**Reading:** speculation speeds decoding up {first:.2f}x at batch size 1 and {last:.2f}x at batch "
              "size 8; batching itself multiplies target-only tokens/s by "
              f"{tps['target only', 8] / tps['target only', 1]:.2f}x from 1 to 8 rows."]
    return lines


@torch.inference_mode()
def e2b_batch_costs(args, q: dict) -> list[str]:
    """An E2B-shaped model (5 layers, bfloat16, random weights: no drafter exists for it, so no acceptance): the
    median ms of a decode step of B rows and of a verify forward over B rows of N + 1 = 5 tokens."""
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        folder = Path(tmp) / "e2b"
        write_random_checkpoint(folder, e2b_config(5, 0))
        model = load_target(folder, dtype=torch.bfloat16)
        costs = {}
        for b in BATCH_SIZES:
            cache = model.new_cache(batch_size=b, max_length=q["e2b"]["context"] + 16, max_rollback=8)
            ids = torch.randint(3, 262144, (b, q["e2b"]["context"] + 5), generator=torch.Generator().manual_seed(b))
            for row in range(b):
                model(ids[row:row + 1, :-5], cache, logits_to_keep=1, rows=slice(row, row + 1))

            def step(k: int) -> None:
                model(ids[:, -5:][:, :k], cache)
                cache.rollback(k)

            times = round_robin({1: lambda: step(1), 5: lambda: step(5)}, q["e2b"]["verify_reps"], 1)
            costs[b] = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        del model
    lines = [f"E2B-shaped model (E2B's layer geometry and vocabulary, 5 layers, bfloat16, random weights), "
             f"{q['e2b']['context']}-token context per row, median ms:", "",
             "| batch size | decode step (B x 1 tokens) | ms per row | verify (B x 5 tokens) | verify / decode |",
             "|---|---|---|---|---|"]
    lines += [f"| {b} | {c[1]:.1f} | {c[1] / b:.1f} | {c[5]:.1f} | {c[5] / c[1]:.2f} |" for b, c in costs.items()]
    return lines


def plot_batch(tps: dict, path: Path, report_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["", "(no plot: matplotlib is not installed; `pip install -e .[plot]`)"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("target only", "speculative"):
        a.plot(BATCH_SIZES, [tps[mode, s] for s in BATCH_SIZES], "o-", label=mode)
    a.set(xlabel="batch size", ylabel="tokens/s (whole batch)", title="Throughput", xticks=BATCH_SIZES)
    a.legend()
    b.plot(BATCH_SIZES, [tps["speculative", s] / tps["target only", s] for s in BATCH_SIZES], "s-")
    b.axhline(1.0, color="black", lw=0.5)
    b.set(xlabel="batch size", ylabel="speculative / target-only", title="Speed-up of speculation",
          xticks=BATCH_SIZES)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return ["", f"![tokens/s and speed-up vs batch size]({os.path.relpath(path, report_dir)})"]


# ---- the compiled path ------------------------------------------------------------------------------------------
def section_compiled(args, q: dict) -> list[str]:
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    target, drafter = load_pair(args.models)
    n = args.draft_tokens or drafter.generation_config.get("num_assistant_tokens", 6)
    prompts = held_out_prompts(args.models, q["prompts"], q["prompt_tokens"])
    start = time.perf_counter()
    first = generate(target, drafter, prompts[0], max_new_tokens=q["new_tokens"], num_draft_tokens=n, compile=True,
                     schedule="constant")
    cold = time.perf_counter() - start
    again = generate(target, drafter, prompts[1], max_new_tokens=q["new_tokens"], schedule="heuristic",
                     compile=True)
    hf_target = Gemma4ForCausalLM.from_pretrained(args.models / "target", dtype=CPU_DTYPE).eval()
    hf_drafter = Gemma4AssistantForCausalLM.from_pretrained(args.models / "drafter", dtype=CPU_DTYPE).eval()
    hf_drafter.generation_config.num_assistant_tokens = n
    hf_drafter.generation_config.num_assistant_tokens_schedule = "constant"

    def ours(ids, compiled):
        res = generate(target, drafter, ids, max_new_tokens=q["new_tokens"], num_draft_tokens=n, compile=compiled,
                       schedule="constant")
        return res.tokens, res.stats.compile_seconds

    @torch.inference_mode()
    def theirs(ids):
        out = hf_target.generate(torch.tensor([ids]), assistant_model=hf_drafter, max_new_tokens=q["new_tokens"],
                                 do_sample=False)
        return out[0, len(ids):].tolist(), 0.0

    runs = {"ours, eager": lambda ids: ours(ids, False), "ours, compiled": lambda ids: ours(ids, True),
            "transformers (assisted generation)": theirs}
    walls = {(name, i): [] for name in runs for i in range(len(prompts))}
    tokens = {}
    for _ in range(q["repeats"]):  # interleaved, so background load hits every implementation alike
        for i, ids in enumerate(prompts):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                tokens[name, i], compiling = fn(ids)
                walls[name, i].append(time.perf_counter() - t0 - compiling)
    tps = {name: sum(len(tokens[name, i]) for i in range(len(prompts)))
           / sum(statistics.median(walls[name, i]) for i in range(len(prompts))) for name in runs}
    equal = sum(tokens["ours, compiled", i] == tokens["ours, eager", i] for i in range(len(prompts)))
    lines = [f"Bundled pair, {len(prompts)} held-out prompts of {q['prompt_tokens']} tokens, up to {q['new_tokens']} "
             f"new tokens, greedy, N = {n}, float32, {torch.get_num_threads()} threads; tokens/s = new tokens / wall "
             f"time of the generate call (prefill included, the compiled path's warm-up excluded), median of "
             f"{q['repeats']} interleaved runs.", "",
             "| implementation | tokens/s | vs eager | vs transformers |", "|---|---|---|---|"]
    lines += [f"| {name} | {v:.1f} | {v / tps['ours, eager']:.2f}x | "
              f"{v / tps['transformers (assisted generation)']:.2f}x |" for name, v in tps.items()]
    lines += ["", f"Compiled tokens equal eager tokens on {equal}/{len(prompts)} prompts. Warm-up: the first "
              f"compiled generation in this process compiled for {first.stats.compile_seconds:.0f} s ({cold:.0f} s "
              f"for the whole call; inductor's on-disk cache may "
              f"already have held kernels from an earlier run), a later one with the heuristic schedule (other "
              f"draft lengths) {again.stats.compile_seconds:.1f} s."]
    lines += ["", *compiled_e2b_costs(args, q, "cpu")]
    if torch.cuda.is_available():
        lines += ["", *compiled_e2b_costs(args, q, "cuda")]
    ratio = tps["ours, compiled"] / tps["ours, eager"]
    versus = tps["ours, compiled"] / tps["transformers (assisted generation)"]
    lines += ["", f"**Reading:** compiled speculative decoding runs at {ratio:.2f}x the eager loop (target >= 2x: "
              + ("met" if ratio >= 2 else "missed") + f") and {versus:.2f}x transformers' assisted generation "
              "(target >= 3x: " + ("met" if versus >= 3 else "missed") + ")."]
    return lines


@torch.inference_mode()
def compiled_e2b_costs(args, q: dict, device: str) -> list[str]:
    """Median ms of a one-token decode and a 5-token verify on an E2B-shaped model (bfloat16): eager, compiled
    (`speculative.compiled`'s target step, after its warm-up) and transformers."""
    from speculative.compiled import CompiledSteps

    layers = 5 if args.quick or device == "cpu" else 35
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        folder = Path(tmp) / "e2b"
        write_random_checkpoint(folder, e2b_config(layers, 0 if layers == 5 else 20))
        ours = load_target(folder, dtype=torch.bfloat16, device=device)
        compiled = CompiledSteps(ours, None)
        hf = load_impl("transformers", folder, torch.bfloat16, device)
        context = q["e2b"]["context"]
        ids = torch.randint(3, 262144, (1, context + 5), generator=torch.Generator().manual_seed(0)).to(device)
        caches = {"eager": ours.new_cache(max_length=context + 8, max_rollback=8),
                  "compiled": ours.new_cache(max_length=context + 8, max_rollback=8, static=True)}
        for cache in caches.values():
            ours(ids[:, :context], cache, logits_to_keep=1)
        hf_cache = hf.new_cache(context + 8, True)
        hf.forward(ids[:, :context], hf_cache, 1)
        forwards = {"eager": lambda x, c: ours(x, c), "compiled": compiled.forward}

        def step(name: str, k: int) -> None:
            if name == "transformers":
                hf.forward(ids[:, context:context + k], hf_cache, None)
                hf.rollback(hf_cache, k)
            else:
                forwards[name](ids[:, context:context + k], caches[name])
                caches[name].rollback(k)

        t0 = time.perf_counter()
        step("compiled", 1), step("compiled", 5)  # the warm-up: compiles both shapes
        warm = time.perf_counter() - t0
        names = ("eager", "compiled", "transformers")
        fns = {(name, k): functools.partial(step, name, k) for name in names for k in (1, 5)}
        times = round_robin(fns, q["e2b"]["verify_reps"], 1, device)
        ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
        del ours, hf, compiled
    lines = [f"E2B-shaped model on {device} ({layers} layers, bfloat16, random weights, {context}-token context), "
             f"median ms (compiling both shapes took {warm:.0f} s):", "",
             "| implementation | decode (1 token) | verify (5 tokens) | verify / decode |", "|---|---|---|---|"]
    lines += [f"| {name} | {ms[name, 1]:.1f} | {ms[name, 5]:.1f} | {ms[name, 5] / ms[name, 1]:.2f} |"
              for name in names]
    return lines


# ---- draft-length schedules -------------------------------------------------------------------------------------
class CostlyDrafter:
    """The bundled drafter with every step computed `repeat` times (the same result each time): a drafter whose steps
    cost about as much as the target's decode step, so that speculation cannot pay."""

    def __init__(self, drafter, repeat: int):
        self.drafter, self.repeat = drafter, repeat
        self.config, self.generation_config = drafter.config, drafter.generation_config
        self.sliding_history = drafter.sliding_history

    def context(self, position, views):
        return self.drafter.context(position, views)

    def step(self, *args, **kwargs):
        for _ in range(self.repeat - 1):
            self.drafter.step(*args, **kwargs)
        return self.drafter.step(*args, **kwargs)


def prose_paragraphs() -> list[str]:
    """English prose: the paragraphs of Python's pydoc topics that are plain sentences (no grammar, no code)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for par in topics[name].split("\n\n"):
            text = " ".join(line.strip() for line in par.splitlines())
            if len(text) > 300 and par[:1].isalpha() and not any(c in par for c in "::=>>>{}[]()_*`"):
                out.append(text)
    return out


def prose_prompts(models: Path, count: int, length: int) -> list[list[int]]:
    tokenizer = load_tokenizer(models / "target")
    prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prose_paragraphs()]
    prompts = [p[:length] for p in prompts if len(p) >= length]
    if len(prompts) < count:
        raise RuntimeError(f"only {len(prompts)} prose paragraphs of pydoc's topics have {length} tokens")
    return prompts[:count]


def decode_rate(results, cpu: bool = False) -> float:
    """A batch's decode tokens per second: every row's decode tokens over the longest row's decode seconds (`cpu`:
    the generating thread's CPU seconds, which other programs' load does not inflate)."""
    seconds = max(r.stats.decode_cpu_seconds if cpu else r.stats.decode_seconds for r in results)
    return sum(r.stats.decode_tokens for r in results) / seconds


def section_schedules(args, q: dict) -> list[str]:
    if args.schedules_from:  # several runs (e.g. one process per dtype, side by side), merged
        runs = [json.loads(Path(f).read_text()) for f in args.schedules_from.split(",")]
        cfg = dict(runs[0]["cfg"], dtypes=tuple(dict.fromkeys(d for r in runs for d in r["cfg"]["dtypes"])))
        results: dict = {}
        processes: dict = {}
        for r in runs:  # a cell measured by several processes: their runs together
            for k, label, v in r["results"]:
                results.setdefault((tuple(k), label), []).extend(v)
                processes[tuple(k)] = processes.get(tuple(k), 0) + (label == "auto")
        cfg["processes"] = max(processes.values())
        curves = next((r["curves"] for r in runs if r["curves"]), {})
        return render_schedules(results, cfg, [x for r in runs for x in r["load"]], curves, args)
    cfg = dict(q["schedules"], threads=torch.get_num_threads())  # the runs' threads, not a merging process's
    if args.dtypes:
        cfg["dtypes"] = tuple(args.dtypes.split(","))
    batches, ns, new = cfg["batches"], cfg["ns"], cfg["new"]
    code = held_out_prompts(args.models, max(batches), cfg["prompt"])
    prose = prose_prompts(args.models, max(batches), cfg["prompt"])
    load = [os.getloadavg()[0]]
    modes = [("target only", False, {}), ("auto", True, {"schedule": "auto"}),
             *((f"N={n}", True, {"schedule": "constant", "num_draft_tokens": n}) for n in ns),
             ("heuristic", True, {"schedule": "heuristic"})]
    results, curves = {}, {}
    for dtype_name in cfg["dtypes"]:
        dtype = getattr(torch, dtype_name)
        target = load_target(args.models / "target", dtype=dtype)
        drafter = load_drafter(args.models / "drafter", target=target, dtype=dtype)
        costly = CostlyDrafter(drafter, repeat=8)
        scenarios = {"code": (drafter, code), "prose": (drafter, prose), "costly drafter, code": (costly, code)}
        for d in (drafter, costly):  # warm-up; auto measures its costs in this process (what a first use does)
            for b in (1, max(batches)):
                generate_batch(target, d, code[:b], max_new_tokens=12, stop_token_ids=[])
        generate_batch(target, None, code[:2], max_new_tokens=4, stop_token_ids=[])
        for scenario, (d, prompts) in scenarios.items():
            for b in batches:
                cell = (dtype_name, scenario, b)
                print(f"[benchmark] schedules {cell}", file=sys.stderr, flush=True)
                want, rates, ks = None, {}, []
                for run in range(cfg["runs"]):  # interleaved: every schedule once per run, the order rotated
                    for label, drafts, options in modes[run % len(modes):] + modes[:run % len(modes)]:
                        out = generate_batch(target, d if drafts else None, prompts[:b], max_new_tokens=new,
                                             stop_token_ids=[], **options)
                        want = want or [r.tokens for r in out]
                        assert [r.tokens for r in out] == want, f"{cell} {label}: outputs differ from the others"
                        rates.setdefault(label, []).append(decode_rate(out))
                        rates.setdefault(f"{label} {CPU}", []).append(decode_rate(out, cpu=True))
                        if label == "auto":
                            ks += [k for r in out for k in r.stats.draft_lengths]
                for label, values in rates.items():
                    results[cell, label] = values  # every run's, in order
                results[cell, "auto k"] = ks
        if dtype_name == "float32":
            curves = schedule_curve(target, drafter, code[0], prose, cfg["curve"])
    load.append(os.getloadavg()[0])
    raw = args.out.parent / f"schedules-{'-'.join(cfg['dtypes'])}.json"  # for render_schedules of several runs
    raw.write_text(json.dumps({"cfg": cfg, "load": load, "curves": curves,
                               "results": [[list(key[0]), key[1], value] for key, value in results.items()]}))
    return render_schedules(results, cfg, load, curves, args)


CPU = "(cpu)"  # the results' label of a schedule's rates in CPU time


def held_out_best(runs: dict[int, list[float]]) -> tuple[float, int, int]:
    """(tokens/s, N, N) of the best constant N, each half of the runs choosing N for the other half to time.

    The largest of eight medians, several of them within noise of each other, is an overestimate (the winner's
    curse): it picks the N whose runs were luckiest, by about one run-to-run spread here. So the N chosen on the
    even-numbered runs is timed by the odd-numbered ones and vice versa, and the two timings are averaged: still a
    choice after the fact, but no run both chooses and times."""
    halves = [{n: v[i::2] for n, v in runs.items()} for i in (0, 1)]
    chosen = [max(h, key=lambda n: statistics.median(h[n])) for h in halves]
    timed = [statistics.median(halves[1 - i][n]) for i, n in enumerate(chosen)]
    return statistics.mean(timed), chosen[0], chosen[1]


def render_schedules(runs: dict, cfg: dict, load: list[float], curves: dict, args) -> list[str]:
    """The section's text and plots from measured cells (one process's runs, or several processes' merged)."""
    batches, ns, new = cfg["batches"], cfg["ns"], cfg["new"]
    results = {key: statistics.mean(v) if key[1] == "auto k" else statistics.median(v) for key, v in runs.items()}
    count = min(len(v) for key, v in runs.items() if key[1] != "auto k")
    where = f" in {cfg['processes']} processes" if cfg.get("processes", 1) > 1 else ""
    lines = [f"The bundled pair; {max(batches)} held-out code prompts (the drafter's domain) and {max(batches)} "
             f"English prose paragraphs (pydoc's topics) of {cfg['prompt']} tokens; the costly drafter is the "
             "bundled one computing each step 8 times (same drafts, about the cost of a target decode step). Each "
             f"cell runs the first B prompts as one batch, greedy, {new} new tokens per row (a few tens of rounds: "
             "`auto` learns within the generation, and real generations are longer still), "
             f"{cfg.get('threads', torch.get_num_threads())} thread(s); decode tokens/s = all rows' decode tokens / the batch's decode "
             f"seconds (prefill excluded). Each figure is the median of {count} runs{where}, interleaved within "
             "each cell (a run runs every schedule once, the order rotated by one schedule per run, so that a drift "
             "in the machine's speed spreads over all schedules); every output equals target-only (checked). `auto` "
             "runs as a first use in a process would after a warm-up generation per drafter: it measured its costs "
             "in this process, and each generation starts from the pair's recent acceptance. **Best N** is timed on "
             "runs that did not choose it (`held_out_best`: the N with the best median over the even-numbered runs "
             "timed by the odd-numbered ones and vice versa, the two averaged); the largest median of the eight N "
             "(the last column) favours whichever N had the luckiest runs. Load average (1 min) at the start and "
             f"end of each process: {', '.join(f'{x:.1f}' for x in load)} (a shared 2-core machine: single runs "
             "are noisy).", "",
             "| dtype | prompts | B | target only | " + " | ".join(f"N={n}" for n in ns) + " | heuristic | auto "
             "(mean k) | auto / target only | auto / best N (held out) | auto / largest median |",
             "|---" * (9 + len(ns)) + "|"]

    def ratios(cell, suffix=""):
        """auto / target only, auto / best N (held out), auto / largest median; the chosen N's."""
        auto = results[cell, "auto" + suffix]
        best, n1, n2 = held_out_best({n: runs[cell, f"N={n}{suffix}"] for n in ns})
        top_n = max(ns, key=lambda n: results[cell, f"N={n}{suffix}"])
        return (auto / results[cell, "target only" + suffix], auto / best,
                auto / results[cell, f"N={top_n}{suffix}"], n1, n2, top_n)

    cells = [(d, scenario, b) for d in cfg["dtypes"] for scenario in ("code", "prose", "costly drafter, code")
             for b in batches]
    worst = {"target": (9.0, None), "best": (9.0, None), "largest": (9.0, None)}
    for cell in cells:
        dtype_name, scenario, b = cell
        base, auto = results[cell, "target only"], results[cell, "auto"]
        r1, r2, r3, n1, n2, top_n = ratios(cell)
        for name, r in (("target", r1), ("best", r2), ("largest", r3)):
            worst[name] = min(worst[name], (r, cell))
        chosen = f"N={n1}" if n1 == n2 else f"N={n1}, {n2}"
        lines.append(f"| {dtype_name} | {scenario} | {b} | {base:.1f} | "
                     + " | ".join(f"{results[cell, f'N={n}']:.1f}" for n in ns)
                     + f" | {results[cell, 'heuristic']:.1f} | {auto:.1f} ({results[cell, 'auto k']:.1f}) | "
                     f"{r1:.2f} | {r2:.2f} ({chosen}) | {r3:.2f} (N={top_n}) |")
    (r1, c1), (r2, c2), (r3, c3) = worst["target"], worst["best"], worst["largest"]
    lines += ["", f"**Worst cells:** auto / target-only {r1:.2f} ({', '.join(map(str, c1))}; target >= 0.97), "
              f"auto / best constant N {r2:.2f} ({', '.join(map(str, c2))}; target >= 0.95); against the largest "
              f"median of the eight N, {r3:.2f} ({', '.join(map(str, c3))})."]
    if all((cell, f"auto {CPU}") in results for cell in cells):
        lines += ["", "The same runs timed in the generating thread's CPU seconds (`stats.decode_cpu_seconds`) instead "
                  "of wall seconds: what a core of its own would give, which the load of other programs on this "
                  "shared machine does not inflate (the run-to-run spread of wall time here is up to 15 %, more "
                  "than the margins of the two targets). auto / target only, auto / best N (held out):", ""]
        cpu = {cell: ratios(cell, " " + CPU) for cell in cells}
        lines += ["| dtype | prompts | " + " | ".join(f"B = {b}" for b in batches) + " |",
                  "|---" * (2 + len(batches)) + "|"]
        for d in cfg["dtypes"]:
            for scenario in ("code", "prose", "costly drafter, code"):
                lines.append(f"| {d} | {scenario} | " + " | ".join(
                    f"{cpu[d, scenario, b][0]:.2f}, {cpu[d, scenario, b][1]:.2f}" for b in batches) + " |")
        (t1, c1), (t2, c2) = (min((cpu[c][i], c) for c in cells) for i in (0, 1))
        lines += ["", f"**Worst cells in CPU time:** auto / target-only {t1:.2f} ({', '.join(map(str, c1))}), "
                  f"auto / best constant N {t2:.2f} ({', '.join(map(str, c2))})."]
    lines += plot_schedules(results, cfg, curves, args)
    return lines


def schedule_curve(target, drafter, code: list[int], prose: list[list[int]], new: int) -> dict:
    """`auto`'s k over a conversation-like generation: `new` tokens after a code prompt, then, on the same cache,
    the text so far + an English paragraph and `new` more tokens (each generate call starts its acceptance
    estimates afresh; the costs carry over)."""
    from speculative import new_session_cache

    cache = new_session_cache(target, drafter)
    first = generate(target, drafter, code, max_new_tokens=new, stop_token_ids=[], cache=cache)
    history = code + first.tokens + prose[0][1:]
    second = generate(target, drafter, history, max_new_tokens=new, stop_token_ids=[], cache=cache)
    return {"code": first.stats.draft_lengths, "prose": second.stats.draft_lengths,
            "rates": first.stats.expected_tokens_per_second + second.stats.expected_tokens_per_second}


def plot_schedules(results: dict, cfg: dict, curves: dict, args) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = args.out.parent / "benchmarks" if not args.quick else args.out.parent
    path, kpath = (folder / "schedules.png", folder / "schedules_k.png") if not args.quick else (
        args.out.with_name("schedules.quick.png"), args.out.with_name("schedules_k.quick.png"))
    path.parent.mkdir(parents=True, exist_ok=True)
    scenarios = ("code", "prose", "costly drafter, code")
    fig, axes = plt.subplots(len(cfg["dtypes"]), 3, figsize=(15, 4.2 * len(cfg["dtypes"])), squeeze=False)
    for row, dtype_name in enumerate(cfg["dtypes"]):
        for col, scenario in enumerate(scenarios):
            a = axes[row][col]
            cells = [(dtype_name, scenario, b) for b in cfg["batches"]]
            x = range(len(cells))
            for n in cfg["ns"]:
                a.plot(x, [results[c, f"N={n}"] / results[c, "target only"] for c in cells], color="tab:blue",
                       alpha=0.25 + 0.075 * n, lw=1, label="constant N (darker: larger)" if n == cfg["ns"][0] else None)
            a.plot(x, [results[c, "heuristic"] / results[c, "target only"] for c in cells], "s--", color="gray",
                   label="heuristic")
            a.plot(x, [results[c, "auto"] / results[c, "target only"] for c in cells], "o-", color="tab:red", lw=2.5,
                   label="auto")
            a.axhline(1.0, color="black", lw=0.8)
            a.set_xticks(list(x), [str(b) for b in cfg["batches"]])
            a.set(title=f"{scenario}, {dtype_name}", xlabel="batch size", ylabel="tokens/s / target-only")
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    lines = ["", f"![tokens/s per cell and schedule]({path.relative_to(args.out.parent)})"
             if path.is_relative_to(args.out.parent) else f"plot: {path}"]
    if curves:
        fig, a = plt.subplots(figsize=(9, 3.2))
        ks = curves["code"] + curves["prose"]
        a.step(range(len(ks)), ks, where="post", color="tab:red")
        a.axvline(len(curves["code"]), color="gray", ls=":")
        a.text(len(curves["code"]) + 0.5, max(ks) * 0.9 if ks else 1, "prose paragraph appended", fontsize=8)
        a.set(xlabel="decode pass", ylabel="k chosen by auto", title="auto's draft length: code, then English prose "
              "(float32, batch 1)")
        fig.tight_layout()
        fig.savefig(kpath, dpi=110)
        plt.close(fig)
        lines += ["", f"![k over a generation]({kpath.relative_to(args.out.parent)})"
                  if kpath.is_relative_to(args.out.parent) else f"plot: {kpath}",
                  "", f"Mean k: {statistics.mean(curves['code']):.2f} over the code part, "
                  f"{statistics.mean(curves['prose']):.2f} over the prose part."]
    return lines


# ---- side by side: ours eager and compiled, transformers, llama.cpp ---------------------------------------------
def llama_cpp_tree(args) -> Path | None:
    """A built llama.cpp source tree (`--llama-cpp DIR` or $LLAMA_CPP): DIR/convert_hf_to_gguf.py and the binaries
    llama-completion and llama-speculative-simple in DIR/build/bin. None when there is none: this script installs
    nothing (README.md, "llama.cpp as a benchmark peer", says how to get one)."""
    folder = args.llama_cpp or os.environ.get("LLAMA_CPP")
    if not folder:
        return None
    folder = Path(folder)
    needed = [folder / "convert_hf_to_gguf.py", *(folder / "build" / "bin" / b for b in LLAMA_CPP_BINARIES)]
    return folder if all(p.is_file() for p in needed) else None


LLAMA_CPP_BINARIES = ("llama-completion", "llama-speculative-simple")


def to_gguf(tree: Path, model: Path, dtype: str, out: Path) -> Path:
    """The checkpoint converted by llama.cpp's own converter (it reads tokenizer.json, which tiny_gemma4 ships)."""
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model), "--outtype",
                    {"float32": "f32", "bfloat16": "bf16"}[dtype], "--outfile", str(out)], env=env, check=True,
                   capture_output=True)
    return out


def run_llama_cpp(tree: Path, target: Path, drafter: Path | None, text: str, new_tokens: int, n: int,
                  threads: int) -> tuple[str, float]:
    """Greedy generation of `new_tokens` tokens after `text` (llama.cpp adds <bos>), target-only
    (llama-completion) or speculative with the MTP drafter (llama-speculative-simple --spec-type draft-mtp, N
    drafts). Returns the generated text and tokens/s = new tokens / (prompt eval + generation) seconds, as ours
    (the process start and model load excluded)."""
    common = ["-m", str(target), "-p", text, "-n", str(new_tokens), "--temp", "0", "-t", str(threads), "-tb",
              str(threads), "-c", "1024", "--ignore-eos"]
    if drafter is None:
        cmd = [str(tree / "build" / "bin" / "llama-completion"), *common, "-no-cnv", "--no-display-prompt",
               "--no-warmup"]
    else:
        cmd = [str(tree / "build" / "bin" / "llama-speculative-simple"), *common, "-md", str(drafter),
               "--spec-type", "draft-mtp", "--spec-draft-n-max", str(n), "-td", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if " E " in line or "error" in line.lower()]
        raise LlamaCppRefused(f"{Path(cmd[0]).name} failed ({done.returncode}): "
                              + (errors[0].split(": ", 1)[-1] if errors else done.stderr[-500:]))
    log = done.stderr
    if drafter is None:
        prompt_ms = float(re.search(r"prompt eval time =\s*([\d.]+) ms", log).group(1))
        eval_ms = float(re.search(r"\n[^\n]*?\beval time =\s*([\d.]+) ms", log.split("prompt eval time")[1]).group(1))
        # llama-completion prints "\n\n" after the generated text (completion.cpp, before its timings)
        text_out = done.stdout[:-2] if done.stdout.endswith("\n\n") else done.stdout
        seconds = (prompt_ms + eval_ms) / 1e3
    else:
        m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        prompt = re.search(r"encoded\s+\d+ tokens in\s+([\d.]+) seconds", log)
        seconds = float(m.group(2)) + (float(prompt.group(1)) if prompt else 0.0)
        text_out = done.stdout[len(text):] if done.stdout.startswith(text) else done.stdout
    return text_out, new_tokens / seconds


class LlamaCppRefused(RuntimeError):
    """llama.cpp did not run a configuration (its message says why)."""


def measure_warmup(dtype: str, models: str, spec: bool) -> None:
    """(--measure-warmup, in a fresh process) the compile seconds of a first compiled generation, as JSON."""
    start = time.perf_counter()
    target = load_target(Path(models) / "target", dtype=getattr(torch, dtype))
    drafter = load_drafter(Path(models) / "drafter", target=target, dtype=target.dtype) if spec else None
    loaded = time.perf_counter() - start
    res = generate(target, drafter, list(range(5, 40)), max_new_tokens=40, schedule="heuristic" if spec else "constant",
                   compile=True)
    print(json.dumps({"compile_seconds": res.stats.compile_seconds, "load_seconds": loaded,
                      "process_seconds": time.perf_counter() - start}))


def section_llamacpp(args, q: dict) -> list[str]:
    """Side by side on the bundled pair: ours eager and compiled, transformers, llama.cpp; target-only and
    speculative; float32 and bfloat16; 1 and 2 threads; plus the compiled path's warm-up in a first and a second
    process. Every implementation generates greedily from the same prompts, interleaved, median of q["repeats"]."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    tree = llama_cpp_tree(args)
    if tree is None:
        return ["skipped: llama.cpp not found (pass --llama-cpp DIR or set LLAMA_CPP to a built llama.cpp source "
                "tree; README.md, \"llama.cpp as a benchmark peer\", says how to build one)"]
    tokenizer = load_tokenizer(args.models / "target")
    prompts = held_out_prompts(args.models, q["peer_prompts"], q["prompt_tokens"])
    texts = [tokenizer.decode(ids[1:]) for ids in prompts]  # llama.cpp tokenizes the text and adds <bos> itself
    new = q["peer_tokens"]
    lines, load = [], [os.getloadavg()[0]]
    tmp = Path(tempfile.mkdtemp(dir=args.tmp_dir, prefix="gguf-"))
    warm = {}
    # Warm-up figures first: a fresh process with an empty kernel cache, then another one with the cache the first
    # left; this process then uses that cache too (its own warm-up is not what is measured here).
    cache = Path(tempfile.mkdtemp(dir=args.tmp_dir, prefix="inductor-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read by inductor at its first compile, which comes later
    for dtype in ("float32", "bfloat16"):
        for attempt in ("first", "second"):
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--measure-warmup", dtype,
                                  str(args.models), "spec"], capture_output=True, text=True, check=True)
            warm[dtype, attempt] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"[llamacpp] warm-up {dtype} {attempt} process: {warm[dtype, attempt]}, load "
                  f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows: dict = {}
    equal: dict = {}
    refused: dict = {}
    for dtype in ("float32", "bfloat16"):
        torch_dtype = getattr(torch, dtype)
        target = load_target(args.models / "target", dtype=torch_dtype)
        drafter = load_drafter(args.models / "drafter", target=target, dtype=torch_dtype)
        n = args.draft_tokens or drafter.generation_config.get("num_assistant_tokens", 6)
        hf_target = Gemma4ForCausalLM.from_pretrained(args.models / "target", dtype=torch_dtype).eval()
        hf_drafter = Gemma4AssistantForCausalLM.from_pretrained(args.models / "drafter", dtype=torch_dtype).eval()
        hf_drafter.generation_config.num_assistant_tokens = n
        hf_drafter.generation_config.num_assistant_tokens_schedule = "constant"
        ggufs = {m: to_gguf(tree, args.models / m, dtype, tmp / f"{m}-{dtype}.gguf") for m in ("target", "drafter")}
        for threads in (1, 2):  # this process's warm-up, not timed: a compiled graph holds its thread count
            torch.set_num_threads(threads)
            for spec in (False, True):
                generate(target, drafter if spec else None, prompts[0], max_new_tokens=new, num_draft_tokens=n,
                         stop_token_ids=[], compile=True)

        def ours(i, spec, compiled):
            res = generate(target, drafter if spec else None, prompts[i], max_new_tokens=new, num_draft_tokens=n,
                           stop_token_ids=[], compile=compiled)
            return tokenizer.decode(res.tokens), new / (res.stats.prefill_seconds + res.stats.decode_seconds)

        @torch.inference_mode()
        def theirs(i, spec):
            extra = dict(assistant_model=hf_drafter) if spec else {}
            start = time.perf_counter()
            out = hf_target.generate(torch.tensor([prompts[i]]), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, **extra)
            return tokenizer.decode(out[0, len(prompts[i]):].tolist()), new / (time.perf_counter() - start)

        def peer(i, spec, threads):
            if spec and (dtype, "spec") in refused:
                return None, float("nan")
            try:
                return run_llama_cpp(tree, ggufs["target"], ggufs["drafter"] if spec else None, texts[i], new, n,
                                     threads)
            except LlamaCppRefused as error:  # e.g. a drafter this build does not load: recorded, not fatal
                refused[dtype, "spec"] = str(error)
                return None, float("nan")

        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = {"ours, eager": lambda i, s: ours(i, s, False), "ours, compiled": lambda i, s: ours(i, s, True),
                    "transformers": theirs, "llama.cpp": lambda i, s: peer(i, s, threads)}
            for spec in (False, True):
                speeds = {name: {i: [] for i in range(len(prompts))} for name in runs}
                outputs = {}
                for _ in range(q["repeats"]):  # interleaved: a busy spell hits every implementation alike
                    for i in range(len(prompts)):
                        for name, fn in runs.items():
                            outputs[name, i], tps = fn(i, spec)
                            speeds[name][i].append(tps)
                    load.append(os.getloadavg()[0])
                for name in runs:
                    rows[name, dtype, spec, threads] = statistics.median(
                        statistics.median(v) for v in speeds[name].values())
                    equal[name, dtype, spec, threads] = sum(
                        outputs[name, i] == outputs["ours, eager", i] for i in range(len(prompts))
                        if outputs[name, i] is not None)
                    print(f"[llamacpp] {name}, {dtype}, {'speculative' if spec else 'target-only'}, {threads} thr: "
                          f"{rows[name, dtype, spec, threads]:.1f} tokens/s, same text "
                          f"{equal[name, dtype, spec, threads]}/{len(prompts)}, load {os.getloadavg()[0]:.1f}",
                          file=sys.stderr, flush=True)
        torch.set_num_threads(args.threads)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    modes = [(dtype, spec) for spec in (False, True) for dtype in ("float32", "bfloat16")]
    head = " | ".join(f"{'speculative' if spec else 'target-only'} {dtype}, {t} thr" for dtype, spec in modes
                      for t in (1, 2))
    lines += [f"Bundled pair, {len(prompts)} held-out prompts of {q['prompt_tokens']} tokens, {new} new tokens each "
              f"(end-of-sequence ignored), greedy, speculative with N = {n}; tokens/s = new tokens / (prefill + "
              f"generation) seconds (process start, loading and the compiled path's warm-up excluded), median over "
              f"prompts of the median of {q['repeats']} interleaved runs. llama.cpp: `{tree.name}` built from "
              "source, the pair converted by its convert_hf_to_gguf.py to GGUF in the same dtype, target-only "
              "with llama-completion, speculative with llama-speculative-simple --spec-type draft-mtp. "
              f"Load average (1 min) during the run: {min(load):.1f} to {max(load):.1f}.", "",
              f"| implementation | {head} |", "|---|" + "---|" * (len(modes) * 2)]
    for name in ("ours, eager", "ours, compiled", "transformers", "llama.cpp"):
        cells = [f"{rows[name, d, s, t]:.1f}" if rows[name, d, s, t] == rows[name, d, s, t] else "refused"
                 for d, s in modes for t in (1, 2)]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    for (d, _), why in refused.items():
        lines += ["", f"llama.cpp refused the speculative run in {d}: {why}. The ratios below for speculative "
                  "decoding are then against llama.cpp's target-only decoding."]
        if "embedding_length_out" in why:  # its loader reads a drafter as wide as the target as "not set"
            lines[-1] += (" (Its loader reads the drafter's `embedding_length_out` equal to the drafter's own "
                          "width as unset, and the bundled drafter is as wide as its target, 128; the released "
                          "drafters are narrower than their targets.)")
    lines += ["", "Same greedy text as ours (eager) on how many prompts: " + "; ".join(
        f"{name} {min(equal[name, d, s, t] for d, s in modes for t in (1, 2))}/{len(prompts)}"
        for name in ("ours, compiled", "transformers", "llama.cpp")) + " (worst over the columns).", ""]
    def peer_speed(d, s, t):  # llama.cpp's speculative figure, or its target-only one where it refused the pair
        value = rows["llama.cpp", d, s, t]
        return value if value == value else rows["llama.cpp", d, False, t]

    lines += ["Ratios, ours compiled / llama.cpp: " + "; ".join(
        f"{'speculative' if s else 'target-only'} {d}, {t} thr "
        f"{rows['ours, compiled', d, s, t] / peer_speed(d, s, t):.3f}x" for d, s in modes for t in (1, 2)) + ".", ""]
    lines += ["Warm-up of the compiled path (`stats.compile_seconds`, speculative with the heuristic schedule: every "
              "shape any schedule uses), each in a fresh process, with an empty kernel cache and then with the first "
              "one's: " + "; ".join(f"{d} {warm[d, 'first']['compile_seconds']:.1f} s first, "
                                     f"{warm[d, 'second']['compile_seconds']:.1f} s second"
                                     for d in ("float32", "bfloat16")) + "."]
    return lines


KEPT = "Kept from an earlier run (not rerun by `--only"


def previous_sections(path: Path) -> dict[str, list[str]]:
    """{section heading: its lines} of an existing BENCHMARKS.md, for the sections a run with --only does not
    rerun (so that `--only e2b` adds its section instead of erasing the others); "not run" sections are left out."""
    if not path.exists():
        return {}
    sections, current = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:], [])
        elif current is not None and not line.startswith(KEPT):
            current.append(line)
    return {title: lines for title, lines in ((t, "\n".join(b).strip().splitlines()) for t, b in sections.items())
            if lines and not lines[0].startswith("not run")}


def settings(quick: bool) -> dict:
    if quick:
        return dict(prompt=64, decode=4, reps=1, context=64, ns=[0, 1, 3, 4], verify_reps=2, prompts=2,
                    prompt_tokens=48, new_tokens=24, repeats=1, tradeoff_ns=[1, 2, 4], cost_reps=5,
                    memory_layers=(5, 0), e2b=dict(prompt=16, decode=3, reps=1, context=16, ns=[0, 4], verify_reps=2),
                    batch_short=16, batch_long=48, batch_new=12,
                schedules=dict(batches=(1, 2), dtypes=("float32",), prompt=16, new=8, ns=(1, 4), curve=8, runs=2), peer_prompts=1, peer_tokens=16)
    return dict(prompt=512, decode=32, reps=3, context=300, ns=list(range(9)), verify_reps=7, prompts=5,
                prompt_tokens=120, new_tokens=128, repeats=3, tradeoff_ns=list(range(1, 9)), cost_reps=30,
                memory_layers=(35, 20),
                e2b=dict(prompt=64, decode=8, reps=1, context=64, ns=[0, 4], verify_reps=5),
                batch_short=40, batch_long=160, batch_new=96,
                schedules=dict(batches=(1, 4, 8, 16), dtypes=("float32", "bfloat16"), prompt=32, new=64,
                               ns=tuple(range(1, 9)), curve=96, runs=6), peer_prompts=3, peer_tokens=64)


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [f"- CPU: {cpu}, {os.cpu_count()} cores; GPU: {gpu}",
            f"- torch {torch.__version__} (torch.get_num_threads() = {torch.get_num_threads()}); transformers {hf}; "
            f"Python {platform.python_version()}"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run, not a measurement")
    p.add_argument("--models", type=Path, default=ROOT / "tiny_gemma4", help="folder with target/ and drafter/")
    p.add_argument("--draft-tokens", type=int, default=None, help="N for the spec section (default: the drafter's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp-dir", default=None, help="where random checkpoints are written (the memory one: ~10 GB)")
    p.add_argument("--out", type=Path, default=None, help="the report's file; its plots go to a benchmarks/ folder "
                   "beside it (default: gemma4-benchmarks/BENCHMARKS.md in the temporary directory; --quick: "
                   "BENCHMARKS.quick.md there)")
    p.add_argument("--write", action="store_true", help="write the committed BENCHMARKS.md and benchmarks/*.png of "
                   "this repository (only for a run on a quiet machine whose figures should replace them)")
    p.add_argument("--dtypes", default=None, help="schedules section: comma-separated dtypes (default "
                   "float32,bfloat16)")
    p.add_argument("--schedules-from", default=None, metavar="JSON,...", help="schedules section: render the "
                   "cells that earlier runs measured (their schedules-*.json files) instead of measuring")
    p.add_argument("--measure-load", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--measure-e2b", nargs=3, metavar=("DTYPE", "IMPL", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--measure-warmup", nargs=3, metavar=("DTYPE", "FOLDER", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--llama-cpp", default=None, help="a built llama.cpp source tree, for the llamacpp section "
                   "(default: $LLAMA_CPP; the section is skipped without one)")
    args = p.parse_args(argv)
    if args.write and (args.out is not None or args.quick):
        p.error("--write replaces the committed BENCHMARKS.md: not with --out or --quick")
    temporary = Path(tempfile.gettempdir())
    default = temporary / "BENCHMARKS.quick.md" if args.quick else temporary / "gemma4-benchmarks" / "BENCHMARKS.md"
    args.out = ROOT / "BENCHMARKS.md" if args.write else (args.out or default)
    args.plot = args.out.parent / "benchmarks" / "tradeoff.png" if not args.quick else args.out.with_suffix(".png")
    # now, not with the report: sections write their raw results (schedules-*.json) beside it as they finish, and a
    # missing folder failed a 15-minute grid at its end
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.parser = p
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    p = args.parser
    torch.set_num_threads(args.threads)
    if args.measure_load:
        measure_load(*args.measure_load)
        return 0
    if args.measure_warmup:
        dtype, folder, mode = args.measure_warmup
        measure_warmup(dtype, folder, mode == "spec")
        return 0
    if args.measure_e2b:
        dtype, name, folder = args.measure_e2b
        measure_e2b(name, folder, dtype, args.quick)
        return 0
    only = [s.strip() for s in args.only.split(",")]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if not (args.models / "target").is_dir() and set(only) & {"forward", "spec", "tradeoff"}:
        p.error(f"{args.models} has no target/: train it (scripts/train_tiny.py) or pass --models")
    q = settings(args.quick)
    titles = {"forward": "1. Forward cost, ours vs transformers (CPU, float32)",
              "spec": "2. Speculative decoding, ours vs transformers' assisted generation (bundled tiny pair)",
              "tradeoff": "3. The draft-length trade-off (bundled tiny pair, ours)",
              "memory": "4. Loading memory (full-size E2B-shaped checkpoint, bfloat16)",
              "cuda": "5. GPU (CUDA, bfloat16, full E2B geometry)",
              "e2b": "6. The real E2B text geometry on CPU: loading, decode and verify, ours vs transformers",
              "training": "7. Training a drafter for a new domain (bundled tiny pair, `scripts/train_drafter.py`)",
              "batch": "8. Batched decoding: tokens/s per batch size, speculative and target-only",
              "compiled": "9. The compiled path (torch.compile), ours eager vs compiled vs transformers",
              "schedules": "10. Draft-length schedules: auto against target-only and every constant N",
              "llamacpp": "11. Side by side: ours (eager, compiled), transformers and llama.cpp"}
    functions = {"forward": section_forward, "spec": section_spec, "tradeoff": section_tradeoff,
                 "memory": section_memory, "cuda": section_cuda, "e2b": section_e2b, "batch": section_batch,
                 "compiled": section_compiled, "schedules": section_schedules,
                 "llamacpp": section_llamacpp}
    command = "python scripts/benchmark.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    models = args.models.relative_to(ROOT) if args.models.is_relative_to(ROOT) else args.models
    doc = ["# Benchmarks", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
           "", *machine(), f"- models: `{models}`" + (" (--quick: smoke settings, not a measurement)" * args.quick), ""]
    previous = previous_sections(args.out if args.out.exists() or args.quick else ROOT / "BENCHMARKS.md")
    for name in SECTIONS:
        doc += [f"## {titles[name]}", ""]
        if name in MEASURED_ELSEWHERE:
            doc += previous.get(titles[name], ["not measured yet: see README.md, Training a drafter"])
        elif name not in only and titles[name] in previous:
            doc += [f"{KEPT} {args.only}`; the machine and versions above are this run's).", "",
                    *previous[titles[name]]]
        elif name in only:
            start = time.perf_counter()
            print(f"[benchmark] {name} ...", file=sys.stderr, flush=True)
            doc += functions[name](args, q)
            print(f"[benchmark] {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        else:
            doc.append(f"not run (`--only {args.only}`)")
        doc.append("")
    args.out.write_text("\n".join(doc))
    print("\n".join(doc))
    print(f"[benchmark] report written to {args.out}" + ("" if args.write else " (--write: the committed "
          "BENCHMARKS.md)"), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
