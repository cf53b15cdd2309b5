"""What the command lines of scripts/generate.py and scripts/walkthrough.py share, so that they check and fail alike:

- a user's mistake is one line on stderr, `error: ...`, and exit status 2, never a traceback (`UserError`, and
  `Parser` for argparse's own errors);
- generation options go through the library's own checks (`speculative.options.check_options`), with the message
  naming the command-line option (`check_generation_options`);
- a reader that closes stdout early (`... | head`) ends the run quietly (`closed_stdout`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from speculative.options import check_options

# generate()'s keyword -> the option of generate.py that sets it
GENERATION_OPTIONS = {"max_new_tokens": "--max-new-tokens", "num_draft_tokens": "--num-draft-tokens",
                      "schedule": "--schedule", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                      "seed": "--seed"}
# The exit status a shell reports for a program that SIGPIPE ended (128 + 13), as `yes | head` leaves `yes`.
SIGPIPE_STATUS = 141


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, no traceback."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every other user error gets (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_generation_options(values: dict, options: dict = GENERATION_OPTIONS, *, prompt_len: int = 1,
                             given=None, source: str | None = None) -> None:
    """speculative.options.check_options on `values` (generate()'s keywords; missing ones are None), the message
    naming the command-line option (`options`: keyword -> option), or, for a value the user did not give (not in
    `given`), `source`, the file its default came from. The position limit is checked later, against the model."""
    try:
        check_options(prompt_len=prompt_len, max_positions=float("inf"),
                      **{name: values.get(name) for name in GENERATION_OPTIONS})
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        if name not in options:
            raise
        where = options[name] if source is None or given is None or name in given else f"{name} from {source}"
        raise UserError(f"{where} {rest.replace(' or None', '')}") from None


def closed_stdout() -> int:
    """After a BrokenPipeError on stdout (the reader has gone: `| head`): point stdout at the null device, so that
    the interpreter's last flush does not fail again with "Exception ignored ... Broken pipe", and return the
    status to exit with (SIGPIPE_STATUS). Nothing is printed: the reader chose to stop reading."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture): nothing to redirect
        pass
    return SIGPIPE_STATUS


class StopOnInterrupt:
    """Ctrl-C during a generation: the first press asks the loop to stop at its next round (`check` raises
    KeyboardInterrupt from on_round, a point where the cache's state is known), a second press stops at once.
    The handler only sets a flag: a KeyboardInterrupt raised by Python's default handler can land inside a
    finalizer run by the garbage collector, which prints it as ignored and carries on, and the generation with it.
    Outside the main thread signals cannot be caught: Ctrl-C then stops at once, as Python's default."""

    def __enter__(self):
        self.pressed, self._previous = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
