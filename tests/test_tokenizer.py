"""Tokenizer and chat template against their oracles: transformers (tokenizer.json, apply_chat_template), sentencepiece
itself (tokenizer.model, which transformers 5 can only convert with protobuf installed), and closed-form strings.

Everything is built in the test: a Gemma-style tokenizer.json (BPE trained on a few sentences, byte fallback, "▁" for
spaces, Gemma's special ids), a SentencePiece BPE model, and a Gemma-4-style chat template.
"""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weights.chat_template import ChatTemplateError, load_chat_template, render_chat
from weights.files import CheckpointError
from weights.tokenizer import load_tokenizer

CORPUS = [
    "Hello world, this is a tiny Gemma style tokenizer.",
    "The quick brown fox jumps over the lazy dog.\n",
    "Speculative decoding drafts tokens and the target verifies them.",
    "    indented code\n\tand tabs\n\n",
    "Café déjà vu, naïve façade.",
    "日本語のテキスト",
]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]  # ids 0..5: Gemma's pad 0, eos 1, bos 2
TEXTS = [
    "Hello world",
    "",
    " leading and trailing ",
    "runs  of   spaces\n\n\nand\ttabs \t\n",
    "Café déjà vu; ÅNGSTRÖM ñ",
    "日本語 and 漢字 and 한국어",
    "emoji 😀🎉 and a flag 🇫🇷 and ZWJ 👩‍💻",
    "<|turn>user\nHello<turn|>\n<|turn>model\n",
    "x<bos>y<eos>z<pad>",
    "not a special: <|turn <turn| <0x41>",
    "unknown to the vocab: Ωμέγα ∑ \x00 \x7f \u200b",
]

# Whitespace control mixes "-" markers with plain tags that rely on trim_blocks / lstrip_blocks, as real templates do.
GEMMA4_TEMPLATE = """{{ bos_token }}
{%- if tools -%}
<|turn>system
You can call these tools: {{ tools | tojson }}<turn|>
{% endif -%}
{%- for message in messages -%}
{%- if message['role'] not in ['system', 'user', 'assistant'] -%}
{{ raise_exception("Unknown role '" + message['role'] + "': use system, user or assistant") }}
{%- endif -%}
    {% if message['role'] == 'system' and not loop.first %}
        {{- raise_exception('A system message may only come first') -}}
    {% endif %}
{%- if message['content'] == '' -%}{% continue %}{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
<|turn>{{ role }}
    {% if message['content'] is string -%}
{{ message['content'] | trim }}
{%- else -%}
{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endfor -%}
{%- endif -%}
<turn|>
{% endfor -%}
{% if add_generation_prompt %}
<|turn>model
{% endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2? "}],
    [
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello! 日本語"},
        {"role": "user", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "Tell me <more>."}, {"type": "image"}]},
    ],
]


def _train_tokenizer_json(folder):
    """A Gemma-style tokenizer.json: BPE, byte_fallback with <0x00>..<0xFF> in the model vocab, "▁" for spaces,
    no splitting (whitespace runs and newlines are ordinary text), BOS added by the post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # as GemmaTokenizer: a no-op
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "eos_token": {"__type": "AddedToken", "content": "<eos>", "special": True},  # the dict form old repos use
        "add_bos_token": True, "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = _train_tokenizer_json(tmp_path_factory.mktemp("tok-json"))
    (folder / "chat_template.jinja").write_text(GEMMA4_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def pair(hf_folder):
    """(transformers tokenizer, ours), loaded from the same folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_folder), load_tokenizer(hf_folder)


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    """A SentencePiece BPE model in Gemma's style: byte fallback, no dummy prefix, whitespace kept as is."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("tok-sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<|turn>", "<turn|>"],
        hard_vocab_limit=False, minloglevel=2,
    )
    return folder


# --- tokenizer.json against transformers ---------------------------------------------------------------------------


def test_special_ids_and_vocab(pair):
    hf, ours = pair
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 1, 0)
    assert ours.token_to_id("<|turn>") == hf.convert_tokens_to_ids("<|turn>") == 4
    assert ours.token_to_id("<0xF0>") == hf.convert_tokens_to_ids("<0xF0>")
    assert ours.token_to_id("no such token") is None
    assert ours.vocab_size == len(hf.get_vocab()) - ("<mask>" in hf.get_vocab())  # transformers adds a <mask>


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    hf, ours = pair
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_bos=True) == hf.encode(text) == [2] + ours.encode(text)
    ids = ours.encode(text, add_bos=True)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids[1:]) == text  # lossless: byte fallback covers every character


def test_specials_in_text_are_single_ids(pair):
    _, ours = pair
    assert ours.encode("<|turn>user\nHi<turn|>")[0] == 4 and ours.encode("<|turn>user\nHi<turn|>")[-1] == 5
    assert ours.decode(ours.encode("<bos>Hi<eos>"), skip_special_tokens=True) == "Hi"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([*"ab \u2060\n\téà日本😀", "<|turn>", "<eos>", "the ", "😀🎉"]), max_size=30))
def test_encode_matches_transformers_on_random_text(pair, pieces):
    hf, ours = pair
    text = "".join(pieces)
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text


# --- streaming -------------------------------------------------------------------------------------------------------


def _stream(tokenizer, ids):
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.flush()


def test_stream_holds_back_a_split_emoji(pair):
    hf, ours = pair
    text = "Hi 😀 日本 Ωx"
    ids = ours.encode(text)
    n = len(ours.encode("Hi "))
    assert hf.convert_ids_to_tokens(ids[n : n + 4]) == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # 1 char, 4 tokens
    pieces, rest = _stream(ours, ids)
    assert "".join(pieces) + rest == hf.decode(ids) == text
    assert rest == "" and not any("\ufffd" in p for p in pieces)
    assert pieces[n : n + 4] == ["", "", "", "😀"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(pair, text):
    hf, ours = pair
    ids = ours.encode(text, add_bos=True)
    pieces, rest = _stream(ours, ids)
    assert "".join(pieces) + rest == hf.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_flush_emits_an_incomplete_tail(pair):
    _, ours = pair
    ids = ours.encode("ok 😀")[:-1]  # the emoji's last byte never arrives
    pieces, rest = _stream(ours, ids)
    assert "".join(pieces) == "ok " and rest == ours.decode(ids)[len("ok ") :] and rest.endswith("\ufffd")


# --- tokenizer.model via sentencepiece -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_matches_sentencepiece(sp_folder, text):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    ours = load_tokenizer(sp_folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (2, 1, 0, sp.get_piece_size())
    ids = ours.encode(text, add_bos=True)
    # sentencepiece never matches control pieces inside text; ours does (as transformers): split, encode each part
    parts = re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text)
    expected = [2] + [i for k, part in enumerate(parts) for i in ([sp.piece_to_id(part)] if k % 2 else sp.encode(part))]
    assert ids == expected
    plain = "".join(parts[::2])
    assert ours.decode(ids, skip_special_tokens=True) == sp.decode(ids) == plain
    assert ours.decode(ids) == "<bos>" + text
    pieces, rest = _stream(ours, ids)
    assert "".join(pieces) + rest == "<bos>" + text and not any("\ufffd" in p for p in pieces)


def test_tokenizer_json_preferred_over_tokenizer_model(hf_folder, sp_folder, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    (tmp_path / "tokenizer.model").write_bytes((sp_folder / "tokenizer.model").read_bytes())
    assert load_tokenizer(tmp_path).encode("Hello world") == load_tokenizer(hf_folder).encode("Hello world")


# --- special ids from config files and error paths -------------------------------------------------------------------


def test_special_ids_from_config_json(hf_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"bos_token_id": 2, "eos_token_id": [1, 5]}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 1]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 5, None)  # generation_config before text_config; no pad
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    (tmp_path / "generation_config.json").unlink()
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (None, 1)
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", add_bos=True)


def test_empty_folder_names_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.json" in str(e.value) and "tokenizer.model" in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"])
def test_malformed_file_is_named(hf_folder, tmp_path, name):
    if name == "tokenizer_config.json":
        (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    (tmp_path / name).write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(CheckpointError, match=str(tmp_path / name).replace("\\", "\\\\")):
        load_tokenizer(tmp_path)


# --- chat template -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_transformers(pair, hf_folder, messages, add_generation_prompt):
    hf, ours = pair
    template = load_chat_template(hf_folder)
    assert template == GEMMA4_TEMPLATE
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render_chat(template, messages, add_generation_prompt=add_generation_prompt) == expected
    ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ours.encode(expected) == list(ids)


def test_template_renders_gemma4_turns_and_tools_like_transformers(pair):
    hf, _ = pair
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert render_chat(GEMMA4_TEMPLATE, messages) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n"
    )
    tools = [{"type": "function", "function": {"name": "add", "description": "a <b> & 'c' é"}}]
    ours = render_chat(GEMMA4_TEMPLATE, messages, tools=tools)
    assert ours == hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "a <b> & 'c' é" in ours  # tojson neither HTML-escapes nor ASCII-escapes


def test_default_format_without_template():
    assert render_chat(None, [{"role": "user", "content": "Hello"}]) == (  # more in test_chat_template.py
        "<bos><|turn>user\nHello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    messages = [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}
    ]
    assert render_chat(None, messages, add_generation_prompt=False) == (
        "<bos><|turn>system\nS<turn|>\n<|turn>user\nU<turn|>\n<|turn>model\nA<turn|>\n"
    )


def test_generation_tag_and_other_globals_like_transformers(pair):
    hf, _ = pair
    template = (
        "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
        "{{ strftime_now('%Y') }}{{ dict(a=1) | tojson }}{{ dict.fromkeys(['k']) | tojson(indent=1) }}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "extra": None}]
    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert render_chat(template, messages) == expected
    assert expected.startswith("[a][b]")


def test_load_chat_template_sources(tmp_path):
    assert load_chat_template(tmp_path) is None
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}"}))
    assert load_chat_template(tmp_path) == "{{ bos_token }}"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"


def test_template_raise_exception_message(pair):
    hf, _ = pair
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="Unknown role 'tool': use system, user or assistant"):
        render_chat(GEMMA4_TEMPLATE, bad)
    with pytest.raises(Exception, match="Unknown role 'tool'"):  # transformers refuses the same conversation
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="raised an error: x"):
        render_chat("{{ raise_exception('x') }}", [])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__ }}",  # one level: plain jinja would print "" here; we refuse
        "{{ ''.__class__ }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
        "{{ namespace(_private=1) }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{{ messages[0]['__class__'] }}",
    ],
)
def test_hostile_templates_are_refused(template):
    with pytest.raises(ChatTemplateError, match="unsafe operation"):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_template_failures_become_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="'os' is undefined"):
        render_chat("{{ os.system('ls') }}", [])
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        render_chat("{% for m in messages %}{{ m }}", [])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat("{% include 'x' %", [])
    with pytest.raises(ChatTemplateError, match="no loader"):  # templates cannot read files
        render_chat("{% include '/etc/passwd' %}", [])
    with pytest.raises(ChatTemplateError, match="has no attribute 'mro'"):  # `dict` is not the real type
        render_chat("{{ dict.mro() }}", [])
    assert issubclass(ChatTemplateError, ValueError)
