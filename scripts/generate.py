#!/usr/bin/env python
"""Generate text with a Gemma 4 target, drafting with its MTP assistant (speculative decoding).

    python scripts/generate.py                          # the bundled tiny pair (tiny_gemma4/), offline
    python scripts/generate.py --target google/gemma-4-E2B-it --prompt "Why is the sky blue?"
    python scripts/generate.py --target ./my-gemma --prompt "..." --compare        # speed-up vs target only
    python scripts/generate.py --target ./my-gemma --prompt "..." --show-drafts    # watch drafts being verified

The answer streams to stdout as it is accepted; a summary (tokens, rounds, acceptance, tokens per target pass,
tokens/s) goes to stderr. `--json` prints one JSON object as the last line of stdout instead. User errors (a
missing folder, an offline hub, a drafter that does not fit, a bad option) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from drafter import IncompatibleDrafterError  # noqa: E402
from gemma4 import CacheError, ConfigError  # noqa: E402
from speculative import SCHEDULES, generate  # noqa: E402
from weights import (  # noqa: E402
    ChatTemplateError, CheckpointError, load_chat_template, load_drafter, load_target, load_tokenizer, render_chat,
)

BUNDLED_TARGET = Path(__file__).resolve().parents[1] / "tiny_gemma4" / "target"
BUNDLED_DRAFTER = BUNDLED_TARGET.parent / "drafter"
BUNDLED_PROMPT = ('class Stack:\n    """A last-in, first-out container."""\n\n    def __init__(self):\n'
                  "        self._items = []\n\n    def push(self, item):\n")
USER_ERRORS = (CheckpointError, ConfigError, IncompatibleDrafterError, ChatTemplateError, CacheError, ValueError,
               FileNotFoundError)


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, no traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="checkpoint folder or hub repo id of the Gemma 4 target (default: the bundled "
                   "tiny pair in tiny_gemma4/, trained on Python source: runs offline)")
    p.add_argument("--drafter", help="drafter folder or hub id (default: the target's id + '-assistant')")
    p.add_argument("--no-draft", action="store_true", help="target-only decoding (the baseline)")
    p.add_argument("--compare", action="store_true", help="run target-only and speculative, compare outputs and speed")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the user message (default: a short request; for the bundled pair, the "
                        "start of a Python function, as plain text)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids (for checkpoints without a tokenizer)")
    p.add_argument("--raw", action="store_true", help="use the prompt as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-draft-tokens", type=int, help="tokens drafted per round (default: the drafter's "
                   "generation_config num_assistant_tokens)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="constant: N every round; heuristic: +2 after a fully accepted round, -1 otherwise")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: from generation_config.json)")
    p.add_argument("--top-k", type=int, help="(default: from generation_config.json)")
    p.add_argument("--top-p", type=float, help="(default: from generation_config.json)")
    p.add_argument("--seed", type=int, help="random seed for sampling (default: from generation_config.json, else random)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--show-drafts", action="store_true", help="show each round: accepted drafts green, rejected red, "
                   "the target's bonus token marked")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    args = p.parse_args(argv)
    if args.target is None:  # the bundled pair: a code model without chat turns, so a raw code prompt
        if not BUNDLED_TARGET.is_dir():
            p.error(f"no --target given and the bundled pair is missing ({BUNDLED_TARGET})")
        args.target = str(BUNDLED_TARGET)
        if not args.no_draft:
            args.drafter = args.drafter or str(BUNDLED_DRAFTER)
        if args.prompt is None and args.prompt_ids is None:
            args.prompt, args.raw = BUNDLED_PROMPT, True
    if args.prompt is None:
        args.prompt = "Write a short poem about the sea."
    if args.no_draft and (args.compare or args.drafter):
        p.error("--no-draft cannot be combined with --compare or --drafter")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return args


def default_drafter(target: str) -> str:
    return target.rstrip("/\\") + "-assistant"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_models(args):
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    start = time.perf_counter()
    log(f"loading target {args.target} ({dtype}, {args.device}) ...")
    target = load_target(args.target, dtype=dtype, device=args.device)
    log(f"  {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters in {time.perf_counter() - start:.1f} s")
    drafter = None
    if not args.no_draft:
        name = args.drafter or default_drafter(args.target)
        start = time.perf_counter()
        log(f"loading drafter {name} ...")
        try:
            drafter = load_drafter(name, target=target, dtype=dtype, device=args.device)
        except CheckpointError as e:
            if args.drafter:
                raise
            raise UserError(f"{e}\n(no drafter given: pass --drafter PATH, or --no-draft for target-only decoding)")
        log(f"  {sum(p.numel() for p in drafter.parameters()) / 1e6:.1f}M parameters in {time.perf_counter() - start:.1f} s")
    return target, drafter


def prompt_ids(args, target, tokenizer) -> list[int]:
    if args.prompt_ids:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if tokenizer is None:
        raise UserError(f"{target.checkpoint_dir} has no tokenizer (tokenizer.json or tokenizer.model); "
                        "pass --prompt-ids instead of --prompt")
    if args.raw:
        return tokenizer.encode(args.prompt, add_bos=True)
    template = load_chat_template(target.checkpoint_dir)
    specials = {name: tokenizer.decode([i]) for name, i in
                (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)) if i is not None}
    text = render_chat(template, [{"role": "user", "content": args.prompt}], add_generation_prompt=True, **specials)
    return tokenizer.encode(text)


def sampling_options(args, target) -> dict:
    """CLI flags, else the target's generation_config.json (released -it models: sample, T 1.0, top-k 64, top-p 0.95)."""
    gen = target.generation_config
    sample = gen.get("do_sample", False)
    temperature = args.temperature if args.temperature is not None else (gen.get("temperature", 1.0) if sample else 0.0)
    return dict(
        temperature=temperature,
        top_k=args.top_k if args.top_k is not None else (gen.get("top_k") if sample else None),
        top_p=args.top_p if args.top_p is not None else (gen.get("top_p") if sample else None),
        seed=args.seed if args.seed is not None else gen.get("seed"),
    )


class Printer:
    """Streams accepted text to stdout (unless quiet: --json); with --show-drafts, prints each round's drafts
    instead: accepted green (+tok+ without colours), rejected red (-tok-), the target's bonus token bold (*tok*)."""

    GREEN, RED, BOLD, RESET = "\033[32m", "\033[31;9m", "\033[1;36m", "\033[0m"

    def __init__(self, tokenizer, show_drafts: bool, quiet: bool):
        self.tokenizer, self.show_drafts, self.quiet = tokenizer, show_drafts, quiet
        self.stream = tokenizer.stream() if tokenizer is not None else None
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.tokens: list[int] = []
        self.rounds: list[tuple[int, int]] = []  # [drafted, accepted] of every drafting round so far

    def piece(self, token: int) -> str:
        return repr(self.tokenizer.decode([token]))[1:-1] if self.tokenizer is not None else f"<{token}>"

    def mark(self, text: str, style: str, plain: str) -> str:
        return f"{style}{text}{self.RESET}" if self.color else f"{plain}{text}{plain}"

    def __call__(self, info) -> None:
        self.tokens += info.emitted
        if info.drafted:
            self.rounds.append((len(info.drafted), info.accepted))
        if self.show_drafts:
            shown = [self.mark(self.piece(t), self.GREEN, "+") for t in info.drafted[: info.accepted]]
            shown += [self.mark(self.piece(t), self.RED, "-") for t in info.drafted[info.accepted :]]
            if info.bonus is not None:
                shown.append(self.mark(self.piece(info.bonus), self.BOLD, "*"))
            print(f"[{info.accepted}/{len(info.drafted)}] " + " ".join(shown), flush=True)
        elif self.quiet:
            return
        elif self.stream is not None:
            print("".join(self.stream.push(t) for t in info.emitted), end="", flush=True)
        else:
            print(" ".join(map(str, info.emitted)), end=" ", flush=True)

    def finish(self) -> None:
        if not self.quiet and not self.show_drafts:
            print(self.stream.flush() if self.stream is not None else "", flush=True)


class Interrupted(Exception):
    """Ctrl-C during generation, carrying what the printer saw so far."""

    def __init__(self, printer: "Printer"):
        self.printer = printer


def run_once(target, drafter, ids, args, options, tokenizer, quiet):
    printer = Printer(tokenizer, args.show_drafts and drafter is not None, quiet)
    try:
        result = generate(target, drafter, ids, max_new_tokens=args.max_new_tokens,
                          num_draft_tokens=args.num_draft_tokens, schedule=args.schedule, on_round=printer, **options)
    except KeyboardInterrupt:
        printer.finish()
        raise Interrupted(printer) from None
    printer.finish()
    return result


def report_interrupted(printer: "Printer", args) -> int:
    """What Ctrl-C leaves: the tokens so far (already streamed) and the statistics of the rounds that finished."""
    drafted = sum(d for d, _ in printer.rounds)
    accepted = sum(a for _, a in printer.rounds)
    rate = accepted / drafted if drafted else 0.0
    log(f"interrupted: {len(printer.tokens)} tokens, {len(printer.rounds)} rounds, acceptance {100 * rate:.1f}%")
    if args.json:
        text = printer.tokenizer.decode(printer.tokens, skip_special_tokens=True) if printer.tokenizer else None
        print(json.dumps({"tokens": printer.tokens, "text": text, "interrupted": True,
                          "stats": {"rounds": [list(r) for r in printer.rounds], "acceptance_rate": rate}}))
    return 130


def summary(label: str, stats) -> str:
    return (f"{label}: {stats.decode_tokens + 1} tokens, {len(stats.rounds)} rounds, "
            f"acceptance {100 * stats.acceptance_rate:.1f}%, {stats.mean_tokens_per_pass:.2f} tokens/target pass, "
            f"{stats.tokens_per_second:.1f} tokens/s (prefill {stats.prefill_tokens_per_second:.0f} tokens/s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Interrupted as e:
        return report_interrupted(e.printer, args)


def run(args) -> int:
    target, drafter = load_models(args)
    tokenizer = load_tokenizer(target.checkpoint_dir) if has_tokenizer(target.checkpoint_dir) else None
    ids = prompt_ids(args, target, tokenizer)
    options = sampling_options(args, target)
    report: dict = {}
    if args.compare:
        log("target only:")
        baseline = run_once(target, None, ids, args, options, tokenizer, quiet=args.json)
        log(summary("target only", baseline.stats))
        log("speculative:")
    result = run_once(target, drafter, ids, args, options, tokenizer, quiet=args.json)
    log(summary("speculative" if drafter is not None else "target only", result.stats))
    if args.compare:
        speedup = result.stats.tokens_per_second / max(baseline.stats.tokens_per_second, 1e-9)
        equal = baseline.tokens == result.tokens
        log(f"speed-up {speedup:.2f}x; outputs {'identical' if equal else 'DIFFER'}")
        if options["temperature"] == 0 and not equal:
            log("warning: greedy outputs differ (a near-tie flipped by rounding, or a bug)")
        report.update(speedup=speedup, outputs_equal=equal, baseline={"tokens": baseline.tokens,
                                                                         "stats": baseline.stats.to_dict()})
    if args.json:
        text = tokenizer.decode(result.tokens, skip_special_tokens=True) if tokenizer is not None else None
        print(json.dumps({"tokens": result.tokens, "text": text, "stats": result.stats.to_dict(), **report}))
    return 0


def has_tokenizer(folder: Path) -> bool:
    return (Path(folder) / "tokenizer.json").exists() or (Path(folder) / "tokenizer.model").exists()


def cli(argv=None) -> int:
    """main() with user errors turned into one line on stderr and exit status 2 (130 on Ctrl-C)."""
    try:
        return main(argv)
    except (UserError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
