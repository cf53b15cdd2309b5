"""Prompts with images: the target's logits against transformers' Gemma4ForConditionalGeneration, and the
speculative loop over them.

Oracles: transformers 5.24 given the same ids, pixel values (padded to the budget, positions (-1, -1), as its
processor gives them) and mm_token_type_ids (its processor's: 1 on image tokens); transformers' greedy `generate`
with the same inputs; our target-only output. Tiny multimodal checkpoints (tests/tiny.py VISION_FAMILIES): the
E2B-like one is causal everywhere (use_bidirectional_attention unset, as the released E2B/E4B), the 31B-like one
lets sliding layers see a whole image ("vision"). The prompt's second image has 9 soft tokens, more than the
sliding window of 8: the window still bounds what an image token sees.
"""

from __future__ import annotations

import functools

import pytest
import torch

from speculative import generate, generate_batch
from tests import tiny
from tests.test_vision import padded
from weights import load_drafter, load_target, load_vision

pytestmark = pytest.mark.usefixtures("row_invariant_float32")  # tests/conftest.py

IMAGE, BOI, EOI = (tiny.IMAGE_TOKENS[f"{name}_token_id"] for name in ("image", "boi", "eoi"))
GRIDS = [(6, 9), (9, 9)]  # 6 and 9 soft tokens


def image_prompt(grids=GRIDS, text=(10, 11, 12)):
    """ids with one image block per grid between text tokens, the patches, and transformers' inputs."""
    gen = torch.Generator().manual_seed(sum(a * b for a, b in grids))
    patches = [torch.rand(a * b, 48, generator=gen) for a, b in grids]
    ids = [2, *text]
    for a, b in grids:
        ids += [BOI] + [IMAGE] * (a * b // 9) + [EOI, 13, 14]
    ids += [20, 21]
    pixel_values = torch.cat([padded(p, a, b)[0] for p, (a, b) in zip(patches, grids)])
    positions = torch.cat([padded(p, a, b)[1] for p, (a, b) in zip(patches, grids)])
    return ids, patches, dict(pixel_values=pixel_values, image_position_ids=positions,
                              mm_token_type_ids=(torch.tensor([ids]) == IMAGE).long())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """folders(family) -> folder with target/ (multimodal) and drafter/, biased so that drafts are often accepted."""

    @functools.cache
    def make(family: str):
        target = tiny.build_vision_target(family, seed=0)
        drafter = tiny.build_drafter(tiny.PAIRS[family], seed=1)
        tiny.bias_vocab(target, drafter, [10, 11, 12], amount=0.3)
        folder = tmp_path_factory.mktemp(f"images-{family}")
        tiny.save(target, folder / "target", eos_token_id=())
        tiny.save(drafter, folder / "drafter", eos_token_id=())
        return folder

    return make


@functools.cache
def transformers_model(folder):
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def features(vision, patches, grids=GRIDS):
    with torch.no_grad():
        return torch.cat([vision(p, g) for p, g in zip(patches, grids)])


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_logits_match_transformers(family, folders):
    folder = folders(family) / "target"
    ids, patches, extra = image_prompt()
    with torch.no_grad():
        ref = transformers_model(folder)(input_ids=torch.tensor([ids]), **extra).logits
    target, vision = load_target(folder), load_vision(folder)
    embeds = features(vision, patches)
    with torch.no_grad():
        whole = target(torch.tensor([ids]), image_features=embeds).logits
        cached = target(torch.tensor([ids]), target.new_cache(max_length=64), image_features=embeds).logits
        target.config.use_bidirectional_attention = None if family == "31b" else "vision"  # the other mask
        other = target(torch.tensor([ids]), image_features=embeds).logits
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached, ref, atol=1e-4, rtol=0)
    assert (other - ref).abs().max() > 1e-2  # the comparison sees the mask over image blocks


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_generic_path_logits_match_transformers(family, folders):
    """The code a CUDA device runs (gemma4/generic.py, here on the CPU): its prefill masks are `Causal`
    descriptions, except a sliding layer's over an image block, which is a tensor."""
    from gemma4.generic import generic_path

    folder = folders(family) / "target"
    ids, patches, extra = image_prompt()
    with torch.no_grad():
        ref = transformers_model(folder)(input_ids=torch.tensor([ids]), **extra).logits
    target, vision = load_target(folder), load_vision(folder)
    with torch.no_grad(), generic_path():
        logits = target(torch.tensor([ids]), target.new_cache(max_length=64), image_features=features(vision, patches))
    torch.testing.assert_close(logits.logits, ref, atol=1e-4, rtol=0)


def hf_greedy(folder, ids, extra, n):
    with torch.no_grad():
        out = transformers_model(folder).generate(input_ids=torch.tensor([ids]), **extra, max_new_tokens=n,
                                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_greedy_speculative_equals_target_only_and_transformers(family, folders):
    folder = folders(family)
    ids, patches, extra = image_prompt()
    target = load_target(folder / "target")
    drafter = load_drafter(folder / "drafter", target=target)
    embeds = features(load_vision(folder / "target"), patches)
    plain = generate(target, None, ids, max_new_tokens=24, image_features=embeds, stop_token_ids=[])
    # a constant N: random weights accept little, so `auto` (the default) may rightly stop drafting
    spec = generate(target, drafter, ids, max_new_tokens=24, image_features=embeds, stop_token_ids=[],
                    num_draft_tokens=4, schedule="constant")
    assert spec.tokens == plain.tokens == hf_greedy(folder / "target", ids, extra, 24)
    accepted = sum(n for _, n in spec.stats.rounds)
    assert 0 < accepted < sum(k for k, _ in spec.stats.rounds)  # drafts both accepted and rejected


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_bfloat16_speculative_equals_target_only(family, folders):
    folder = folders(family)
    ids, patches, _ = image_prompt()
    target = load_target(folder / "target", dtype="bfloat16")
    drafter = load_drafter(folder / "drafter", target=target, dtype="bfloat16")
    embeds = features(load_vision(folder / "target", dtype="bfloat16"), patches)
    assert embeds.dtype == torch.bfloat16
    plain = generate(target, None, ids, max_new_tokens=24, image_features=embeds, stop_token_ids=[])
    spec = generate(target, drafter, ids, max_new_tokens=24, image_features=embeds, stop_token_ids=[],
                    num_draft_tokens=4)
    assert spec.tokens == plain.tokens


def test_batch_of_image_and_text_prompts_equals_single_runs(folders):
    folder = folders("31b")
    target = load_target(folder / "target")
    drafter = load_drafter(folder / "drafter", target=target)
    vision = load_vision(folder / "target")
    one, patches_one, _ = image_prompt(GRIDS[:1], text=(30, 31))
    two, patches_two, _ = image_prompt(GRIDS, text=(10,))
    text = [2, 40, 41, 42, 43, 44, 45]
    prompts = [one, text, two]
    embeds = [features(vision, patches_one, GRIDS[:1]), None, features(vision, patches_two)]
    batch = generate_batch(target, drafter, prompts, max_new_tokens=16, image_features=embeds, stop_token_ids=[],
                           num_draft_tokens=4)
    for prompt, e, result in zip(prompts, embeds, batch):
        assert result.tokens == generate(target, None, prompt, max_new_tokens=16, image_features=e,
                                         stop_token_ids=[]).tokens


def test_image_inputs_are_checked(folders, checkpoint):
    folder = folders("e2b")
    target = load_target(folder / "target")
    ids, patches, _ = image_prompt()
    embeds = features(load_vision(folder / "target"), patches)
    with pytest.raises(ValueError, match="holds 15 image tokens .* but no image embeddings"):
        generate(target, None, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"image embeddings must be \[15, 64\]"):
        generate(target, None, ids, max_new_tokens=2, image_features=embeds[:-1])
    with pytest.raises(ValueError, match=r"prompts\[1\]: image embeddings must be"):
        generate_batch(target, None, [ids, ids], max_new_tokens=2, image_features=[embeds, embeds[:3]])
    with pytest.raises(ValueError, match="takes text only"):
        generate(load_target(checkpoint("e2b")), None, [2, 3], max_new_tokens=2, image_features=embeds[:0])


@pytest.mark.compile
def test_compiled_speculative_over_an_image_prompt_equals_eager(folders):
    """generate(compile=True): the prefill with the images stays eager, the compiled steps follow (minutes on 2
    cores: run with -m compile)."""
    folder = folders("31b")
    ids, patches, _ = image_prompt()
    target = load_target(folder / "target")
    drafter = load_drafter(folder / "drafter", target=target)
    embeds = features(load_vision(folder / "target"), patches)
    eager = generate(target, drafter, ids, max_new_tokens=12, image_features=embeds, stop_token_ids=[],
                     num_draft_tokens=3)
    compiled = generate(target, drafter, ids, max_new_tokens=12, image_features=embeds, stop_token_ids=[],
                        num_draft_tokens=3, compile=True)
    assert compiled.tokens == eager.tokens
