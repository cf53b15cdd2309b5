"""The terminal conversation of `scripts/generate.py --chat`, over `speculative.Session` (the KV cache is kept from
one turn to the next; only the tokens the cache does not hold are processed).

Input: at a terminal, a `>>> ` prompt per message (Ctrl-D exits, Ctrl-C at the prompt says how to leave); otherwise
one user message per line of stdin (blank lines skipped), until EOF. Commands, alone on a line: `/reset` (a new
conversation, the system message kept), `/stats` (the last turn's figures), `/exit`; `/image PATH` attaches an image
to the next message (the vision encoder is loaded the first time; the image stays in the conversation, and later
turns read its positions from the cache).

Output: the answer streams as its tokens are accepted and ends at the end-of-turn token (the target's stop tokens,
never printed); with --show-drafts, one line per round instead (generate.py's Printer). A thinking model's thought
channel (`<|channel>thought ...<channel|>`) is shown dimmed (default; `[thinking] ... [/thinking]` where there are no
colours), hidden, or as generated (`--thinking dim|hide|show`). A one-line summary per turn goes to stderr. With
--json nothing streams: one JSON line per turn (user, text, thinking, tokens, stats with prompt_tokens_reused and
prompt_tokens_processed, how the cache was used).

A turn that fails (a message too long for the context, NaN logits: TURN_ERRORS) prints an error line on stderr
and, with --json, `{"user": ..., "error": {"type": ..., "message": ...}}` in its answer's place; the conversation
goes on without that message, and the exit status is then 1.

Ctrl-C while an answer is generated stops it at the next round (a second Ctrl-C stops at once): the turn keeps what
was emitted and the next message continues the conversation.
"""

from __future__ import annotations

import json
import os
import sys

from gemma4 import CacheError
from speculative import NumericalError, Session
from speculative.session import THOUGHT_CLOSE, THOUGHT_OPEN, split_thinking

from cli_common import StopOnInterrupt

COMMANDS = ("/reset", "/stats", "/exit", "/image PATH")
# What fails one turn and not the conversation (Session.send leaves the session as it was): a message that does not
# fit the context, a template that cannot render it, NaN logits. An error line takes the answer's place.
TURN_ERRORS = (ValueError, CacheError, NumericalError)
THINKING = ("dim", "hide", "show")
PROMPT = ">>> "


def run_chat(args, target, drafter, tokenizer, template, options: dict, *, drafts_printer=None, stdin=None,
             stdout=None, stderr=None, load_vision=None) -> int:
    """The conversation loop. `args` carries generate.py's options (system, max_new_tokens, num_draft_tokens,
    schedule, thinking, enable_thinking, json); `options` the sampling ones; `drafts_printer()` makes the per-round
    printer of --show-drafts; `load_vision()` the target's vision model (None: the target takes text only). Returns
    the exit status at EOF or /exit: 0, or 1 when a turn failed (TURN_ERRORS)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    thinking = {"enable_thinking": True} if args.enable_thinking else None
    session = Session(target, drafter, tokenizer=tokenizer, template=template, system=args.system,
                      max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
                      schedule=args.schedule, template_kwargs=thinking,
                      compile=getattr(args, "compile", False), **options)
    color = stdout.isatty() and "NO_COLOR" not in os.environ
    failed, images = 0, []

    def note(message: str) -> None:
        print(message, file=stderr, flush=True)

    for line in messages(stdin, stdout, note):
        command = line.strip()
        if command.startswith("/image"):
            path = command[len("/image"):].strip()
            error = attach_image(session, path, load_vision)
            if error:
                failed += 1
                note(f"error: {error}")
            else:
                images.append(path)
                note(f"(image {path} goes with the next message)")
            continue
        if command.startswith("/") and " " not in command:
            if command == "/exit":
                break
            if command == "/reset":
                session.reset()
                note("(new conversation)")
            elif command == "/stats":
                note(stats_text(session.last) if session.last else "(no answer yet)")
            else:
                note(f"unknown command {command}: {', '.join(COMMANDS)}")
            continue
        printer = AnswerPrinter(tokenizer, session.stops, args.thinking, color, stdout, quiet=args.json,
                                drafts=drafts_printer() if drafts_printer is not None else None)
        try:
            with StopOnInterrupt() as stop:
                sent, images = images, []
                turn = session.send(line, on_round=lambda info: (printer(info), stop.check()), images=sent)
        except TURN_ERRORS as e:  # the session is left as it was before the message: the conversation goes on
            failed += 1
            message = " ".join(str(e).split())
            note(f"error: {message}")
            if args.json:
                print(json.dumps({"user": line, "error": {"type": type(e).__name__, "message": message}}),
                      file=stdout, flush=True)
            continue
        finally:
            printer.finish()
        if args.json:
            thinking, text = split_thinking(tokenizer.decode(turn.tokens[:-1] if turn.stopped else turn.tokens,
                                                             skip_special_tokens=False))
            print(json.dumps({"turn": len(session.turns), "user": line, "text": strip_specials(text),
                              "thinking": thinking, "tokens": turn.tokens, "interrupted": turn.interrupted,
                              "stats": turn.to_dict()}), file=stdout, flush=True)
        note(summary(turn))
    return 1 if failed else 0


def attach_image(session, path: str, load_vision) -> str | None:
    """Check an image file for `/image PATH` and load the vision model the first time; an error message or None."""
    from weights.images import open_image

    if not path:
        return "/image needs a file: /image PATH"
    if load_vision is None:
        return "this target takes text only (its config.json has no vision_config)"
    try:
        open_image(path)
        if session.vision is None:
            session.vision = load_vision()
    except (ValueError, OSError) as e:
        return " ".join(str(e).split())
    return None


def messages(stdin, stdout, note):
    """The user's messages: prompted lines at a terminal (Ctrl-D ends, Ctrl-C at the prompt is not an exit), else
    the lines of stdin, blank ones skipped."""
    if not stdin.isatty():
        for line in stdin:
            if line.strip():
                yield line.rstrip("\n")
        return
    while True:
        try:
            print(PROMPT, end="", file=stdout, flush=True)
            line = stdin.readline()
        except KeyboardInterrupt:
            note("\n(/exit or Ctrl-D to quit)")
            continue
        if not line:  # Ctrl-D
            print(file=stdout)
            return
        if line.strip():
            yield line.rstrip("\n")


class ThoughtFilter:
    """Streamed answer text -> what to print, for one of THINKING's modes: the thought channel between
    `<|channel>` and `<channel|>` dimmed (or bracketed without colours), removed, or left as generated. Text that
    may be the start of a marker is held back until the next chunk says."""

    DIM, RESET = "\033[2m", "\033[0m"

    def __init__(self, mode: str, color: bool):
        if mode not in THINKING:
            raise ValueError(f"thinking display must be one of {list(THINKING)}, got {mode!r}")
        self.mode, self.color, self.inside, self.pending = mode, color, False, ""

    def feed(self, text: str) -> str:
        self.pending += text
        out = []
        while self.pending:
            marker = THOUGHT_CLOSE if self.inside else THOUGHT_OPEN
            i = self.pending.find(marker)
            if i < 0:
                keep = next((n for n in range(min(len(marker) - 1, len(self.pending)), 0, -1)
                             if marker.startswith(self.pending[-n:])), 0)
                out.append(self._text(self.pending[:len(self.pending) - keep]))
                self.pending = self.pending[len(self.pending) - keep:]
                break
            out.append(self._text(self.pending[:i]))
            self.pending = self.pending[i + len(marker):]
            out.append(self._marker(marker))
            self.inside = not self.inside
        return "".join(out)

    def flush(self) -> str:
        out, self.pending = self._text(self.pending), ""
        if self.inside and self.mode == "dim":
            out += self._marker(THOUGHT_CLOSE)
        return out

    def _text(self, text: str) -> str:
        if not self.inside or self.mode == "show" or not text:
            return text
        if self.mode == "hide":
            return ""
        return f"{self.DIM}{text}{self.RESET}" if self.color else text

    def _marker(self, marker: str) -> str:
        if self.mode == "show":
            return marker
        if self.mode == "dim" and not self.color:
            return "[thinking] " if marker == THOUGHT_OPEN else " [/thinking]\n"
        return ""


class AnswerPrinter:
    """on_round for one answer: streams its text (stop tokens left out, the thought channel through
    ThoughtFilter), or hands every round to the --show-drafts printer; prints nothing when quiet (--json)."""

    def __init__(self, tokenizer, stops, thinking: str, color: bool, stdout, *, quiet: bool, drafts=None):
        self.stream, self.stops, self.stdout, self.quiet, self.drafts = tokenizer.stream(), stops, stdout, quiet, drafts
        self.filter, self.started = ThoughtFilter(thinking, color), False

    def __call__(self, info) -> None:
        self.started = True
        if self.quiet:
            return
        if self.drafts is not None:
            self.drafts(info)
            return
        text = "".join(self.stream.push(t) for t in info.emitted if t not in self.stops)
        print(self.filter.feed(text), end="", file=self.stdout, flush=True)

    def finish(self) -> None:
        if self.started and not self.quiet and self.drafts is None:
            print(self.filter.feed(self.stream.flush()) + self.filter.flush(), file=self.stdout, flush=True)


def strip_specials(text: str) -> str:
    """An answer's text without the turn and channel markers a template would strip (for --json's "text")."""
    for marker in ("<|turn>", "<turn|>", THOUGHT_OPEN, THOUGHT_CLOSE):
        text = text.replace(marker, "")
    return text


def summary(turn) -> str:
    s = turn.stats
    speed = f", {s.tokens_per_second:.1f} tokens/s" if s.decode_seconds > 0 and s.decode_tokens else ""
    extra = (", interrupted" if turn.interrupted else "") + (f"; {turn.cache_note}" if turn.cache_note else "")
    return (f"[{len(turn.tokens)} tokens; prompt: {s.prompt_tokens_reused} reused, {s.prompt_tokens_processed} "
            f"processed (cache {turn.cache}); acceptance {100 * s.acceptance_rate:.0f}%{speed}{extra}]")


def stats_text(turn) -> str:
    """/stats: the last turn's figures, one per line."""
    s = turn.stats
    lines = [f"answer tokens: {len(turn.tokens)}{' (interrupted)' if turn.interrupted else ''}",
             f"prompt tokens: {s.prompt_tokens} ({s.prompt_tokens_reused} reused from the cache, "
             f"{s.prompt_tokens_processed} processed; cache {turn.cache})",
             f"rounds: {len(s.rounds)}, acceptance {100 * s.acceptance_rate:.1f}%, "
             f"{s.mean_tokens_per_pass:.2f} tokens per target pass, {s.target_forward_passes} target passes",
             f"prefill: {s.prefill_seconds:.2f} s ({s.prefill_tokens_per_second:.0f} tokens/s); decode: "
             f"{s.decode_seconds:.2f} s ({s.tokens_per_second:.1f} tokens/s)"]
    if turn.messages_dropped:
        lines.append(f"messages dropped to fit the context: {turn.messages_dropped}")
    if turn.cache_note:
        lines.append(f"note: {turn.cache_note}")
    return "\n".join(lines)
