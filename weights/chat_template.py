"""Chat messages -> prompt text, by the checkpoint's own Jinja chat template.

A chat template comes from the internet with the checkpoint, so it is untrusted code: it runs in jinja2's
`ImmutableSandboxedEnvironment` (no dunder attributes, no mutating methods, bounded `range`), and any failure,
including a refused unsafe operation, becomes a `ChatTemplateError` naming the problem.

The environment mirrors the one transformers builds for `apply_chat_template` (utils/chat_template_utils.py), so the
same template renders the same text: trim_blocks + lstrip_blocks, the loopcontrols extension, `raise_exception`,
`strftime_now`, a `tojson` filter that does not HTML-escape, a `dict` without `dict.mro`, a `namespace` refusing
underscore names, and the special-token strings (`bos_token`, ...) as variables. Two deliberate differences: an
unsafe attribute access fails at once (jinja, and so transformers, renders a single `x.__class__` as ""), and
`{% generation %}` (transformers' assistant-mask tag) just renders its body.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .files import read_optional_json


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled or rendered, or that refused the messages (`raise_exception`)."""


def load_chat_template(folder: str | os.PathLike) -> str | None:
    """The template shipped in `folder`: chat_template.jinja, else the "chat_template" of chat_template.json or
    tokenizer_config.json (a string, or a list of {"name", "template"} of which "default" is used); None if none."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = read_optional_json(folder / name).get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
        if isinstance(template, str):
            return template
    return None


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "<bos>",
    **kwargs,
) -> str:
    """The prompt for `messages` ([{"role": ..., "content": ...}]); `kwargs` (eos_token, tools, ...) reach the
    template as variables. With no template, the plain Gemma 4 turn format (see `_gemma4_turns`)."""
    if template is None:
        return _gemma4_turns(messages, add_generation_prompt, bos_token)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers: None = absent
    variables = {"tools": None, "documents": None, **kwargs}
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, **variables
        )
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped: {e}") from None
    except Exception as e:  # anything else a template can trigger: undefined names, type errors, bad indexing
        raise ChatTemplateError(f"chat template failed while rendering: {type(e).__name__}: {e}") from None


def _gemma4_turns(messages: list[dict], add_generation_prompt: bool, bos_token: str) -> str:
    """`<bos><|turn>{role}\\n{content}<turn|>\\n` per message (assistant is called "model"), then `<|turn>model\\n`."""
    turns = []
    for m in messages:
        if not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"the default Gemma 4 format needs string content, got message {m!r}")
        role = "model" if m.get("role") == "assistant" else m.get("role")
        turns.append(f"<|turn>{role}\n{m['content']}<turn|>\n")
    return bos_token + "".join(turns) + ("<|turn>model\n" if add_generation_prompt else "")


def _raise_exception(message):
    raise ChatTemplateError(f"chat template raised an error: {message}")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` only: the real `dict` type would expose `dict.mro` and friends."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace`, refusing underscore attributes (plain jinja lets `{% set ns.__x = 1 %}` through)."""

    def __init__(*args, **kwargs):  # no `self`, as jinja's Namespace, so that `namespace(self=...)` works
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it to mask assistant tokens)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
_ENV.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
)
_ENV.globals.update(
    raise_exception=_raise_exception,
    strftime_now=lambda fmt: datetime.now().strftime(fmt),
    dict=_TemplateDict(),
    namespace=_TemplateNamespace,
)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template cannot be compiled: {e}") from None
