"""Conversations (speculative.Session, generate.py --chat): the KV cache kept across turns.

Oracle: a fresh `generate` over the whole rendered history of each turn (greedy, float32 with row-invariant
products: a turn's prefill of a suffix and a fresh prefill of the whole history compute the same rows in different
products), and the closed-form count of prompt tokens the cache holds (the previous turn's ids and answer but its
last token, or the longest common prefix when the template rewrites history). The tiny families use a
character-level tokenizer whose encode and decode are exact inverses, so a re-rendered history differs from the
cached ids exactly where the template's text does.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import speculative.loop
from drafter import Drafter, DrafterConfig
from gemma4 import Gemma4Config, Gemma4Model
from speculative import ContextLimitError, Session, generate
from speculative.session import split_thinking
from tests import tiny
from weights import load_chat_template, load_drafter, load_target, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
generate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_script)
sys.path.insert(0, str(ROOT / "scripts"))
import chat  # noqa: E402  (scripts/chat.py)

END = 5  # <turn|>: the end-of-turn token of the tiny families
PLAIN = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
         "{{ m.content }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")
# Rewrites history as the released Gemma 4 template does: earlier answers lose their thought channel, and the
# generation prompt ends in an empty one that the next rendering leaves out.
REWRITING = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
             "{% if m.role == 'assistant' %}{% for part in m.content.split('<channel|>') %}"
             "{{ part.split('<|channel>')[0] }}{% endfor %}{% else %}{{ m.content }}{% endif %}<turn|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|turn>model\n<|channel>thought\n<channel|>{% endif %}")


pytestmark = pytest.mark.usefixtures("row_invariant_float32")  # tests/conftest.py


class CharTokenizer:
    """One string per id: 8 specials, then ASCII, then code points from U+0500 (encode(decode(ids)) == ids)."""

    SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
    bos_id, eos_id = 2, 1

    def __init__(self, vocab_size: int = 512):
        self.pieces = self.SPECIALS + [chr(c) for c in range(128)]
        self.pieces += [chr(0x500 + i) for i in range(vocab_size - len(self.pieces))]
        self.ids = {p: i for i, p in enumerate(self.pieces)}

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.SPECIALS if text.startswith(s, i)), None)
            piece = special or text[i]
            ids.append(self.ids[piece])
            i += len(piece)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i < len(self.SPECIALS)))


@functools.cache
def family_pair(family: str):
    torch.manual_seed(0)
    target = Gemma4Model(Gemma4Config(**tiny.TARGET_CONFIGS[family])).eval()
    tiny.randomize(target, seed=0)
    kind = tiny.PAIRS[family]
    drafter = Drafter(DrafterConfig.from_dict(dict(tiny.DRAFTER_CONFIGS[kind], model_type="gemma4_assistant")))
    tiny.randomize(drafter.eval(), seed=1)
    return target, drafter


@functools.cache
def bundled():
    target = load_target(ROOT / "tiny_gemma4" / "target")
    drafter = load_drafter(ROOT / "tiny_gemma4" / "drafter", target=target)
    return target, drafter, load_tokenizer(ROOT / "tiny_gemma4" / "target")


def session(family: str, template: str = PLAIN, **kwargs) -> Session:
    target, drafter = family_pair(family)
    kwargs = dict(dict(max_new_tokens=24, num_draft_tokens=3, stop_token_ids=[END]), **kwargs)
    return Session(target, drafter, tokenizer=CharTokenizer(), template=template, **kwargs)


def fresh(s: Session, turn) -> list[int]:
    """The oracle: a fresh generation over the turn's whole rendered history."""
    return generate(s.target, s.drafter, turn.prompt_ids, max_new_tokens=len(turn.tokens) if turn.interrupted
                    else s.max_new_tokens, num_draft_tokens=3, stop_token_ids=sorted(s.stops)).tokens


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("family", ["e2b", "31b", "moe"])
def test_each_turn_equals_a_fresh_generate_and_prefills_only_the_new_tokens(family):
    s = session(family, system="Be brief.")
    previous = None
    for message in ["Hello there", "And a second question?", "x" * 20]:
        turn = s.send(message)
        assert turn.tokens == fresh(s, turn)
        if previous is None:
            assert (turn.cache, turn.prompt_tokens_reused) == ("new", 0)
        else:  # a template without rewriting: the history is an extension of what the cache holds
            held = previous.prompt_ids + previous.tokens
            assert turn.prompt_ids[:len(held)] == held and turn.cache == "continued"
            assert turn.prompt_tokens_reused == len(held) - 1  # all but the last answer token, never run
            assert turn.prompt_tokens_processed == len(turn.prompt_ids) - len(held) + 1
        previous = turn
    assert [m["role"] for m in s.messages] == ["system"] + ["user", "assistant"] * 3
    assert s.messages[-1]["content"] == CharTokenizer().decode(turn.tokens[:-1] if turn.stopped else turn.tokens)


def test_bundled_pair_turns_longer_than_the_sliding_window():
    """The bundled pair (W = 64, a real tokenizer and template): user turns and answers longer than the window."""
    target, drafter, tokenizer = bundled()
    s = Session(target, drafter, tokenizer=tokenizer, template=load_chat_template(target.checkpoint_dir),
                max_new_tokens=66)
    for message in ["def fibonacci(n):\n" + "    # the n-th number\n" * 8, "\nclass Stack:\n"]:
        turn = s.send(message)
        assert len(turn.prompt_ids) > 64 and turn.tokens == fresh(s, turn)
    assert turn.cache == "continued" and turn.prompt_tokens_processed < 20 < turn.prompt_tokens_reused


@functools.cache
def half_pair(family: str, dtype: torch.dtype):
    """family_pair (or the bundled pair) in a half-precision dtype."""
    if family == "bundled":
        target = load_target(ROOT / "tiny_gemma4" / "target", dtype=dtype)
        return target, load_drafter(ROOT / "tiny_gemma4" / "drafter", target=target, dtype=dtype)
    target, drafter = family_pair(family)
    return copy.deepcopy(target).to(dtype), copy.deepcopy(drafter).to(dtype)


def _message(length: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    return "".join(chr(c) for c in torch.randint(32, 127, (length,), generator=gen).tolist())


# (family, template, messages' lengths, max_context): 21 turns; histories up to 500 tokens, many windows long, fed
# to the cache in suffixes of 1 to 150 tokens; the rewriting template rolls back or restores, a small context drops
# old turns and starts new caches.
ANSWER = 16  # new tokens per turn
CONVERSATIONS = [("e2b", PLAIN, [5, 140, 12, 60, 150, 30], None), ("31b", REWRITING, [40, 3, 120, 70], None),
                 ("moe", PLAIN, [90, 20, 130, 45, 8, 75], 260), ("bundled", None, [60, 10, 150, 35, 80], None)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_turns_each_equal_a_fresh_generate_token_for_token(dtype):
    """Greedy turns in bfloat16 and float16: each equals a fresh `generate` over the whole rendered history, token
    for token, whatever part of the history the cache held. 26 of 80 such turns differed while a turn's prefill of
    more than 64 tokens attended through SDPA over its own key layout (a history fed in pieces gave other logits
    than one prefill: tests/test_dtype_equivalence.py checks that directly)."""
    differ, caches = [], set()
    for family, template, lengths, max_context in CONVERSATIONS:
        target, drafter = half_pair(family, dtype)
        if family == "bundled":
            tokenizer = load_tokenizer(ROOT / "tiny_gemma4" / "target")
            s = Session(target, drafter, tokenizer=tokenizer, template=load_chat_template(target.checkpoint_dir),
                        max_new_tokens=ANSWER, num_draft_tokens=3)
        else:
            s = Session(target, drafter, tokenizer=CharTokenizer(), template=template, max_new_tokens=ANSWER,
                        num_draft_tokens=3, stop_token_ids=[END], max_context=max_context, system="Be brief.")
        for i, length in enumerate(lengths):
            turn = s.send(_message(length, i))
            want = generate(target, drafter, turn.prompt_ids, max_new_tokens=ANSWER, num_draft_tokens=3,
                            stop_token_ids=sorted(s.stops)).tokens
            caches.add(turn.cache)
            if turn.tokens != want:
                differ.append((family, i, turn.cache, common_prefix(turn.tokens, want)))
    assert differ == [], f"turns (family, turn, cache, first differing token) that differ: {differ}"
    assert caches >= {"new", "continued", "rolled back"}


def test_a_rewriting_template_reuses_the_common_prefix_by_rollback_or_ring_snapshot():
    """Turn 2 shares with the cache only the prefix before the empty thought channel: close enough to roll back
    after a short answer; after an answer that the ring cannot roll back over (its 71 slots keep 9 positions of history,
    so at most 62 positions back) the ring snapshot of the prompt's end
    brings it back; a change further back than the snapshot starts a new cache."""
    s = session("e2b", REWRITING, max_new_tokens=12)
    budgets = [12, 64, 8]
    turns = [s.send(message, max_new_tokens=n) for message, n in zip(["Hi", "Tell me more", "Thanks"], budgets)]
    assert [t.cache for t in turns] == ["new", "rolled back", "restored"]
    for before, turn in zip(turns, turns[1:]):
        held = before.prompt_ids + before.tokens
        common = common_prefix(held, turn.prompt_ids)
        assert common < len(before.prompt_ids) and turn.prompt_tokens_reused == common
        assert turn.prompt_tokens_processed == len(turn.prompt_ids) - common
    for turn, budget in zip(turns, budgets):
        assert turn.tokens == generate(s.target, s.drafter, turn.prompt_ids, max_new_tokens=budget,
                                       num_draft_tokens=3, stop_token_ids=[END]).tokens
    changed = list(s.tokens[:-1])
    changed[3] = (changed[3] + 1) % 512  # the history rewritten near its start: no cache state reaches there
    turn = s.generate_ids(changed, max_new_tokens=8)
    assert turn.cache == "new" and turn.prompt_tokens_reused == 0 and "further than" in turn.cache_note
    assert turn.tokens == generate(s.target, s.drafter, changed, max_new_tokens=8, num_draft_tokens=3,
                                   stop_token_ids=[END]).tokens


def test_a_conversation_past_the_context_limit_drops_its_oldest_turns_or_says_it_does_not_fit():
    s = session("e2b", system="S", max_new_tokens=16, max_context=110)
    dropped = []
    for i in range(4):
        turn = s.send(f"question number {i}")
        assert len(turn.prompt_ids) + 16 <= 110 and turn.tokens == fresh(s, turn)
        dropped.append(turn.messages_dropped)
    assert dropped[0] == 0 and sum(dropped) > 0 and s.messages[0] == {"role": "system", "content": "S"}
    first_drop = next(t for t in s.turns if t.messages_dropped)
    assert "2 oldest messages dropped" in first_drop.cache_note  # one user turn and its answer
    assert first_drop.prompt_tokens_reused == common_prefix(s.turns[s.turns.index(first_drop) - 1].prompt_ids,
                                                            first_drop.prompt_ids)
    assert s.messages[1] != {"role": "user", "content": "question number 0"}
    before = list(s.messages)
    with pytest.raises(ContextLimitError, match="context limit of 110"):
        s.send("y" * 100)  # alone it does not fit: even dropping everything else does not help
    assert s.messages == before
    strict = session("e2b", max_new_tokens=16, max_context=80, overflow="error")
    strict.send("short")
    with pytest.raises(ContextLimitError, match="overflow='error'"):
        strict.send("a longer second message that no longer fits")
    assert len(strict.messages) == 2 and strict.send("ok").tokens == fresh(strict, strict.last)


def test_reset_starts_a_new_conversation_with_the_system_message():
    s = session("31b", system="Sys")
    s.send("first")
    s.reset()
    turn = s.send("second")
    assert turn.cache == "new" and turn.prompt_tokens_reused == 0
    assert s.messages[:2] == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "second"}]
    assert turn.prompt_ids == CharTokenizer().encode("<bos><|turn>system\nSys<turn|>\n<|turn>user\nsecond<turn|>\n"
                                                     "<|turn>model\n")
    assert turn.tokens == fresh(s, turn)


@pytest.mark.parametrize("stop_at", [1, 3])
def test_ctrl_c_mid_answer_keeps_the_partial_turn_and_the_next_turn_continues(stop_at):
    """KeyboardInterrupt from on_round (what Ctrl-C does in the chat) at the prefill's report or a later round."""
    s = session("e2b", max_new_tokens=30)
    calls = []

    def interrupt(info):
        calls.append(info)
        if len(calls) == stop_at:
            raise KeyboardInterrupt

    turn = s.send("Hello", on_round=interrupt)
    complete = generate(s.target, s.drafter, turn.prompt_ids, max_new_tokens=30, num_draft_tokens=3,
                        stop_token_ids=[END]).tokens
    assert turn.interrupted and 0 < len(turn.tokens) < 30
    assert turn.tokens == [t for info in calls for t in info.emitted] == complete[:len(turn.tokens)]
    assert s._cache.length == len(turn.prompt_ids) + len(turn.tokens) - 1  # exactly the recorded tokens but the last
    assert s.messages[-1] == {"role": "assistant", "content": CharTokenizer().decode(turn.tokens)}
    following = s.send("Go on")
    assert following.cache == "continued" and following.tokens == fresh(s, following)
    assert following.prompt_tokens_reused == len(turn.prompt_ids) + len(turn.tokens) - 1


def test_ctrl_c_inside_the_prefill_discards_the_cache(monkeypatch):
    s = session("e2b")
    s.send("one")
    with monkeypatch.context() as m:
        m.setattr(speculative.loop, "prefill", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        turn = s.send("two")
    assert turn.interrupted and turn.tokens == [] and "discarded" in turn.cache_note
    following = s.send("three")
    assert following.cache == "new" and following.tokens == fresh(s, following)


def test_thinking_is_split_dimmed_hidden_or_shown():
    text = "<|channel>thought\nLet me think<channel|>The answer"
    assert split_thinking(text) == ("Let me think", "The answer") and split_thinking("plain") == (None, "plain")
    assert split_thinking("<|channel>thought\ncut by the budget") == ("cut by the budget", "")
    chunks = ["<|chan", "nel>thought\nLet ", "me think<chan", "nel|>The ", "answer"]

    def shown(mode, color):
        f = chat.ThoughtFilter(mode, color)
        return "".join(f.feed(c) for c in chunks) + f.flush()

    assert shown("hide", True) == "The answer" and shown("show", False) == text
    assert shown("dim", True) == "\033[2mthought\nLet \033[0m\033[2mme think\033[0mThe answer"
    assert shown("dim", False) == "[thinking] thought\nLet me think [/thinking]\nThe answer"


def test_the_first_ctrl_c_asks_for_a_stop_at_the_next_round_and_the_second_stops_at_once():
    with chat.StopOnInterrupt() as stop:
        stop.check()
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def run_cli(argv, stdin: str, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = generate_script.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_chat_json_one_line_per_turn_equal_to_the_library_session(monkeypatch, capsys):
    """Non-TTY stdin: one message per line; --json: one JSON line per turn; /stats, /reset, /exit; EOF never
    reached after /exit (the last line is not answered)."""
    lines = ["def add(a, b):", "/stats", "    return a", "", "/reset", "class A:", "/exit", "never answered"]
    code, out, err = run_cli(["--chat", "--json", "--max-new-tokens", 12, "--threads", 1], "\n".join(lines) + "\n",
                             monkeypatch, capsys)
    assert code == 0, err
    reports = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["user"] for r in reports] == ["def add(a, b):", "    return a", "class A:"]
    target, drafter, tokenizer = bundled()
    s = Session(target, drafter, tokenizer=tokenizer, template=load_chat_template(target.checkpoint_dir),
                max_new_tokens=12)
    for report, message in zip(reports, ["def add(a, b):", "    return a", "/reset", "class A:"]):
        if message == "/reset":
            s.reset()
            message = "class A:"
        turn = s.send(message)
        assert report["tokens"] == turn.tokens and report["text"] == turn.text
        assert report["stats"]["prompt_tokens_reused"] == turn.prompt_tokens_reused
        assert report["stats"]["prompt_tokens_processed"] == turn.prompt_tokens_processed
    assert [r["stats"]["cache"] for r in reports] == ["new", "continued", "new"]
    assert reports[1]["stats"]["prompt_tokens_reused"] > 0
    assert "answer tokens: 12" in err and "(new conversation)" in err


def test_cli_chat_compile_answers_as_the_eager_library_session(monkeypatch, capsys):
    """--chat --compile: the conversation runs through the compiled steps (target-only here, the lighter compile;
    tests/test_compiled.py covers a compiled conversation with a drafter) and answers as the eager Session."""
    lines = ["def add(a, b):", "    return a"]
    code, out, err = run_cli(["--chat", "--json", "--compile", "--no-draft", "--max-new-tokens", 10, "--threads", 1],
                             "\n".join(lines) + "\n", monkeypatch, capsys)
    assert code == 0, err
    reports = [json.loads(line) for line in out.strip().splitlines()]
    target, _, tokenizer = bundled()
    s = Session(target, None, tokenizer=tokenizer, template=load_chat_template(target.checkpoint_dir),
                max_new_tokens=10)
    assert [r["tokens"] for r in reports] == [s.send(message).tokens for message in lines]
    assert [r["stats"]["cache"] for r in reports] == ["new", "continued"]
    assert reports[0]["stats"]["compile_seconds"] > 0


def test_cli_chat_streams_each_answer_as_text_and_exits_at_eof(monkeypatch, capsys):
    code, out, err = run_cli(["--chat", "--max-new-tokens", 8, "--threads", 1, "--no-draft"],
                             "def f(x):\n    return x\n", monkeypatch, capsys)
    assert code == 0, err
    target, _, tokenizer = bundled()
    s = Session(target, None, tokenizer=tokenizer, template=load_chat_template(target.checkpoint_dir),
                max_new_tokens=8)
    answers = [s.send(m).text for m in ["def f(x):", "    return x"]]
    assert out == "".join(a + "\n" for a in answers)
    assert err.count("[8 tokens; prompt:") == 2


@pytest.mark.parametrize("argv, message", [
    (["--chat", "--prompt", "hi"], "cannot be combined"),
    (["--system", "be brief"], "need --chat"),
])
def test_cli_chat_option_errors(argv, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(argv, "", monkeypatch, capsys)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_chat_a_failed_turn_answers_with_an_error_in_its_place_and_the_exit_status_says_so(monkeypatch, capsys):
    """A message too long for the context (2048 positions) fails its turn: --json prints a line with an "error"
    object where the answer would be (every message gets one line, in order), the conversation goes on as if the
    message had not been sent, and the exit status is 1. Without --json the error is a line on stderr."""
    too_long = " ".join(f"x{i}" for i in range(1500))
    lines = ["def add(a, b):", too_long, "class A:"]
    code, out, err = run_cli(["--chat", "--json", "--max-new-tokens", 8, "--threads", 1], "\n".join(lines) + "\n",
                             monkeypatch, capsys)
    assert code == 1, err
    reports = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["user"] for r in reports] == lines
    assert "error" not in reports[0] and "error" not in reports[2]
    error = reports[1]["error"]
    assert error["type"] == "ContextLimitError" and "context limit of 2048" in error["message"]
    assert "tokens" not in reports[1] and "Traceback" not in err
    target, drafter, tokenizer = bundled()
    s = Session(target, drafter, tokenizer=tokenizer, template=load_chat_template(target.checkpoint_dir),
                max_new_tokens=8)
    answers = [s.send(m).tokens for m in (lines[0], lines[2])]
    assert [reports[0]["tokens"], reports[2]["tokens"]] == answers

    code, out, err = run_cli(["--chat", "--max-new-tokens", 8, "--threads", 1, "--no-draft"],
                             "\n".join(lines) + "\n", monkeypatch, capsys)
    assert code == 1
    assert err.count("error: ") == 1 and "context limit of 2048" in err and "Traceback" not in err
    s = Session(target, None, tokenizer=tokenizer, template=load_chat_template(target.checkpoint_dir),
                max_new_tokens=8)
    assert out == "".join(s.send(m).text + "\n" for m in (lines[0], lines[2]))  # the two answers, nothing else
