"""The MTP drafter (Gemma 4 "assistant"): a 4-layer model that proposes tokens by reading the target's KV cache.

A draft step (docs/drafter.md) takes [target embedding of the last token ; hidden state] ([B, 1, 2 H_t]), projects it to
the drafter's width, runs decoder layers whose queries attend to the target's K/V of accepted positions (full
layers: all of them; sliding layers: the last W_a + 1), normalises, and returns
- `hidden`: projected back to the target's width, the hidden-state input of the next draft step;
- `logits`: the tied head, or on E2B/E4B drafters the centroid-masked head. No softcapping.
Every step of one round uses the same RoPE position: that of the last token, which the target has not processed.

The drafter owns no K/V and copies none: it receives `KVView`s (views into the target's cache) each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gemma4 import FULL, KVView, RMSNorm
from gemma4.kernels import additive_mask, linear
from gemma4.layers import Linear, rope_cos_sin
from gemma4.model import DecoderLayer

from .config import DrafterConfig


@dataclass(frozen=True)
class DraftContext:
    """What every draft step of one round shares: the target's K/V, the masks over it and the rotary tables of the
    round's constant position. A round's steps differ only in their input row, so this is built once per round
    (`Drafter.context`) instead of once per step."""

    shared: dict[str, tuple[torch.Tensor, torch.Tensor]]  # attention type -> (K, V) [B, n_kv, T, d]
    masks: dict[str, torch.Tensor]  # attention type -> [S, T] additive (0 / -inf)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # attention type -> (cos, signed sin) [S, 1, d]


@dataclass
class DraftOutput:
    logits: torch.Tensor  # [B, S, V]; -inf outside the selected clusters of a centroid-masked head
    hidden: torch.Tensor  # [B, S, H_t]


class MaskedEmbedding(nn.Module):
    """Centroid-masked output head: score `num_centroids` clusters, keep the top k, compute logits only for the
    tokens of those clusters (`token_ordering` lists each cluster's token ids), and give every other token -inf.

    transformers fills the others with min(selected) - 1, so its argmax is the same, but its softmax leaves them
    probability; -inf gives them exactly 0, which rejection sampling needs (q must be the distribution drafts are
    really drawn from)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        text = config.text
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = Linear(text.hidden_size, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(text.vocab_size, dtype=torch.long))

    def forward(self, h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        B, S, H = h.shape  # h: [B, S, H_a]; lm_head: [V, H_a]
        top = torch.topk(self.centroids(h), self.top_k, dim=-1).indices  # [B, S, k]
        clusters = self.token_ordering.view(self.num_centroids, -1)  # [C, V/C]
        ids = clusters[top].reshape(B, S, -1)  # [B, S, k*V/C]
        rows = lm_head[ids.reshape(-1)].view(B, S, ids.shape[-1], H)  # [B, S, k*V/C, H_a]
        selected = (h.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)  # [B, S, k*V/C]
        out = h.new_full((B, S, lm_head.shape[0]), float("-inf"))
        return out.scatter_(-1, ids, selected)


class Drafter(nn.Module):
    """Module names equal the checkpoint's keys (`pre_projection`, `model.layers.{i}...`, `masked_embedding...`)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        text = config.text
        self.pre_projection = Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = Linear(text.hidden_size, config.backbone_hidden_size, bias=False)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)  # used only as the tied head
        self.model.layers = nn.ModuleList(DecoderLayer(text, spec) for spec in text.layers)
        self.model.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(config)

    @property
    def sliding_history(self) -> int:
        return self.config.sliding_history

    def step(self, target, token: torch.Tensor, hidden: torch.Tensor, position: int,
             views: dict[str, KVView], context: DraftContext | None = None) -> DraftOutput:
        """One draft step from the last token [B, 1] and the hidden state [B, 1, H_t] that precedes it: the target's
        post-norm hidden state for the first step of a round, the drafter's own `hidden` after that. `context`, if
        given, must be `self.context(position, views)` (the loop builds it once per round)."""
        return self(torch.cat([target.embed(token), hidden], dim=-1), position, views, context)

    def context(self, position: int | torch.Tensor, views: dict[str, KVView]) -> DraftContext:
        """Masks, K/V and rotary tables for queries at `position` over `views`: an int or [S] positions (the same
        for every batch row), or [B, S] (row b's queries at position[b]; a batch's rows have their own lengths)."""
        text, weight = self.config.text, self.pre_projection.weight
        positions = torch.as_tensor(position, device=weight.device)
        positions = positions.reshape(1, -1) if positions.dim() < 2 else positions  # [B or 1, S]
        return DraftContext(
            shared={t: (view.k, view.v) for t, view in views.items()},
            masks={t: additive_mask(self._mask(t, view.positions, positions), weight.dtype)
                   for t, view in views.items()},
            rope={t: rope_cos_sin(positions, text.rope[t], head_dim, weight.dtype)
                  for t, head_dim in {s.attention_type: s.head_dim for s in text.layers}.items()},
        )

    def forward(self, inputs_embeds: torch.Tensor, position: int | torch.Tensor,
                views: dict[str, KVView], context: DraftContext | None = None) -> DraftOutput:
        """inputs_embeds: [B, S, 2 H_t], one query per row; `position`: an int (decoding: S = 1), [S] positions
        (training: every position of a sequence at once) or [B, S] (a batch: each row its own). Query i reads the
        target K/V of positions < position[i]."""
        if context is None:
            context = self.context(position, views)
        x = self.pre_projection(inputs_embeds)  # [B, S, H_a]
        for spec, layer in zip(self.config.text.layers, self.model.layers):
            t = spec.attention_type
            x = layer(x, *context.rope[t], context.masks[t], None, context.shared)
        h = self.model.norm(x)  # [B, S, H_a]
        return DraftOutput(self.head(h), self.post_projection(h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        if self.config.use_ordered_embeddings:
            return self.masked_embedding(h, weight)
        return linear(h, weight)

    def _mask(self, attention_type: str, key_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B or 1, S, T] bool from key positions [B or 1, T] (or [T]) and query positions [B or 1, S]. Full layers
        see every accepted position; sliding layers the last W_a + 1 of them."""
        keys, queries = key_positions.view(-1, 1, key_positions.shape[-1]), positions[:, :, None]
        visible = (keys >= 0) & (keys < queries)
        if attention_type != FULL:
            visible &= keys >= queries - self.config.sliding_history
        return visible
