"""The mixture-of-experts block of Gemma 4 26B-A4B (docs/gemma4.md). It runs next to the dense MLP on every layer.

The router reads the residual stream after attention; its softmax covers all experts, then the top-k weights are
renormalised and multiplied by a learned per-expert scale. Experts are stored stacked, as in the checkpoint:
`gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I].
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Gemma4Config
from .kernels import gelu_tanh, generic, linear
from .layers import Linear, RMSNorm


class Router(nn.Module):
    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.top_k = config.top_k_experts
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))
        self.root_size = config.hidden_size**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> weights [T, k] (float32), expert ids [T, k]."""
        logits = self.proj(self.norm(x) * self.scale * self.root_size)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


class Experts(nn.Module):
    def __init__(self, config: Gemma4Config):
        super().__init__()
        e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; weights, experts: [T, k]. Each token's output is the weighted sum of its experts' MLPs.
        Experts are visited in ascending id and accumulated with index_add_, which keeps fp32 sums bit-equal to
        transformers. The loop visits only experts some token chose (one host sync for the list)."""
        if torch.compiler.is_compiling():
            return self.gathered(x, weights, experts) if generic(x) else self.dense(x, weights, experts)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            gate, up = linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = linear(gelu_tanh(gate) * up, self.down_proj[e])  # [n, H]
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out

    def dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`forward` without data-dependent shapes, for torch.compile: every expert runs on every token, weighted by
        0 where the token did not choose it. The sums are the loop's, in the same order (an unchosen expert adds an
        exact zero), and the products are row-invariant, so the result is the same. It reads every expert's
        weights for every step, which suits small models, not a 26B-A4B (128 experts, 8 chosen)."""
        chosen = torch.zeros(x.shape[0], self.gate_up_proj.shape[0], dtype=weights.dtype, device=x.device)
        chosen.scatter_(1, experts, weights)  # [T, E]: each token's weight for each expert, 0 if not chosen
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            gate, up = linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            y = linear(gelu_tanh(gate) * up, self.down_proj[e])  # [T, H]
            out += (y * chosen[:, e, None]).to(out.dtype)
        return out

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`forward` without data-dependent shapes that reads only the chosen experts' weights: the torch.compile
        path of the generic path (a GPU). Each token's k chosen experts are gathered ([T, k, 2I, H] and [T, k, H,
        I]) and applied as batched products; a token's k outputs are summed in ascending expert id, the loop's
        order. The products are batched matrix-vector products, not the loop's F.linear over a group of tokens, so
        the result equals the loop's within float rounding (tests/test_generic_path.py), not bit for bit. Reads
        T * k expert matrices: a decode step of 26B-A4B 8 of 128 per layer, where `dense` reads all 128."""
        order = experts.argsort(dim=-1)  # [T, k]
        experts, weights = experts.gather(1, order), weights.gather(1, order)  # ascending expert id
        gate_up = torch.matmul(self.gate_up_proj[experts], x[:, None, :, None]).squeeze(-1)  # [T, k, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.matmul(self.down_proj[experts], (gelu_tanh(gate) * up)[..., None]).squeeze(-1)  # [T, k, H]
        out = torch.zeros_like(x)
        for slot in range(experts.shape[1]):
            out = out + (y[:, slot] * weights[:, slot, None]).to(out.dtype)
        return out
