"""Images through the front door: scripts/generate.py --image, --prompts-file entries with images, --chat with
/image, and speculative.Session over a conversation whose first turn has an image.

Oracles: the library calls on the same prompt (the chat template rendered by `render_chat` with image parts,
tokenized, markers expanded by `weights.images.image_prompt`) and target-only decoding. The tiny multimodal
checkpoint gets a tokenizer whose `<|image|>`, `<|image>` and `<image|>` are special tokens, and its config the
ids they got; its chat template writes `<|image|>` for an image part, as the released template does.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer

from speculative import Session, generate
from tests import tiny
from tests.test_image_processor import _png
from tests.test_tokenizer import GEMMA4_TEMPLATE, _train_tokenizer_json
from weights import load_target, load_tokenizer, load_vision, render_chat
from weights.images import image_prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import generate as generate_script  # noqa: E402

PIL = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.usefixtures("row_invariant_float32")  # tests/conftest.py: a suffix prefill == a whole one
TEMPLATE = GEMMA4_TEMPLATE.replace(
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endfor -%}",
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '\\n\\n<|image|>\\n\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """<root>/gemma (multimodal, tokenizer, template) and <root>/gemma-assistant; two image files."""
    root = tmp_path_factory.mktemp("image-cli")
    (root / "tok").mkdir()
    words = _train_tokenizer_json(root / "tok")
    tok = HFTokenizer.from_file(str(words / "tokenizer.json"))
    markers = ("<|image|>", "<|image>", "<image|>")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in markers])
    ids = dict(image_token_id=tok.token_to_id("<|image|>"), boi_token_id=tok.token_to_id("<|image>"),
               eoi_token_id=tok.token_to_id("<image|>"))
    target = tiny.build_vision_target("31b", seed=0, tokens=ids)
    drafter = tiny.build_drafter(tiny.PAIRS["31b"], seed=1)
    tiny.bias_vocab(target, drafter, [10, 11, 12], amount=0.3)
    folder = tiny.save(target, root / "gemma", eos_token_id=())
    tiny.save(drafter, root / "gemma-assistant", eos_token_id=())
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text((words / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    rng = np.random.default_rng(0)
    PIL.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(root / "a.png")
    PIL.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "b.png")
    return folder


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = generate_script.cli([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def library(folder, messages, n=12):
    """(prompt ids, embeddings, target-only tokens) of the library on `messages`."""
    target, vision, tokenizer = load_target(folder), load_vision(folder), load_tokenizer(folder)
    text = render_chat(TEMPLATE, messages, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")
    paths = [p["path"] for m in messages if isinstance(m["content"], list) for p in m["content"]
             if p["type"] == "image"]
    ids, embeds = image_prompt(vision, tokenizer.encode(text), paths)
    return ids, embeds, generate(target, None, ids, max_new_tokens=n, image_features=embeds).tokens


def test_image_prompt_compare_equals_the_library(models, capsys):
    image = models.parent / "a.png"
    code, out, err = run(["--target", models, "--image", image, "--prompt", "Hello world", "--max-new-tokens", 12,
                          "--num-draft-tokens", 3, "--compare", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    ids, _, want = library(models, [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                                 {"type": "text", "text": "Hello world"}]}])
    assert report["outputs_equal"] and report["tokens"] == report["baseline"]["tokens"] == want
    assert report["stats"]["prompt_tokens"] == len(ids)
    assert "loading vision encoder" in err


def _truncated(folder):
    rng = np.random.default_rng(1)
    PIL.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return folder / "cut.png"


def _enormous(folder):
    (folder / "huge.png").write_bytes(_png(60_000, 60_000))
    return folder / "huge.png"


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.png", "no such image file"),
    (lambda d: (d / "text.png").write_text("hello") and d / "text.png", "not an image Pillow can read"),
    (_truncated, "broken or truncated"),
    (_enormous, "enormous"),
    (lambda d: (d / "empty.png").write_bytes(_png(0, 7)) and d / "empty.png", "no pixels|not an image"),
])
def test_bad_image_is_one_line_before_loading(models, tmp_path, capsys, make, message):
    path = make(tmp_path)
    code, out, err = run(["--target", models, "--image", path, "--prompt", "Hi"], capsys)
    assert code == 2 and re.search(message, err) and str(path) in err
    assert len(err.strip().splitlines()) == 1 and "loading" not in err


def test_text_only_target_and_audio_are_refused(models, tmp_path, capsys):
    text_only = tiny.save(tiny.build_target("e2b"), tmp_path / "text")
    code, _, err = run(["--target", text_only, "--no-draft", "--image", models.parent / "a.png"], capsys)
    assert code == 2 and "takes text only" in err and "loading" not in err
    code, _, err = run(["--target", models, "--audio", "talk.wav"], capsys)
    assert code == 2 and "audio input is not supported" in err


def test_prompts_file_with_images_equals_single_runs(models, tmp_path, capsys):
    a, b = str(models.parent / "a.png"), str(models.parent / "b.png")
    entries = [
        {"prompt": "Hello world", "images": [a]},
        {"prompt": "The quick brown fox"},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": b}, {"type": "text", "text": "Hi"},
                                                    {"type": "image", "path": a}]}]},
    ]
    file = tmp_path / "prompts.jsonl"
    file.write_text("\n".join(json.dumps(e) for e in entries))
    code, out, err = run(["--target", models, "--prompts-file", file, "--batch-size", 3, "--max-new-tokens", 10,
                          "--num-draft-tokens", 3], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    messages = [[{"role": "user", "content": [{"type": "image", "path": a}, {"type": "text", "text": "Hello world"}]}],
                [{"role": "user", "content": "The quick brown fox"}], entries[2]["messages"]]
    for line, m in zip(lines, messages):
        assert line["tokens"] == library(models, m, n=10)[2]


def test_chat_with_an_image_in_the_first_turn(models, capsys, monkeypatch):
    """/image attaches the file to the next message; the second turn reuses the image's positions from the cache
    and answers exactly as a fresh target-only generation over the whole conversation."""
    a = str(models.parent / "a.png")
    code, out, err = run(["--target", models, "--chat", "--json", "--max-new-tokens", 8, "--num-draft-tokens", 3],
                         capsys, stdin=f"/image {a}\nHello world\nThe quick brown fox\n", monkeypatch=monkeypatch)
    assert code == 0, err
    first, second = [json.loads(line) for line in out.strip().splitlines()]
    history = [{"role": "user", "content": [{"type": "image", "path": a}, {"type": "text", "text": "Hello world"}]}]
    ids, _, want = library(models, history, n=8)
    assert first["tokens"] == want
    history += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "The quick brown fox"}]
    _, _, want = library(models, history, n=8)
    assert second["tokens"] == want
    assert second["stats"]["cache"] in ("continued", "rolled back")  # back to the end of the first prompt at most
    assert second["stats"]["prompt_tokens_reused"] >= ids.count(load_target(models).config.image_token_id)


def test_session_refuses_images_without_vision_and_bad_files(models, tmp_path):
    target = load_target(models)
    session = Session(target, tokenizer=load_tokenizer(models), template=TEMPLATE)
    with pytest.raises(ValueError, match="no vision model"):
        session.send("Hi", images=[models.parent / "a.png"])
    session.vision = load_vision(models)
    with pytest.raises(ValueError, match="no such image file"):
        session.send("Hi", images=[tmp_path / "nope.png"])
    assert session.messages == []


def test_a_different_image_of_the_same_size_is_not_taken_from_the_cache(models):
    """Two images of one size give the same token ids. A conversation whose first image is replaced (a history
    rewrite) must not reuse the old image's K/V: the session matches the cache on image identities, not ids."""
    target, tokenizer, vision = load_target(models), load_tokenizer(models), load_vision(models)
    a, c = models.parent / "a.png", models.parent / "c.png"
    PIL.fromarray(np.random.default_rng(5).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(c)
    session = Session(target, tokenizer=tokenizer, template=TEMPLATE, vision=vision, max_new_tokens=6)
    first = session.send("Hello world", images=[a])
    session.messages[0]["content"][0] = {"type": "image", "path": str(c)}  # the same size, other pixels
    second = session.send("The quick brown fox")
    replaced = [{"type": "image", "path": str(c)}, {"type": "text", "text": "Hello world"}]
    history = [{"role": "user", "content": replaced},
               {"role": "assistant", "content": first.text}, {"role": "user", "content": "The quick brown fox"}]
    _, _, want = library(models, history, n=6)
    assert second.tokens == want
    assert second.prompt_tokens_reused < first.prompt_ids.index(target.config.image_token_id)
