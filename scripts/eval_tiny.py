#!/usr/bin/env python
"""Measure the bundled tiny Gemma 4 pair (`scripts/train_tiny.py`) with the library's own loop.

    python scripts/eval_tiny.py                       # tiny_gemma4/, prints a markdown table
    python scripts/eval_tiny.py --write               # also stores the figures in tiny_gemma4/training.json and
                                                      # the best N as the drafter's num_assistant_tokens

Figures: the target's held-out loss and perplexity (the files `training.json` lists as held out); per-step costs
(one target decode step, one verify pass over k+1 tokens, one drafter step); and for each draft length N, greedy
generation from held-out prompts (the first `--prompt-tokens` tokens of each held-out file) target-only and
speculative: tokens/s both ways, the speedup, whether the outputs are identical, the acceptance rate, and the
acceptance per draft position (position j counts as accepted in a round iff at least j drafts were accepted).
Each (prompt, mode) runs `--repeats` times, interleaved, and keeps its fastest run: other processes on a shared
CPU slow down single runs, never speed them up. Finally it checks that transformers 5.24 (if installed) loads both
folders and gives the same logits as `weights.load_target` / `load_drafter`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gemma4 import KVView  # noqa: E402
from speculative import generate  # noqa: E402
from weights import load_drafter, load_target  # noqa: E402
from weights.tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def held_out_token_files(folder: Path, tokenizer) -> list[list[int]]:
    """<bos> + tokens + <eos> of every held-out file that training.json lists (read from this Python's stdlib)."""
    record = json.loads((folder / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for rel in record["corpus"]["held_out_files"]:
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"held-out file {path} is missing: this Python's stdlib differs from training's")
        files.append([tokenizer.bos_id] + tokenizer.encode(path.read_text(encoding="utf-8")) + [tokenizer.eos_id])
    return files


@torch.no_grad()
def held_out_loss(target, files: list[list[int]], window: int = 256, batch: int = 16) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over the held-out files, laid end to end and cut into non-overlapping
    windows of `window` predicted tokens (as in training; the tail that does not fill a window is left out)."""
    stream = torch.tensor([t for f in files for t in f])
    n = (len(stream) - 1) // window
    inputs = stream[: n * window].view(n, window)  # [n, window]
    labels = stream[1 : n * window + 1].view(n, window)
    total = 0.0
    for i in range(0, n, batch):
        logits = target(inputs[i : i + batch]).logits  # [b, window, V]
        total += F.cross_entropy(logits.flatten(0, 1).float(), labels[i : i + batch].flatten(), reduction="sum").item()
    return total / (n * window), n * window


@torch.inference_mode()
def step_costs(target, drafter, prompt: list[int], ks: list[int], reps: int = 60) -> dict:
    """Median milliseconds of one target decode step, one verify pass over k+1 tokens, one drafter step."""
    cache = target.new_cache(max_length=len(prompt) + 64, max_rollback=max(ks) + 1,
                             min_sliding_history=drafter.sliding_history)
    out = target(torch.tensor([prompt]), cache, logits_to_keep=1)
    token, h = torch.tensor([[prompt[-1]]]), out.hidden_states[:, -1:]
    views = cache.views()

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def verify(n):
        target(torch.full((1, n), prompt[-1]), cache)
        cache.rollback(n)

    costs = {"target_decode_ms": timed(lambda: verify(1)),
             "drafter_step_ms": timed(lambda: drafter.step(target, token, h, cache.length, views).logits.argmax(-1))}
    costs["verify_ms"] = {k: timed(lambda: verify(k + 1)) for k in ks}
    costs["drafter_to_target_ratio"] = costs["drafter_step_ms"] / costs["target_decode_ms"]
    return costs


def acceptance_per_position(rounds: list[tuple[int, int]], n: int) -> list[float]:
    """For j = 1..n: of the rounds that drafted at least j tokens, the share that accepted at least j."""
    out = []
    for j in range(1, n + 1):
        drafted = [a for d, a in rounds if d >= j]
        out.append(sum(a >= j for a in drafted) / len(drafted) if drafted else float("nan"))
    return out


def run_generations(target, drafter, prompts, ns: list[int], new_tokens: int, repeats: int, log) -> dict:
    """Greedy target-only and speculative generation for every prompt and N; fastest of `repeats` runs each."""
    best: dict = {}  # (mode, prompt index) -> result with the fastest decode
    generate(target, drafter, prompts[0], max_new_tokens=8, num_draft_tokens=2)  # warm-up
    for rep in range(repeats):
        for i, ids in enumerate(prompts):
            for mode in [None, *ns]:
                res = generate(target, drafter if mode else None, ids, max_new_tokens=new_tokens, num_draft_tokens=mode,
                               schedule="constant")
                key = (mode, i)
                if key not in best or res.stats.decode_seconds < best[key].stats.decode_seconds:
                    best[key] = res
        log(f"generation repeat {rep + 1}/{repeats} done")
    base_tokens = sum(best[(None, i)].stats.decode_tokens for i in range(len(prompts)))
    base_seconds = sum(best[(None, i)].stats.decode_seconds for i in range(len(prompts)))
    results = {"target_only": {"tokens_per_second": base_tokens / base_seconds, "decode_tokens": base_tokens,
                               "decode_seconds": base_seconds}, "speculative": {}}
    for n in ns:
        runs = [best[(n, i)] for i in range(len(prompts))]
        tokens = sum(r.stats.decode_tokens for r in runs)
        seconds = sum(r.stats.decode_seconds for r in runs)
        rounds = [r for run in runs for r in run.stats.rounds]
        results["speculative"][str(n)] = {
            "tokens_per_second": tokens / seconds,
            "speedup": (tokens / seconds) / results["target_only"]["tokens_per_second"],
            "outputs_identical": all(best[(n, i)].tokens == best[(None, i)].tokens for i in range(len(prompts))),
            "acceptance_rate": sum(a for _, a in rounds) / sum(d for d, _ in rounds),
            "acceptance_per_position": acceptance_per_position(rounds, n),
            "tokens_per_target_pass": tokens / sum(r.stats.target_forward_passes - 1 for r in runs),
            "rounds": len(rounds),
        }
    return results


@torch.no_grad()
def transformers_parity(folder: Path, target, drafter, ids: list[int]) -> dict:
    """Max |logit difference| between transformers 5.24 and our models loaded from the same folders (fp32):
    the target over `ids`; the drafter's first step at the last position given transformers' own K/V and hidden."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    hf_t = Gemma4ForCausalLM.from_pretrained(folder / "target", dtype=torch.float32, attn_implementation="eager").eval()
    hf_d = Gemma4AssistantForCausalLM.from_pretrained(folder / "drafter", dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    x = torch.tensor([ids])
    p = x.shape[1] - 1
    ref = hf_t(x[:, :p], return_shared_kv_states=True, output_hidden_states=True)
    ours = target(x[:, :p])
    emb = hf_t.get_input_embeddings()(x[:, p:])
    want = hf_d(inputs_embeds=torch.cat([emb, ref.hidden_states[-1][:, -1:]], -1), position_ids=torch.tensor([[p]]),
                shared_kv_states=ref.shared_kv_states)
    views = {t: KVView(k, v, torch.arange(k.shape[2])) for t, (k, v) in ref.shared_kv_states.items()}
    got = drafter.step(target, x[:, p:], ref.hidden_states[-1][:, -1:], p, views)
    return {"target_max_abs_logit_diff": (ours.logits - ref.logits).abs().max().item(),
            "drafter_max_abs_logit_diff": (got.logits - want.logits).abs().max().item()}


def markdown(ev: dict) -> str:
    lines = [f"held-out loss {ev['held_out_loss']:.3f} nats/token (perplexity {ev['held_out_perplexity']:.2f}, "
             f"{ev['held_out_tokens']} tokens); target-only {ev['target_only']['tokens_per_second']:.1f} tokens/s",
             f"step costs: target decode {ev['step_costs']['target_decode_ms']:.2f} ms, drafter step "
             f"{ev['step_costs']['drafter_step_ms']:.2f} ms (ratio {ev['step_costs']['drafter_to_target_ratio']:.3f}), "
             "verify k+1 tokens: " + ", ".join(f"k={k}: {v:.2f} ms" for k, v in ev["step_costs"]["verify_ms"].items()),
             "", "| N | tokens/s | speedup | identical | acceptance | tokens/pass | acceptance per position |",
             "|---|---|---|---|---|---|---|"]
    for n, r in ev["speculative"].items():
        per = " ".join(f"{a:.2f}" for a in r["acceptance_per_position"])
        lines.append(f"| {n} | {r['tokens_per_second']:.1f} | {r['speedup']:.2f}x | {r['outputs_identical']} | "
                     f"{r['acceptance_rate']:.3f} | {r['tokens_per_target_pass']:.2f} | {per} |")
    if "transformers" in ev:
        lines.append(f"\ntransformers parity (fp32): {ev['transformers']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=ROOT / "tiny_gemma4", help="folder with target/ and drafter/")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--prompt-tokens", type=int, default=120, help="prompt length, <bos> included")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], help="the N values to try")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="store the figures in training.json and the best N in the "
                   "drafter's generation_config.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - begin:6.1f} s] {msg}", file=sys.stderr, flush=True)

    folder = args.models
    target = load_target(folder / "target")
    drafter = load_drafter(folder / "drafter", target=target, dtype=target.dtype)
    tokenizer = load_tokenizer(folder / "target")
    files = held_out_token_files(folder, tokenizer)
    loss, count = held_out_loss(target, files)
    log(f"held-out loss {loss:.3f} over {count} tokens")
    prompts = [f[: args.prompt_tokens] for f in files if len(f) > args.prompt_tokens][: args.prompts]
    ev = {"held_out_loss": loss, "held_out_perplexity": math.exp(loss), "held_out_tokens": count,
          "threads": args.threads, "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
          "new_tokens": args.new_tokens, "repeats": args.repeats}
    ev["step_costs"] = step_costs(target, drafter, prompts[0], args.draft_tokens)
    log(f"step costs {ev['step_costs']}")
    ev.update(run_generations(target, drafter, prompts, args.draft_tokens, args.new_tokens, args.repeats, log))
    try:
        ev["transformers"] = transformers_parity(folder, target, drafter, prompts[0])
    except ImportError:
        log("transformers not installed: parity not checked")
    best = max(ev["speculative"], key=lambda n: ev["speculative"][n]["tokens_per_second"])
    ev["best_num_draft_tokens"] = int(best)
    ev["seconds"] = time.perf_counter() - begin
    print(markdown(ev))
    print(f"\nbest N = {best}: speedup {ev['speculative'][best]['speedup']:.2f}x")
    if args.write:
        record_path = folder / "training.json"
        record = json.loads(record_path.read_text())
        record["eval"] = ev
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        gen_path = folder / "drafter" / "generation_config.json"
        gen = json.loads(gen_path.read_text())
        gen["num_assistant_tokens"] = int(best)
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")
        log(f"wrote {record_path} and num_assistant_tokens={best} to {gen_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
