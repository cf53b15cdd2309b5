#!/usr/bin/env python
"""Train an MTP drafter for your own Gemma 4 target: distil it from the frozen target on your data.

    python scripts/train_drafter.py --target T --data PATHS --out DIR --init D            # fine-tune a drafter
    python scripts/train_drafter.py --target T --data PATHS --out DIR --init scratch --size 256
    python scripts/train_drafter.py --out DIR --resume [--steps N]                         # continue a run

T and D are checkpoint folders or hub ids. PATHS: text files, folders of them (.txt .md .rst .py .text, and .jsonl),
JSONL files with a "text" or a "messages" field per line (messages are rendered with the target's chat template).
Everything is tokenized with the target's tokenizer. A document is held out when the SHA-256 of its text falls in
the first --held-out share of the hash range: the split depends on the text alone, and equal texts fall together.

What it trains on is what the loop gives a drafter (drafter/training.py): the target's embedding of the last token,
its post-norm hidden state, its K/V of accepted positions, a constant RoPE position, K chained draft steps; the
target is frozen, in --dtype, under no_grad; only the drafter's parameters are trained (float32 master weights).
Contexts (--contexts): windows of the data itself, the target's own greedy continuations of prompts from it (what
the drafter meets after a prompt at inference), or both in each batch (mixed, the default).

Held-out evaluation, before training, every --eval-every steps and at the end, measures what the loop will see on
this data: prompts cut at random from held-out documents (--eval-prompts of --eval-prompt-len tokens), continued
greedily by the target for --eval-new-tokens tokens (the first tokens after a prompt, where the domain still shapes
the text; a small target's long continuations repeat themselves, which any drafter predicts). On them, the rounds
of greedy speculative decoding are replayed for every N (a round at p that accepts a drafts is followed by one at
p + a + 1, as in speculative/loop.py): acceptance at each draft position, tokens per target pass, and the predicted
speed-up, tokens per pass over the round's cost (N drafter steps plus one verify pass over N + 1 tokens, measured
on --device in units of one target decode step, or --drafter-cost given). Beside it, teacher-forced on windows of
the held-out documents: how often draft step j equals the target's argmax at every position.

Never worse than the start: the output is the evaluation with the highest predicted speed-up, step 0 (the initial
drafter) included, evaluated with its weights rounded to the saved dtype. If no evaluation beats the initial
drafter, DIR holds the initial drafter, one line says so and the exit status is 3 (0 when a trained drafter is the
output); --resume keeps the best so far. `generation_config.json`'s num_assistant_tokens is the output's best N.
At the end the loop itself (speculative.generate, greedy) runs on held-out prompts with the initial and the output
drafter, checking that the output equals target-only decoding.

Every phase reports its progress on stderr (loading, greedy continuations, teacher, evaluations, training, loop
check); CPU threads default to the free cores, as in generate.py.

DIR receives a Hugging Face-layout drafter folder (config.json, model.safetensors, generation_config.json, the
target's tokenizer files) that weights.load_drafter and transformers load, `training_report.json` (every
evaluation, the output's step, the loss curve, the loop check), and `checkpoint/` (drafter, the best evaluation's
weights, optimizer and RNG state, contexts: safetensors + JSON, never pickle) that --resume continues from.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from drafter import Drafter, DrafterConfig, check_compatible  # noqa: E402
from drafter.training import (  # noqa: E402
    accepted_lengths, document_windows, drafter_loss, greedy_sequences, init_weights, join, lr_at, make_optimizer,
    optimizer_from_safetensors, optimizer_to_safetensors, round_cost, round_statistics, round_to, scratch_config,
    simulated_rounds, teacher_forced_agreement, teacher_inputs, warm_start,
)
from gemma4 import Gemma4Config  # noqa: E402
from speculative import generate  # noqa: E402
from weights import (  # noqa: E402
    load_chat_template, load_drafter, load_target, load_tokenizer, parse_dtype, render_chat, resolve_checkpoint,
)
from weights.files import CheckpointError  # noqa: E402
from weights.loader import parse_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import default_threads  # noqa: E402  (the free cores: the same default as generate.py)

KEPT_INIT = 3  # exit status when no evaluation beat the initial drafter, which is then the output
EVALUATION_NOTE = (
    "acceptance_per_position, tokens_per_round, predicted_speedup: the rounds of greedy speculative decoding with N "
    "drafts (N = 1..--eval-steps, lists indexed N - 1; acceptance_per_position at the largest N) replayed on the "
    "target's greedy continuations of held-out prompts (--eval-prompts prompts of --eval-prompt-len tokens cut at "
    "random from held-out documents, --eval-new-tokens new tokens each): the rounds the loop runs on those prompts. "
    "Acceptance at draft position j: of the rounds that drafted >= j, the share that accepted >= j; tokens per round "
    "= per target pass. teacher_forced_agreement_per_step: on windows of the held-out documents themselves, at "
    "every position, the share at which draft step j (fed the document's tokens) equals the target's argmax given "
    "the document. The output is the evaluation with the highest predicted speed-up (step 0: the initial drafter), "
    "evaluated in the saved dtype.")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja"]
DEFAULTS = dict(init=None, size=None, steps=400, seq_len=256, draft_steps=4, eval_steps=8, dtype="float32",
                device="cpu", lr=None, batch_size=8, eval_every=25, save_every=None, seed=0, contexts="mixed",
                greedy_seqs=256, eval_seqs=16, eval_prompts=64, eval_prompt_len=48, eval_new_tokens=32,
                held_out=0.05, loss="kl", save_dtype="float32", drafter_cost=None, loop_prompts=8, loop_new_tokens=32,
                threads=None, weight_decay=0.01)
# what a resumed run may change; every other option must equal the saved run's
RESUMABLE = {"steps", "eval_every", "save_every", "device", "threads", "loop_prompts", "loop_new_tokens"}


class UsageError(Exception):
    """A bad option or input: reported as one line, exit status 2."""


# ---- data ---------------------------------------------------------------------------------------------------------
def read_documents(paths: list[str], chat_template: str | None) -> list[dict]:
    """[{"source": where it came from, "text": str, "chat": bool}] from files, folders and JSONL (sorted walk)."""
    docs = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"})
            if not files:
                raise UsageError(f"--data {raw}: the folder holds no {', '.join(sorted(TEXT_SUFFIXES))} or .jsonl file")
        elif path.is_file():
            files = [path]
        else:
            raise UsageError(f"--data {raw}: no such file or folder")
        for f in files:
            docs += read_jsonl(f, chat_template) if f.suffix == ".jsonl" else [read_text(f)]
    if not docs:
        raise UsageError("--data: no documents found")
    return docs


def read_utf8(path: Path) -> str:
    """The file's text, or a UsageError naming the file (and the byte offset) when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UsageError(f"--data {path}: cannot be read ({e.strerror})") from None


def read_text(path: Path) -> dict:
    return {"source": str(path), "text": read_utf8(path), "chat": False}


def read_jsonl(path: Path, chat_template: str | None) -> list[dict]:
    docs = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--data {where}: not JSON ({e.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            docs.append({"source": where, "text": record["text"], "chat": False})
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            try:
                text = render_chat(chat_template, record["messages"], add_generation_prompt=False)
            except (ValueError, TypeError, KeyError) as e:
                raise UsageError(f"--data {where}: the messages do not render with the target's chat template: "
                                 f"{e}") from None
            docs.append({"source": where, "text": text, "chat": True})
        else:
            raise UsageError(f"--data {where}: a JSONL line needs a string \"text\" or a list \"messages\"")
    return docs


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_held_out(text: str, fraction: float) -> bool:
    """The deterministic split: the first 64 bits of the text's SHA-256, as a share of 2^64, below `fraction`."""
    return int(text_hash(text)[:16], 16) < fraction * 2**64


def tokenize(docs: list[dict], tokenizer) -> list[torch.Tensor]:
    """Text documents: <bos> text <eos>; rendered chats: as rendered (the template writes <bos> and turn ends)."""
    out = []
    for doc in docs:
        ids = tokenizer.encode(doc["text"]) if doc["chat"] else \
            tokenizer.encode(doc["text"], add_bos=True) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length] windows at random offsets of the token stream."""
    starts = torch.randint(0, len(stream) - length + 1, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


# ---- the drafter ----------------------------------------------------------------------------------------------------
def read_json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def scratch_drafter_config(target_dir: Path, size: int | None) -> dict:
    """The config.json of a scratch drafter for the target in `target_dir`, from the target's config.json alone
    (before any weight is read), checked against the target: hidden size `size` (default min(256, the target's))."""
    target_config = parse_config(target_dir, Gemma4Config.from_dict)
    raw = read_json_or_empty(target_dir / "config.json")
    size = size or min(256, target_config.hidden_size)
    config = scratch_config(target_config, size, raw.get("text_config", raw))
    try:
        check_compatible(DrafterConfig.from_dict(config), target_config)
    except ValueError as e:  # a layout the rule should never produce: named, before the target is loaded
        raise UsageError(f"--init scratch --size {size}: {e}") from None
    return config


def build_drafter(target, settings: dict, generator: torch.Generator, config: dict | None = None
                  ) -> tuple[Drafter, dict, dict]:
    """(float32 trainable drafter on the target's device, its config.json dict, its generation_config dict);
    `config`: a scratch drafter's (`scratch_drafter_config`)."""
    device = target.device
    if settings["init"] == "scratch":
        drafter_config = DrafterConfig.from_dict(config)
        check_compatible(drafter_config, target.config)
        drafter = Drafter(drafter_config).to(device)
        init_weights(drafter, generator)
        warm_start(drafter, target)
        generation = {k: v for k, v in (target.generation_config or {}).items()
                      if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    else:
        drafter = load_drafter(settings["init"], target=target, dtype=torch.float32, device=device)
        config = read_json_or_empty(Path(drafter.checkpoint_dir) / "config.json")
        generation = dict(drafter.generation_config or {})
    drafter.requires_grad_(True).train()
    if drafter.config.use_ordered_embeddings:
        drafter.masked_embedding.token_ordering.requires_grad_(False)
    return drafter, config, generation


# ---- measuring ------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def step_costs(target, drafter, prompt: list[int], max_n: int, reps: int = 15) -> dict:
    """Median seconds of a target decode step, a drafter step and verify passes over n + 1 tokens, and the latter
    two in units of the first (the speed model's inputs)."""
    cache = target.new_cache(max_length=len(prompt) + max_n + 8, max_rollback=max_n + 1,
                             min_sliding_history=drafter.sliding_history)
    out = target(torch.tensor([prompt], device=target.device), cache, logits_to_keep=1)
    token, h = torch.tensor([[prompt[-1]]], device=target.device), out.hidden_states[:, -1:]
    views = cache.views()

    def verify(n):
        target(token.expand(1, n), cache)
        cache.rollback(n)

    runs = {"decode": lambda: verify(1),
            "draft": lambda: drafter.step(target, token, h, len(prompt), views).logits.argmax(-1),
            **{n: (lambda n=n: verify(n + 1)) for n in range(1, max_n + 1)}}
    times = {name: [] for name in runs}
    for rep in range(reps + 3):  # round robin: a busy spell on a shared machine slows every measurement alike
        for name, fn in runs.items():
            sync(target.device)
            t0 = time.perf_counter()
            fn()
            sync(target.device)
            if rep >= 3:  # the first rounds warm up
                times[name].append(time.perf_counter() - t0)
    decode, draft = statistics.median(times["decode"]), statistics.median(times["draft"])
    verify_cost = {n: statistics.median(times[n]) / decode for n in range(1, max_n + 1)}
    return {"target_decode_ms": decode * 1e3, "drafter_step_ms": draft * 1e3, "drafter_cost": draft / decode,
            "verify_cost": verify_cost}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_check(target, drafters: dict, prompts: list[list[int]], n: int, new_tokens: int, progress=None) -> dict:
    """Greedy speculative.generate with each drafter at N = n drafts, and target-only, on held-out prompts: the
    loop's own acceptance per position, tokens per target pass, tokens/s, and whether outputs equal target-only.
    `progress(runs done, runs)` after every generation."""
    total, done = len(prompts) * (1 + len(drafters)), 0

    def run_one(drafter, prompt, **kw):
        nonlocal done
        result = generate(target, drafter, prompt, max_new_tokens=new_tokens, **kw)
        done += 1
        if progress is not None:
            progress(done, total)
        return result

    base = [run_one(None, p) for p in prompts]
    base_rate = sum(r.stats.decode_tokens for r in base) / sum(r.stats.decode_seconds for r in base)
    out = {"prompts": len(prompts), "new_tokens": new_tokens, "num_draft_tokens": n,
           "target_only_tokens_per_second": base_rate}
    for name, drafter in drafters.items():
        runs = [run_one(drafter, p, num_draft_tokens=n, schedule="constant") for p in prompts]
        rounds = [r for run in runs for r in run.stats.rounds]
        tokens = sum(r.stats.decode_tokens for r in runs)
        rate = tokens / sum(r.stats.decode_seconds for r in runs)
        per = round_statistics(rounds, 0, n)["acceptance_per_position"]
        out[name] = {"acceptance_per_position": per,
                     "acceptance_rate": sum(a for _, a in rounds) / max(1, sum(d for d, _ in rounds)),
                     "tokens_per_target_pass": tokens / max(1, sum(r.stats.target_forward_passes - 1 for r in runs)),
                     "tokens_per_second": rate, "speedup_wall_clock": rate / base_rate,
                     "outputs_identical": all(r.tokens == b.tokens for r, b in zip(runs, base))}
    return out


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def save_state(folder: Path, drafter: Drafter, optimizer, generator: torch.Generator, state: dict,
               best_weights: dict[str, torch.Tensor]) -> None:
    """checkpoint/: drafter.safetensors (float32), best.safetensors (the best evaluation's float32 weights),
    optimizer.safetensors + state.json (step, losses, evaluations, RNG, settings). Written beside and then moved
    over the old files, so an interrupted save leaves the previous checkpoint."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in drafter.state_dict().items()}
    save_file(weights, str(tmp / "drafter.safetensors"))
    save_file({k: v.contiguous() for k, v in best_weights.items()}, str(tmp / "best.safetensors"))
    tensors, meta = optimizer_to_safetensors(optimizer)
    tensors["rng.data"] = generator.get_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": meta}, indent=1) + "\n")
    if (folder / "contexts.safetensors").is_file():
        shutil.copy2(folder / "contexts.safetensors", tmp / "contexts.safetensors")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def save_drafter_folder(out: Path, drafter: Drafter, config: dict, generation: dict, dtype: torch.dtype,
                        target_dir: Path) -> None:
    """The Hugging Face-layout folder: keys = module names (the tied head is not stored), weights in `dtype`."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in drafter.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {**config, "dtype": str(dtype).removeprefix("torch.")}
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (target_dir / name).is_file():
            shutil.copy2(target_dir / name, out / name)


# ---- options --------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_drafter.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="the target: checkpoint folder or hub id (frozen)")
    p.add_argument("--data", nargs="+", help="text files, folders, JSONL files (\"text\" or \"messages\")")
    p.add_argument("--out", type=Path, required=True, help="output folder (the drafter, report and checkpoint/)")
    p.add_argument("--init", help="a released-layout drafter (folder or hub id) to fine-tune, or 'scratch'")
    p.add_argument("--size", type=int, help="--init scratch: the drafter's hidden size, any integer >= 1 for every "
                   "target (default min(256, the target's)); its query heads are size // 64 rounded up to a multiple "
                   "of the target's KV heads per attention type (at 256: 4 for E2B and E4B, 16 for 31B, 8 for "
                   "26B-A4B), checked against the target before its weights load")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULTS['steps']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per training sequence (default {DEFAULTS['seq_len']})")
    p.add_argument("--draft-steps", type=int, help=f"K chained draft steps trained (default {DEFAULTS['draft_steps']})")
    p.add_argument("--eval-steps", type=int, help="draft positions evaluated, the largest N considered "
                   f"(default max(K, {DEFAULTS['eval_steps']}))")
    p.add_argument("--dtype", help="the target's dtype: float32, bfloat16, float16 (default float32)")
    p.add_argument("--device", help="cpu, cuda, mps (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/checkpoint")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 fine-tuning, 2e-3 from scratch)")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--eval-every", type=int, help=f"held-out evaluation interval (default {DEFAULTS['eval_every']})")
    p.add_argument("--save-every", type=int, help="checkpoint interval (default: --eval-every)")
    p.add_argument("--seed", type=int, help="seed of the data order, greedy prompts and scratch init (default 0)")
    p.add_argument("--contexts", choices=["data", "greedy", "mixed"], help="training contexts (default mixed)")
    p.add_argument("--greedy-seqs", type=int, help="greedy continuations generated for training (default 256)")
    p.add_argument("--eval-prompts", type=int, help="held-out prompts whose greedy continuations are evaluated "
                   f"(default {DEFAULTS['eval_prompts']})")
    p.add_argument("--eval-prompt-len", type=int, help="tokens per held-out prompt, cut at random from a held-out "
                   f"document (default {DEFAULTS['eval_prompt_len']})")
    p.add_argument("--eval-new-tokens", type=int, help="the first tokens after each prompt whose round starts are "
                   f"evaluated (default {DEFAULTS['eval_new_tokens']})")
    p.add_argument("--eval-seqs", type=int, help="held-out document windows of --seq-len tokens for the "
                   f"teacher-forced evaluation (default {DEFAULTS['eval_seqs']})")
    p.add_argument("--held-out", type=float, help="share of documents held out, by text hash (default 0.05)")
    p.add_argument("--loss", choices=["kl", "argmax"], help="KL to the target's distribution (default) or "
                   "cross-entropy to its argmax")
    p.add_argument("--save-dtype", help="dtype of the saved weights (default float32: the trained weights as they "
                   "are; bfloat16 rounding lost a third of a short fine-tune's gain, BENCHMARKS.md section 7)")
    p.add_argument("--drafter-cost", type=float, help="a drafter step's cost in target decode steps (default: "
                   "measured on --device, with the verify passes)")
    p.add_argument("--loop-prompts", type=int, help="held-out prompts run through speculative.generate at the end "
                   f"(default {DEFAULTS['loop_prompts']}; 0: skip)")
    p.add_argument("--loop-new-tokens", type=int, help="new tokens per loop-check prompt (default "
                   f"{DEFAULTS['loop_new_tokens']})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: as generate.py, one per core that no "
                   "other process keeps busy when the run starts)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.01)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, saved: dict | None) -> dict:
    """Every setting of the run: the saved run's on --resume (only RESUMABLE ones may change), else the options
    over DEFAULTS. Raises UsageError naming the first bad option."""
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("out", "resume", "no_progress", "command")}
    if saved is not None:
        for key, value in given.items():
            old = saved.get(key)
            if key not in RESUMABLE and (list(value) if isinstance(value, list) else value) != old:
                raise UsageError(f"--resume: --{key.replace('_', '-')} {value} differs from the saved run's {old}; "
                                 f"only {', '.join('--' + k.replace('_', '-') for k in sorted(RESUMABLE))} may change")
        return {**saved, **{k: v for k, v in given.items() if k in RESUMABLE}}
    s = {**DEFAULTS, **given}
    if not s.get("target"):
        raise UsageError("--target is required (a checkpoint folder or hub id)")
    if not s.get("data"):
        raise UsageError("--data is required (text files, folders or JSONL)")
    if not s.get("init"):
        raise UsageError("--init is required: a drafter folder or hub id to fine-tune, or 'scratch' (with --size)")
    if s["init"] != "scratch" and s["size"] is not None:
        raise UsageError("--size applies to --init scratch only")
    for key in ("steps", "seq_len", "draft_steps", "batch_size", "eval_every", "greedy_seqs", "eval_seqs",
                "eval_prompts", "eval_prompt_len", "eval_new_tokens", "loop_new_tokens"):
        if s[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {s[key]}")
    if s["seq_len"] < 8:
        raise UsageError(f"--seq-len must be at least 8, got {s['seq_len']}")
    for key in ("size", "save_every", "threads"):
        if s[key] is not None and s[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {s[key]}")
    if s["loop_prompts"] < 0:
        raise UsageError(f"--loop-prompts must be 0 or more, got {s['loop_prompts']}")
    if not 0 < s["held_out"] < 1:
        raise UsageError(f"--held-out must be between 0 and 1 (a share of the documents), got {s['held_out']}")
    if s["lr"] is not None and not s["lr"] > 0:
        raise UsageError(f"--lr must be positive, got {s['lr']}")
    if s["drafter_cost"] is not None and not s["drafter_cost"] > 0:
        raise UsageError(f"--drafter-cost must be positive, got {s['drafter_cost']}")
    s["lr"] = s["lr"] or (2e-3 if s["init"] == "scratch" else 1e-3)  # fine-tuning: BENCHMARKS.md section 7's sweep
    s["eval_steps"] = s["eval_steps"] or max(s["draft_steps"], DEFAULTS["eval_steps"])
    if s["eval_steps"] < 1 or s["eval_steps"] >= s["seq_len"] // 2:
        raise UsageError(f"--eval-steps must be between 1 and --seq-len / 2, got {s['eval_steps']}")
    for key in ("dtype", "save_dtype"):
        if s[key] is not None:
            try:
                parse_dtype(s[key])
            except ValueError as e:
                raise UsageError(f"--{key.replace('_', '-')}: {e}") from None
    s["save_every"] = s["save_every"] or s["eval_every"]
    return s


# ---- main -----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = "python scripts/train_drafter.py " + " ".join(argv)
    previous = torch.get_num_threads()
    try:
        return run(args)
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"train_drafter.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous)  # for callers in the same process


def run(args: argparse.Namespace) -> int:
    out, ckpt = args.out, args.out / "checkpoint"
    saved_state = None
    if args.resume:
        if not (ckpt / "state.json").is_file():
            raise UsageError(f"--resume: no checkpoint in {ckpt} (state.json missing)")
        saved_state = json.loads((ckpt / "state.json").read_text())
    elif (ckpt / "state.json").is_file():
        raise UsageError(f"{out} already holds a run (checkpoint/state.json): pass --resume or choose another --out")
    s = settings_from(args, saved_state["settings"] if saved_state else None)
    torch.set_num_threads(s["threads"] or default_threads())
    begin = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - begin) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    target_dir = resolve_checkpoint(s["target"])
    scratch = scratch_drafter_config(target_dir, s["size"]) if s["init"] == "scratch" else None  # before the weights
    threads = torch.get_num_threads()
    log(f"loading target {s['target']} ({s['dtype']}, {s['device']}, {threads} thread{'s' * (threads > 1)}) ...")
    target = load_target(target_dir, dtype=s["dtype"], device=s["device"])  # frozen: requires_grad off, eval
    log(f"target loaded: {sum(p.numel() for p in target.parameters()) / 1e6:.1f} M parameters")
    tokenizer = load_tokenizer(target.checkpoint_dir)
    docs = read_documents(s["data"], load_chat_template(target.checkpoint_dir))
    held = [d for d in docs if is_held_out(d["text"], s["held_out"])]
    train = [d for d in docs if not is_held_out(d["text"], s["held_out"])]
    if not held or not train:
        raise UsageError(f"--held-out {s['held_out']} of {len(docs)} documents leaves "
                         f"{len(train)} for training and {len(held)} held out: both need at least one")
    train_files, held_files = tokenize(train, tokenizer), tokenize(held, tokenizer)
    stream = torch.cat(train_files)  # [T] documents end to end
    if len(stream) <= s["seq_len"]:
        raise UsageError(f"the training documents hold {len(stream)} tokens, not more than --seq-len {s['seq_len']}")
    data_record = {"documents": len(docs), "train_documents": len(train), "held_out_documents": len(held),
                   "train_tokens": len(stream), "held_out_tokens": sum(len(f) for f in held_files),
                   "held_out_sources": [d["source"] for d in held],
                   "train_sha256": hashlib.sha256(stream.numpy().tobytes()).hexdigest(),
                   "split_rule": f"int(sha256(text)[:8 bytes]) < {s['held_out']} * 2^64"}
    if saved_state and saved_state["data"]["train_sha256"] != data_record["train_sha256"]:
        raise UsageError("--resume: the training data changed since the checkpoint (its token hash differs)")
    log(f"data: {len(docs)} documents, {len(train)} training ({len(stream)} tokens), {len(held)} held out")

    gen = torch.Generator().manual_seed(s["seed"])
    drafter, config, generation = build_drafter(target, s, gen, scratch)
    save_dtype = parse_dtype(s["save_dtype"])
    optimizer = make_optimizer(drafter, s["lr"], s["weight_decay"])
    greedy_rows = {"data": 0, "greedy": s["batch_size"], "mixed": s["batch_size"] // 2}[s["contexts"]]
    best_weights: dict[str, torch.Tensor] = {}  # the best evaluation's float32 weights (step 0: the init's)
    if saved_state:
        drafter.load_state_dict(load_file(str(ckpt / "drafter.safetensors"), device=str(target.device)))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        gen.set_state(tensors.pop("rng.data"))
        optimizer_from_safetensors(optimizer, tensors, saved_state["optimizer"])
        contexts = load_file(str(ckpt / "contexts.safetensors"))
        best_weights.update(load_file(str(ckpt / "best.safetensors")))
        state = {k: v for k, v in saved_state.items() if k != "optimizer"}
        state["settings"] = s
        log(f"resumed at step {state['step']} of {s['steps']} (best so far: step {state['best']['step']})")
    else:
        ctx_gen = torch.Generator().manual_seed(s["seed"] + 1)
        eval_ids, eval_first = greedy_sequences(
            target, held_files, s["eval_prompts"], s["eval_prompt_len"] + s["eval_new_tokens"] + s["eval_steps"],
            ctx_gen, batch=min(32, s["eval_prompts"]), prompt_len=s["eval_prompt_len"],
            progress=Phase(log, "greedy continuations of held-out prompts", "rows"))
        contexts = {"eval_ids": eval_ids, "eval_first": eval_first,
                    "eval_docs": document_windows(held_files, s["eval_seqs"], s["seq_len"])}
        if greedy_rows:
            contexts["train_ids"] = greedy_sequences(
                target, train_files, s["greedy_seqs"], s["seq_len"], ctx_gen, prompt_len=greedy_prompt_len(s),
                progress=Phase(log, "greedy continuations of training prompts", "rows"))[0]
        ckpt.mkdir(parents=True, exist_ok=True)
        save_file(contexts, str(ckpt / "contexts.safetensors"))
        state = {"settings": s, "data": data_record, "step": 0, "losses": [], "evals": [],
                 "minutes_trained": 0.0}
    evaluation = {"prompts": teacher_inputs(target, contexts["eval_ids"],
                                            progress=Phase(log, "held-out teacher: prompts", "rows")),
                  "documents": teacher_inputs(target, contexts["eval_docs"],
                                              progress=Phase(log, "held-out teacher: documents", "rows"))}
    evaluation["prompts"]["first"] = contexts["eval_first"]

    if not saved_state:
        prompt = [int(t) for t in contexts["eval_ids"][0, : int(contexts["eval_first"][0]) + 1]]
        if s["drafter_cost"] is None:
            log("measuring step costs (target decode, drafter step, verify passes) ...")
            state["costs"] = step_costs(target, drafter, prompt, s["eval_steps"])
        else:
            state["costs"] = {"drafter_cost": s["drafter_cost"], "verify_cost": {}}
        log(f"step costs: a drafter step = {state['costs']['drafter_cost']:.3f} target decode steps")
    verify_cost = {int(k): v for k, v in state["costs"]["verify_cost"].items()}
    shipped = copy.deepcopy(drafter).requires_grad_(False).eval()  # the weights as saved: rounded to save_dtype

    def measure(model, label: str) -> dict:
        return evaluate_drafter(model, target, evaluation, s["eval_steps"], s["eval_new_tokens"],
                                state["costs"]["drafter_cost"], verify_cost,
                                lambda what: Phase(log, f"{label}: {what}", "rows"))

    def evaluate(step: int) -> None:
        """Evaluate the drafter as it would be saved; keep its weights when its predicted speed-up beats the best."""
        shipped.load_state_dict(drafter.state_dict())
        round_to(shipped, save_dtype)
        result = {"step": step, **measure(shipped, f"evaluation at step {step}")}
        state["evals"].append(result)
        best = state.get("best")
        if best is None or result["predicted_speedup_best"] > best["predicted_speedup_best"]:
            state["best"] = {"step": step, "predicted_speedup_best": result["predicted_speedup_best"]}
            best_weights.clear()
            best_weights.update({k: v.detach().cpu().clone() for k, v in drafter.state_dict().items()})
        log(f"step {step}: {summary(result)}" + ("  (best so far)" if state["best"]["step"] == step else
                                                  f"  (best: step {state['best']['step']})"))

    if not saved_state:
        evaluate(0)

    train_loop(drafter, target, optimizer, gen, stream, contexts.get("train_ids"), greedy_rows, s, state, ckpt,
               evaluate, best_weights, log, no_progress=args.no_progress)

    # the output: the best evaluation's weights (the init's if nothing beat it), rounded to the saved dtype
    best_step = state["best"]["step"]
    kept_init = best_step == 0
    output = next(e for e in state["evals"] if e["step"] == best_step)
    before = state["evals"][0]
    drafter.load_state_dict({k: v.to(target.device) for k, v in best_weights.items()})
    drafter.requires_grad_(False).eval()
    other = None  # the output's weights in the other dtype: what rounding to bfloat16 costs (or would cost)
    if not kept_init:
        twin = copy.deepcopy(drafter)  # the float32 master weights
        other_dtype = torch.bfloat16 if save_dtype == torch.float32 else torch.float32
        round_to(twin, other_dtype)  # (float32: as they are)
        other = {"dtype": str(other_dtype).removeprefix("torch."),
                 **measure(twin, f"step {best_step} in {other_dtype}")}
    round_to(drafter, save_dtype)
    n = output["num_assistant_tokens"]
    generation = {**generation, "num_assistant_tokens": n, "num_assistant_tokens_schedule": "constant"}
    save_drafter_folder(out, drafter, config, generation, save_dtype, Path(target.checkpoint_dir))

    report = {"command": args.command,
              "settings": s, "data": state["data"], "target_dtype": str(target.dtype), "saved_dtype": str(save_dtype),
              "parameters_trained": sum(p.numel() for p in drafter.parameters()),
              "steps": state["step"], "minutes_trained": state["minutes_trained"], "losses": state["losses"],
              "evaluation": EVALUATION_NOTE, "evals": state["evals"], "before": before, "output": output,
              "output_step": best_step, "kept_init": kept_init,
              "acceptance_per_position": {"before": before["acceptance_per_position"],
                                          "after": output["acceptance_per_position"]},
              "output_in_other_dtype": other, "costs": state["costs"], "num_assistant_tokens": n,
              "speed_model": "speedup(N) = (1 + A_1 + ... + A_N) / (N * drafter_cost + verify_cost[N]), costs in "
                             "target decode steps"}
    if s["loop_prompts"]:
        prompts = [[int(t) for t in row[: int(first) + 1]] for row, first in
                   zip(contexts["eval_ids"][: s["loop_prompts"]], contexts["eval_first"][: s["loop_prompts"]])]
        drafters = {"after": drafter}
        if s["init"] != "scratch":  # the drafter as it was before training
            drafters = {"before": load_drafter(s["init"], target=target, device=target.device), **drafters}
        report["loop_check"] = loop_check(target, drafters, prompts, n, s["loop_new_tokens"],
                                          progress=Phase(log, "loop check (speculative.generate)", "runs"))
        log(f"loop check: {json.dumps({k: v for k, v in report['loop_check'].items() if isinstance(v, dict)})}")
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"before:  {summary(before)}")
    log(f"output:  {summary(output)}  (step {best_step})")
    if kept_init:
        best_trained = max(state["evals"][1:], key=lambda e: e["predicted_speedup_best"], default=None)
        print(f"train_drafter.py: no evaluation beat the initial drafter (predicted speed-up "
              f"{before['predicted_speedup_best']:.3f}" + (f"; the best trained one {best_trained['predicted_speedup_best']:.3f}"
                                                          f" at step {best_trained['step']}" if best_trained else "")
              + f"): {out} holds the initial drafter (exit status {KEPT_INIT})", file=sys.stderr, flush=True)
        return KEPT_INIT
    log(f"saved {out}: the drafter of step {best_step}, num_assistant_tokens = {n}")
    return 0


def greedy_prompt_len(s: dict) -> int:
    """Prompt length of a training greedy continuation: the rest of --seq-len after the first --eval-new-tokens +
    --eval-steps new tokens (at least half of it), so that the greedy part is what the evaluation and the loop see
    first after a prompt, and the prompt part trains on the data itself."""
    return max(s["seq_len"] // 2, s["seq_len"] - s["eval_new_tokens"] - s["eval_steps"])


def summary(result: dict) -> str:
    """One line: acceptance per position on held-out prompts and teacher-forced, the best N's prediction."""
    n = result["num_assistant_tokens"]
    return ("held-out prompts A_j " + " ".join(f"{a:.3f}" for a in result["acceptance_per_position"])
            + "; documents (teacher-forced) agreement per step "
            + " ".join(f"{a:.3f}" for a in result["teacher_forced_agreement_per_step"])
            + f"; N = {n}: {result['tokens_per_round'][n - 1]:.2f} tokens per target pass, predicted speed-up "
            f"{result['predicted_speedup_best']:.3f}")


def evaluate_drafter(drafter, target, evaluation: dict, steps: int, new_tokens: int, drafter_cost: float,
                     verify_cost: dict, progress) -> dict:
    """The held-out evaluation of one drafter (EVALUATION_NOTE): the loop's rounds on the held-out prompts' greedy
    continuations, replayed for every N = 1..steps, with their acceptance per position, tokens per target pass and
    predicted speed-up; and the teacher-forced acceptance per position on held-out documents."""
    prompts = evaluation["prompts"]
    lengths, _ = accepted_lengths(drafter, target, prompts, steps, progress=progress("prompts"))
    by_n = [round_statistics(*simulated_rounds(lengths, prompts["first"] + 1, new_tokens, n), n)
            for n in range(1, steps + 1)]
    speed = [r["tokens_per_pass"] / round_cost(n, drafter_cost, verify_cost) for n, r in enumerate(by_n, start=1)]
    n = 1 + speed.index(max(speed))
    documents = teacher_forced_agreement(drafter, target, evaluation["documents"], steps,
                                         progress=progress("documents"))
    return {"acceptance_per_position": by_n[-1]["acceptance_per_position"], "rounds": by_n[-1]["rounds"],
            "tokens_per_round": [r["tokens_per_pass"] for r in by_n],  # N = 1, 2, ...
            "acceptance_per_position_by_n": [r["acceptance_per_position"] for r in by_n],
            "teacher_forced_agreement_per_step": documents,
            "predicted_speedup": speed, "num_assistant_tokens": n, "predicted_speedup_best": speed[n - 1]}


def train_loop(drafter, target, optimizer, gen, stream, greedy_ids, greedy_rows, s, state, ckpt, evaluate,
               best_weights, log, no_progress: bool) -> None:
    """Optimizer steps state["step"]..s["steps"]: each batch holds `greedy_rows` rows of the greedy pool and the
    rest fresh windows of the training stream, the teacher computed on the fly; evaluation every --eval-every steps
    and at the end, checkpoints (with the best evaluation's weights) at their interval and at the end."""
    steps, warmup = s["steps"], max(1, s["steps"] // 20)
    bar = progress(state["step"], steps, no_progress)
    start = time.perf_counter()
    trained = state["minutes_trained"]
    for step in range(state["step"], steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, s["lr"], warmup)
        parts = []
        if greedy_rows:
            rows = torch.randint(0, len(greedy_ids), (greedy_rows,), generator=gen)
            parts.append(teacher_inputs(target, greedy_ids[rows]))
        if s["batch_size"] - greedy_rows:
            windows = random_windows(stream, s["batch_size"] - greedy_rows, s["seq_len"], gen)  # [b, S]
            parts.append(teacher_inputs(target, windows))
        batch = parts[0] if len(parts) == 1 else join(*parts)
        loss, _ = drafter_loss(drafter, target, batch, s["draft_steps"], s["loss"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        state["losses"].append(loss.item())
        state["step"] = step + 1
        state["minutes_trained"] = trained + (time.perf_counter() - start) / 60
        bar.update(state["losses"][-1])
        if state["step"] % s["eval_every"] == 0 or state["step"] == steps:
            drafter.eval()
            evaluate(state["step"])
            drafter.train()
        if state["step"] % s["save_every"] == 0 or state["step"] == steps:
            save_state(ckpt, drafter, optimizer, gen, state, best_weights)
    bar.close()


class Phase:
    """Progress of one phase as lines on stderr (through `log`): called as `phase(done, total)` while it runs, it
    writes a line at every tenth of the total it passes, with the rate and the time left, and one at the end."""

    def __init__(self, log, name: str, unit: str):
        self.log, self.name, self.unit = log, name, unit
        self.start, self.shown = time.perf_counter(), 0

    def __call__(self, done: float, total: float) -> None:
        tenth = int(10 * done / total) if total else 10
        if tenth <= self.shown and done < total:
            return
        if done >= total and self.shown == 11:
            return
        self.shown = 11 if done >= total else tenth
        elapsed = time.perf_counter() - self.start
        left = elapsed * (total - done) / done if done else float("nan")
        self.log(f"{self.name}: {done:.0f}/{total:.0f} {self.unit}, {elapsed:.0f} s"
                 + (f", about {left:.0f} s left" if done < total else ""))


class progress:
    """A progress bar with the loss and ETA: tqdm if installed, else a line every ~2% of the run (stderr)."""

    def __init__(self, done: int, total: int, plain: bool):
        self.done, self.total, self.start, self.first = done, total, time.perf_counter(), done
        self.bar = None
        if not plain:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, desc="drafter", unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(1)
            return
        every = max(1, self.total // 50)
        if self.done % every == 0 or self.done == self.total:
            rate = (time.perf_counter() - self.start) / (self.done - self.first)
            eta = rate * (self.total - self.done)
            print(f"step {self.done}/{self.total}  loss {loss:.3f}  {rate:.2f} s/step  ETA {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr, flush=True))(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
