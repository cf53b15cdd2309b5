"""scripts/generate.py --prompts-file / --batch-size: one JSON line per prompt, each equal to the library's
single-prompt call (greedy), and file mistakes named by FILE:LINE before any model is loaded."""

import json

import pytest

from speculative import generate
from tests.test_cli import GEMMA4_TEMPLATE, models, no_loading, one_line_error, run  # noqa: F401 (fixtures)
from weights import load_drafter, load_target, load_tokenizer, render_chat


def test_every_line_equals_the_single_prompt_library_call(models, tmp_path, capsys):
    entries = [{"prompt": "Hello world"}, {"messages": [{"role": "user", "content": "Tell me a story"}]},
               {"prompt": "Why?"}, {"prompt_ids": [2, 17, 40, 41, 42]}, {"prompt": "One more question here"}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    code, out, err = run(["--target", models, "--prompts-file", path, "--batch-size", 2, "--max-new-tokens", 12,
                          "--num-draft-tokens", 3, "--schedule", "heuristic"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [line["index"] for line in lines] == list(range(5))
    target = load_target(models)
    drafter = load_drafter(str(models) + "-assistant", target=target)
    tokenizer = load_tokenizer(models)
    for entry, line in zip(entries, lines):
        if "prompt_ids" in entry:
            ids = entry["prompt_ids"]
        else:
            messages = entry.get("messages") or [{"role": "user", "content": entry["prompt"]}]
            ids = tokenizer.encode(render_chat(GEMMA4_TEMPLATE, messages))
        alone = generate(target, drafter, ids, max_new_tokens=12, num_draft_tokens=3, schedule="heuristic")
        assert line["tokens"] == alone.tokens and line["stats"]["rounds"] == [list(r) for r in alone.stats.rounds]
        assert line["text"] == tokenizer.decode(alone.tokens, skip_special_tokens=True)
        assert {k: line[k] for k in entry} == entry
    assert "5 prompts, batch size 2:" in err and "tokens/s for the whole run" in err


def test_plain_text_lines_with_raw(models, tmp_path, capsys):
    path = tmp_path / "in.txt"
    path.write_text("first prompt\n\n  second prompt\n")
    code, out, err = run(["--target", models, "--prompts-file", path, "--raw", "--no-draft", "--max-new-tokens", 5],
                         capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [line["prompt"] for line in lines] == ["first prompt", "  second prompt"]  # blank line skipped
    target, tokenizer = load_target(models), load_tokenizer(models)
    for line in lines:
        ids = tokenizer.encode(line["prompt"], add_bos=True)
        assert line["tokens"] == generate(target, None, ids, max_new_tokens=5).tokens


@pytest.mark.parametrize("content,extra,message", [
    (None, [], "no such file"),
    ("", [], "holds no prompt"),
    ('{"prompt": "a"}\n{"prompt": \n', [], "in.jsonl:2: not a JSON object"),
    ('{"prompt": "a", "messages": []}\n', [], 'in.jsonl:1: expected exactly one of "prompt"'),
    ('{"text": "a"}\n', [], "in.jsonl:1: expected exactly one of"),
    ('{"messages": "hi"}\n', [], '"messages" must be a non-empty list'),
    ('{"prompt_ids": [1, "x"]}\n', [], '"prompt_ids" must be a non-empty list of integer'),
    ('["a"]\n', [], "in.jsonl:1: expected a JSON object"),
    ('{"prompt": "a"}\n', ["--batch-size", "0"], "--batch-size must be at least 1"),
    ('{"prompt": "a"}\n', ["--compare"], "--prompts-file cannot be combined with --compare"),
])
def test_file_mistakes_are_one_line_before_loading(content, extra, message, models, tmp_path, no_loading, capsys):
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_text(content)
    code, _, err = run(["--target", models, "--prompts-file", path, *extra], capsys)
    assert code == 2 and message in one_line_error(err), err
