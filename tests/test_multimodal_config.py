"""Multimodal (`gemma4`, Gemma4ForConditionalGeneration) configs: the fields transformers reads from the top level.

transformers ties the output head by the top-level `tie_word_embeddings` (default true; `text_config`'s is never
read for that), and without generation_config.json its generation config takes the top-level `eos_token_id` /
`bos_token_id` first, `text_config`'s after. The math itself comes from `text_config`. Every case is checked
against transformers loading the same folder.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gemma4 import Gemma4Config
from speculative.options import stop_tokens
from tests import tiny
from weights import load_target

TEXT = {"model_type": "gemma4_text", **tiny.E2B_LIKE}


def _ids():
    return torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(11))


def _multimodal(tmp_path: Path, *, top_tie: bool, text_tie: bool, seed: int = 3) -> Path:
    """A saved tiny Gemma4ForConditionalGeneration (keys under model.language_model.) with the two tie flags."""
    from transformers import Gemma4Config as HFConfig, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    text = tiny._text_config("e2b", tie_word_embeddings=text_tie).to_dict()
    config = HFConfig(text_config=text, vision_config=None, audio_config=None, tie_word_embeddings=top_tie)
    model = Gemma4ForConditionalGeneration(config).eval()
    tiny.randomize(model, seed)
    return tiny.save(model, tmp_path / f"mm-top{top_tie}-text{text_tie}")


def _edit_config(folder: Path, edit) -> None:
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)
    (folder / "config.json").write_text(json.dumps(raw))


def _keys(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def _transformers_logits(folder: Path, cls_name="Gemma4ForConditionalGeneration"):
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits, model


def test_top_level_untied_head_is_loaded_untied(tmp_path):
    """Top level false, text_config true (its default), lm_head.weight stored: the head is used, not the table."""
    folder = _multimodal(tmp_path, top_tie=False, text_tie=True)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["tie_word_embeddings"] is False and raw["text_config"]["tie_word_embeddings"] is True
    assert "lm_head.weight" in _keys(folder)
    ref, hf = _transformers_logits(folder)
    assert not torch.equal(hf.lm_head.weight, hf.get_input_embeddings().weight)
    ours = load_target(folder)
    assert ours.config.tie_word_embeddings is False
    with torch.no_grad():
        out = ours(_ids()).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert ours.config.final_logit_softcapping == 30.0
    with torch.no_grad():  # the comparison is not vacuous: the tied head (softcapped as the model does) differs
        tied = torch.tanh(ours(_ids()).hidden_states @ ours.embed_tokens.weight.T / 30.0) * 30.0
    assert (tied - ref).abs().max() > 0.1


def test_top_level_tied_head_is_tied_even_when_text_config_says_untied(tmp_path):
    folder = _multimodal(tmp_path, top_tie=True, text_tie=False)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["tie_word_embeddings"] is True and raw["text_config"]["tie_word_embeddings"] is False
    assert "lm_head.weight" not in _keys(folder)
    ref, _ = _transformers_logits(folder)
    ours = load_target(folder)  # refused as "missing tensor 'lm_head.weight'" when text_config decided
    assert ours.config.tie_word_embeddings is True
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref, atol=1e-4, rtol=0)


def test_absent_top_level_tie_defaults_to_tied(tmp_path):
    folder = _multimodal(tmp_path, top_tie=True, text_tie=False)
    _edit_config(folder, lambda raw: raw.pop("tie_word_embeddings"))
    ref, hf = _transformers_logits(folder)
    assert hf.config.tie_word_embeddings is True
    ours = load_target(folder)
    assert ours.config.tie_word_embeddings is True
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["multimodal", "text-only"])
def test_tied_config_with_a_different_stored_head_loads_it_untied_with_a_warning(layout, tmp_path):
    """transformers ties only when lm_head.weight is absent or equal to the table; otherwise it warns and keeps
    the stored head. Ignoring the head would silently change every logit."""
    if layout == "multimodal":
        folder, cls_name = _multimodal(tmp_path, top_tie=False, text_tie=False), "Gemma4ForConditionalGeneration"
    else:
        folder = tiny.save(tiny.build_target("e2b", seed=4, tie_word_embeddings=False), tmp_path / "text")
        cls_name = "Gemma4ForCausalLM"
    assert "lm_head.weight" in _keys(folder)
    _edit_config(folder, lambda raw: raw.update(tie_word_embeddings=True))
    ref, hf = _transformers_logits(folder, cls_name)
    assert not torch.equal(hf.lm_head.weight, hf.get_input_embeddings().weight)  # transformers did not tie
    with pytest.warns(UserWarning, match="holds a different 'lm_head.weight'; loading it untied"):
        ours = load_target(folder)
    assert ours.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("top", [
    {}, {"tie_word_embeddings": False}, {"tie_word_embeddings": True}, {"eos_token_id": [1, 106]},
    {"eos_token_id": None, "bos_token_id": 5}, {"eos_token_id": 7, "pad_token_id": 3},
])
@pytest.mark.parametrize("text_tie", [True, False])
def test_top_level_precedence_matches_transformers(top, text_tie):
    """Our parsed fields equal what transformers uses: the model's tie flag, the generation config's eos/bos (as
    GenerationConfig.from_model_config builds it with no generation_config.json), text_config's pad."""
    from transformers import Gemma4Config as HFConfig, GenerationConfig

    raw = {"model_type": "gemma4", **top,
           "text_config": {**TEXT, "tie_word_embeddings": text_tie, "eos_token_id": 1, "bos_token_id": 2}}
    ours, theirs = Gemma4Config.from_dict(json.loads(json.dumps(raw))), HFConfig.from_dict(raw)
    generation = GenerationConfig.from_model_config(theirs)
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.eos_token_id == generation.eos_token_id
    assert ours.bos_token_id == generation.bos_token_id
    assert ours.pad_token_id == theirs.text_config.pad_token_id


def test_stop_tokens_fall_back_to_the_top_level_eos_list(tmp_path):
    """No generation_config.json: the released configs' top-level eos_token_id [1, 106] (end of turn included), not
    text_config's single 1; transformers' generation config says the same."""
    from transformers import AutoConfig, GenerationConfig

    folder = _multimodal(tmp_path, top_tie=True, text_tie=True)
    (folder / "generation_config.json").unlink()
    _edit_config(folder, lambda raw: (raw.update(eos_token_id=[1, 106]), raw["text_config"].update(eos_token_id=1)))
    expected = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder)).eos_token_id
    assert expected == [1, 106]
    ours = load_target(folder)
    assert ours.generation_config == {}
    assert stop_tokens(ours, None) == frozenset(expected)
    assert stop_tokens(ours, [9]) == {9}  # the caller's choice still wins

    _edit_config(folder, lambda raw: raw.pop("eos_token_id"))  # no top-level list: text_config's value
    assert stop_tokens(load_target(folder), None) == {1}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 50]}))
    assert stop_tokens(load_target(folder), None) == {1, 50}  # generation_config.json first, as transformers
