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

The inputs are prepared as `apply_chat_template` prepares them: keys whose value is None are dropped, a message's
reasoning given as `thinking` or `reasoning` is copied to `reasoning_content` (the name templates read; Gemma 4's
renders it as the thought channel of a tool-call turn), and Python functions in `tools` become JSON schemas
(`weights.tool_schema`).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .files import read_optional_json
from .tool_schema import ToolSchemaError, function_schema


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
    tools: list | None = None,
    **kwargs,
) -> str:
    """The prompt for `messages` ([{"role": ..., "content": ...}]); `tools` (JSON-schema dicts or documented,
    type-hinted Python functions) and `kwargs` (eos_token, enable_thinking, ...) reach the template as variables.
    With no template, the released Gemma 4 turn format for plain text turns (see `_gemma4_turns`)."""
    messages = _prepare_messages(messages)
    tools = _tool_schemas(tools)
    if template is None:
        return _gemma4_turns(messages, add_generation_prompt, bos_token, tools, bool(kwargs.get("enable_thinking")))
    variables = {"documents": None, **kwargs}
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, tools=tools,
            **variables,
        )
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped: {e}") from None
    except Exception as e:  # anything else a template can trigger: undefined names, type errors, bad indexing
        raise ChatTemplateError(f"chat template failed while rendering: {type(e).__name__}: {e}") from None


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is the one templates read


def _prepare_messages(messages: list[dict]) -> list[dict]:
    """Copies of `messages` as transformers hands them to a template: None values dropped (None = absent), and
    the first reasoning field present copied to `reasoning_content` (and to `thinking` when that is absent)."""
    prepared = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"message {i} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _tool_schemas(tools: list | None) -> list[dict] | None:
    """`tools` with every Python function replaced by its JSON schema, as transformers converts them."""
    if tools is None:
        return None
    if isinstance(tools, (dict, str)) or not hasattr(tools, "__iter__"):
        raise ChatTemplateError(f"tools must be a list of JSON-schema dicts or functions, got a {type(tools).__name__}")
    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            try:
                schemas.append(function_schema(tool))
            except ToolSchemaError as e:
                raise ChatTemplateError(f"{e}; document it (Google-style Args:) or pass its JSON-schema dict "
                                        '{"type": "function", "function": {"name", "description", "parameters"}}'
                                        ) from None
        else:
            raise ChatTemplateError(
                f"a tool must be a JSON-schema dict or a Python function with a docstring and type hints, got "
                f"{type(tool).__name__} {tool!r:.80}"
            )
    return schemas


def _gemma4_turns(
    messages: list[dict], add_generation_prompt: bool, bos_token: str, tools: list | None, enable_thinking: bool
) -> str:
    """What the released Gemma 4 chat template renders for plain text turns, for checkpoints that ship none:
    `<bos>`, a system turn when the first message is a system (or developer) message or thinking is on (which
    starts it with `<|think|>`), then `<|turn>{role}\\n{content}<turn|>\\n` per message (assistant is "model",
    text trimmed, earlier thought channels removed from model turns), and for the generation prompt
    `<|turn>model\\n` followed, when thinking is off, by the empty thought channel `<|channel>thought\\n<channel|>`
    that tells the model to answer without thinking."""
    if tools:
        raise ChatTemplateError("this checkpoint has no chat template, and the built-in Gemma 4 format renders "
                                "plain text turns only: pass no tools, or a template (chat_template.jinja)")
    for m in messages:
        if not isinstance(m.get("content"), str) or m.get("role") in (None, "tool") or m.get("tool_calls"):
            raise ChatTemplateError("this checkpoint has no chat template, and the built-in Gemma 4 format renders "
                                    f"plain text turns only (string content, no tool calls), got message {m!r:.200}")
    out = [bos_token]
    has_system = bool(messages) and messages[0].get("role") in ("system", "developer")
    if enable_thinking or has_system:
        system = messages[0]["content"].strip() if has_system else ""
        out.append("<|turn>system\n" + ("<|think|>\n" if enable_thinking else "") + system + "<turn|>\n")
    previous_role = None
    for m in messages[1:] if has_system else messages:
        role = "model" if m["role"] == "assistant" else m["role"]
        if not (role == "model" and previous_role == "assistant"):  # the template continues a model turn
            out.append(f"<|turn>{role}\n")
        out.append((_strip_thinking(m["content"]) if role == "model" else m["content"].strip()) + "<turn|>\n")
        previous_role = m["role"]
    if add_generation_prompt:
        out.append("<|turn>model\n" + ("" if enable_thinking else "<|channel>thought\n<channel|>"))
    return "".join(out)


def _strip_thinking(text: str) -> str:
    """`text` without its `<|channel>...<channel|>` spans, trimmed (the template's `strip_thinking` macro)."""
    parts = [part.split("<|channel>")[0] for part in text.split("<channel|>")]
    return "".join(parts).strip()


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
