"""The Gemma 4 text model (the speculative-decoding *target*): embeddings, decoder layers, final norm, tied head.

One class covers E2B/E4B (per-layer embeddings, KV sharing, double-wide MLP), 31B (k_eq_v full layers, separate
global head dim and KV heads) and 26B-A4B (mixture of experts); the differences live in `Gemma4Config.layers`, not in
branches on the model name. Module names equal the checkpoint's key names after the `model.` /
`model.language_model.` prefix, so loading is a prefix strip (see `weights/loader.py`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, Step
from .config import Gemma4Config, LayerSpec
from .generic import last_rows
from .kernels import gelu_tanh, linear, prefill_pieces
from .layers import MLP, Attention, Linear, RMSNorm, rope_cos_sin
from .moe import Experts, Router


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S_kept, V], softcapped
    hidden_states: torch.Tensor  # [B, S_kept, H], after the final norm: what the drafter takes as input


class DecoderLayer(nn.Module):
    """One layer (docs/gemma4.md): attention and feed-forward blocks, each wrapped in pre- and post-norms, then the
    per-layer-embedding gate (E2B/E4B) and a learned scalar on the whole output."""

    def __init__(self, config: Gemma4Config, spec: LayerSpec):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, spec)
        self.mlp = MLP(hidden, spec.mlp_width)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.uses_ple = config.uses_ple
        if self.uses_ple:
            self.per_layer_input_gate = Linear(hidden, config.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = Linear(config.hidden_size_per_layer_input, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)
        self.uses_moe = config.enable_moe_block
        if self.uses_moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)

    def forward(self, x, cos, sin, mask, kv, shared, per_layer_input=None) -> torch.Tensor:
        """`kv`: the layer's `LayerKV` of the cache (or None), `shared`: see `Attention.forward`."""
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, shared))
        m = self.mlp(self.pre_feedforward_layernorm(h))
        if self.uses_moe:  # the dense MLP and the experts both run; the router reads h, not the normed input
            flat = h.reshape(-1, h.shape[-1])  # [B*S, H]
            weights, experts = self.router(flat)
            e = self.experts(self.pre_feedforward_layernorm_2(flat), weights, experts).view_as(h)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(e)
        h = h + self.post_feedforward_layernorm(m)
        if self.uses_ple:
            g = gelu_tanh(self.per_layer_input_gate(h)) * per_layer_input  # [B, S, P]
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return h * self.layer_scalar


class Gemma4Model(nn.Module):
    """`model(input_ids, cache=None)` -> ModelOutput. With a cache, processes positions [cache.length,
    cache.length + S) and appends their K/V; without one, treats input_ids as a whole sequence."""

    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in config.layers)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(hidden, config.vocab_size, bias=False)
        if config.uses_ple:
            layers, per_layer = config.num_hidden_layers, config.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, layers * per_layer)
            self.per_layer_model_projection = Linear(hidden, layers * per_layer, bias=False)
            self.per_layer_projection_norm = RMSNorm(per_layer, config.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embedding [B, S, H]: sqrt(H) is rounded to the weight dtype first, as transformers does
        (in bf16, sqrt(1536) = 39.19 becomes 39.25). The drafter embeds its input token with this too."""
        scale = torch.tensor(self.config.hidden_size**0.5).to(self.dtype)
        return self.embed_tokens(input_ids) * scale

    def per_layer_inputs(self, input_ids: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Per-layer embeddings [B, S, L, P] (docs/gemma4.md): a token part from its own table and a context part
        projected from the scaled embedding x0, each normalised per layer, averaged with 1/sqrt(2)."""
        cfg = self.config
        shape = (*input_ids.shape, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
        scale = torch.tensor(cfg.hidden_size_per_layer_input**0.5).to(self.dtype)
        token = (self.embed_tokens_per_layer(input_ids) * scale).reshape(shape)
        context = self.per_layer_model_projection(x0) * cfg.hidden_size**-0.5
        context = self.per_layer_projection_norm(context.reshape(shape))
        return (context + token) * 2**-0.5

    def embed_prompt(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None):
        """The first hidden state x0 [B, S, H] and the per-layer inputs [B, S, L, P] (None without PLE).

        With images (docs/gemma4.md, "Images"), as transformers: image tokens are embedded as the padding token,
        then x0 takes `image_features` [N, H] (the vision model's output, in the order of the image tokens) at
        their places, unscaled; the per-layer inputs read the padding token's row of their table, and their
        context part is projected from that x0."""
        if image_features is not None:
            is_image = input_ids == self.config.image_token_id  # [B, S]
            found = int(is_image.sum())
            if found != image_features.shape[0]:
                raise ValueError(f"the prompt has {found} image tokens but {image_features.shape[0]} image "
                                 "embeddings were given")
            input_ids = input_ids.masked_fill(is_image, self.config.pad_token_id or 0)
        x = self.embed(input_ids)  # [B, S, H]
        if image_features is not None:
            x = x.masked_scatter(is_image[..., None], image_features.to(x.dtype))
        return x, (self.per_layer_inputs(input_ids, x) if self.config.uses_ple else None)

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, logits_to_keep: int | None = None,
        rows: slice | None = None, image_features: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids: [B, S], B = the cache's batch size, or the number of cache rows in `rows` (a batch prefills
        its prompts one row at a time: `rows=slice(b, b + 1)`). Each row continues at its own cache length.
        `logits_to_keep=k` computes logits and hidden states for the last k positions only: a prefill needs one
        row. That saves the head (the largest matmul) and, with KV sharing, most of the KV-sharing layers (see
        `kv_shared_from`). `image_features` [N, H]: the embeddings of the N image tokens in input_ids
        (`embed_prompt`); where the config says `use_bidirectional_attention: "vision"`, sliding layers then also
        see every position of the same image (`image_blocks`), full layers stay causal."""
        B, S = input_ids.shape
        keep = S if logits_to_keep is None else max(1, min(logits_to_keep, S))
        if cache is None:
            cache = KVCache(self.config, batch_size=B, dtype=self.dtype, device=self.device, max_length=S,
                            max_rollback=0)
        blocks = None
        if image_features is not None and self.config.use_bidirectional_attention == "vision":
            blocks = image_blocks(input_ids == self.config.image_token_id)
        pieces = None
        if not (torch.is_grad_enabled() and self.embed_tokens.weight.requires_grad):  # training: one pass
            pieces = prefill_pieces(input_ids, blocks)
        if pieces is None:
            return self.run_step(input_ids, cache.begin(S, rows, blocks), cache, keep, image_features)
        outputs, images = [], 0
        for start, end in pieces:  # each piece computed as a verify pass over its positions is (kernels.py)
            ids, features = input_ids[:, start:end], None
            if image_features is not None:
                count = int((ids == self.config.image_token_id).sum())
                features, images = (image_features[images:images + count] if count else None), images + count
            wanted = min(end - start, max(0, keep - (S - end)))  # this piece's positions among the last `keep`
            step = cache.begin(end - start, rows, None if blocks is None else blocks[:, start:end])
            out = self.run_step(ids, step, cache, wanted, features)
            if out is not None:
                outputs.append(out)
        return ModelOutput(torch.cat([o.logits for o in outputs], dim=1),
                           torch.cat([o.hidden_states for o in outputs], dim=1))

    def run_step(self, input_ids: torch.Tensor, step: Step, cache: KVCache, keep: int,
                 image_features: torch.Tensor | None = None, run_layer=None) -> ModelOutput | None:
        """The forward itself, after the cache has reserved the positions (`step`): tensors in, tensors out, no
        decision that depends on a tensor's value. `run_layer(layer, *inputs)` runs a decoder layer (default:
        `layer(*inputs)`): the compiled path (speculative/compiled.py) passes one compiled function, which
        compiles one graph per kind of layer (attention type, owns or reuses K/V) and runs it for every layer of
        that kind; the cache's bookkeeping stays in Python, outside the graphs. `keep=0` (a prefill's pieces
        before the last) only fills the cache: the trailing KV-sharing layers and the head are skipped, and None
        is returned."""
        S = input_ids.shape[1]
        masks = step.masks
        x, ple = self.embed_prompt(input_ids, image_features)  # [B, S, H], [B, S, L, P]
        if ple is not None:  # [L, B, S, P], a view: layer i reads ple[i]
            ple = ple.permute(2, 0, 1, 3)
        rope = {
            t: rope_cos_sin(step.positions, self.config.rope[t], head_dim, x.dtype)
            for t, head_dim in {s.attention_type: s.head_dim for s in self.config.layers}.items()
        }
        # attention type -> (K, V) of its last owning layer in this pass, read by "reuse" layers; every type's key
        # is there from the start, so a compiled layer sees a dict of one shape whatever its place in the stack
        shared: dict = dict.fromkeys(self.config.layer_types)
        for spec, layer in zip(self.config.layers, self.layers):
            if spec.index == self.kv_shared_from and keep < S:  # from here on only the kept rows matter
                if keep == 0:  # nothing from here on writes the cache
                    return None
                x, ple = x[:, -keep:], ple[:, :, -keep:] if ple is not None else None
                rope = {t: (cos[:, -keep:], sin[:, -keep:]) for t, (cos, sin) in rope.items()}
                masks = {t: last_rows(m, keep) for t, m in masks.items()}
            t = spec.attention_type
            kv = cache.layer(spec.index) if spec.kv_mode != "reuse" else None
            inputs = (x, *rope[t], masks[t], kv, shared, ple[spec.index] if ple is not None else None)
            x = layer(*inputs) if run_layer is None else run_layer(layer, *inputs)
        if keep == 0:
            return None
        h = self.norm(x[:, -keep:])  # [B, keep, H]
        return ModelOutput(self.head(h), h)

    @functools.cached_property
    def kv_shared_from(self) -> int:
        """Index of the first layer of the trailing run of KV-sharing layers (E2B: 15 of 35; no sharing: the
        number of layers). Those layers store no K/V and their attention reads only K/V stored earlier in the
        pass, so a position's output there feeds nothing but that position's own hidden state: rows whose logits
        are not wanted can skip them (as transformers does)."""
        index = len(self.config.layers)
        while index > 0 and self.config.layers[index - 1].kv_mode == "reuse":
            index -= 1
        return index

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Tied (or separate) output projection, then final logit softcapping c * tanh(logits / c)."""
        weight = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = linear(h, weight, contiguous=False)
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        if logits.requires_grad:  # training: tanh's backward reads its output, which mul_ would overwrite
            return torch.tanh(logits / cap) * cap
        return logits.div_(cap).tanh_().mul_(cap)  # in place: the logits are fresh and V wide

    def new_cache(self, *, batch_size: int = 1, max_length: int = 256, max_rollback: int = 16,
                  min_sliding_history: int = 0, static: bool = False, position_slack: int = 0) -> KVCache:
        """An empty cache on this model's device and dtype."""
        return KVCache(self.config, batch_size=batch_size, dtype=self.dtype, device=self.device,
                       max_length=max_length, max_rollback=max_rollback, min_sliding_history=min_sliding_history,
                       static=static, position_slack=position_slack)


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """[B, S] bool (image token) -> [B, S] int64: the index of the image each image token belongs to (a run of
    consecutive image tokens is one image), -1 for text. transformers' `get_block_sequence_ids_for_mask`."""
    starts = is_image & ~F.pad(is_image[:, :-1], (1, 0))  # first token of each run
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)
