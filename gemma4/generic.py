"""The generic path: how `kernels.py`'s primitives run on every device but the CPU (a CUDA GPU), and on the CPU
inside `generic_path()` (tests run the GPU's code this way on a machine without one).

Products and activations take their reference definitions as they are (`F.linear`, `F.gelu`); attention is SDPA,
called so that a GPU runs one of its fused kernels and never its math fallback (which materialises [S, T] scores
per head: at S = 8192 a long prompt's prefill becomes slow and memory-hungry):

- Grouped-query heads are never passed as `enable_gqa` where it could cost the fused kernel. SDPA's flash kernel
  takes grouped heads but stops at head_dim 256 and refuses any mask; the memory-efficient kernel takes any head_dim
  (a multiple of 8) and a mask, but not grouped heads on every torch version. Every released Gemma 4 model has
  head_dim 512 on its full-attention layers, so there `enable_gqa` meant the math kernel. Instead:
  decode, drafting and verification (few query rows) fold the g query heads of a KV head into the rows of one
  attention over that KV head ([B, n_kv, g*S, d]: no K/V copy); longer masked passes repeat K/V per query head;
  a causal prefill keeps `enable_gqa` only where flash can take it (half precision, head_dim <= 256).
- A prefill from position 0 gets no mask tensor at all: the cache describes its mask as `Causal` and attention
  passes `is_causal=True` (full layers; flash or memory-efficient, O(S) memory), or, on sliding layers, cuts the
  queries into blocks of W that each attend to 2W keys under one [W, 2W] band (memory and work O(S W), not S^2).
- The MoE under torch.compile reads only the chosen experts' weights (`Experts.gathered` in moe.py), not every
  expert's as the CPU's compiled path does.
- `fused_backends` states these rules of SDPA's kernel choice, so that tests can check, on a CPU, every call the
  generic path makes (scripts/gpu_check.py compares the rules with torch's own choice on a GPU).

What the generic path does not promise by default: a row's bits independent of how many rows run with it. cuBLAS
and the fused attention kernels choose tiles and split the sums by shape, so a position's logits in a verify pass of
k + 1 rows can differ in their last bits from a one-token decode, and greedy speculative output can then differ from
target-only output where two tokens' logits are within rounding of each other (a near-tie). Logits stay within
float rounding of the reference; tests/test_generic_path.py asserts that, and that tokens agree up to the first
near-tie, and measures how often output differs.

`fixed_rows(P)` is the policy that may keep the promise on a GPU: every product and attention of at most P rows
(decode, verify, drafting) runs padded to exactly P rows, so that a row meets the same kernel, at the same shape,
whether it is computed alone or in a verify pass (cuBLAS and SDPA choose by shape; a row's place among the rows
does not change its sums). What remains is the key length of full-attention layers, which can differ between a
decode and a verify pass that crosses a 256-position block. On the CPU it makes float32 verify rows equal to
one-token decodes bit for bit (tests/test_generic_path.py); scripts/gpu_check.py measures what it keeps and costs
on a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_on_cpu = False  # module state read by compiled code too (dynamo guards on it)
_fixed_rows: int | None = None


@contextlib.contextmanager
def generic_path(enabled: bool = True):
    """Within this block CPU tensors take the generic path (exactly the code a CUDA device runs): F.linear, F.gelu,
    SDPA as described above, the MoE's gathered experts under torch.compile, `Causal` prefill masks. For tests
    and `scripts/gpu_check.py --cpu-smoke`; not thread-safe."""
    global _on_cpu
    before, _on_cpu = _on_cpu, enabled
    try:
        yield
    finally:
        _on_cpu = before


@contextlib.contextmanager
def fixed_rows(rows: int | None):
    """Within this block, generic-path products and attention of fewer than `rows` rows run padded to `rows`
    (None: as they are). See the module docstring."""
    global _fixed_rows
    before, _fixed_rows = _fixed_rows, rows
    try:
        yield
    finally:
        _fixed_rows = before


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.linear` on the generic path: F.linear, padded to `fixed_rows` rows when that policy is on."""
    tokens = x.numel() // x.shape[-1]
    if _fixed_rows is None or tokens >= _fixed_rows:
        return F.linear(x, weight, bias)
    rows = x.reshape(tokens, x.shape[-1])
    rows = torch.cat([rows, rows.new_zeros(_fixed_rows - tokens, x.shape[-1])])  # [P, in]
    return F.linear(rows, weight, bias)[:tokens].view(*x.shape[:-1], weight.shape[0])


def generic(t: torch.Tensor) -> bool:
    """Whether computations on `t`'s device take the generic path."""
    return _on_cpu or t.device.type != "cpu"


# SDPA's flash kernel takes head dims up to this (torch 2.x, CUDA).
FLASH_MAX_HEAD_DIM = 256
# Attention over at most this many query rows folds the query heads of a KV head into its rows.
FOLD_ROWS = 64
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Causal:
    """The mask of a pass whose keys are positions 0, 1, ... in order (a prefill from position 0), described
    instead of materialised: query row i is position `first + i`, key j is position j, and j is visible iff
    j <= first + i and (with a window) first + i - j < window. Keys past the last query (a full layer's padding)
    are never visible. `rows` is the number of query rows."""

    rows: int
    first: int = 0
    window: int | None = None

    def last(self, n: int) -> Causal:
        """The mask of this pass's last n query rows (the model keeps only those past its KV-sharing layers)."""
        return Causal(n, self.first + self.rows - n, self.window)

    def visible(self, keys: int, device: torch.device) -> torch.Tensor:
        """[1, rows, keys] bool."""
        q = torch.arange(self.first, self.first + self.rows, device=device)[:, None]
        k = torch.arange(keys, device=device)[None]
        seen = k <= q
        if self.window is not None:
            seen &= k > q - self.window
        return seen[None]


def last_rows(mask, n: int):
    """A step's mask ([b, S, T] additive, or `Causal`) for its last n query rows."""
    return mask.last(n) if isinstance(mask, Causal) else mask[:, -n:]


def fused_backends(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, *, is_causal: bool = False,
                   enable_gqa: bool = False) -> set[str]:
    """The fused CUDA kernels SDPA may choose for these arguments (empty: the math kernel), by the rules of torch 2.x
    that matter here (4-D dense inputs, inference): flash needs half precision, head_dim <= 256 (a multiple of 8),
    no mask, and with is_causal as many queries as keys; memory-efficient needs head_dim a multiple of 8 and as
    many query heads as K/V heads (grouped heads are not taken on every version). Both need the last dimension
    contiguous. A model of torch's choice for tests on a CPU; on a GPU, scripts/gpu_check.py compares it with
    torch.backends.cuda.can_use_flash_attention / can_use_efficient_attention."""
    d = q.shape[-1]
    dense = q.dim() == 4 and q.stride(-1) == 1 and k.stride(-1) == 1 and d % 8 == 0
    out = set()
    if (dense and q.dtype in _HALF and d <= FLASH_MAX_HEAD_DIM and mask is None
            and not (is_causal and q.shape[2] != k.shape[2])
            and (q.shape[1] == k.shape[1] or enable_gqa)):
        out.add("flash")
    if dense and q.shape[1] == k.shape[1]:
        out.add("efficient")
    return out


def sdpa(q, k, v, mask=None, *, is_causal=False, enable_gqa=False) -> torch.Tensor:
    """The one SDPA call of the generic path (scale 1.0: q_norm and k_norm take the place of 1/sqrt(d)).
    mask: additive, broadcastable to [B, H, S, T]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0,
                                          enable_gqa=enable_gqa)


def _repeat_heads(x: torch.Tensor, g: int) -> torch.Tensor:
    """[B, n_kv, T, d] -> [B, n_kv * g, T, d], KV head j serving query heads j*g .. j*g + g - 1."""
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """`kernels.attend` on the generic path: q [B, nH, S, d], k/v [B, n_kv, T, d], mask additive [b, S, T] /
    [S, T], None (every key visible) or `Causal`. -> [B, nH, S, d]."""
    if isinstance(mask, Causal):
        return _causal(q, k, v, mask)
    if mask is not None and mask.dim() == 2:
        mask = mask[None]
    return _masked(q, k, v, mask)


def _masked(q, k, v, mask):
    B, nH, S, d = q.shape
    if _fixed_rows is not None and S < _fixed_rows:  # padded with zero queries that see every key
        pad = _fixed_rows - S
        mask = None if mask is None else F.pad(mask, (0, 0, 0, pad))
        return _masked(F.pad(q, (0, 0, 0, pad)), k, v, mask)[:, :, :S]
    n_kv, T = k.shape[1], k.shape[2]
    g = nH // n_kv
    if g == 1:
        return sdpa(q, k, v, None if mask is None else mask[:, None])
    if S <= FOLD_ROWS:  # the g query heads of a KV head as g*S rows of one attention: no K/V copy
        rows = q.reshape(B, n_kv, g * S, d)  # head h = j*g + i -> KV head j, rows i*S .. i*S + S - 1
        m = None if mask is None else mask[:, None, None].expand(-1, 1, g, S, T).reshape(-1, 1, g * S, T)
        return sdpa(rows, k, v, m).view(B, nH, S, d)
    return sdpa(q, _repeat_heads(k, g), _repeat_heads(v, g), None if mask is None else mask[:, None])


def _causal(q, k, v, c: Causal):
    B, nH, S, d = q.shape
    g = nH // k.shape[1]
    windowed = c.window is not None and c.window < c.first + S
    if c.first == 0 and not windowed:  # keys 0 .. S-1, query i sees keys <= i: SDPA's own causal mask
        k, v = k[:, :, :S], v[:, :, :S]
        if g > 1 and q.dtype in _HALF and d <= FLASH_MAX_HEAD_DIM:  # flash takes grouped heads
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)
        return sdpa(q, _repeat_heads(k, g), _repeat_heads(v, g), is_causal=True)
    if c.first == 0 and S > 2 * c.window:
        return _windowed(q, k[:, :, :S], v[:, :, :S], c.window)
    return _masked(q, k, v, torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(
        ~c.visible(k.shape[2], q.device), float("-inf")))


def _windowed(q, k, v, W: int):
    """Sliding-window attention from position 0 over keys 0 .. S-1, in query blocks of W: block i (positions
    iW .. iW + W - 1) attends to the 2W keys (i-1)W .. iW + W - 1 under one band mask [W, 2W] (block 0's first W
    keys are padding, masked). Memory and work O(S W) instead of O(S^2)."""
    B, nH, S, d = q.shape
    g = nH // k.shape[1]
    n = -(-S // W)
    pad = n * W - S
    k, v = _repeat_heads(k, g), _repeat_heads(v, g)  # a mask is needed: no grouped heads (see the module doc)
    qb = F.pad(q, (0, 0, 0, pad)).view(B, nH, n, W, d).transpose(1, 2).reshape(B * n, nH, W, d)

    def blocks(x):  # [B, nH, S, d] -> [B*n, nH, 2W, d]: block i holds positions (i-1)W .. iW + W - 1
        x = F.pad(x, (0, 0, W, pad)).unfold(2, 2 * W, W)  # [B, nH, n, d, 2W]
        return x.permute(0, 2, 1, 4, 3).reshape(B * n, nH, 2 * W, d)

    r = torch.arange(W, device=q.device)[:, None]
    c = torch.arange(2 * W, device=q.device)[None]
    visible = ((c > r) & (c <= r + W)).expand(n, W, 2 * W).clone()  # query iW + r, key (i-1)W + c
    visible[0, :, :W] = False  # positions < 0
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    mask = mask[None].expand(B, -1, -1, -1).reshape(B * n, 1, W, 2 * W)
    out = sdpa(qb, blocks(k), blocks(v), mask)  # [B*n, nH, W, d]
    return out.view(B, n, nH, W, d).transpose(1, 2).reshape(B, nH, n * W, d)[:, :, :S]
