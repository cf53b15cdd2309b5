"""Chat messages and tools prepared as transformers prepares them, and the built-in format for checkpoints without a
template; the oracle is transformers 5.24's `apply_chat_template` and `get_json_schema` (or, for the built-in format,
the closed-form text of the released Gemma 4 template).

The templates here are written for the tests. They use what the released Gemma 4 template uses: the thought channel
of an assistant tool-call turn from `reasoning_content` (or `reasoning`), tool calls, `role: tool` answers, tool
declarations printed from their JSON schemas.
"""

import enum
from typing import Any, Literal, Optional, Union

import pytest

from weights.chat_template import ChatTemplateError, render_chat
from weights.tool_schema import function_schema

# The released template's rule: an assistant turn's reasoning is shown (as the thought channel) only when that turn
# calls tools, after the last user message.
TOOL_TEMPLATE = """{{ bos_token }}
{%- if tools %}<|turn>system
{% for tool in tools %}<|tool>{{ tool | tojson }}<tool|>{% endfor %}<turn|>
{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m['role'] == 'tool' %}<|tool_response>{{ m['content'] }}<tool_response|>
{% else %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}
{% set thought = m.get('reasoning') or m.get('reasoning_content') %}
{%- if thought and loop.index0 > ns.last_user and m.get('tool_calls') %}<|channel>thought
{{ thought }}
<channel|>{% endif %}
{%- for call in m.get('tool_calls', []) %}{% set f = call['function'] %}
<|tool_call>call:{{ f['name'] }}{{ f['arguments'] | tojson }}<tool_call|>{% endfor %}
{{- m.get('content', '') }}<turn|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|turn>model
{% endif %}"""
# gpt-oss style templates read `thinking` instead; transformers fills it from `reasoning_content` too.
THINKING_TEMPLATE = "{% for m in messages %}[{{ m.role }}|{{ m.thinking }}|{{ m.reasoning_content }}]{% endfor %}"


@pytest.fixture(scope="module")
def hf():
    """A transformers tokenizer, only to call its `apply_chat_template` (the vocabulary is irrelevant)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = models.WordLevel({"<bos>": 0, "<unk>": 1}, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocab), bos_token="<bos>", unk_token="<unk>")


def _tool_call_chat(**reasoning):
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, **reasoning,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "P"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]


# --- reasoning fields: `thinking` and `reasoning` reach the template as `reasoning_content` ------------------------


@pytest.mark.parametrize(
    "reasoning",
    [
        {"thinking": "Call the tool."},
        {"reasoning_content": "Call the tool."},
        {"reasoning": "Call the tool."},
        {"thinking": "Call the tool.", "reasoning_content": None},  # None is absent: thinking still counts
        {"reasoning_content": "Call the tool.", "thinking": "ignored: reasoning_content comes first"},
    ],
)
def test_thinking_is_rendered_as_the_thought_channel_like_transformers(hf, reasoning):
    messages = _tool_call_chat(**reasoning)
    expected = hf.apply_chat_template(messages, chat_template=TOOL_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert "<|channel>thought\nCall the tool.\n<channel|><|tool_call>call:weather" in expected
    assert render_chat(TOOL_TEMPLATE, messages) == expected


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": "a", "reasoning_content": "R"},
        {"role": "assistant", "content": "a", "reasoning": "R"},
        {"role": "assistant", "content": "a", "thinking": "T", "reasoning_content": "R"},
        {"role": "assistant", "content": "a", "reasoning_content": ""},  # empty is present (not None)
        {"role": "assistant", "content": "a"},
    ],
)
def test_reasoning_aliases_match_transformers(hf, message):
    expected = hf.apply_chat_template([message], chat_template=THINKING_TEMPLATE, tokenize=False)
    assert render_chat(THINKING_TEMPLATE, [message]) == expected


def test_messages_are_not_modified_and_non_dicts_are_refused():
    messages = [{"role": "assistant", "content": "a", "thinking": "T", "extra": None}]
    render_chat(THINKING_TEMPLATE, messages)
    assert messages == [{"role": "assistant", "content": "a", "thinking": "T", "extra": None}]
    with pytest.raises(ChatTemplateError, match="message 1 is a str, not a dict"):
        render_chat(THINKING_TEMPLATE, [{"role": "user", "content": "hi"}, "hello"])


# --- tools given as Python functions ------------------------------------------------------------------------------


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(city: str, unit: Unit = Unit.CELSIUS, days: int | None = None) -> dict:
    """Get the weather forecast for a city.

    Args:
        city: The city's name, e.g. "Paris"
        unit: The temperature unit
        days: How many days ahead,
            at most 7.

    Returns:
        The forecast, keyed by day.
    """


def pour(beverage: str, sizes: list[float], extras: dict[str, int], flags: tuple[bool, str] = (True, "x"),
         anything: Any = None, either: Union[int, str] = 0, mixed: Optional[list[int] | str] = None,
         mode: Literal["hot", "cold", 3] = "hot"):
    """Pour a drink.

    Longer explanation on a second paragraph.

    Args:
        beverage (str): The beverage to pour (choices: ["tea", "coffee"])
        sizes: Cup sizes in millilitres
        extras: Counts of extras by name
        flags: A pair
        anything: Anything at all
        either: A number or a name
        mixed: Either a list of numbers or a string
        mode: How to serve it
    """


def no_arguments() -> None:
    """Do nothing, loudly."""


class Kitchen:
    def bake(self, minutes: int) -> str:
        """Bake something.

        Args:
            minutes: For how long
        """


@pytest.mark.parametrize("func", [get_weather, pour, no_arguments, Kitchen().bake, Kitchen.bake])
def test_function_tools_become_transformers_json_schemas(hf, func):
    from transformers.utils import get_json_schema

    assert function_schema(func) == get_json_schema(func)
    messages = [{"role": "user", "content": "Hi"}]
    expected = hf.apply_chat_template(messages, tools=[func], chat_template=TOOL_TEMPLATE, tokenize=False)
    assert render_chat(TOOL_TEMPLATE, messages, tools=[func], add_generation_prompt=False) == expected  # key order too


def undocumented(x: int):
    pass


def missing_arg_doc(x: int, y: int):
    """Add.

    Args:
        x: The first
    """


def missing_hint(x):
    """Echo.

    Args:
        x: Anything
    """


def custom_class(k: Kitchen):
    """Use a kitchen.

    Args:
        k: The kitchen
    """


@pytest.mark.parametrize(
    "tool, message",
    [
        (undocumented, r"tool undocumented\(\) has no docstring"),
        (missing_arg_doc, r"tool missing_arg_doc\(\) has no description of its argument 'y'"),
        (missing_hint, r"tool missing_hint\(\): argument 'x' has no type hint"),
        (custom_class, r"tool custom_class\(\), argument 'k': type hint .*Kitchen.* has no JSON-schema equivalent"),
    ],
)
def test_functions_that_cannot_be_described_say_to_pass_a_json_schema(hf, tool, message):
    with pytest.raises(Exception):  # transformers refuses them too
        hf.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool], chat_template=TOOL_TEMPLATE)
    with pytest.raises(ChatTemplateError, match=message) as e:
        render_chat(TOOL_TEMPLATE, [{"role": "user", "content": "hi"}], tools=[tool])
    assert "pass its JSON-schema dict" in str(e.value)


@pytest.mark.parametrize("tools", [[42], [print], {"type": "function"}, "get_weather"])
def test_tools_that_are_neither_schemas_nor_functions_are_refused(tools):
    with pytest.raises(ChatTemplateError, match="JSON-schema dict"):
        render_chat(TOOL_TEMPLATE, [{"role": "user", "content": "hi"}], tools=tools)


# --- no template: the released Gemma 4 format for plain text turns ------------------------------------------------


def test_builtin_format_ends_the_generation_prompt_as_the_released_template():
    """The released template opens the model turn with an empty thought channel when thinking is off."""
    assert render_chat(None, [{"role": "user", "content": "Hello"}]) == (
        "<bos><|turn>user\nHello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert render_chat(None, [{"role": "user", "content": "Hello"}], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n"
    )


def test_builtin_format_turns():
    messages = [
        {"role": "developer", "content": " Be brief. "},
        {"role": "user", "content": "  What is 2+2? "},
        {"role": "assistant", "content": "Four <|channel>thought\nadd<channel|>indeed. "},
        {"role": "assistant", "content": "More."},  # continues the same model turn
        {"role": "user", "content": "Thanks"},
    ]
    assert render_chat(None, messages, add_generation_prompt=False, bos_token="<s>") == (
        "<s><|turn>system\nBe brief.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\nFour indeed.<turn|>\nMore.<turn|>\n<|turn>user\nThanks<turn|>\n"
    )


@pytest.mark.parametrize(
    "messages, tools",
    [
        ([{"role": "user", "content": "hi"}], [get_weather]),
        (_tool_call_chat(thinking="x"), None),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], None),
    ],
)
def test_builtin_format_refuses_what_it_cannot_render(messages, tools):
    with pytest.raises(ChatTemplateError, match="no chat template.*plain text turns only"):
        render_chat(None, messages, tools=tools)
