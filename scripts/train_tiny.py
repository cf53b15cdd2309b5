#!/usr/bin/env python
"""Train the bundled tiny Gemma 4 pair (target + MTP drafter) from scratch on the Python standard library's source.

    python scripts/train_tiny.py --seed 0                    # the shipped run (tiny_gemma4/, see training.json)
    python scripts/train_tiny.py --quick --out /tmp/tiny     # a few minutes, end to end, same shapes

Every fresh machine has the corpus: the `.py` files under `sysconfig.get_paths()["stdlib"]`, sorted by relative
path, minus test suites, third-party packages and generated tables (`EXCLUDED_DIRS`). A deterministic 2% of the
files (by the SHA-256 of their relative path) is held out for evaluation. `training.json` records the held-out
files, a SHA-256 of the corpus (every sorted relative path and its bytes), the hyperparameters, losses and timings.

The phases, one function each:
1. `train_tokenizer`: SentencePiece BPE (byte fallback, whitespace kept: code needs its indentation) on a sample of
   the training files; ids 0-3 are <pad> <eos> <bos> <unk> as in Gemma.
2. `train_target`: next-token cross-entropy through the library's own `Gemma4Model` (no cache: `target(ids)` builds
   a temporary one, and autograd flows through its buffer writes). E2B-style: sliding + full layers, proportional
   RoPE, per-layer embeddings, KV sharing, logit softcapping; narrow and deep, so that one drafter step costs a
   small fraction of one target decode step on a CPU, where per-layer overhead dominates.
3. `greedy_sequences` (drafter/training.py, shared with scripts/train_drafter.py, as is the distillation of 4):
   prompts from the training files continued by the frozen target's greedy decoding. These are
   the contexts the drafter meets at inference (a real prompt, then what the target itself wrote).
4. `train_drafter`: distillation into the library's own `Drafter` with exactly the loop's inputs (see
   `drafter_loss`): the target's scaled embedding of the last token and post-norm hidden state of the position
   before it, the target's K/V of positions < p, a constant RoPE position p for all chained steps.
5. `save_checkpoint`: Hugging Face folders that `weights.load_target` / `load_drafter` and transformers 5.24
   (`Gemma4ForCausalLM`, `Gemma4AssistantForCausalLM`) both load. transformers is never used here;
   `scripts/eval_tiny.py` and `tests/test_bundled.py` check the folders against it.

Runs are reproducible from `--seed` on the same software and thread count (`--threads`; CPU matmul blocking, and so
rounding, depends on it). Weights are trained in float32 and saved in bfloat16; the target is rounded to bfloat16
before distillation, so the drafter learns the target that ships.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from drafter import Drafter, DrafterConfig  # noqa: E402
from drafter.training import (  # noqa: E402  the distillation shared with scripts/train_drafter.py
    drafter_agreement, drafter_loss, greedy_sequences, init_weights, join, lr_at, make_optimizer, round_to, rows_of,
    teacher_inputs, warm_start,
)
from gemma4 import Gemma4Config, Gemma4Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
S, FULL = "sliding_attention", "full_attention"
PAD, EOS, BOS, UNK = 0, 1, 2, 3

# Directories (any path component) left out of the corpus: test suites, IDLE, third-party packages, and two
# folders of generated data (codec tables in encodings/, the pydoc topics dump) that would swamp the real code.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
                 "encodings", "pydoc_data", "turtledemo"}
HELD_OUT_PER_MILLE = 20  # 2% of the files, chosen by hash of the relative path

TARGET = dict(  # E2B-like, narrow and deep: 6 x (3 sliding + 1 full); the last 8 layers reuse K/V of 14 and 15
    vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=24, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, global_head_dim=64, layer_types=([S] * 3 + [FULL]) * 6,
    sliding_window=64, hidden_size_per_layer_input=8, vocab_size_per_layer_input=4096, num_kv_shared_layers=8,
    use_double_wide_mlp=False, final_logit_softcapping=30.0, max_position_embeddings=2048,
    rope_parameters={S: {"rope_type": "default", "rope_theta": 10_000.0},
                     FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}},
)
DRAFTER_TEXT = dict(  # the released drafters' design: 4 layers, 3 sliding + 1 full; head dims and KV heads = target's
    vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=1, head_dim=32, global_head_dim=64, layer_types=[S] * 3 + [FULL], sliding_window=64,
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=4,
    max_position_embeddings=2048, rope_parameters=TARGET["rope_parameters"],
)


# ---- 0. corpus ------------------------------------------------------------------------------------------------------
def list_corpus() -> tuple[Path, list[str]]:
    """The stdlib root and the sorted relative paths of its corpus files (POSIX separators)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, files in os.walk(root):
        rel_dir = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        paths += [(rel_dir / f).as_posix() for f in files if f.endswith(".py")]
    return root, sorted(paths)


def is_held_out(rel_path: str) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELD_OUT_PER_MILLE


def read_corpus(root: Path, paths: list[str]) -> tuple[dict[str, str], dict]:
    """{relative path: text} of the files that are valid UTF-8, and the corpus record (counts, SHA-256)."""
    sha, texts, skipped, size = hashlib.sha256(), {}, [], 0
    for rel in paths:
        raw = (root / rel).read_bytes()
        try:
            texts[rel] = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        sha.update(rel.encode() + b"\0" + raw + b"\0")
        size += len(raw)
    record = dict(stdlib=str(root), python=platform.python_version(), files=len(texts), bytes=size,
                  sha256=sha.hexdigest(), skipped_not_utf8=skipped, excluded_dirs=sorted(EXCLUDED_DIRS),
                  held_out_rule=f"int(sha256(relative path)[:8 bytes]) % 1000 < {HELD_OUT_PER_MILLE}")
    return texts, record


# ---- 1. tokenizer ---------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model (serialized). Whitespace is kept exactly: identity normalisation, no dummy prefix,
    whitespace-only pieces allowed (indentation), "\\n" a piece of its own; unseen bytes fall back to <0xNN>."""
    import sentencepiece as spm

    def chunks():  # ~20-line pieces of each file; sentencepiece treats every item as one "sentence"
        for text in texts:
            lines = text.splitlines(keepends=True)
            for i in range(0, len(lines), 20):
                yield "".join(lines[i : i + 20])

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=chunks(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        user_defined_symbols=["\n"], pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", max_sentence_length=1 << 16,
        input_sentence_size=0, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


# ---- 2. target ------------------------------------------------------------------------------------------------------
def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length] windows at random offsets of the token stream."""
    starts = torch.randint(0, len(stream) - length, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def lm_loss(target: Gemma4Model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows [B, S+1] (nats per token)."""
    logits = target(windows[:, :-1]).logits  # [B, S, V], no cache: the model makes a temporary one
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def held_out_loss(target: Gemma4Model, windows: torch.Tensor, batch: int = 16) -> float:
    losses = [lm_loss(target, windows[i : i + batch]) * len(windows[i : i + batch]) for i in range(0, len(windows), batch)]
    return float(sum(losses) / len(windows))


def train_target(target: Gemma4Model, train: torch.Tensor, held_windows: torch.Tensor, args, log) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = make_optimizer(target, args.target_lr, weight_decay=0.1)
    warmup = max(1, args.target_steps // 20)
    target.train()
    start, history = time.perf_counter(), []
    for step in range(args.target_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.target_steps, args.target_lr, warmup)
        loss = lm_loss(target, random_windows(train, args.batch, args.seq_len + 1, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(target.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.target_steps:
            elapsed = time.perf_counter() - start
            recent = sum(history[-args.log_every :]) / len(history[-args.log_every :])
            line = f"target step {step + 1}/{args.target_steps}  loss {recent:.3f}  {elapsed / 60:.1f} min"
            if (step + 1) % (args.log_every * 8) == 0 or step + 1 == args.target_steps:
                target.eval()
                line += f"  held-out {held_out_loss(target, held_windows):.3f}"
                target.train()
            log(line)
    target.eval()
    return dict(steps=args.target_steps, batch=args.batch, seq_len=args.seq_len, peak_lr=args.target_lr,
                warmup_steps=warmup, weight_decay=0.1, tokens_seen=args.target_steps * args.batch * args.seq_len,
                final_train_loss=sum(history[-50:]) / len(history[-50:]), minutes=(time.perf_counter() - start) / 60)


# ---- 3, 4. greedy continuations and the drafter: drafter/training.py ------------------------------------------------
def train_drafter(drafter: Drafter, target: Gemma4Model, train: dict, val: dict, stream: torch.Tensor, args,
                  log) -> dict:
    """Each batch: greedy continuations (the inference regime), plus fresh windows of real training text (never
    repeated, so the drafter cannot memorise the continuations; in real text a chained step counts only where the
    text follows the target's greedy path)."""
    gen = torch.Generator().manual_seed(args.seed + 3)
    real = round(args.drafter_batch * args.real_fraction)
    opt = make_optimizer(drafter, args.drafter_lr, weight_decay=0.01)
    warmup = max(1, args.drafter_steps // 20)
    start, history = time.perf_counter(), []
    for step in range(args.drafter_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.drafter_steps, args.drafter_lr, warmup)
        rows = torch.randint(0, len(train["ids"]), (args.drafter_batch - real,), generator=gen)
        batch = rows_of(train, rows)
        if real:
            batch = join(batch, teacher_inputs(target, random_windows(stream, real, args.seq_len, gen)))
        loss, _ = drafter_loss(drafter, target, batch, args.draft_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.drafter_steps:
            recent = sum(history[-args.log_every :]) / len(history[-args.log_every :])
            line = f"drafter step {step + 1}/{args.drafter_steps}  loss {recent:.3f}  " \
                   f"{(time.perf_counter() - start) / 60:.1f} min"
            if (step + 1) % (args.log_every * 4) == 0 or step + 1 == args.drafter_steps:
                line += "  held-out agreement per step " + " ".join(f"{a:.2f}" for a in drafter_agreement(drafter, target, val, args.draft_steps))
            log(line)
    return dict(steps=args.drafter_steps, batch=args.drafter_batch, real_text_rows=real, draft_steps=args.draft_steps,
                peak_lr=args.drafter_lr, warmup_steps=warmup, weight_decay=0.01,
                final_train_loss=sum(history[-50:]) / len(history[-50:]), minutes=(time.perf_counter() - start) / 60)


# ---- 5. checkpoints -------------------------------------------------------------------------------------------------
def target_config_json(dtype: str) -> dict:
    return {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", **TARGET,
            "num_global_key_value_heads": None, "attention_k_eq_v": False, "enable_moe_block": False,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS, "dtype": dtype}


def drafter_config_json(dtype: str) -> dict:
    text = {"model_type": "gemma4_text", **DRAFTER_TEXT, "attention_k_eq_v": False, "enable_moe_block": False,
            "use_double_wide_mlp": False, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True, "attention_bias": False, "pad_token_id": PAD, "eos_token_id": EOS,
            "bos_token_id": BOS}
    return {"architectures": ["Gemma4AssistantForCausalLM"], "model_type": "gemma4_assistant",
            "backbone_hidden_size": TARGET["hidden_size"], "use_ordered_embeddings": False,
            "num_centroids": 2048, "centroid_intermediate_top_k": 32, "tie_word_embeddings": True,
            "text_config": text, "dtype": dtype}


def save_checkpoint(folder: Path, model: torch.nn.Module, prefix: str, config: dict, generation: dict,
                    tokenizer: bytes, dtype: torch.dtype) -> None:
    """config.json, model.safetensors (checkpoint key = prefix + module name; tied heads are not stored),
    generation_config.json and the tokenizer files (tokenizer.model and the same tokenizer as tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "tokenizer.model").write_bytes(tokenizer)
    from make_tokenizer_json import tokenizer_json  # this folder's script: the same tokenizer as tokenizer.json

    (folder / "tokenizer.json").write_text(tokenizer_json(folder / "tokenizer.model") + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "unk_token": "<unk>", "mask_token": None, "add_bos_token": True, "add_eos_token": False}, indent=2) + "\n")


# A code model has no chat format: the "chat" prompt is the text itself after <bos>, so generate.py works unchanged.
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def reproduce_command(args) -> str:
    """The command line that reproduces this run, every setting spelled out (the output folder aside)."""
    flags = ["seed", "threads", "tokenizer_every", "target_steps", "batch", "seq_len", "target_lr", "greedy_seqs",
             "drafter_steps", "drafter_batch", "drafter_lr", "real_fraction", "draft_steps", "num_assistant_tokens", "dtype"]
    return "python scripts/train_tiny.py " + " ".join(f"--{f.replace('_', '-')} {getattr(args, f)}" for f in flags)


# ---- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: tiny_gemma4/, --quick: /tmp/...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few-minute end-to-end run with the same shapes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--tokenizer-every", type=int, default=3, help="train the tokenizer on every n-th training file")
    p.add_argument("--target-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--target-lr", type=float, default=3e-3)
    p.add_argument("--greedy-seqs", type=int, default=1024, help="greedy continuations to distil the drafter on")
    p.add_argument("--drafter-steps", type=int, default=400)
    p.add_argument("--drafter-batch", type=int, default=8)
    p.add_argument("--drafter-lr", type=float, default=2e-3)
    p.add_argument("--real-fraction", type=float, default=0.5, help="share of each drafter batch that is real text")
    p.add_argument("--draft-steps", type=int, default=4, help="chained draft steps trained per position")
    p.add_argument("--num-assistant-tokens", type=int, default=4, help="drafter default N (eval_tiny.py measures it)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="saved weight dtype")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.quick:
        args.target_steps, args.drafter_steps, args.greedy_seqs, args.tokenizer_every = 30, 20, 64, 12
        args.log_every = 10
    if args.out is None:
        args.out = Path("/tmp/tiny_gemma4_quick") if args.quick else ROOT / "tiny_gemma4"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    begin = time.perf_counter()
    timings = {}

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - begin) / 60:5.1f} min] {msg}", flush=True)

    def lap(name: str, since: float) -> float:
        timings[name] = round((time.perf_counter() - since) / 60, 2)
        return time.perf_counter()

    t = time.perf_counter()
    root, paths = list_corpus()
    texts, corpus = read_corpus(root, paths)
    held = [p for p in texts if is_held_out(p)]
    train_paths = [p for p in texts if not is_held_out(p)]
    corpus.update(train_files=len(train_paths), held_out_files=held)
    log(f"corpus: {corpus['files']} files, {corpus['bytes'] / 1e6:.1f} MB, {len(held)} held out, sha256 {corpus['sha256'][:16]}")

    import sentencepiece as spm

    tokenizer = train_tokenizer([texts[p] for p in train_paths[:: args.tokenizer_every]], TARGET["vocab_size"])
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    train_files = [torch.tensor([BOS] + sp.encode(texts[p]) + [EOS]) for p in train_paths]
    held_files = [torch.tensor([BOS] + sp.encode(texts[p]) + [EOS]) for p in held]
    train_stream, held_stream = torch.cat(train_files), torch.cat(held_files)
    corpus.update(train_tokens=len(train_stream), held_out_tokens=len(held_stream),
                  bytes_per_token=round(corpus["bytes"] / (len(train_stream) + len(held_stream)), 3))
    held_windows = held_stream.unfold(0, args.seq_len + 1, args.seq_len)  # [n, S+1], as scripts/eval_tiny.py
    t = lap("tokenizer", t)
    log(f"tokenizer: {sp.get_piece_size()} pieces; {len(train_stream)} training tokens, {len(held_stream)} held out")

    gen = torch.Generator().manual_seed(args.seed)
    target = Gemma4Model(Gemma4Config.from_dict({"model_type": "gemma4_text", **TARGET}))
    init_weights(target, gen)
    log(f"target: {sum(p.numel() for p in target.parameters()) / 1e6:.2f}M parameters")
    target_record = train_target(target, train_stream, held_windows[:64], args, log)  # progress: 64 windows
    t = lap("target", t)
    dtype = getattr(torch, args.dtype)
    round_to(target, dtype)
    target.requires_grad_(False)
    target_record["held_out_loss"] = held_out_loss(target, held_windows)  # every held-out window
    target_record["held_out_tokens"] = held_windows.shape[0] * args.seq_len
    target_record["held_out_perplexity"] = math.exp(target_record["held_out_loss"])
    log(f"target held-out loss {target_record['held_out_loss']:.3f} (perplexity {target_record['held_out_perplexity']:.2f})")
    save_checkpoint(args.out / "target", target, "model.", target_config_json(args.dtype),
                    {"bos_token_id": BOS, "eos_token_id": [EOS], "pad_token_id": PAD, "do_sample": False},
                    tokenizer, dtype)
    (args.out / "target" / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    data_gen = torch.Generator().manual_seed(args.seed + 2)
    greedy_train, _ = greedy_sequences(target, train_files, args.greedy_seqs, args.seq_len, data_gen)
    greedy_val, _ = greedy_sequences(target, held_files, 32, args.seq_len, data_gen, batch=32)
    t = lap("greedy_data", t)
    log(f"greedy continuations: {len(greedy_train)} training and {len(greedy_val)} held-out sequences")
    greedy_train, greedy_val = teacher_inputs(target, greedy_train), teacher_inputs(target, greedy_val)
    t = lap("teacher_inputs", t)

    drafter = Drafter(DrafterConfig.from_dict(drafter_config_json(args.dtype)))
    init_weights(drafter, gen)
    warm_start(drafter, target)
    log(f"drafter: {sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M parameters")
    drafter_record = train_drafter(drafter, target, greedy_train, greedy_val, train_stream, args, log)
    round_to(drafter, dtype)
    drafter.requires_grad_(False)
    drafter_record["held_out_agreement_per_step"] = drafter_agreement(drafter, target, greedy_val, args.draft_steps)
    t = lap("drafter", t)
    log("drafter held-out agreement per step: " + " ".join(f"{a:.3f}" for a in drafter_record["held_out_agreement_per_step"]))

    out = args.out
    save_checkpoint(out / "drafter", drafter, "", drafter_config_json(args.dtype),
                    {"bos_token_id": BOS, "eos_token_id": [EOS], "pad_token_id": PAD,
                     "num_assistant_tokens": args.num_assistant_tokens, "num_assistant_tokens_schedule": "constant"},
                    tokenizer, dtype)
    timings["total"] = round((time.perf_counter() - begin) / 60, 2)
    timings["total_cpu"] = round(time.process_time() / 60, 2)  # less than wall time when other processes share the CPU
    record = dict(
        command=reproduce_command(args),
        seed=args.seed, threads=args.threads, quick=args.quick, saved_dtype=args.dtype,
        software=dict(python=platform.python_version(), torch=torch.__version__, sentencepiece=spm.__version__),
        corpus=corpus, tokenizer=dict(type="sentencepiece bpe", vocab_size=sp.get_piece_size(),
                                      trained_on=f"every {args.tokenizer_every}th training file, 20-line chunks"),
        target=dict(config=TARGET, parameters=sum(p.numel() for p in target.parameters()), **target_record),
        drafter=dict(config=DRAFTER_TEXT, parameters=sum(p.numel() for p in drafter.parameters()), **drafter_record),
        minutes=timings,
    )
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    log(f"saved {out}: {sum(sizes.values()) / 1e6:.1f} MB in {len(sizes)} files; total {timings['total']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
