"""One command for a GPU machine: is the CUDA path right, where does it fall off a fused kernel, how fast is it.

    python scripts/gpu_check.py                  # CUDA, at most ~8 minutes on one H200; needs transformers
    python scripts/gpu_check.py --cpu-smoke      # the same code at tiny sizes on the CPU (generic path), seconds

Writes `gpu_check.json` and `gpu_check.md` (a table per part) into `--out` (default: the current folder). Every part
runs inside a time budget (`--budget-s`, default 450 s): a part that would start after the budget is spent is
recorded as skipped, and a part that fails is recorded with its error, so one run always leaves its figures.

Parts, in order:
1. parity: every tiny family of tests/tiny.py, our logits vs transformers' on the device (a 40-token prefill of
   2 rows, then decoding in chunks over a cache). float32 within 1e-4; bfloat16 ours against transformers' float32
   logits within twice transformers' own bfloat16 error (plus 0.05): the generic path promises rounding, not bits.
2. mismatch: greedy speculative vs target-only tokens in bfloat16 (tiny family pairs biased to accept drafts,
   many prompts): how many runs differ, and where (the generic path does not promise equality; the CPU path does),
   by default and with `fixed_rows(16)` (products and attention padded to 16 rows: what it keeps).
3. geometry: E2B, E4B, 31B and 26B-A4B text geometry (benchmarks/text_geometries.json) in bfloat16 with random
   weights built on the device (transformers' model, initialised there; ours shares its tensors): build time, peak
   memory, prefill tokens/s at 2k and 8k tokens, decode ms after a 2k prompt, verify ms for N = 1..8 drafts
   (N + 1 rows), eager; transformers' decode and verify on the same weights; our attention run with SDPA's math
   kernel disabled (an error names a call that would fall back to it), and each SDPA call's fused kernels by
   gemma4.generic.fused_backends against torch's own answer; decode and verify again with the row-count policy
   `gemma4.generic.fixed_rows(16)` (its cost). The per-layer-embedding table (E2B): a decode step's
   rows gathered on the device vs gathered on the host and copied (weights/mapped.py).
4. compiled: decode and verify ms through speculative/compiled.py (CUDA graphs) for the geometries the budget allows
   (E2B first).
5. bundled: the bundled tiny pair's target-only vs speculative tokens/s (float32 and bfloat16, interleaved, median
   of 3) and whether the outputs are equal; and the mismatch count over prompts from the Python standard library's
   own source (the corpus it was trained on).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gemma4 import Gemma4Config, Gemma4Model, generic  # noqa: E402
from gemma4.generic import generic_path  # noqa: E402

GEOMETRIES = ROOT / "benchmarks" / "text_geometries.json"
FP32_TOL = 1e-4
FIXED_ROWS = 16  # gemma4.generic.fixed_rows: the row-count policy measured next to the default


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


class Check:
    """The run's settings: device, sizes (full or smoke), budget, and the results being collected."""

    def __init__(self, args):
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.budget = Budget(args.budget_s)
        self.results: dict = {"device": self._describe(), "mode": "cpu-smoke" if self.smoke else "cuda",
                              "torch": torch.__version__}
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))

    def _describe(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(0)
        return "cpu (generic path)"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, repeats: int) -> float:
        """Median wall ms of fn() over `repeats` calls (synchronised), after one warm-up call."""
        fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def part(self, name: str, fn, *, needs_s: float = 0.0):
        """Run one part: its result, or {"skipped": why} / {"error": ...}; printed as it goes."""
        if self.budget.left() < needs_s:
            self.results[name] = {"skipped": f"time budget ({self.budget.left():.0f} s left)"}
            print(f"[{name}] skipped: budget", flush=True)
            return
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            self.results[name] = fn()
        except Exception as e:  # recorded, so that the other parts still run and report
            self.results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            print(f"[{name}] error: {e}", flush=True)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _ids(rows: int, n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(2, vocab, (rows, n), generator=torch.Generator().manual_seed(seed))


# ---- 1. parity ------------------------------------------------------------------------------------------------

def parity(check: Check) -> dict:
    from tests import tiny
    from weights import load_target

    out = {}
    for family in tiny.TARGET_CONFIGS:
        folder = tiny.save(tiny.build_target(family, seed=0), check.tmp / f"parity-{family}")
        from transformers import Gemma4ForCausalLM

        hf = Gemma4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval().to(check.device)
        ids = _ids(2, 40, 1, 512).to(check.device)
        row = {}
        with torch.no_grad():
            ref = hf(ids).logits.float()
            hf_bf16_err = (hf.to(torch.bfloat16)(ids).logits.float() - ref).abs().max().item()
            for dtype in (torch.float32, torch.bfloat16):
                ours = load_target(folder, dtype=dtype, device=check.device)
                prefill = (ours(ids).logits.float() - ref).abs().max().item()
                cache, start, chunks = ours.new_cache(batch_size=2, max_length=4), 0, []
                for n in (11, 1, 1, 5, 2, 20):
                    chunks.append(ours(ids[:, start:start + n], cache).logits.float())
                    start += n
                decode = (torch.cat(chunks, 1) - ref).abs().max().item()
                name = "float32" if dtype == torch.float32 else "bfloat16"
                tol = FP32_TOL if dtype == torch.float32 else 2 * hf_bf16_err + 0.05
                row[name] = {"prefill_err": prefill, "decode_err": decode, "tol": tol,
                             "ok": max(prefill, decode) <= tol}
        row["transformers_bfloat16_err"] = hf_bf16_err
        out[family] = row
    return out


# ---- 2. mismatch counts ---------------------------------------------------------------------------------------

def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def count_mismatches(target, drafter, prompts, new_tokens: int, **options) -> dict:
    from speculative import generate

    differing, positions, tokens, spec_tokens, accepted, drafted = 0, [], 0, 0, 0, 0
    for prompt in prompts:
        want = generate(target, None, prompt, max_new_tokens=new_tokens, stop_token_ids=[]).tokens
        got = generate(target, drafter, prompt, max_new_tokens=new_tokens, stop_token_ids=[], **options)
        tokens += len(want)
        spec_tokens += len(got.tokens)
        drafted += sum(d for d, _ in got.stats.rounds)
        accepted += sum(n for _, n in got.stats.rounds)
        i = _first_difference(want, got.tokens)
        if i is not None:
            differing += 1
            positions.append(i)
    return {"runs": len(prompts), "differing": differing, "first_difference_at": positions,
            "target_only_tokens": tokens, "speculative_tokens": spec_tokens,
            "acceptance": accepted / drafted if drafted else None}


def mismatch(check: Check) -> dict:
    from tests import tiny
    from weights import load_drafter, load_target

    runs, new = (2, 12) if check.smoke else (12, 32)
    out = {}
    for family in ("e2b", "e4b", "31b", "moe"):
        target, drafter = tiny.build_target(family, seed=0), tiny.build_drafter(tiny.PAIRS[family], seed=1)
        tiny.bias_vocab(target, drafter, [10, 11, 12], amount=0.3)
        folder = check.tmp / f"pair-{family}"
        tiny.save(target, folder / "target", eos_token_id=())
        tiny.save(drafter, folder / "drafter", eos_token_id=())
        ours = load_target(folder / "target", dtype=torch.bfloat16, device=check.device)
        d = load_drafter(folder / "drafter", target=ours, dtype=torch.bfloat16, device=check.device)
        lengths = [5 + 17 * i % 90 for i in range(runs)]
        prompts = [_ids(1, n, 100 + i, 512)[0].tolist() for i, n in enumerate(lengths)]
        out[family] = count_mismatches(ours, d, prompts, new, schedule="heuristic")
        with generic.fixed_rows(FIXED_ROWS):
            out[f"{family}, fixed rows {FIXED_ROWS}"] = count_mismatches(ours, d, prompts, new, schedule="heuristic")
    return out


# ---- 3. geometry ----------------------------------------------------------------------------------------------

def geometries(check: Check) -> dict[str, dict]:
    if check.smoke:  # tiny stand-ins with the released layouts' features (PLE and KV sharing; MoE)
        from tests import tiny

        return {"tiny-e2b": dict(tiny.E2B_LIKE, model_type="gemma4_text"),
                "tiny-moe": dict(tiny.MOE_LIKE, model_type="gemma4_text")}
    return json.loads(GEOMETRIES.read_text())


def build_pair(raw: dict, device: torch.device):
    """transformers' Gemma4ForCausalLM in bfloat16 with random weights, built on `device`, and our Gemma4Model
    sharing its tensors (no second copy). Norm weights are set to 1 (transformers may start them at 0)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from weights.loader import build_empty

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = Gemma4ForCausalLM(Gemma4TextConfig(**raw, attn_implementation="sdpa")).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("scale"):
                p.fill_(1.0)
    config = Gemma4Config.from_dict(raw)
    ours = build_empty(Gemma4Model, config, torch.bfloat16, torch.device("meta"))
    state = {k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.")}
    missing, _ = ours.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise RuntimeError(f"transformers' model has no tensor for {missing[:3]}")
    return hf, ours.requires_grad_(False).eval()


@contextlib.contextmanager
def fused_only(device: torch.device):
    """SDPA without its math kernel (CUDA): a call that needs it raises, naming the reason."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        yield


@contextlib.contextmanager
def recorded_sdpa(calls: list):
    """Record every SDPA call of the generic path: our rules' fused kernels, and torch's where it can say."""
    original = generic.sdpa

    def record(q, k, v, mask=None, *, is_causal=False, enable_gqa=False):
        entry = {"q": list(q.shape), "k": list(k.shape), "mask": None if mask is None else list(mask.shape),
                 "is_causal": is_causal, "enable_gqa": enable_gqa,
                 "rules": sorted(generic.fused_backends(q, k, mask, is_causal=is_causal, enable_gqa=enable_gqa))}
        if q.is_cuda:
            try:
                from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

                params = SDPAParams(q, k, v, mask, 0.0, is_causal, enable_gqa)
                entry["torch"] = sorted({"flash"} if can_use_flash_attention(params) else set()
                                        | ({"efficient"} if can_use_efficient_attention(params) else set()))
            except Exception as e:  # the signature changes between torch versions
                entry["torch"] = f"unknown ({type(e).__name__})"
        if entry not in calls:
            calls.append(entry)
        return original(q, k, v, mask, is_causal=is_causal, enable_gqa=enable_gqa)

    generic.sdpa = record
    try:
        yield
    finally:
        generic.sdpa = original


def measure_ours(check: Check, model, prompt_len: int, verify_ns, repeats: int) -> dict:
    vocab = model.config.vocab_size
    out = {}
    with torch.inference_mode():
        cache = model.new_cache(max_length=prompt_len + 16, max_rollback=16)
        model(_ids(1, prompt_len, 0, vocab).to(check.device), cache, logits_to_keep=1)
        one = _ids(1, 1, 1, vocab).to(check.device)

        def step(ids):
            model(ids, cache)
            cache.rollback(ids.shape[1])

        out["decode_ms"] = check.time_ms(lambda: step(one), repeats)
        out["verify_ms"] = {n: check.time_ms(lambda n=n: step(_ids(1, n + 1, n, vocab).to(check.device)), repeats)
                            for n in verify_ns}
    return out


def measure_prefill(check: Check, model, lengths, repeats: int = 1) -> dict:
    vocab = model.config.vocab_size
    out = {}
    with torch.inference_mode():
        for n in lengths:
            ids = _ids(1, n, 2, vocab).to(check.device)

            def run():
                model(ids, model.new_cache(max_length=n, max_rollback=0), logits_to_keep=1)

            ms = check.time_ms(run, repeats)
            out[n] = {"ms": ms, "tokens_per_s": n / ms * 1e3}
    return out


def measure_transformers(check: Check, hf, prompt_len: int, verify_ns, repeats: int) -> dict:
    from transformers import DynamicCache

    vocab = hf.config.vocab_size
    out = {}
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        hf(_ids(1, prompt_len, 0, vocab).to(check.device), cache=cache, use_cache=True, logits_to_keep=1)
        cache.activate_past_recording()  # as its assisted generation does: sliding layers can then roll back

        def step(ids):
            hf(ids, cache=cache, use_cache=True)
            cache.crop(-ids.shape[1])

        out["decode_ms"] = check.time_ms(lambda: step(_ids(1, 1, 1, vocab).to(check.device)), repeats)
        out["verify_ms"] = {n: check.time_ms(lambda n=n: step(_ids(1, n + 1, n, vocab).to(check.device)), repeats)
                            for n in verify_ns}
    return out


def ple_rows(check: Check, model, repeats: int) -> dict:
    """A decode step's per-layer-embedding rows: the table on the device vs on the host (MappedEmbedding)."""
    from weights.mapped import MappedEmbedding

    table = model.embed_tokens_per_layer
    host = MappedEmbedding(table.weight.detach().to("cpu"), dtype=table.weight.dtype, device=check.device)
    out = {}
    with torch.inference_mode():
        for rows in (1, 9):
            ids = _ids(1, rows, 5, table.weight.shape[0]).to(check.device)
            out[rows] = {"device_ms": check.time_ms(lambda: table(ids), repeats),
                         "host_ms": check.time_ms(lambda: host(ids), repeats)}
    out["table_gb"] = table.weight.numel() * table.weight.element_size() / 2**30
    return out


def geometry(check: Check, name: str, raw: dict) -> dict:
    prompt_len, lengths = (48, (64, 128)) if check.smoke else (2048, (2048, 8192))
    verify_ns = (1, 2, 3) if check.smoke else tuple(range(1, 9))
    repeats = 2 if check.smoke else 10
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    hf, ours = build_pair(raw, check.device)
    check.sync()
    out = {"build_s": time.perf_counter() - t0, "weights_gb": sum(
        p.numel() * p.element_size() for p in ours.parameters()) / 2**30, "peak_gb_built": check.peak_gb()}
    calls: list = []
    try:
        with fused_only(check.device), recorded_sdpa(calls):
            out["prefill"] = measure_prefill(check, ours, lengths)
            out["eager"] = measure_ours(check, ours, prompt_len, verify_ns, repeats)
        with generic.fixed_rows(FIXED_ROWS):
            out[f"eager_fixed_rows_{FIXED_ROWS}"] = measure_ours(check, ours, prompt_len, verify_ns, repeats)
        out["math_kernel_needed"] = False
    except RuntimeError as e:  # a call only the math kernel takes: say which, then measure without the restriction
        out["math_kernel_needed"] = str(e)[:500]
        out["prefill"] = measure_prefill(check, ours, lengths)
        out["eager"] = measure_ours(check, ours, prompt_len, verify_ns, repeats)
    out["peak_gb"] = check.peak_gb()
    out["sdpa_calls"] = calls
    out["sdpa_rules_disagree"] = [c for c in calls if isinstance(c.get("torch"), list) and c["torch"] != c["rules"]]
    out["transformers"] = measure_transformers(check, hf, prompt_len, verify_ns, repeats)
    if ours.config.uses_ple:
        out["ple_rows"] = ple_rows(check, ours, repeats)
    del hf, ours
    return out


def compiled(check: Check, name: str, raw: dict) -> dict:
    from speculative.compiled import CompiledSteps, mark_static

    prompt_len, verify_ns, repeats = (48, (1, 2, 3), 2) if check.smoke else (2048, tuple(range(1, 9)), 10)
    hf, ours = build_pair(raw, check.device)
    del hf
    steps = CompiledSteps(ours, None)
    vocab = ours.config.vocab_size
    out = {}
    with torch.inference_mode():
        cache = ours.new_cache(max_length=prompt_len + 16, max_rollback=16, static=True)
        if check.device.type == "cuda":
            mark_static(cache)
        ours(_ids(1, prompt_len, 0, vocab).to(check.device), cache, logits_to_keep=1)
        t0 = time.perf_counter()
        for n in (0, *verify_ns):  # every graph first
            steps.forward(_ids(1, n + 1, n, vocab).to(check.device), cache)
            cache.rollback(n + 1)
        check.sync()
        out["compile_s"] = time.perf_counter() - t0

        def step(ids):
            steps.forward(ids, cache)
            cache.rollback(ids.shape[1])

        out["decode_ms"] = check.time_ms(lambda: step(_ids(1, 1, 1, vocab).to(check.device)), repeats)
        out["verify_ms"] = {n: check.time_ms(lambda n=n: step(_ids(1, n + 1, n, vocab).to(check.device)), repeats)
                            for n in verify_ns}
    return out


# ---- 5. the bundled pair --------------------------------------------------------------------------------------

def stdlib_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Prompts of `length` tokens from the Python standard library's source files (sorted, every 7th file)."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))[::7]
    out = []
    for path in files:
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) > 2 * length:
            start = len(ids) // 3
            out.append([tokenizer.bos_id] + ids[start:start + length])
        if len(out) == count:
            break
    return out


def bundled(check: Check) -> dict:
    from speculative import generate
    from weights import load_drafter, load_target
    from weights.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "tiny_gemma4" / "target")
    count, length, new = (2, 32, 16) if check.smoke else (24, 96, 64)
    prompts = stdlib_prompts(tokenizer, count, length)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        target = load_target(ROOT / "tiny_gemma4" / "target", dtype=dtype, device=check.device)
        drafter = load_drafter(ROOT / "tiny_gemma4" / "drafter", target=target, dtype=dtype, device=check.device)
        name = "float32" if dtype == torch.float32 else "bfloat16"
        speed = {"target_only": [], "speculative": []}
        equal = True
        for _ in range(1 if check.smoke else 3):  # interleaved
            a = generate(target, None, prompts[0], max_new_tokens=new, stop_token_ids=[])
            b = generate(target, drafter, prompts[0], max_new_tokens=new, stop_token_ids=[])
            speed["target_only"].append(a.stats.tokens_per_second)
            speed["speculative"].append(b.stats.tokens_per_second)
            equal &= a.tokens == b.tokens
        t, s = statistics.median(speed["target_only"]), statistics.median(speed["speculative"])
        out[name] = {"target_only_tokens_per_s": t, "speculative_tokens_per_s": s, "speedup": s / t,
                     "outputs_equal": equal,
                     "mismatch": count_mismatches(target, drafter, prompts, new, schedule="constant")}
        with generic.fixed_rows(FIXED_ROWS):
            out[name][f"mismatch_fixed_rows_{FIXED_ROWS}"] = count_mismatches(target, drafter, prompts, new,
                                                                              schedule="constant")
    return out


# ---- report ---------------------------------------------------------------------------------------------------

def _f(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(results: dict) -> str:
    lines = [f"# gpu_check: {results['device']} ({results['mode']}, torch {results['torch']})", ""]
    p = results.get("parity", {})
    if "error" in p or "skipped" in p:
        lines += [f"parity: {p}", ""]
    elif p:
        lines += ["## Parity with transformers (max |logit error|)", "",
                  "| family | float32 prefill | float32 decode | bf16 prefill | bf16 decode | bf16 tol | ok |",
                  "|---|---|---|---|---|---|---|"]
        for fam, r in p.items():
            f32, b16 = r["float32"], r["bfloat16"]
            lines.append(f"| {fam} | {f32['prefill_err']:.1e} | {f32['decode_err']:.1e} | {b16['prefill_err']:.1e} "
                         f"| {b16['decode_err']:.1e} | {b16['tol']:.2f} | {f32['ok'] and b16['ok']} |")
        lines.append("")
    m = results.get("mismatch", {})
    if m and "error" not in m and "skipped" not in m:
        lines += ["## Greedy speculative vs target-only, bfloat16", "",
                  "| pair | runs | runs differing | first difference at | acceptance |", "|---|---|---|---|---|"]
        for fam, r in m.items():
            lines.append(f"| {fam} | {r['runs']} | {r['differing']} | {r['first_difference_at']} "
                         f"| {_f(r['acceptance'])} |")
        lines.append("")
    geo = {k[len("geometry "):]: v for k, v in results.items() if k.startswith("geometry ")}
    if geo:
        lines += ["## Text geometries, bfloat16, random weights", "",
                  "| model | build s | weights GB | peak GB | prefill tok/s (short, long) | decode ms "
                  "| verify ms N=1..8 | fixed rows 16: decode, verify at the largest N, ms | transformers decode ms "
                  "| transformers verify ms | compiled decode ms | compiled verify ms | math kernel needed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in geo.items():
            if "eager" not in r:
                lines.append(f"| {name} | {r} |")
                continue
            c = results.get(f"compiled {name}", {})
            fixed = r.get(f"eager_fixed_rows_{FIXED_ROWS}", {})
            tr = r.get("transformers", {})
            lines.append(
                f"| {name} | {_f(r['build_s'], 1)} | {_f(r['weights_gb'])} | {_f(r['peak_gb'])} | "
                + ", ".join(f"{v['tokens_per_s']:.0f}" for v in r["prefill"].values())
                + f" | {_f(r['eager']['decode_ms'])} | "
                + " ".join(f"{v:.1f}" for v in r["eager"]["verify_ms"].values())
                + f" | {_f(fixed.get('decode_ms'))}, {_f(max(fixed.get('verify_ms', {0: None}).items())[1])}"
                + f" | {_f(tr.get('decode_ms'))} | " + " ".join(f"{v:.1f}" for v in tr.get("verify_ms", {}).values())
                + f" | {_f(c.get('decode_ms'))} | " + " ".join(f"{v:.1f}" for v in c.get("verify_ms", {}).values())
                + f" | {r['math_kernel_needed']} |")
        lines.append("")
    b = results.get("bundled", {})
    if b and "error" not in b and "skipped" not in b:
        lines += ["## Bundled pair", "", "| dtype | target-only tok/s | speculative tok/s | speed-up | equal | "
                  f"runs differing | runs differing, fixed rows {FIXED_ROWS} |", "|---|---|---|---|---|---|---|"]
        for dtype, r in b.items():
            lines.append(f"| {dtype} | {r['target_only_tokens_per_s']:.1f} | {r['speculative_tokens_per_s']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['outputs_equal']} | {r['mismatch']['differing']} of "
                         f"{r['mismatch']['runs']} | {r[f'mismatch_fixed_rows_{FIXED_ROWS}']['differing']} |")
        lines.append("")
    for key, r in results.items():
        if isinstance(r, dict) and ("error" in r or "skipped" in r):
            lines.append(f"- {key}: {r.get('error') or r.get('skipped')}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU through the generic path")
    ap.add_argument("--out", default=".", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--budget-s", type=float, default=450.0, help="time budget (parts past it are skipped)")
    ap.add_argument("--only", default=None, help="comma-separated parts: parity,mismatch,geometry,compiled,bundled")
    ap.add_argument("--compile-smoke", action="store_true",
                    help="with --cpu-smoke: also the compiled part (minutes of compiling on a small CPU)")
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        ap.error("no CUDA device; run with --cpu-smoke for the reduced CPU check")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny models: one thread is as fast, and does not spin-wait on a shared CPU
    check = Check(args)
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def wanted(part: str) -> bool:
        return only is None or part in only

    def save():
        (out / "gpu_check.json").write_text(json.dumps(check.results, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(check.results))

    with generic_path(check.smoke) if check.smoke else contextlib.nullcontext():
        if wanted("parity"):
            check.part("parity", lambda: parity(check))
            save()
        if wanted("mismatch"):
            check.part("mismatch", lambda: mismatch(check), needs_s=30)
            save()
        for name, raw in geometries(check).items() if wanted("geometry") else ():
            check.part(f"geometry {name}", lambda: geometry(check, name, raw), needs_s=40)
            save()
        if wanted("bundled"):
            check.part("bundled", lambda: bundled(check), needs_s=30)
            save()
        if wanted("compiled") and (not check.smoke or args.compile_smoke):  # minutes of compiling on a small CPU
            for name, raw in geometries(check).items():
                check.part(f"compiled {name}", lambda: compiled(check, name, raw), needs_s=120)
                save()
    check.results["seconds"] = check.budget.seconds - check.budget.left()
    save()
    print(markdown(check.results))
    return check.results


if __name__ == "__main__":
    main()
