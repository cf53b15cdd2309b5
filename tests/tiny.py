"""Tiny random Gemma 4 checkpoints built with transformers (the oracle), for every test.

The configs cover E2B, 31B and MoE, plus an E4B-like target (PLE, KV sharing, no double-wide MLP, 2 KV heads) and a
drafter for it. The dicts carry no `model_type` (our own `Gemma4Config(**d)` takes them as they are); add
`{"model_type": "gemma4_text", **d}` where a config.json form is needed.

Norm weights, `layer_scalar`, the router scales and the drafter's token ordering are randomized on purpose:
transformers initialises them to ones, zeros or the identity, and a model with those values hides bugs such as
using `1 + w` instead of `w`, a missing layer_scalar, a swapped router scale, or a wrong cluster lookup. Every
other weight is redrawn from a generator seeded with `seed`, so a model is a pure function of (family, seed).
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
# E4B-like: PLE and KV sharing but no double-wide MLP, 2 KV heads. A full layer must precede the shared ones
# (each type needs a "store" layer), hence 7 layers: modes [N, N, N, store(S), store(F), reuse(S), reuse(F)].
E4B_LIKE = dict(E2B_LIKE, num_key_value_heads=2, num_hidden_layers=7, layer_types=[S] * 4 + [F] + [S] + [F],
                num_kv_shared_layers=2, use_double_wide_mlp=False)
DENSE31B_LIKE = dict(  # k_eq_v on full layers, 1 global KV head, global_head_dim, no PLE, no KV sharing
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=1,
    layer_types=[S, S, F] * 2, sliding_window=8, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
    num_kv_shared_layers=0, final_logit_softcapping=30.0)
MOE_LIKE = dict(DENSE31B_LIKE, intermediate_size=96, enable_moe_block=True, num_experts=8, top_k_experts=2,
                moe_intermediate_size=32)
DENSE31B_LIKE_KVSHARE = dict(DENSE31B_LIKE, num_kv_shared_layers=2, use_double_wide_mlp=True,  # k_eq_v on a store
                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=512)
MOE_LIKE_KVSHARE = dict(MOE_LIKE, num_kv_shared_layers=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512)

TARGET_CONFIGS = {"e2b": E2B_LIKE, "e4b": E4B_LIKE, "31b": DENSE31B_LIKE, "moe": MOE_LIKE,
                  "31b_kvshare": DENSE31B_LIKE_KVSHARE, "moe_kvshare": MOE_LIKE_KVSHARE}

_DRAFTER_TEXT = dict(model_type="gemma4_text", vocab_size=512, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=4, num_attention_heads=2, head_dim=16, global_head_dim=32, sliding_window=8,
                     hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
ASSIST_E2B = dict(backbone_hidden_size=64, use_ordered_embeddings=False, text_config=dict(
    _DRAFTER_TEXT, num_key_value_heads=1, layer_types=[S] * 3 + [F],
    final_logit_softcapping=30.0))  # present on purpose: the drafter must ignore it
ASSIST_E4B = dict(backbone_hidden_size=64, use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4,
                  text_config=dict(_DRAFTER_TEXT, num_key_value_heads=2, layer_types=[S] * 3 + [F]))
ASSIST_ORDERED = dict(backbone_hidden_size=64, use_ordered_embeddings=True, num_centroids=16,
                      centroid_intermediate_top_k=4, text_config=dict(  # k_eq_v head counts, as its targets
                          _DRAFTER_TEXT, num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1,
                          layer_types=[S, F] * 2))

DRAFTER_CONFIGS = {"e2b": ASSIST_E2B, "e4b": ASSIST_E4B, "ordered": ASSIST_ORDERED}
PAIRS = {"e2b": "e2b", "e4b": "e4b", "31b": "ordered", "moe": "ordered", "31b_kvshare": "ordered",
         "moe_kvshare": "ordered"}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every weight from a seeded generator: RMSNorm weights and router.scale ~ N(1, 0.3),
    per_expert_scale and layer_scalar ~ U(0.5, 1.5), token_ordering a random permutation, the rest ~ N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules()
             if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None}
    for name, p in model.named_parameters():  # tied weights appear once
        if id(p) in norms or name.endswith("router.scale"):
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


@torch.no_grad()
def bias_vocab(target, drafter, token_ids, amount: float = 0.3, gain: float = 10.0) -> None:
    """Make target and drafter favour `token_ids` under the same conditions, so that greedy drafts are accepted
    part of the time (with random weights they almost never are). Changes both models in place.

    A logit is norm(h)·E[t], and a random norm(h) has no fixed sign along any direction, so adding a constant to
    a few output rows would just add noise. Instead token_ids[c] gets hidden channel c as its "bias channel":
    - target: the final norm weight of channel c is set to `gain`, so norm(h)[c] is a large signal (±gain) that
      depends on the context; E[t, c] += amount gives token t a logit bonus of amount·norm(h)[c]. The other
      channels of norm(h) do not change (RMSNorm divides by the rms of its input, not of its output);
    - drafter: pre_projection row c reads only channel c of the target's hidden state h_prev, its final norm
      weight of channel c is `gain`, post_projection row c copies its channel c into the hidden state passed to
      the next draft, and its own E[t, c] (= its lm_head; with ordered embeddings also the centroid of t's
      cluster) gets the same bonus.
    So both models favour t when the target's channel c was large at the previous position: drafts are accepted
    when that signal persists from one position to the next and rejected when it does not, at the rate the
    context dictates. The target's inputs change slightly too (E is tied): token t's embedding moves by amount.
    """
    H_t = target.get_input_embeddings().weight.shape[1]
    for c, t in enumerate(token_ids):
        target.get_input_embeddings().weight[t, c] += amount
        target.get_decoder().norm.weight[c] = gain
        drafter.pre_projection.weight[c] = 0.0  # [H_a, 2·H_t]: embedding first, then h_prev
        drafter.pre_projection.weight[c, H_t + c] = 1.0
        drafter.post_projection.weight[c] = 0.0  # [H_t, H_a]
        drafter.post_projection.weight[c, c] = 1.0
        drafter.model.norm.weight[c] = gain
        drafter.model.embed_tokens.weight[t, c] += amount  # tied to the drafter's lm_head
        if drafter.config.use_ordered_embeddings:
            head = drafter.masked_embedding
            cluster = (head.token_ordering == t).nonzero().item() // head.vocab_size_per_centroid
            head.centroids.weight[cluster, c] += amount


def _text_config(family: str, **overrides):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**{k: v for k, v in {**TARGET_CONFIGS[family], **overrides}.items() if k != "model_type"})


def build_target(family: str, seed: int = 0, **overrides):
    """A randomized transformers Gemma4ForCausalLM (fp32, eager attention, eval mode); overrides edit the config."""
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    config = _text_config(family, **overrides)
    config._attn_implementation = "eager"
    model = Gemma4ForCausalLM(config).eval()
    randomize(model, seed)
    return model


def build_multimodal_target(family: str, seed: int = 0):
    """The same text model inside Gemma4ForConditionalGeneration: weights under `model.language_model.`."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma4Config(text_config=_text_config(family).to_dict(), vision_config=None, audio_config=None)
    config._attn_implementation = "eager"
    model = Gemma4ForConditionalGeneration(config).eval()
    randomize(model, seed)
    return model


# Vision encoders with each released family's geometry, shrunk: E2B/E4B clip every linear (use_clipped_linears),
# 31B/26B-A4B standardise the pooled features and attend bidirectionally within an image on sliding layers
# (text_config use_bidirectional_attention="vision"). Patches of 4 pixels, pooling 3: a 12 x 12 pixel cell is one
# soft token. Image token ids sit inside the tiny vocabulary.
VISION_E2B_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
                       position_embedding_size=64, use_clipped_linears=True, standardize=False)
VISION_31B_LIKE = dict(VISION_E2B_LIKE, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=12, use_clipped_linears=False, standardize=True)
VISION_FAMILIES = {"e2b": ("e2b", VISION_E2B_LIKE, None), "31b": ("31b", VISION_31B_LIKE, "vision")}
IMAGE_TOKENS = dict(image_token_id=500, boi_token_id=501, eoi_token_id=502, video_token_id=503, audio_token_id=504,
                    boa_token_id=505, eoa_token_id=506)


@torch.no_grad()
def randomize_vision(model, seed: int) -> None:
    """Draw what `randomize` leaves at transformers' neutral values in a vision tower: the clipping bounds (finite
    and tight enough that some inputs and outputs are clamped) and the standardisation bias and scale."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, b in model.named_buffers():
        if name.endswith(("input_min", "input_max")):
            b.fill_((torch.rand((), generator=gen) * 1.5 + 0.5).item() * (1 if name.endswith("max") else -1))
        elif name.endswith(("output_min", "output_max")):
            b.fill_((torch.rand((), generator=gen) * 0.3 + 0.1).item() * (1 if name.endswith("max") else -1))
        elif name.endswith("std_bias"):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
        elif name.endswith("std_scale"):
            b.copy_(torch.rand(b.shape, generator=gen) + 0.5)


def build_vision_target(family: str, seed: int = 0, tokens: dict | None = None, **text_overrides):
    """A randomized Gemma4ForConditionalGeneration with a vision tower (no audio), family "e2b" or "31b" (the text
    family and vision geometry of VISION_FAMILIES); `tokens` overrides IMAGE_TOKENS' ids."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text_family, vision, bidirectional = VISION_FAMILIES[family]
    torch.manual_seed(seed)
    text = _text_config(text_family, use_bidirectional_attention=bidirectional, **text_overrides).to_dict()
    config = Gemma4Config(text_config=text, vision_config=dict(vision), audio_config=None,
                          vision_soft_tokens_per_image=70, **{**IMAGE_TOKENS, **(tokens or {})})
    config._attn_implementation = "eager"
    model = Gemma4ForConditionalGeneration(config).eval()
    randomize(model, seed)
    randomize_vision(model, seed)
    return model


def build_drafter(kind: str, seed: int = 0, num_assistant_tokens: int = 4, **overrides):
    """A randomized transformers Gemma4AssistantForCausalLM with num_assistant_tokens set (docs/transformers.md)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    torch.manual_seed(seed)
    config = Gemma4AssistantConfig(**{**DRAFTER_CONFIGS[kind], **overrides})
    config._attn_implementation = "eager"
    model = Gemma4AssistantForCausalLM(config).eval()
    randomize(model, seed)
    model.generation_config.num_assistant_tokens = num_assistant_tokens
    return model


def save(model, folder, *, max_shard_size=None, eos_token_id=(1,)) -> Path:
    """save_pretrained (safetensors; sharded with max_shard_size, e.g. "100KB") plus a generation_config.json with
    the stop ids and, for drafters, num_assistant_tokens. Returns the folder."""
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen["eos_token_id"] = list(eos_token_id)
    num = getattr(model.generation_config, "num_assistant_tokens", None)
    if num is not None:
        gen["num_assistant_tokens"] = num
    gen_path.write_text(json.dumps(gen, indent=2))
    return folder
