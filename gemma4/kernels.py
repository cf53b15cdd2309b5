"""How each product, attention and activation of the model is computed, on which device: the one home of kernel choices.

`layers.py` states the model's math with three primitives, and this module decides how each runs:

| function | reference definition | the promise kept on CPU |
|---|---|---|
| `linear` | `F.linear(x, weight, bias)` | a row's bits do not depend on how many rows run with it (bfloat16; float32 after `set_row_invariant_float32(True)`; float16 as measured) |
| `attend` | `F.scaled_dot_product_attention(q, k, v, mask, scale=1.0)` with GQA | up to `INVARIANT_QUERY_ROWS` query rows: a row's bits depend only on that row, the keys it sees and the key length |
| `gelu_tanh` | `F.gelu(x, approximate="tanh")` | an element's bits do not depend on the tensor's length |
| `prefill_pieces` | one forward over the whole input | a forward of more than `INVARIANT_QUERY_ROWS` positions runs in pieces computed as verify passes: a position's K/V and logits do not depend on how its prompt was split |

Why these promises matter: greedy speculative decoding gives exactly the target-only output only if a position's
logits are the same bits whether the position is computed alone (a one-token decode), as one row of a verify pass
(k + 1 rows), inside a batch, or in a prefill of any length (a chat turn prefills only what its cache does not hold,
a fresh `generate` the whole history). BLAS and SDPA kernels do not promise that; the paths below do, and
tests/test_layers.py and tests/test_dtype_equivalence.py check them bit for bit. Off the CPU (CUDA) every function
takes the generic path (`generic.py`: the reference definitions, and SDPA called so that it runs a fused kernel),
which CPU runs take too inside `generic_path()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import generic as _generic
from .generic import generic, generic_path  # noqa: F401  (generic_path: the switch tests use)

# CPU products with at most this many tokens and a weight of at least this many elements run as row blocks.
_FEW_TOKENS = 16
_BLOCKED_WEIGHT = 1 << 14  # 64 KB in float32; below it F.linear is as fast and one op fewer
_ROW_BLOCKS = 8
# Under torch.compile, CPU products with a weight of at most this many elements run as a sum of products that inductor
# compiles into its own loop (see `linear`).
_FUSED_WEIGHT = 1 << 16  # 256 KB in float32
# CPU bfloat16 inference products with a weight of at most this many elements run in float64 (see `linear`).
_FLOAT64_WEIGHT = 1 << 16  # 128 KB in bfloat16: every product of the bundled pair but the output head
# CPU inference products in these dtypes run as oneDNN's inner product, the same kernel for every row count and
# weight size (bfloat16: weights above _FLOAT64_WEIGHT): see `linear`.
_ONEDNN_DTYPES = {torch.bfloat16}


def set_row_invariant_float32(enabled: bool) -> None:
    """Run float32 CPU inference products through the row-invariant oneDNN path too (off by default).
    Measured (scripts/bench_float32.py, 1 thread, a 2-core EPYC at load average 13-19, interleaved medians):
    bundled target: decode step 2.1x, 5-token verify pass 2.0x, greedy speculative generate of 128 tokens 1.65x
    the default's time; E2B-shaped model (5 layers): decode step 1.4x (oneDNN's 2-row float32 kernel reads the
    weight more slowly than the row-block path), 5-token verify pass 0.52x. Without it a float32 row can differ in
    its last bits between a one-token decode and a verify pass of 2+ (F.linear) or 4+ (row blocks) tokens, and
    greedy output equals target-only output only up to near-ties (`row_invariant`, README "Limits")."""
    if enabled:
        _ONEDNN_DTYPES.add(torch.float32)
    else:
        _ONEDNN_DTYPES.discard(torch.float32)


def row_invariant_float32() -> bool:
    """Whether float32 CPU products take the row-invariant path (`set_row_invariant_float32`)."""
    return torch.float32 in _ONEDNN_DTYPES


def row_invariant(t: torch.Tensor) -> bool:
    """Whether computations in `t`'s dtype on `t`'s device keep this module's row-invariance promises, and with
    them bit-exact greedy speculative decoding and chat turns: on the CPU, bfloat16 (small weights in float64, the
    others through oneDNN), float16 (as measured) and float32 after `set_row_invariant_float32(True)`; by default
    float32 keeps MKL's faster kernels, whose rows depend on the row count, so greedy outputs may differ from
    target-only ones where two logits are within rounding (~1e-6) of each other. The generic path (`generic.py`)
    promises no row invariance."""
    if generic(t):
        return False
    if t.dtype == torch.float16:
        return True
    return t.dtype in _ONEDNN_DTYPES and _onednn_inner_product(t.dtype)


# probed once per dtype, outside any compiled graph. Keyed by the dtype's name: torch cannot reuse a nested compile
# region (speculative/compiled.py) whose guards read a dict at a dtype key
_ONEDNN_WORKS: dict[str, bool] = {}


def _onednn_inner_product(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run a oneDNN inner product in `dtype` (the op exists only in builds with
    oneDNN, and oneDNN refuses dtypes the CPU has no kernel for, e.g. float16 without AVX512-FP16). The answer is
    kept in a plain dict, which torch.compile reads as a constant (it cannot trace the probe itself)."""
    name = str(dtype)
    if name not in _ONEDNN_WORKS:
        _ONEDNN_WORKS[name] = _probe_onednn(dtype)
    return _ONEDNN_WORKS[name]


@torch.compiler.disable
def _probe_onednn(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), torch.ones(8, 8, dtype=dtype), None,
                                               "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           contiguous: bool = True) -> torch.Tensor:
    """Reference: `F.linear(x, weight, bias)` = x @ weight^T (+ bias), x: [..., in], weight: [out, in]. Every path
    below takes the same products, summed in another order: equal to the reference within float rounding.

    Row invariance. Greedy speculative decoding gives exactly the target-only output only if a position's logits
    do not depend on how many positions are computed with it: a verify pass computes k + 1 rows at once where
    decoding computes one, a batch computes B (k + 1), a chat turn re-processes a suffix its history prefilled.
    BLAS kernels do not promise that: MKL's float32 GEMM sums a column differently for 1-3, 4, 5-7... columns, and
    the bfloat16 GEMM behind F.linear differs between 1 and 2+ rows, and on small weights between other counts. On
    CPU in bfloat16, every inference product therefore takes one of two row-invariant paths, chosen by the weight
    (a constant of a layer, never the row count):
    - Weights of at most `_FLOAT64_WEIGHT` elements (every product of the bundled pair but its output head): the
      product in float64, rounded to bfloat16. A product of two bfloat16 values (8 significant bits each) is exact
      in float64, and a sum of such products is exact as long as its terms span less than ~2^28 in magnitude
      (53 bits, less 16 per term and 9 for up to 512 terms): the result is then the exact sum rounded, whatever
      order BLAS adds the terms in for a given row count. Beyond that span only float64's last bit can depend on
      the order, which changes the bfloat16 result only if the sum lies that close to a rounding boundary
      (measured on the bundled target's own products, a 200-token prompt and 100 decode steps: 10 of 7.4 million
      float64 sums depended on the order of their terms, no bfloat16 result). Measured on the bundled target, 1
      thread: target-only decoding 43.8 -> 68.9 tokens/s eager and 77.7 -> 118.8 compiled (float32: 84 and 239),
      greedy speculative (k = 4, eager) 151 -> 187, a 120-token prompt's prefill 45 -> 50 ms (load average
      0.5-1.0, interleaved medians of 3 runs, 6 compiled). A one-row product with a 384 x 128 weight inside a
      decode step (weights out of cache, load 2-3): ~27 us, against ~59 us through oneDNN (its setup per call,
      whatever the row count) and ~58 us with a float64 copy of the weight kept (4x bfloat16's bytes to read each
      step: the copy is made per call instead). With warm caches oneDNN is cheaper from a few rows on at the
      MLP's shapes (5 rows: ~19 against ~40 us; a 64-row prefill piece: ~50 against ~160 us).
    - Larger weights: oneDNN's inner product, which (measured on every Gemma 4 E2B and tiny-model shape, 2 to 300
      rows, 1 and 2 threads) gives a row the same bits for any count of 2+ rows and any row index; a single row is
      computed as two copies of itself, so that it takes the same 2+ row kernel. It costs nothing there: within
      15% of F.linear either way from 1 to 2048 rows on E2B's MLP shapes.
    tests/test_layers.py checks both bit for bit.
    Float16 runs the paths below where oneDNN has no float16 kernel (CPUs without AVX512-FP16): row-invariant as
    they are, measured on a 2-core EPYC from 1 to 300 rows on every tiny and E2B shape, 1 and 2 threads. Float32
    takes the oneDNN path only after `set_row_invariant_float32(True)`, as it slows float32 decoding down (see
    there).

    Row blocks (float16, float32 by default, no oneDNN). A product of a few tokens is bound
    by reading the weight, which in a generation loop is never in cache. BLAS runs a one-token product as a
    matrix-vector product on one thread, so the weight is cut into 8 blocks of rows and multiplied as a batch,
    [8, out/8, in] @ [in, T], which torch spreads over all threads. The column operand is x^T with strides
    (0, 1, in), the layout BLAS runs fastest.
    `contiguous=False` may return a transposed view of the [T, out] result instead of copying it (the output head:
    a copy of [T, 262144] logits costs ~4 ms)."""
    if generic(x):
        return _generic.linear(x, weight, bias)
    inference = not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    if inference and weight.dtype == x.dtype and _float64_product(weight):  # checked first: ~1 us a call less
        if torch.compiler.is_compiling():  # the same kernel, opaque to inductor (see `_row_invariant_linear`)
            return _row_invariant_op(x, weight, bias)
        return _float64_linear(x, weight, bias)  # x as it is: a reshape and a view cost ~1.7 us a call
    tokens = x.numel() // x.shape[-1]
    out, inp = weight.shape
    if not weight.is_contiguous():
        return F.linear(x, weight, bias)
    if inference and weight.dtype == x.dtype and x.dtype in _ONEDNN_DTYPES and _onednn_inner_product(x.dtype):
        if torch.compiler.is_compiling():
            return _row_invariant_op(x, weight, bias)
        return _row_invariant_linear(x.reshape(tokens, inp), weight, bias).view(*x.shape[:-1], out)
    # Under torch.compile, a small float32 weight's product as an elementwise product summed over `in`: inductor
    # compiles it into a loop of its own, where F.linear calls BLAS, whose setup dominates a product this small
    # (the bundled target's 216 one-token products, weights out of cache, 1 thread: 3.8 ms through BLAS, 1.5 ms as
    # inductor's loops). A choice by the weight's size, a constant of the graph, never by the token count.
    if (torch.compiler.is_compiling() and weight.numel() <= _FUSED_WEIGHT and x.dtype == torch.float32
            and x.device.type == "cpu"):
        y = (x[..., None, :] * weight).sum(-1)  # [..., out]
        return y if bias is None else y + bias
    # Under torch.compile, F.linear (inductor runs its own choice of GEMM for it): a branch on the token count
    # would give every kind of compiled layer a second graph for verify passes of more than _FEW_TOKENS.
    # is_compiling first: a test of the token count before it would be a guard (verify passes of more than
    # _FEW_TOKENS tokens would compile a graph of their own). One exception: a graph whose token count is the
    # constant 1 (a one-row decode step, a drafter step) runs its large products (the output head) as row blocks, as
    # eager code does; a test of a constant is no guard. The bundled target's head (4096 x 128, float32, weights
    # out of cache, 1 thread): ~60 us as row blocks against ~100-130 us through F.linear, which took ~128 us of a
    # ~1.4 ms compiled decode step; from 2 tokens on F.linear is as fast or faster (9 tokens: ~295 against ~360 us).
    one_token = isinstance(tokens, int) and tokens == 1  # a SymInt (a symbolic count) is no int
    if ((torch.compiler.is_compiling() and not one_token) or tokens > _FEW_TOKENS
            or weight.numel() < _BLOCKED_WEIGHT or out % _ROW_BLOCKS):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    blocks = weight.view(_ROW_BLOCKS, out // _ROW_BLOCKS, inp)  # [8, out/8, in]
    columns = x.as_strided((_ROW_BLOCKS, inp, tokens), (0, 1, inp))  # [8, in, T]: x^T for every block, no copy
    y = torch.bmm(blocks, columns)  # [8, out/8, T]
    if tokens == 1:
        y = y.view(1, out)
    else:
        y = y.view(out, tokens).t()  # [T, out]
        if contiguous:
            y = y.contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out)


def _float64_product(weight: torch.Tensor) -> bool:
    """Whether a product with `weight` takes the float64 path of `_row_invariant_linear`: bfloat16 weights of at
    most `_FLOAT64_WEIGHT` elements (a choice by the weight, the same for every row count)."""
    return weight.dtype == torch.bfloat16 and weight.numel() <= _FLOAT64_WEIGHT


def _row_invariant_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`row_invariant_linear` on x [..., in]: [..., out]."""
    return row_invariant_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _float64_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight^T (+ bias) in float64, rounded to x's dtype: [..., out] (see `linear`)."""
    y = F.linear(x.double(), weight.double())
    return (y if bias is None else y + bias).to(x.dtype)


def _own(y: torch.Tensor) -> torch.Tensor:
    """y, or a copy of it where it is a view (an operator's output must own its memory)."""
    return y if y._base is None else y.clone()


def _row_invariant_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear`'s row-invariant paths, rows [T, in] -> [T, out]: a small bfloat16 weight's product in float64,
    any other as oneDNN's inner product with one row run as two copies. Under torch.compile this runs as the
    operator `row_invariant_linear`, so that compiled rows get the bits eager ones do: inductor would lower the
    oneDNN call as a product with a frozen weight (which it refuses outside its freezing mode) or replace it with
    its own GEMM, whose rows are not invariant. The float64 product, written as an elementwise product summed over
    `in` (float32's compiled form in `linear`), would give the same bits, as its sums are exact, but inductor's
    loops convert to float64 one element at a time (torch's AVX-512 vector code has no conversion to float64: the
    loop stores each vector and converts its elements singly), and every row converts the whole weight again.
    Measured with the pass as one compiled function (bundled pair, 1 thread, a 120-token prompt and 64 new tokens,
    load average 1.8-2.4, medians of 5 interleaved runs): target-only 119 tokens/s with such loops against 143 with
    this operator, greedy speculative (k = 8) 55 against 192; one 384 x 128 product compiled alone: ~110 us for 1
    row and ~800 us for 9, against ~64 and ~96 us through this operator. Converting through the bits (float32
    products, exact, widened with integer shifts) is no faster: inductor casts those bits element by element too."""
    if _float64_product(weight):
        return _float64_linear(rows, weight, bias)
    one = rows.shape[0] == 1
    y = torch.ops.mkldnn._linear_pointwise(rows.expand(2, -1) if one else rows, weight, bias, "none", [], "")
    return y[:1] if one else y


# Registered through torch.library's plain API (a schema and a CPU kernel) rather than `torch.library.custom_op`,
# whose Python wrapper adds ~8 us to every call against ~3 us here (a compiled bfloat16 decode step of the bundled
# target makes 216 of them). Inference only: `linear` takes this path only without autograd.
_LIBRARY = torch.library.Library("gemma4", "DEF")
_LIBRARY.define("row_invariant_linear(Tensor rows, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("row_invariant_linear", lambda rows, weight, bias: _own(_row_invariant_linear(rows, weight, bias)),
              "CPU")
row_invariant_linear = torch.ops.gemma4.row_invariant_linear.default


@torch.library.register_fake("gemma4::row_invariant_linear")
def _(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


# Elements per chunk of torch's vectorised elementwise loop (2 vectors of 512 bits in bfloat16; a multiple of every
# CPU's chunk): the elements after the last whole chunk take a scalar loop.
_VECTOR_CHUNK = 64


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Reference: `F.gelu(x, approximate="tanh")`. Promise: an element's bits do not depend on the tensor's length.
    torch's vectorised kernel and its scalar loop for a tensor's last elements differ
    in the last bit (measured: 8% of float32 values), and which elements are last depends on how many rows the
    tensor has; so a tensor that does not fill whole chunks is padded, and every element takes the vector kernel
    (a 1-row decode and a 9-row verify then give a row the same bits). A non-contiguous one (the MoE's gate half)
    is copied first: torch runs the loop per contiguous row, with a tail in every row. Real Gemma 4 widths fill
    whole chunks."""
    n = x.numel()
    # Under torch.compile the test reads the width, a constant of the graph: a test of n would be a guard on the
    # token count (a graph of its own for verify passes whose n happens to fill whole chunks).
    whole = (x.shape[-1] if torch.compiler.is_compiling() else n) % _VECTOR_CHUNK == 0
    if generic(x) or whole and x.is_contiguous():
        return F.gelu(x, approximate="tanh")
    flat = torch.cat([x.reshape(-1), x.new_zeros(_VECTOR_CHUNK - n % _VECTOR_CHUNK)])
    return F.gelu(flat, approximate="tanh")[:n].view(x.shape)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference: `torch.where(visible, 0, -inf)`. [..., S, T] bool (True: may attend) -> the additive mask, 0 or -inf, of the same shape. Built once per forward:
    SDPA takes a float mask as it is, while a bool one it converts in every layer."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


# Attention over at most this many query rows (decode, drafting, verification) runs as `_attend_rows`, whose result
# for a row does not depend on the other rows; longer ones (prefills, training) run as SDPA.
INVARIANT_QUERY_ROWS = 64


def prefill_pieces(t: torch.Tensor, blocks: torch.Tensor | None = None) -> list[tuple[int, int]] | None:
    """How a forward over the S new positions of input ids `t` [B, S] runs: as consecutive pieces [(start, end),
    ...], or None for one pass. On CPU a longer input (a prefill) runs in pieces of at most `INVARIANT_QUERY_ROWS`
    positions, each computed as a verify pass of that length is: its attention takes `_attend_rows`, and its
    sliding layers write their ring before attending over it (gemma4/cache.py), so a position's keys lie in the
    same layout whatever came before it. A position's K/V and logits then do not depend on how its prompt was
    split: one prefill, a chat history continued turn by turn, decode steps (tests/test_dtype_equivalence.py).
    An image whose positions see each other (`blocks` [B, S]: the image of each position, -1 for text) is never
    cut: it runs as a piece of its own, whatever its length, so it too is computed the same way in every split.
    The generic path (`generic.py`) runs one pass. Costs: docs/loop.md."""
    S = t.shape[1]
    if generic(t) or S <= INVARIANT_QUERY_ROWS:
        return None
    if blocks is None:
        return [(start, min(start + INVARIANT_QUERY_ROWS, S)) for start in range(0, S, INVARIANT_QUERY_ROWS)]
    inside = ((blocks[:, 1:] == blocks[:, :-1]) & (blocks[:, 1:] >= 0)).any(0).tolist()  # i + 1 continues an image
    edge = (blocks[:, 1:] != blocks[:, :-1]).any(0).tolist()  # an image starts or ends before i + 1
    pieces, start = [], 0
    for i in range(1, S):
        if not inside[i - 1] and (edge[i - 1] or i - start == INVARIANT_QUERY_ROWS):
            pieces.append((start, i))
            start = i
    return pieces + [(start, S)]


# Full-attention layers read their keys in blocks of this many positions (the cache pads their length to a multiple).
KEY_BLOCK = 256
# MKL's float32 GEMM computes a row with one kernel for 1-3 rows and another for 4+: every product has 4+ rows.
_MIN_ROWS = 4
# Half-precision attention with K/V rows narrower than this (n_kv * head_dim; tiny models) runs in float32: oneDNN's
# half-precision products cost ~4x float32's on such small matrices (measured: 280 vs 75 us a call, bundled pair).
_HALF_MIN_WIDTH = 256


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference: `F.scaled_dot_product_attention(q, k, v, mask, scale=1.0, enable_gqa=True)` =
    softmax(q k^T + mask) v with scale 1.0 (q_norm and k_norm take the place of 1/sqrt(d)).
    q: [B, nH, S, d]; k, v: [B, n_kv, T, d], query head h reads kv head h // (nH / n_kv); mask: additive
    (`additive_mask`) [B, S, T] (one per row), [1, S, T] or [S, T] (shared by every row), or None (every key
    visible).

    On CPU, up to `INVARIANT_QUERY_ROWS` query rows take `_attend_rows`: greedy speculative decoding is exact only
    if a position's attention gives the same bits in a one-token decode and in a row of a verify pass, and SDPA's
    CPU kernel gives neither (its products and sums change with the number of rows and of keys). Off the CPU
    (and inside `generic_path()`), `generic.attend`; there mask may also be a `generic.Causal`."""
    if generic(q):
        return _generic.attend(q, k, v, mask)
    if mask is not None and mask.dim() == 2:
        mask = mask[None]
    if q.device.type == "cpu" and q.shape[2] <= INVARIANT_QUERY_ROWS:
        return _attend_rows(q, k, v, mask)
    mask = mask[:, None] if mask is not None else None  # [B, 1, S, T]: the same for every head
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1])


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`attend` with a result for each query row that depends only on that row, on the keys it can see and on T.

    - Rows: the g = nH / n_kv query heads of a KV head and the S positions form the rows of one product per KV
      head, [g*S, d] @ [d, T], padded with zero queries to at least `_MIN_ROWS` rows; the products used (MKL in
      float32, oneDNN in half precision) give a row the same bits for any count of 4+ rows and any row index
      (tests/test_dtype_equivalence.py checks this where it runs).
    - Keys: when T is a multiple of `KEY_BLOCK` (full layers: the cache pads T so), the keys are cut into blocks
      of KEY_BLOCK; the exp-sums and the products with V are taken per block and the blocks summed one after the
      other (cumsum: a sequential scan). A block a row cannot see adds exact zeros, so a row gives the same bits
      with T = 256 in a decode step and T = 512 in a verify pass that crosses a block boundary. The max over the
      keys is exact in any order. Sliding layers read their whole ring (T fixed by the config) as one block.
    Scores are computed in the model's dtype and rounded to it, as transformers' eager attention does (float32
    for K/V narrower than `_HALF_MIN_WIDTH`: a choice made by shape, not by T, the same for every call of a layer);
    the softmax statistics are float32."""
    B, nH, S, d = q.shape
    n_kv, T = k.shape[1], k.shape[2]
    dtype = q.dtype
    if mask is not None and mask.dim() == 2:
        mask = mask[None]  # [1, S, T]: shared by every row
    if dtype != torch.float32 and n_kv * d < _HALF_MIN_WIDTH:
        q, k, v = q.float(), k.float(), v.float()
    g = nH // n_kv
    least = -(-_MIN_ROWS // g)
    # queries per head after padding. Under compilation with a symbolic S known to be >= least (S >= 2 in a verify
    # graph), S itself: max() would make the expression Max(least, S), which torch's nested compile regions
    # (speculative/compiled.py) cannot reuse across layers
    rows = S if statically_known_true(S >= least) else max(S, least)
    if rows > S:
        q = torch.cat([q, q.new_zeros(B, nH, rows - S, d)], dim=2)
        if mask is not None:
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], rows - S, T)], dim=1)
    block = KEY_BLOCK if T > KEY_BLOCK and T % KEY_BLOCK == 0 else T
    nb = T // block
    s = torch.matmul(q.reshape(B, n_kv, 1, g * rows, d), k.unflatten(2, (nb, block)).transpose(-1, -2))
    s = s.view(B, n_kv, nb, g, rows, block).float()  # [B, n_kv, nb, g, rows, block]
    if mask is not None:
        s = s + mask.view(-1, 1, rows, nb, block).permute(0, 1, 3, 2, 4)[:, :, :, None]  # [B', 1, nb, 1, rows, block]
    e = (s - s.amax(dim=(2, 5), keepdim=True)).exp_()
    total = e.sum(-1)  # [B, n_kv, nb, g, rows]
    o = torch.matmul(e.view(B, n_kv, nb, g * rows, block).to(v.dtype), v.unflatten(2, (nb, block)))
    if nb > 1:  # blocks summed in order; a single block needs no sum (x + 0 == x)
        total, o = total.cumsum(2)[:, :, -1], o.float().cumsum(2)[:, :, -1]
    else:
        total, o = total[:, :, 0], o[:, :, 0].float()
    out = o.view(B, n_kv, g, rows, d) / total[..., None]  # [B, n_kv, g, rows, d]
    return out[:, :, :, :S].reshape(B, nH, S, d).to(dtype)
