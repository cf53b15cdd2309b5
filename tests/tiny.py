"""Tiny random Gemma 4 checkpoints built with transformers (the oracle), for every test.

Norm weights, `layer_scalar`, the router scales and the drafter's token ordering are randomized on purpose:
transformers initialises them to ones, zeros or the identity, and a model with those values hides bugs such as
using `1 + w` instead of `w`, a missing layer_scalar, or a wrong cluster lookup.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

S, F = "sliding_attention", "full_attention"

E2B_LIKE = dict(  # PLE, KV sharing (store/reuse), double-wide MLP on reuse layers, softcap
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=1, head_dim=16, global_head_dim=32, layer_types=[S] * 3 + [F] + [S] * 3 + [F],
    sliding_window=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512, num_kv_shared_layers=3,
    use_double_wide_mlp=True, final_logit_softcapping=30.0, attention_k_eq_v=False, enable_moe_block=False)
E4B_LIKE = dict(E2B_LIKE, num_key_value_heads=2, num_hidden_layers=7, layer_types=[S] * 4 + [F] + [S] + [F],
                num_kv_shared_layers=2, use_double_wide_mlp=False)
DENSE31B_LIKE = dict(  # k_eq_v on full layers, 1 global KV head, global_head_dim, no PLE, no KV sharing
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=1,
    layer_types=[S, S, F] * 2, sliding_window=8, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
    num_kv_shared_layers=0, final_logit_softcapping=30.0)
MOE_LIKE = dict(DENSE31B_LIKE, intermediate_size=96, enable_moe_block=True, num_experts=8, top_k_experts=2,
                moe_intermediate_size=32)

TARGET_CONFIGS = {
    "e2b": E2B_LIKE,
    "e4b": E4B_LIKE,
    "31b": DENSE31B_LIKE,
    "moe": MOE_LIKE,
    "31b_kvshare": dict(DENSE31B_LIKE, num_kv_shared_layers=2, use_double_wide_mlp=True,
                        hidden_size_per_layer_input=8, vocab_size_per_layer_input=512),
    "moe_kvshare": dict(MOE_LIKE, num_kv_shared_layers=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512),
}

_DRAFTER_TEXT = dict(model_type="gemma4_text", vocab_size=512, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=4, num_attention_heads=2, head_dim=16, global_head_dim=32, sliding_window=8,
                     hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
DRAFTER_CONFIGS = {
    "e2b": dict(backbone_hidden_size=64, use_ordered_embeddings=False, text_config=dict(
        _DRAFTER_TEXT, num_key_value_heads=1, layer_types=[S] * 3 + [F],
        final_logit_softcapping=30.0)),  # present on purpose: the drafter must ignore it
    "e4b": dict(backbone_hidden_size=64, use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4,
                text_config=dict(_DRAFTER_TEXT, num_key_value_heads=2, layer_types=[S] * 3 + [F])),
    "ordered": dict(backbone_hidden_size=64, use_ordered_embeddings=True, num_centroids=16,
                    centroid_intermediate_top_k=4, text_config=dict(
                        _DRAFTER_TEXT, num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1,
                        layer_types=[S, F] * 2)),
}
PAIRS = {"e2b": "e2b", "e4b": "e4b", "31b": "ordered", "moe": "ordered", "31b_kvshare": "ordered",
         "moe_kvshare": "ordered"}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every weight from a seeded generator: matrices ~ N(0, 0.05), norms ~ N(1, 0.3), scalars ~ U(0.5, 1.5),
    token_ordering a random permutation."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("router.scale"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + 1.0)
        elif name.endswith("per_expert_scale"):
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
        elif name.endswith("token_ordering"):
            b.copy_(torch.randperm(b.numel(), generator=gen))


def _text_config(family: str, **overrides):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**{**TARGET_CONFIGS[family], **overrides})


def build_target(family: str, seed: int = 0, **overrides):
    """A randomized transformers Gemma4ForCausalLM (fp32, eager attention, eval mode)."""
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(_text_config(family, **overrides)).eval()
    randomize(model, seed)
    return model


def build_multimodal_target(family: str, seed: int = 0):
    """The same text model inside Gemma4ForConditionalGeneration: weights under `model.language_model.`."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma4Config(text_config=_text_config(family).to_dict(), vision_config=None, audio_config=None)
    model = Gemma4ForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    return model


def build_drafter(kind: str, seed: int = 1, num_assistant_tokens: int = 4, **overrides):
    """A randomized transformers Gemma4AssistantForCausalLM with num_assistant_tokens set (spec §6.2)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(**{**DRAFTER_CONFIGS[kind], **overrides})).eval()
    randomize(model, seed)
    model.generation_config.num_assistant_tokens = num_assistant_tokens
    return model


def save(model, folder, *, max_shard_size=None, eos_token_id=(1,)) -> Path:
    """save_pretrained (safetensors; sharded with max_shard_size) plus a generation_config.json with stop ids."""
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen["eos_token_id"] = list(eos_token_id)
    num = getattr(model.generation_config, "num_assistant_tokens", None)
    if num is not None:
        gen["num_assistant_tokens"] = num
    gen_path.write_text(json.dumps(gen, indent=2))
    return folder
