#!/usr/bin/env python
"""Generate text with a Gemma 4 target, drafting with its MTP assistant (speculative decoding).

    python scripts/generate.py                          # the bundled tiny pair (tiny_gemma4/), offline
    python scripts/generate.py --target google/gemma-4-E2B-it --prompt "Why is the sky blue?"
    python scripts/generate.py --target ./my-gemma --prompt "..." --compare        # speed-up vs target only
    python scripts/generate.py --target ./my-gemma --prompt "..." --show-drafts    # watch drafts being verified
    python scripts/generate.py --target ./my-gemma --prompts-file questions.jsonl --batch-size 4 > answers.jsonl
    python scripts/generate.py --target ./my-gemma --chat --system "Be brief."     # a conversation (scripts/chat.py)
    python scripts/generate.py --target ./my-gemma --image cat.png --prompt "Describe this." --compare

The answer streams to stdout as it is accepted; a summary (tokens, rounds, acceptance, tokens per target pass,
tokens/s; FIGURES defines them, as `--help` and the README do) goes to stderr. `--json` prints one JSON object as the last line of stdout instead. `--prompts-file`
runs many prompts, `--batch-size` at a time (speculative.generate_batch), and prints one JSON line per prompt, in
the file's order; the summary gives tokens/s for the whole run. User errors (a
missing folder, an offline hub, a drafter that does not fit, a bad option) print one line and exit with status 2;
every option is checked, and the folders looked at, before a model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_common, chat

import torch  # noqa: E402

from drafter import IncompatibleDrafterError  # noqa: E402
from gemma4 import CacheError, ConfigError, kernels  # noqa: E402
from speculative import SCHEDULES, NumericalError, generate, generate_batch  # noqa: E402
from weights import (  # noqa: E402
    ChatTemplateError, CheckpointError, load_chat_template, load_drafter, load_target, load_tokenizer, render_chat,
)
from weights.images import image_parts, image_prompt, open_image  # noqa: E402
from weights.loader import load_vision, parse_device, parse_dtype  # noqa: E402

from cli_common import (  # noqa: E402
    GENERATION_OPTIONS, Parser, StopOnInterrupt, UserError, check_generation_options, closed_stdout,
    one_line,
)

BUNDLED_TARGET = Path(__file__).resolve().parents[1] / "tiny_gemma4" / "target"
BUNDLED_DRAFTER = BUNDLED_TARGET.parent / "drafter"
BUNDLED_PROMPT = ('class Stack:\n    """A last-in, first-out container."""\n\n    def __init__(self):\n'
                  "        self._items = []\n\n    def push(self, item):\n")
USER_ERRORS = (CheckpointError, ConfigError, IncompatibleDrafterError, ChatTemplateError, CacheError, ValueError,
               OSError)
CUDA_HELP = ("install a CUDA build of torch (for example pip install torch --index-url "
             "https://download.pytorch.org/whl/cu128; pytorch.org/get-started/locally lists the builds), or use "
             "--device cpu")
DRAFTER_TYPE = "gemma4_assistant"


SHOW_DRAFTS_HELP = (
    "instead of the answer, print one line per round: [accepted/drafted], then the drafted tokens, accepted ones in "
    "green, rejected ones in red and struck through, and the target's own next token (the bonus) in bold cyan; when "
    "stdout is not a terminal or NO_COLOR is set, plain markers: +accepted+ -rejected- *bonus*; with the auto "
    "schedule, the draft length k it chose and the tokens per second it expected of that choice"
)
PROMPTS_FILE_HELP = (
    "many prompts: one per line (plain text, blank lines skipped), or JSONL (.jsonl, or every line a JSON object) "
    "with a \"prompt\" string, a \"messages\" list (chat turns) or \"prompt_ids\"; prints one JSON line per prompt"
)
CHAT_HELP = (
    "a conversation: one user message per line of stdin (a >>> prompt at a terminal), answered with the KV cache kept "
    "across turns; /reset, /stats, /exit; Ctrl-C stops an answer, Ctrl-D exits"
)
COMPILE_HELP = (
    "run the decode, verify and draft steps through torch.compile: the same tokens, faster per step, after a "
    "warm-up that compiles them (about a minute for a small model on 2 cores the first time; the compiled steps are "
    "stored on disk, so later runs start in seconds); prefill stays eager"
)
IMAGE_HELP = (
    "an image shown before the prompt (repeatable: in order); the target must be a multimodal checkpoint (its "
    "vision encoder is then loaded too). In --prompts-file: an \"images\" list, or {\"type\": \"image\", "
    "\"path\": ...} parts in \"messages\"; in --chat: /image PATH"
)
AUDIO_REFUSAL = ("audio input is not supported: this implementation has Gemma 4's text and image parts only "
                 "(E2B/E4B's audio encoder is not implemented)")
THREADS_HELP = (
    "CPU threads for torch (default: one per core that no other process is keeping busy when the run starts; "
    "threads beyond the free cores wait on each other and run several times slower)"
)


# What the summary's figures mean (the same words in README.md, "What the figures mean"; --json's stats names them
# acceptance_rate, mean_tokens_per_pass, tokens_per_second and prefill_tokens_per_second).
FIGURES = {
    "rounds": "the rounds that drafted: each drafts k tokens, verifies them in one target pass and keeps the "
              "accepted ones plus one token of the target's own",
    "acceptance": "accepted drafts / drafted tokens, over all rounds (a round accepts its drafts up to the first one "
                  "the target rejects)",
    "tokens/target pass": "new tokens per target forward pass after the prefill: 1.00 without drafting; a round "
                          "whose k drafts are all accepted gives k + 1",
    "tokens/s": "new tokens after the first (which the prefill chose) per second from the end of the prefill to "
                "the last token; prefill tokens/s is prompt tokens per second of prefill",
    "speed-up": "(--compare) the speculative run's tokens/s over the target-only run's, in the same process",
}


def figures_help() -> str:
    return "figures in the summary (stderr):\n" + "\n".join(
        textwrap.fill(f"{name}: {text}", width=100, initial_indent="  ", subsequent_indent="      ")
        for name, text in FIGURES.items())


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=figures_help())
    p.add_argument("--target", help="checkpoint folder or hub repo id of the Gemma 4 target (default: the bundled "
                   "tiny pair in tiny_gemma4/, trained on Python source: runs offline)")
    p.add_argument("--drafter", help="drafter folder or hub id (default for a hub id: the id + '-assistant'; for a "
                   "folder: a sibling folder named like it + '-assistant', or a 'drafter' folder beside it)")
    p.add_argument("--no-draft", action="store_true", help="target-only decoding (the baseline)")
    p.add_argument("--compare", action="store_true", help="run target-only and speculative, compare outputs and "
                   "speed (under sampling the two texts differ: they draw different random numbers)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the user message (default: a short request; for the bundled pair, the "
                        "start of a Python function, as plain text)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids (for checkpoints without a tokenizer)")
    prompt.add_argument("--prompts-file", metavar="FILE", help=PROMPTS_FILE_HELP)
    p.add_argument("--batch-size", type=int, default=4, help="with --prompts-file: prompts generated together "
                   "(default 4; 1 runs them one by one)")
    p.add_argument("--raw", action="store_true", help="use the prompt as plain text, without the chat template")
    p.add_argument("--image", action="append", metavar="PATH", help=IMAGE_HELP)
    p.add_argument("--audio", metavar="PATH", help="not supported: " + AUDIO_REFUSAL.split(": ", 1)[1])
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    p.add_argument("--num-draft-tokens", type=int, help="N, tokens drafted per round (auto: the most; default: "
                   "the drafter's generation_config num_assistant_tokens)")
    p.add_argument("--schedule", choices=SCHEDULES, default="auto",
                   help="auto (default): each round the draft length in 0..N with the most expected tokens per "
                   "second, from this run's measured step costs and the acceptance so far (with --seed, sampling repeats in "
                   "law, not draw for draw: the choices depend on timing); constant: N every round; heuristic: +2 "
                   "after a fully accepted round, -1 otherwise"),
    p.add_argument("--temperature", type=float, help="0 = greedy, else at least 1e-5 (default: from "
                   "generation_config.json)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default: from "
                   "generation_config.json)")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens whose probability reaches p "
                   "(default: from generation_config.json)")
    p.add_argument("--seed", type=int, help="random seed for sampling, 0 to 2**64 - 1 (default: from "
                   "generation_config.json, else random)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if torch sees a GPU, "
                   "else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--row-invariant-float32", action="store_true", help="float32 on the CPU: products through "
                   "the row-invariant kernel bfloat16 always takes (gemma4.kernels.set_row_invariant_float32), so "
                   "that greedy speculative output is bit for bit the target's (slower: about 2x per decode step "
                   "on the bundled pair); by default float32 takes faster kernels whose rows depend on the row "
                   "count, and a near-tie can flip a greedy token")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--show-drafts", action="store_true", help=SHOW_DRAFTS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout (with "
                   "--chat: one JSON line per turn)")
    p.add_argument("--chat", action="store_true", help=CHAT_HELP)
    p.add_argument("--system", help="with --chat: the system message")
    p.add_argument("--thinking", choices=("dim", "hide", "show"), default="dim", help="with --chat: how a thinking "
                   "model's thought channel is shown (default dim)")
    p.add_argument("--enable-thinking", action="store_true", help="with --chat: ask the chat template for thinking "
                   "(enable_thinking=True)")
    args = p.parse_args(argv)
    if args.audio is not None:
        p.error(f"--audio {args.audio}: {AUDIO_REFUSAL}")
    if args.image and (args.chat or args.prompts_file):
        p.error("--image goes with --prompt or --prompt-ids (--chat: /image PATH; --prompts-file: an \"images\" "
                "list per prompt)")
    if args.chat and (args.compare or args.prompts_file or args.prompt_ids or args.prompt or args.raw):
        p.error("--chat reads the messages from stdin and renders them with the chat template: it cannot be "
                "combined with --compare, --prompt, --prompt-ids, --prompts-file or --raw")
    if not args.chat and (args.system is not None or args.enable_thinking):
        p.error("--system and --enable-thinking need --chat (a single prompt's system message: --prompts-file with "
                "\"messages\")")
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
    if args.prompts_file is not None and (args.compare or args.show_drafts):
        p.error("--prompts-file cannot be combined with --compare or --show-drafts (one JSON line per prompt)")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def check_args(args) -> None:
    """Everything that can be checked without loading a model, so that a mistake costs no load (minutes for a real
    checkpoint): the options, the device and dtype, and what the given folders hold."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(args.device)
    try:
        parse_dtype(args.dtype or "float32")
    except ValueError as e:
        raise UserError(f"--dtype: {e}") from None
    args.ids = parse_prompt_ids(args.prompt_ids) if args.prompt_ids else None
    args.entries = read_prompts_file(args.prompts_file) if args.prompts_file else None
    check_images(args)
    given = {name: getattr(args, name) for name in GENERATION_OPTIONS}
    check_cli_options(args, dict(given, temperature=0.0 if args.temperature is None else args.temperature))
    check_folder(args.target, "--target")
    if args.drafter is not None:
        check_folder(args.drafter, "--drafter")
    elif not args.no_draft:
        args.drafter = default_drafter(args.target)


def check_cli_options(args, values: dict, source: str | None = None) -> None:
    """The library's own checks (scripts/cli_common.py), with the message naming the CLI option, or `source` (the
    file a default came from) when the value is not the user's."""
    check_generation_options(values, prompt_len=len(args.ids) if args.ids else 1, source=source,
                             given={name for name in GENERATION_OPTIONS if getattr(args, name) is not None})


def check_images(args) -> None:
    """Every image file of --image or the prompts file opened and decoded (a bad one is named in one line), and the
    target's config checked for a vision encoder, before any model is loaded."""
    wanted = list(args.image or [])
    for entry in args.entries or []:
        wanted += entry_images(entry)
    for path in wanted:
        try:
            open_image(path)
        except ValueError as e:
            raise UserError(f"--image {e}" if path in (args.image or []) else str(e)) from None
    args.needs_vision = bool(wanted)
    config = Path(args.target).expanduser() / "config.json"
    if wanted and config.is_file():
        try:
            raw = json.loads(config.read_text())
        except (OSError, ValueError):
            return  # the loader reports it
        if not isinstance(raw.get("vision_config") if isinstance(raw, dict) else None, dict):
            raise UserError(f"--target {shown(config.parent)} takes text only (its config.json has no "
                            "vision_config): images need a multimodal Gemma 4 checkpoint")


def entry_images(entry: dict) -> list:
    """The image files of one prompts-file entry: its "images" list, or the image parts of its messages."""
    try:
        return list(entry.get("images", [])) + image_parts(entry.get("messages", []))
    except ValueError as e:
        raise UserError(str(e)) from None


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device: {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if torch.version.cuda is None:
            raise UserError(f"--device {device}: this torch ({torch.__version__}) is a CPU-only build; {CUDA_HELP}")
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
                            "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    try:
        parse_device(parsed)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None


def check_folder(name: str, option: str) -> None:
    """A local folder given as --target or --drafter: the mistakes a folder can reveal before loading it."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return  # a hub id, or missing: the loader names it
    config = folder / "config.json"
    if not config.exists():
        inside = [d.name for d in sorted(folder.iterdir()) if (d / "config.json").is_file()]
        if {"target", "drafter"} <= set(inside):
            raise UserError(f"{option} {shown(folder)} is a target/drafter pair's folder: pass --target "
                            f"{shown(folder / 'target')} (its drafter, {shown(folder / 'drafter')}, is found by "
                            "itself)")
        if inside:
            raise UserError(f"{option} {shown(folder)} has no config.json; its subfolders "
                            f"{', '.join(inside)} have one: pass one of them")
        return  # the loader says what is missing
    model_type = model_type_of(config)
    if option == "--target" and model_type == DRAFTER_TYPE:
        raise UserError(f"--target {shown(folder)} is a drafter (config.json model_type {DRAFTER_TYPE!r}): pass it "
                        "as --drafter, and its target model as --target")
    if option == "--drafter" and model_type in ("gemma4", "gemma4_text"):
        raise UserError(f"--drafter {shown(folder)} is a target model (config.json model_type {model_type!r}), not "
                        f"a drafter: pass it as --target; a drafter's model_type is {DRAFTER_TYPE!r}")


def model_type_of(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: the loader reports it


def default_drafter(target: str) -> str:
    """The drafter when none is given: for a hub id, the id + '-assistant' (how the released drafters are named);
    for a local folder, a local folder only (a local path is never turned into a hub request): `<folder>-assistant`
    beside it, a `drafter` folder beside it (the bundled layout), or in the hub cache the snapshot of the
    '-assistant' repository next to the target's."""
    folder = Path(target).expanduser()
    if not folder.exists():
        return target.rstrip("/\\") + "-assistant"
    folder = Path(os.path.normpath(folder))  # "x/" and "x/." name x
    looked = [folder.with_name(folder.name + "-assistant"), folder.with_name("drafter")]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        repo = folder.parent.parent.with_name(folder.parent.parent.name + "-assistant")  # models--org--name-assistant
        ref = repo / "refs" / "main"
        looked.append(repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else folder.name))
    for candidate in looked:
        if (candidate / "config.json").is_file() and model_type_of(candidate / "config.json") == DRAFTER_TYPE:
            return str(candidate)
    raise UserError(f"no drafter found for the local target {shown(folder)} (looked for "
                    f"{' and '.join(shown(c) for c in looked)}): pass --drafter PATH_OR_HUB_ID (e.g. "
                    "google/gemma-4-E2B-it-assistant), or --no-draft for target-only decoding")


def shown(path) -> str:
    """A path as the user should read it: relative to the working directory when inside it, else as it is."""
    path = Path(path)
    if path.is_absolute():
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)
    return str(path)


def read_prompts_file(name: str) -> list[dict]:
    """The prompts of --prompts-file, each as {"prompt": str} / {"messages": list} / {"prompt_ids": list[int]},
    checked line by line before any model is loaded (errors name FILE:LINE)."""
    path = Path(name).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompts-file {name}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts-file {name}: cannot be read ({one_line(e)})") from None
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise UserError(f"--prompts-file {name} holds no prompt")
    if path.suffix != ".jsonl" and not all(line.lstrip().startswith("{") for _, line in numbered):
        return [{"prompt": line} for _, line in numbered]
    entries = []
    for i, line in numbered:
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise UserError(f"{name}:{i}: not a JSON object ({e})") from None
        entries.append(check_entry(entry, f"{name}:{i}"))
    return entries


def check_entry(entry, where: str) -> dict:
    """One JSONL line: exactly one of "prompt" (a string), "messages" (chat turns) or "prompt_ids" (token ids)."""
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a JSON object with a \"prompt\" or \"messages\" field")
    images = entry.get("images")
    if images is not None and not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise UserError(f"{where}: \"images\" must be a list of image files")
    given = [key for key in ("prompt", "messages", "prompt_ids") if key in entry]
    if len(given) != 1:
        raise UserError(f"{where}: expected exactly one of \"prompt\", \"messages\" or \"prompt_ids\", found "
                        f"{given or sorted(entry)}")
    value = entry[given[0]]
    if given[0] == "prompt" and not (isinstance(value, str) and value):
        raise UserError(f"{where}: \"prompt\" must be a non-empty string")
    if given[0] == "messages" and not (isinstance(value, list) and value
                                        and all(isinstance(m, dict) and "role" in m for m in value)):
        raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., \"content\": ...}}")
    if given[0] == "prompt_ids" and not (isinstance(value, list) and value
                                          and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        raise UserError(f"{where}: \"prompt_ids\" must be a non-empty list of integer token ids")
    return {given[0]: value, **({"images": images} if images else {})}


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UserError("--prompt-ids holds no token id")
    return ids


# THREADS_NOTE. torch's own default is a thread per core, and its OpenMP threads wait for each other at the end of
# every parallel region: when another process keeps one of those cores busy, every region waits for the thread that
# lost its core, and decoding collapses. scripts/bench_threads.py measured it on the bundled pair on 2 shared cores
# (two runs of 3 repeats): 2 threads decoded 0.7-20 tokens/s target-only with a busy loop beside them where 1 thread
# decoded 15-70; OMP_WAIT_POLICY=PASSIVE made 2 threads hold up better under load, but they were slower than 1
# thread in the runs without the busy loop (median 18.6 vs 30.7, 36.7 vs 39.4), so the wait policy is left alone. The default counts the free cores when the run starts (a process
# that starts later is not seen: --threads N fixes the count).
def default_threads() -> int:
    """One thread per core that no other process keeps busy (at least one): see THREADS_NOTE."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = min(cores, torch.get_num_threads())
    return max(1, cores - busy_elsewhere())


def busy_elsewhere(samples: int = 10, interval: float = 0.005) -> int:
    """How many other processes are running right now (Linux: /proc/stat's procs_running counts the runnable
    threads of the whole machine, this one included). The minimum over a few samples 5 ms apart, so that a short
    burst does not count and a process that keeps a core busy does; 0 where /proc/stat cannot be read."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as f:
                counts += [int(line.split()[1]) for line in f if line.startswith("procs_running")]
        except (OSError, ValueError, IndexError):
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, min(counts) - 1) if counts else 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_models(args):
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    start = time.perf_counter()
    threads = f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}" \
        if args.device == "cpu" else ""
    log(f"loading target {shown(args.target)} ({dtype}, {args.device}{threads}) ...")
    target = load_target(args.target, dtype=dtype, device=args.device)
    log(f"  {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters in {time.perf_counter() - start:.1f} s")
    drafter = None
    if not args.no_draft:
        start = time.perf_counter()
        log(f"loading drafter {shown(args.drafter)} ...")
        try:
            drafter = load_drafter(args.drafter, target=target, dtype=dtype, device=args.device)
        except CheckpointError as e:
            if args.drafter_given:
                raise
            raise UserError(f"{e} (no --drafter given: pass --drafter PATH_OR_HUB_ID, or --no-draft for "
                            "target-only decoding)") from None
        log(f"  {sum(p.numel() for p in drafter.parameters()) / 1e6:.1f}M parameters in {time.perf_counter() - start:.1f} s")
    return target, drafter


def prompt_ids(args, target, tokenizer, entry: dict | None = None) -> list[int]:
    """The token ids of --prompt-ids, --prompt, or one --prompts-file entry: raw text (--raw) or chat turns
    rendered with the checkpoint's chat template."""
    entry = entry or dict({"prompt_ids": args.ids} if args.ids is not None else {"prompt": args.prompt},
                          images=args.image or [])
    images = entry.get("images", [])
    if images and target.config.image_token_id is None:
        raise UserError(f"{shown(target.checkpoint_dir)} takes text only (its config.json has no vision_config): "
                        "images need a multimodal Gemma 4 checkpoint")
    if "prompt_ids" in entry:  # images: the ids hold one image token per image where it goes
        return entry["prompt_ids"]
    if tokenizer is None:
        raise UserError(f"{shown(target.checkpoint_dir)} has no tokenizer (tokenizer.json or tokenizer.model); "
                        "pass token ids (--prompt-ids, or \"prompt_ids\" in a JSONL --prompts-file)")
    if "prompt" in entry and args.raw:  # images first, one image token each, after BOS
        ids = tokenizer.encode(entry["prompt"], add_bos=True)
        return ids[:1] + [target.config.image_token_id] * len(images) + ids[1:]
    content = [*({"type": "image", "path": str(i)} for i in images), {"type": "text", "text": entry.get("prompt")}]
    messages = entry.get("messages") or [{"role": "user", "content": content if images else entry["prompt"]}]
    template = load_chat_template(target.checkpoint_dir)
    specials = {name: tokenizer.decode([i]) for name, i in
                (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)) if i is not None}
    text = render_chat(template, messages, add_generation_prompt=True, **specials)
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
        self.draft_lengths: list[int] = []  # k of every report (the first is the prefill's, k = 0)

    def piece(self, token: int) -> str:
        return repr(self.tokenizer.decode([token]))[1:-1] if self.tokenizer is not None else f"<{token}>"

    def mark(self, text: str, style: str, plain: str) -> str:
        return f"{style}{text}{self.RESET}" if self.color else f"{plain}{text}{plain}"

    def __call__(self, info) -> None:
        self.tokens += info.emitted
        self.draft_lengths.append(len(info.drafted))
        if info.drafted:
            self.rounds.append((len(info.drafted), info.accepted))
        if self.show_drafts:
            shown = [self.mark(self.piece(t), self.GREEN, "+") for t in info.drafted[: info.accepted]]
            shown += [self.mark(self.piece(t), self.RED, "-") for t in info.drafted[info.accepted :]]
            if info.bonus is not None:
                shown.append(self.mark(self.piece(info.bonus), self.BOLD, "*"))
            why = ("" if info.expected_tokens_per_second is None else
                   f"   (k = {len(info.drafted)}: {info.expected_tokens_per_second:.1f} tokens/s expected)")
            print(f"[{info.accepted}/{len(info.drafted)}] " + " ".join(shown) + why, flush=True)
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


def run_once(target, drafter, ids, args, options, tokenizer, quiet, image_features=None):
    printer = Printer(tokenizer, args.show_drafts and drafter is not None, quiet)
    try:
        with StopOnInterrupt() as stop:
            result = generate(target, drafter, ids, max_new_tokens=args.max_new_tokens,
                              num_draft_tokens=args.num_draft_tokens, schedule=args.schedule,
                              on_round=lambda info: (stop.check(), printer(info)), compile=args.compile,
                              image_features=image_features, **options)
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
                          "stats": {"rounds": [list(r) for r in printer.rounds], "acceptance_rate": rate,
                                    "draft_lengths": printer.draft_lengths[1:]}}))
    return 130


def summary(label: str, stats) -> str:
    speed = f"{stats.tokens_per_second:.1f} tokens/s" if stats.decode_tokens else "no decode step to time"
    compiled = f", compiling {stats.compile_seconds:.1f} s before decoding" if stats.compile_seconds else ""
    return (f"{label}: {stats.decode_tokens + 1} tokens, {len(stats.rounds)} rounds, "
            f"acceptance {100 * stats.acceptance_rate:.1f}%, {stats.mean_tokens_per_pass:.2f} tokens/target pass, "
            f"{speed} (prefill {stats.prefill_tokens_per_second:.0f} tokens/s{compiled})")


def main(argv=None) -> int:
    """Parse, check everything that needs no model, then run with the chosen thread count (restored on return, for
    callers in the same process)."""
    args = parse_args(argv)
    args.drafter_given = args.drafter is not None
    check_args(args)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    invariant = kernels.row_invariant_float32()
    kernels.set_row_invariant_float32(invariant or args.row_invariant_float32)
    try:
        return run(args)
    except Interrupted as e:
        return report_interrupted(e.printer, args)
    finally:
        torch.set_num_threads(previous)
        kernels.set_row_invariant_float32(invariant)


def run(args) -> int:
    target, drafter = load_models(args)
    tokenizer = load_tokenizer(target.checkpoint_dir) if has_tokenizer(target.checkpoint_dir) else None
    options = sampling_options(args, target)
    check_cli_options(args, dict(options, max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
                                 schedule=args.schedule),
                      source=shown(Path(target.checkpoint_dir) / "generation_config.json"))
    if args.compile:
        from speculative.compiled import cache_dir

        log(f"--compile: the decode, verify and draft steps compile before the first answer starts (about a minute "
            f"for a small model on 2 cores the first time; stored in {cache_dir()}, so later runs start in seconds)")
    if args.entries is not None:
        return run_file(args, target, drafter, tokenizer, options)
    if args.chat:
        return run_chat_mode(args, target, drafter, tokenizer, options)
    images = list(args.image or [])
    ids, features = with_images(args, target, prompt_ids(args, target, tokenizer, None), images)
    report: dict = {"threads": torch.get_num_threads()}
    if args.compare:
        log("target only:")
        baseline = run_once(target, None, ids, args, options, tokenizer, quiet=args.json, image_features=features)
        log(summary("target only", baseline.stats))
        log("speculative:")
    result = run_once(target, drafter, ids, args, options, tokenizer, quiet=args.json, image_features=features)
    log(summary("speculative" if drafter is not None else "target only", result.stats))
    if args.compare:
        equal = baseline.tokens == result.tokens
        speedup = compare_speed(baseline.stats, result.stats)
        same = "identical" if equal else "DIFFER"
        if options["temperature"] > 0:
            same = (f"{'identical' if equal else 'different'} (expected under sampling: the two runs draw different "
                    "random numbers; speculative sampling keeps the target's distribution, not its text)")
        log(f"{f'speed-up {speedup:.2f}x' if speedup is not None else SPEEDUP_UNMEASURABLE}; outputs {same}")
        exact = kernels.row_invariant(target.embed_tokens.weight)
        if options["temperature"] == 0 and not exact:
            log(f"note: {not_exact_reason(target)}: outputs are compared up to rounding, not bit for bit (a "
                "near-tie can flip a token)")
        if options["temperature"] == 0 and not equal:
            log("warning: greedy outputs differ (a near-tie flipped by rounding, or a bug)")
        report.update(speedup=speedup, outputs_equal=equal, row_invariant=exact,
                      baseline={"tokens": baseline.tokens, "stats": baseline.stats.to_dict()})
    if args.json:
        text = tokenizer.decode(result.tokens, skip_special_tokens=True) if tokenizer is not None else None
        print(json.dumps({"tokens": result.tokens, "text": text, "stats": result.stats.to_dict(), **report}))
    return 0


def not_exact_reason(target) -> str:
    """Why this run's kernels do not make greedy speculative output bit for bit the target-only output."""
    if target.device.type == "cpu" and target.dtype == torch.float32:
        return ("float32 on the CPU runs its default products, whose rows depend on the row count "
                "(--row-invariant-float32 or --dtype bfloat16 compare bit for bit)")
    return (f"{str(target.dtype)[6:]} on {target.device.type}: the generic path's kernels (gemma4/generic.py) are "
            "not row-invariant")


def with_images(args, target, ids: list[int], images: list) -> tuple[list[int], torch.Tensor | None]:
    """The prompt ids with each image marker expanded, and the images' embeddings (None without images); the vision
    encoder is loaded the first time an image needs it."""
    if not images:
        return ids, None
    if getattr(args, "vision", None) is None:
        start = time.perf_counter()
        log(f"loading vision encoder of {shown(args.target)} ...")
        args.vision = load_vision(target.checkpoint_dir, dtype=target.dtype, device=target.device)
        log(f"  {sum(p.numel() for p in args.vision.parameters()) / 1e6:.1f}M parameters in "
            f"{time.perf_counter() - start:.1f} s")
    return image_prompt(args.vision, ids, images)


def run_file(args, target, drafter, tokenizer, options) -> int:
    """--prompts-file: the prompts in batches of --batch-size, one JSON line per prompt as each batch finishes."""
    batches, features = [], []
    for i, entry in enumerate(args.entries):
        try:
            ids, embeds = with_images(args, target, prompt_ids(args, target, tokenizer, entry), entry_images(entry))
        except (UserError, ValueError) as e:
            raise UserError(f"{args.prompts_file}, prompt {i + 1}: {e}") from None
        batches.append(ids)
        features.append(embeds)
    total, start = 0, time.perf_counter()
    for first in range(0, len(batches), args.batch_size):
        chunk = batches[first:first + args.batch_size]
        try:
            results = generate_batch(target, drafter, chunk, max_new_tokens=args.max_new_tokens,
                                     num_draft_tokens=args.num_draft_tokens, schedule=args.schedule,
                                     compile=args.compile, image_features=features[first:first + args.batch_size],
                                     **options)
        except ValueError as e:
            raise UserError(f"{args.prompts_file}, prompts {first + 1}-{first + len(chunk)}: {e}") from None
        for i, result in enumerate(results, start=first):
            text = tokenizer.decode(result.tokens, skip_special_tokens=True) if tokenizer is not None else None
            print(json.dumps({"index": i, **args.entries[i], "text": text, "tokens": result.tokens,
                              "stats": result.stats.to_dict()}), flush=True)
            total += len(result.tokens)
        log(f"prompts {first + 1}-{first + len(chunk)} of {len(batches)} done")
    seconds = time.perf_counter() - start
    log(f"{len(batches)} prompts, batch size {args.batch_size}: {total} new tokens in {seconds:.1f} s, "
        f"{total / seconds:.1f} tokens/s for the whole run (prefills included)")
    return 0


def run_chat_mode(args, target, drafter, tokenizer, options) -> int:
    """--chat: scripts/chat.py's conversation loop with this run's models and options."""
    if tokenizer is None:
        raise UserError(f"--chat needs a tokenizer: {shown(target.checkpoint_dir)} has no tokenizer.json or "
                        "tokenizer.model")
    from chat import run_chat

    show = args.show_drafts and drafter is not None
    vision = None if target.config.image_token_id is None else \
        (lambda: load_vision(target.checkpoint_dir, dtype=target.dtype, device=target.device))
    return run_chat(args, target, drafter, tokenizer, load_chat_template(target.checkpoint_dir), options,
                    drafts_printer=(lambda: Printer(tokenizer, True, False)) if show else None, load_vision=vision)


SPEEDUP_UNMEASURABLE = "speed-up not measurable (no decode step: the prefill chose the only new token)"


def compare_speed(baseline, speculative) -> float | None:
    """Decode tokens/s of the speculative run over the target-only run's; None when either decoded nothing (one
    new token, or a stop token first): the prefill's token is not a decode step, and its time is not in the rate."""
    if not baseline.decode_tokens or not speculative.decode_tokens:
        return None
    return speculative.tokens_per_second / max(baseline.tokens_per_second, 1e-9)


def has_tokenizer(folder: Path) -> bool:
    return (Path(folder) / "tokenizer.json").exists() or (Path(folder) / "tokenizer.model").exists()


def cli(argv=None) -> int:
    """main() with user errors turned into one line on stderr and exit status 2 (130 on Ctrl-C; 141, as for SIGPIPE,
    when stdout's reader has gone)."""
    try:
        return main(argv)
    except BrokenPipeError:  # stdout's reader has gone (| head): stop quietly
        return closed_stdout()
    except (UserError, *USER_ERRORS) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except NumericalError as e:
        print(f"error: {one_line(e)}; try --dtype bfloat16 or --dtype float32", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        print(f"error: out of memory ({one_line(e)}); try --dtype bfloat16, a smaller model, or fewer "
              "--max-new-tokens", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
