"""A Python function -> the JSON schema a chat template expects in `tools`, as transformers' `get_json_schema` does.

Chat templates read tools as `{"type": "function", "function": {"name", "description", "parameters"}}`.
transformers lets callers pass plain functions instead and builds that dict from the function's Google-style
docstring (the summary, one `name: description` line per argument under `Args:`, an optional `Returns:` block)
and its type hints. This module does the same for the hints real tools use: int, float, str, bool, None, Any,
list / tuple / dict (bare or parameterised), Optional / Union, Literal and Enum. Anything else (a custom class, a
tensor, an image) raises a `ToolSchemaError` that says to pass a JSON-schema dict for that tool instead. The
output, key order included (templates may print it with `tojson`), is what transformers 5.24 produces.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_SECTION = re.compile(r"^\s*(Args|Returns|Raises):\s*$")
_ARG_LINE = re.compile(r"^([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*(.*)$")  # "name: text" or "name (int): text"
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)
_JSON_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BARE_TYPES = {**_JSON_SCALARS, list: "array", tuple: "array", dict: "object"}


class ToolSchemaError(ValueError):
    """A function passed as a tool that cannot be described as a JSON schema (no docstring, a missing argument
    description or type hint, a type hint with no JSON equivalent)."""


def function_schema(func) -> dict:
    """`{"type": "function", "function": {"name", "description", "parameters"[, "return"]}}` for `func`."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise ToolSchemaError(f"tool {name}() has no docstring to describe it")
    description, arg_docs, return_doc = _parse_docstring(doc.strip())
    parameters, return_schema = _parameters_schema(func, name)
    for arg, schema in parameters["properties"].items():
        if arg not in arg_docs:
            raise ToolSchemaError(f"tool {name}() has no description of its argument {arg!r} under 'Args:'")
        text = arg_docs[arg]
        if choices := _CHOICES.search(text):  # "... (choices: ["tea", "coffee"])" -> an enum
            try:
                values = json.loads(choices.group(1))
            except json.JSONDecodeError as e:
                raise ToolSchemaError(f"tool {name}(): the choices of {arg!r} are not a JSON list: {e}") from None
            schema["enum"] = [v.strip() if isinstance(v, str) else v for v in values]
            text = text[: choices.start()].strip()
        schema["description"] = text
    out = {"name": name, "description": description, "parameters": parameters}
    if return_schema is not None:
        if return_doc is not None:
            return_schema["description"] = return_doc
        out["return"] = return_schema
    return {"type": "function", "function": out}


def _parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(summary, {argument: description}, returns text or None) of a Google-style docstring."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in doc.split("\n"):
        if header := _SECTION.match(line):
            current = header.group(1)
            sections.setdefault(current, [])
        else:
            sections[current].append(line)
    args: dict[str, str] = {}
    base_indent = None
    for line in (line for line in sections.get("Args", []) if line.strip()):
        entry = _ARG_LINE.match(line)
        indent = len(line) - len(line.lstrip())
        if entry and (base_indent is None or indent <= base_indent):  # a new argument, not a continuation line
            base_indent = indent
            key = entry.group(2)
            args[key] = entry.group(3).strip()
        elif args:
            args[key] = f"{args[key]} {line.strip()}".strip()
    returns = "\n".join(sections["Returns"]).strip() if "Returns" in sections else None
    return "\n".join(sections[""]).strip(), args, returns


def _parameters_schema(func, name: str) -> tuple[dict, dict | None]:
    """({"type": "object", "properties", "required"}, the return type's schema or None)."""
    try:
        hints = get_type_hints(func)
    except Exception as e:  # a hint naming something undefined, a bad string annotation
        raise ToolSchemaError(f"tool {name}(): cannot read its type hints: {e}") from None
    params = inspect.signature(func).parameters
    first = next(iter(params.values()), None)
    receiver = first.name if first and first.name in ("self", "cls") and first.annotation is first.empty else None
    required = []
    for param in params.values():
        if param.name == receiver:
            continue
        if param.annotation is param.empty:
            raise ToolSchemaError(f"tool {name}(): argument {param.name!r} has no type hint")
        if param.default is param.empty:
            required.append(param.name)
    properties, return_schema = {}, None
    for arg, hint in hints.items():
        if arg == receiver:
            continue
        if arg == "return":  # the model never writes the return value: an unconvertible one is left out
            try:
                return_schema = _type_schema(hint)
            except ToolSchemaError:
                pass
        else:
            try:
                properties[arg] = _type_schema(hint)
            except ToolSchemaError as e:
                raise ToolSchemaError(f"tool {name}(), argument {arg!r}: {e}") from None
    parameters = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return parameters, return_schema


def _type_schema(hint) -> dict:
    """The JSON schema of one type hint."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, Enum):
        return _enum_schema([member.value for member in hint], f"Enum {hint.__name__}")
    if origin is None:
        if hint is Any:
            return {}
        if hint in _BARE_TYPES:
            return {"type": _BARE_TYPES[hint]}
        raise ToolSchemaError(f"type hint {hint!r} has no JSON-schema equivalent (supported: int, float, str, bool, "
                              "None, Any, list, tuple, dict, Optional/Union, Literal, Enum)")
    if origin is Union or origin is types.UnionType:
        options = [_type_schema(t) for t in args if t is not type(None)]
        if len(options) == 1:
            schema = options[0]
        elif all(o.keys() == {"type"} and isinstance(o["type"], str) for o in options):
            names = sorted({o["type"] for o in options})
            schema = {"type": names[0] if len(names) == 1 else names}
        else:
            schema = {"anyOf": options}
        if type(None) in args:
            schema["nullable"] = True
        return schema
    if origin is Literal and args:
        return _enum_schema(list(args), "Literal")
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise ToolSchemaError(f"type hint {hint!r}: use list[...] for a variable-length sequence")
        return {"type": "array", "prefixItems": [_type_schema(t) for t in args]}
    if origin is dict:
        if len(args) != 2:
            return {"type": "object"}
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    raise ToolSchemaError(f"type hint {hint!r} has no JSON-schema equivalent")


def _enum_schema(values: list, what: str) -> dict:
    """{"type": the JSON types of `values` in order of first use (one name, or a list), "enum": values}."""
    if not values or any(type(v) not in _JSON_SCALARS for v in values):
        raise ToolSchemaError(f"{what} values {values!r} are not all JSON scalars (int, float, str, bool, None)")
    names = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
    return {"type": names[0] if len(names) == 1 else names, "enum": values}

