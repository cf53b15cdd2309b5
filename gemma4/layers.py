"""The building blocks of a Gemma 4 decoder layer: RMSNorm, rotary embeddings, attention, the gated MLP.

Each is written to reproduce transformers' arithmetic step for step (docs/gemma4.md), because the tests compare logits
to 1e-4 and the drafter reads K/V produced by this code. This file is the model's math; how a product, an attention
or an activation is computed on a device (and the row invariance that keeps speculative decoding exact) lives in
`kernels.py`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .config import Gemma4Config, LayerSpec, RopeParams
from .kernels import attend, gelu_tanh, linear


@functools.cache
def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A float32 0-d constant on `device`, made once (an op that takes a tensor operand costs no scalar wrap)."""
    with torch.inference_mode(False):  # usable in training too
        return torch.tensor(value, dtype=torch.float32, device=device)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, in float32. Gemma 4 scales by `w` itself (not `1 + w` as in Gemma 1-3);
    `with_scale=False` (v_norm, the router's norm) has no weight at all.

    mean(x^2) is taken as |x|^2 / dim from one `vector_norm` call: five tensor ops instead of nine. There are seven
    or eight norms per layer, and a decode step of a small model is bound by the number of ops, not by arithmetic.
    Equal to transformers' pow/mean form within float rounding."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)  # [..., 1]
        y = xf * torch.addcmul(_scalar(self.eps, xf.device), norm, norm, value=1.0 / self.dim).rsqrt_()
        if self.weight is not None:
            y = y * (self.weight if self.weight.dtype == torch.float32 else self.weight.float())
        return y if y.dtype == x.dtype else y.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear through `linear` (the fast path for decode and verification)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@functools.cache
def rope_inv_freq(params: RopeParams, head_dim: int, device: torch.device) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (computed once per attention type and device). `proportional` keeps the
    first int(p * d // 2) of the default frequencies, with the full head dim in the exponent's denominator, and
    zeroes the rest."""
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        inv = 1.0 / (params.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
        if params.rope_type == "proportional":
            rotated = int(params.partial_rotary_factor * head_dim // 2)
            inv[rotated:] = 0.0
        return inv / params.factor


def rope_cos_sin(
    positions: torch.Tensor, params: RopeParams, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [..., S, 1, d] for absolute `positions` [..., S] ([S], or [B, S]: one row per sequence;
    the 1 broadcasts over heads); dims j and j + d/2 form one rotation pair.

    The sin comes back with its first half negated, so that `apply_rope` rotates with a roll instead of
    slicing, negating and concatenating (the same products: -x2 * sin == x2 * -sin exactly)."""
    angles = positions[..., None, None].float() * rope_inv_freq(params, head_dim, positions.device)  # [.., S, 1, d/2]
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, n, d]; cos, signed_sin: [S, 1, d] or [B, S, 1, d] from `rope_cos_sin`.
    x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], i.e. roll(x, d/2) * [-sin1, sin2]. Rounded as
    transformers rounds (no fused multiply-add): in half precision a last-bit difference can flip a MoE routing."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    """Self-attention of one layer. Layers that own K/V project, normalise and rotate them, then store them in the
    cache; "reuse" layers (KV sharing, and every drafter layer) have only q_proj/q_norm/o_proj and read the K/V
    given in `shared` for their attention type."""

    def __init__(self, config: Gemma4Config, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        # what forward reads of the spec, as plain attributes: never the layer's index, so that layers of one kind
        # are the same code to torch.compile (its guards compare these values)
        self.head_dim, self.kind, self.reuses = spec.head_dim, spec.attention_type, spec.kv_mode == "reuse"
        heads, d, hidden, bias = config.num_attention_heads, spec.head_dim, config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, heads * d, bias=bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = Linear(heads * d, hidden, bias=bias)
        if spec.kv_mode != "reuse":
            self.k_proj = Linear(hidden, spec.num_kv_heads * d, bias=bias)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
            self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)
            self.v_proj = Linear(hidden, spec.num_kv_heads * d, bias=bias) if spec.has_v_proj else None

    def forward(self, x, cos, sin, mask, kv, shared: dict) -> torch.Tensor:
        """`kv`: this layer's `LayerKV` of the cache (None: no cache; reuse layers never get one). `shared`: per
        attention type, the K/V of the last layer of this pass that owns K/V; every owning layer writes it, so that
        owning layers are one kind of code whether or not they are their type's "store" layer (the reuse layers
        come after all owning layers: they read their store layer's)."""
        B, S, _ = x.shape  # x: [B, S, H]
        d, kind = self.head_dim, self.kind
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, S, -1, d)), cos, sin).transpose(1, 2)  # [B, nH, S, d]
        if self.reuses:
            k, v = shared[kind]
        else:
            k_raw = self.k_proj(x).view(B, S, -1, d)  # [B, S, n_kv, d]
            # k_eq_v full layers have no v_proj: V is the raw k_proj output, taken before k_norm and rope.
            v_raw = self.v_proj(x).view(B, S, -1, d) if self.v_proj is not None else k_raw
            k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)  # [B, n_kv, S, d]
            v = self.v_norm(v_raw).transpose(1, 2)
            if kv is not None:
                k, v = kv.update(k, v)  # [B, n_kv, T, d]
            shared[kind] = (k, v)
        out = attend(q, k, v, mask)  # [B, nH, S, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=False)
        self.up_proj = Linear(hidden, width, bias=False)
        self.down_proj = Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))
