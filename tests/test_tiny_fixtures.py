"""The tiny transformers checkpoints that every other test uses (tests/tiny.py) are what they claim to be.

Oracles: transformers itself. A saved checkpoint reloads to bit-identical logits; the randomization survives the
round trip; the multimodal wrapper and the sharded save hold the same model; and transformers' own assisted
generation with each drafter equals its plain greedy generation.
"""

import functools
import json

import pytest
import torch
from safetensors import safe_open

from tests import tiny

FAMILIES = list(tiny.TARGET_CONFIGS)


def _ids(n, seed=0):
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    """saved_target(family) -> (model, folder it was saved to), built once per module."""

    @functools.cache
    def make(family):
        model = tiny.build_target(family, seed=0)
        return model, tiny.save(model, tmp_path_factory.mktemp(family))

    return make


def _realigned(model):
    """Copy every tensor out of the safetensors mmap. The loaded tensors can sit at addresses that are not 64-byte
    aligned, and the CPU matmul kernels then round differently (up to ~2e-7 on the moe logits); bit-identical
    weights give bit-identical logits only once the memory layout matches too."""
    for p in model.parameters():
        p.data = p.data.clone()
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            setattr(module, name, b.clone())
    return model


def _keys(folder):
    keys = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_target_reloads_to_identical_logits_with_randomized_norms_and_scalars(family, saved_target):
    from transformers import Gemma4ForCausalLM

    model, folder = saved_target(family)
    loaded = _realigned(Gemma4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval())
    ids = _ids(20)  # 20 tokens, sliding_window 8: the window is crossed
    with torch.no_grad():
        want = model(ids).logits
        got = loaded(ids).logits
        prefix = loaded(ids[:, :12]).logits
    assert torch.equal(got, want) and torch.isfinite(got).all()
    torch.testing.assert_close(prefix, got[:, :12], atol=1e-5, rtol=0)  # causal: the future does not leak back
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma4_text"
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [1]

    layer = loaded.model.layers[0]
    for norm in (loaded.model.norm.weight, layer.input_layernorm.weight, layer.self_attn.q_norm.weight):
        assert (norm - 1).abs().max() > 0.1
    scalars = torch.cat([lyr.layer_scalar for lyr in loaded.model.layers])
    assert ((scalars - 1).abs() > 1e-3).all() and scalars.unique().numel() == len(scalars)
    if tiny.TARGET_CONFIGS[family].get("enable_moe_block"):
        assert (layer.router.scale - 1).abs().max() > 0.1
        assert (layer.router.per_expert_scale - 1).abs().max() > 0.1
    assert "lm_head.weight" not in _keys(folder)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], atol=0, rtol=0, msg=name)


def test_randomize_is_a_function_of_the_seed():
    a, b, c = tiny.build_target("moe", seed=3), tiny.build_target("moe", seed=3), tiny.build_target("moe", seed=4)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.model.norm.weight, c.model.norm.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_multimodal_checkpoint_holds_the_same_text_model_under_language_model(tmp_path, saved_target):
    from transformers import Gemma4ForConditionalGeneration

    causal, causal_dir = saved_target("e2b")
    folder = tiny.save(tiny.build_multimodal_target("e2b", seed=0), tmp_path)
    keys = _keys(folder)
    assert all(k.startswith("model.language_model.") for k in keys) and "lm_head.weight" not in keys
    assert {k.replace("model.language_model.", "model.", 1) for k in keys} == _keys(causal_dir)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma4"
    loaded = _realigned(Gemma4ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval())
    ids = _ids(20, 1)
    with torch.no_grad():  # same parameter order, same seed: the same weights as the causal LM
        assert torch.equal(loaded(input_ids=ids).logits, causal(ids).logits)


def test_sharded_save_has_an_index_and_reloads_identically(tmp_path, saved_target):
    from transformers import Gemma4ForCausalLM

    model, _ = saved_target("moe_kvshare")
    folder = tiny.save(model, tmp_path, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    loaded = _realigned(Gemma4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval())
    ids = _ids(20, 2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", list(tiny.DRAFTER_CONFIGS))
def test_drafter_reloads_with_its_token_ordering_tie_and_draft_length(kind, tmp_path, saved_target):
    from transformers import Gemma4AssistantForCausalLM

    drafter = tiny.build_drafter(kind, seed=1, num_assistant_tokens=5)
    folder = tiny.save(drafter, tmp_path)
    loaded = _realigned(Gemma4AssistantForCausalLM.from_pretrained(folder, attn_implementation="eager").eval())
    assert json.loads((folder / "generation_config.json").read_text())["num_assistant_tokens"] == 5
    assert loaded.generation_config.num_assistant_tokens == 5
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert (loaded.model.norm.weight - 1).abs().max() > 0.1
    if drafter.config.use_ordered_embeddings:
        order = loaded.masked_embedding.token_ordering
        assert torch.equal(order, drafter.masked_embedding.token_ordering)
        assert torch.equal(order.sort().values, torch.arange(512)) and not torch.equal(order, torch.arange(512))

    family = next(f for f, k in tiny.PAIRS.items() if k == kind)
    target, _ = saved_target(family)
    ids = _ids(12, 3)
    with torch.no_grad():  # one draft step at p = 11 over the target's K/V of positions 0..10
        out = target(ids[:, :-1], return_shared_kv_states=True, output_hidden_states=True)
        embeds = torch.cat([target.get_input_embeddings()(ids[:, -1:]), out.hidden_states[-1][:, -1:]], -1)
        args = dict(inputs_embeds=embeds, position_ids=torch.tensor([[11]]), shared_kv_states=out.shared_kv_states)
        want, got = drafter(**args), loaded(**args)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.last_hidden_state, want.last_hidden_state)


@pytest.mark.parametrize("family", ["e2b", "e4b", "31b", "moe_kvshare"])
def test_transformers_assisted_greedy_equals_plain_greedy(family):
    target, drafter = tiny.build_target(family, seed=0), tiny.build_drafter(tiny.PAIRS[family], seed=1)
    ids = _ids(6, 4)
    with torch.no_grad():
        plain = target.generate(ids, max_new_tokens=10, do_sample=False)
        assisted = target.generate(ids, assistant_model=drafter, max_new_tokens=10, do_sample=False)
    assert torch.equal(assisted, plain)


def test_bias_vocab_gives_a_mix_of_accepted_and_rejected_drafts():
    """Without the bias, random models almost never agree; with it, some rounds accept drafts and some reject."""
    target, drafter = tiny.build_target("31b", seed=0), tiny.build_drafter("ordered", seed=1)
    tiny.bias_vocab(target, drafter, [10], amount=0.3)
    calls = []
    target.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = _ids(6, 0)
    with torch.no_grad():
        plain = target.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None)
        calls.clear()
        assisted = target.generate(ids, assistant_model=drafter, max_new_tokens=30, do_sample=False,
                                   eos_token_id=None)
    assert torch.equal(assisted, plain)
    assert 0.2 < (plain[0, 6:] == 10).float().mean() < 0.9  # the favoured token is common, not the only one
    assert 30 // 5 < len(calls) < 30  # 30 target forwards: nothing accepted; 30 / (k+1): everything accepted
