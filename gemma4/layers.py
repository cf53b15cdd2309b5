"""The building blocks of a Gemma 4 decoder layer: RMSNorm, rotary embeddings, attention, the gated MLP.

Each is written to reproduce transformers' arithmetic step for step (spec §2), because the tests compare logits
to 1e-4 and the drafter reads K/V produced by this code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Gemma4Config, LayerSpec, RopeParams


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, in float32. Gemma 4 scales by `w` itself (not `1 + w` as in Gemma 1-3);
    `with_scale=False` (v_norm, the router's norm) has no weight at all."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)  # pow, not rsqrt: as transformers
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


# Below this many tokens, CPU matrix products run weight-first (see `linear`).
_FEW_TOKENS = 32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias), x: [..., in], weight: [out, in].

    For a few tokens on CPU it computes (weight @ x^T)^T instead: BLAS picks a much slower kernel for x @ W^T when
    x has few rows and W many (2-4x at 4 rows on the E2B shapes), and decode and verification are exactly that
    case. Same products, summed in another order: equal within float rounding."""
    if x.device.type != "cpu" or x.numel() > _FEW_TOKENS * x.shape[-1]:
        return F.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(-1, x.shape[-1]).T).T.contiguous()  # [T, out]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear through `linear` (the fast path for decode and verification)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(params: RopeParams, head_dim: int, device: torch.device) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2]. `proportional` keeps the first int(p * d // 2) of the default
    frequencies, with the full head dim in the exponent's denominator, and zeroes the rest."""
    inv = 1.0 / (params.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    if params.rope_type == "proportional":
        rotated = int(params.partial_rotary_factor * head_dim // 2)
        inv[rotated:] = 0.0
    return inv / params.factor


def rope_cos_sin(
    positions: torch.Tensor, params: RopeParams, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, d] for absolute `positions` [S]; dims j and j + d/2 form one rotation pair."""
    angles = positions[:, None].float() * rope_inv_freq(params, head_dim, positions.device)  # [S, d/2]
    emb = torch.cat([angles, angles], dim=-1)  # [S, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, n, d]; cos, sin: [S, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T + mask) v with scale 1.0 (q_norm and k_norm take the place of 1/sqrt(d)).
    q: [B, nH, S, d]; k, v: [B, n_kv, T, d], query head h reads kv head h // (nH / n_kv); mask: [S, T] bool."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    """Self-attention of one layer. Layers that own K/V project, normalise and rotate them, then store them in the
    cache; "reuse" layers (KV sharing, and every drafter layer) have only q_proj/q_norm/o_proj and read the K/V
    given in `shared` for their attention type."""

    def __init__(self, config: Gemma4Config, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        heads, d, hidden, bias = config.num_attention_heads, spec.head_dim, config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, heads * d, bias=bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = Linear(heads * d, hidden, bias=bias)
        if spec.kv_mode != "reuse":
            self.k_proj = Linear(hidden, spec.num_kv_heads * d, bias=bias)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
            self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)
            self.v_proj = Linear(hidden, spec.num_kv_heads * d, bias=bias) if spec.has_v_proj else None

    def forward(self, x, cos, sin, mask, cache, shared: dict) -> torch.Tensor:
        B, S, _ = x.shape  # x: [B, S, H]
        d, kind = self.spec.head_dim, self.spec.attention_type
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, S, -1, d)), cos, sin).transpose(1, 2)  # [B, nH, S, d]
        if self.spec.kv_mode == "reuse":
            k, v = shared[kind]
        else:
            k_raw = self.k_proj(x).view(B, S, -1, d)  # [B, S, n_kv, d]
            # k_eq_v full layers have no v_proj: V is the raw k_proj output, taken before k_norm and rope.
            v_raw = self.v_proj(x).view(B, S, -1, d) if self.v_proj is not None else k_raw
            k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)  # [B, n_kv, S, d]
            v = self.v_norm(v_raw).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(self.spec.index, k, v)  # [B, n_kv, T, d]
            if self.spec.kv_mode == "store":
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
