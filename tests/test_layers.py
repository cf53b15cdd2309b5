"""The CPU row-block path of `gemma4.kernels.linear` (a few tokens, a weight of 64 KB or more) against F.linear in
float64, on every shape class it takes or declines: it must equal a plain product within float rounding."""

import pytest
import torch
import torch.nn.functional as F

import contextlib

from gemma4.kernels import linear, row_invariant, set_row_invariant_float32

SHAPES = {
    "tall": (4096, 256),  # the E2B-like case: out >> in, 4 MB
    "wide": (256, 4096),
    "small": (512, 128),  # a drafter MLP: just above the threshold
    "tiny": (64, 128),  # below it: F.linear
    "odd": (2044, 1000),  # out not a multiple of 8: F.linear
}


@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 17])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear_on_every_path(tokens, shape, with_bias):
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(shape, generator=gen)
    bias = torch.randn(shape[0], generator=gen) if with_bias else None
    x = torch.randn(1, tokens, shape[1], generator=gen)
    want = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    for contiguous in (True, False):
        got = linear(x, weight, bias, contiguous=contiguous)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-5)


def test_batched_rows_and_non_contiguous_weights():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 256, generator=gen)
    x = torch.randn(3, 2, 256, generator=gen)  # B = 3 sequences of 2 tokens: one product of 6 rows
    torch.testing.assert_close(linear(x, weight, contiguous=False), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    transposed = torch.randn(256, 512, generator=gen).T  # a view BLAS reads transposed: no row blocks
    torch.testing.assert_close(linear(x, transposed), F.linear(x, transposed), atol=1e-4, rtol=1e-5)


def test_row_blocks_run_with_one_thread_too():
    weight, x = torch.randn(4096, 256), torch.randn(1, 5, 256)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for rows in (x[:, :1], x):
                torch.testing.assert_close(linear(rows, weight), F.linear(rows, weight), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


# ---- dtypes and row invariance -------------------------------------------------------------------------------------

# "float32-invariant": float32 after set_row_invariant_float32(True) (the default float32 path is not row-invariant)
DTYPES = {"float32": torch.float32, "float32-invariant": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@contextlib.contextmanager
def path_of(name: str):
    set_row_invariant_float32(name == "float32-invariant")
    try:
        yield DTYPES[name]
    finally:
        set_row_invariant_float32(False)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# (out, in): tiny-model products and every Gemma 4 E2B layer product (q, k/v, o of sliding and full layers, the MLP)
INVARIANCE_SHAPES = {"tiny-q": (64, 128), "tiny-mlp": (512, 128), "tiny-down": (128, 512),
                     "e2b-q": (2048, 1536), "e2b-kv": (256, 1536), "e2b-o": (1536, 2048),
                     "e2b-full-q": (4096, 1536), "e2b-mlp": (6144, 1536), "e2b-down": (1536, 6144)}


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 2, 5, 17, 40])
@pytest.mark.parametrize("shape", [(64, 128), (2048, 1536), (1536, 6144)], ids=["tiny", "e2b-q", "e2b-down"])
def test_linear_matches_a_float64_product_within_the_dtypes_rounding(name, tokens, shape):
    """Inputs rounded to `dtype`, then the exact product in float64: our result may differ by a float32
    accumulation error (every dtype accumulates in float32) and two roundings to `dtype` (the float16 path rounds
    x @ w^T, then adds the bias)."""
    dtype = DTYPES[name]
    gen = torch.Generator().manual_seed(tokens)
    weight = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(shape[0], generator=gen).to(dtype)
    x = torch.randn(1, tokens, shape[1], generator=gen).to(dtype)
    want = F.linear(x.double(), weight.double(), bias.double())
    bound = F.linear(x.double().abs(), weight.double().abs(), bias.double().abs())  # sum of |terms|
    with torch.inference_mode(), path_of(name):
        got = linear(x, weight, bias)
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want).abs()
    product = F.linear(x.double(), weight.double())  # without the bias
    allowed = UNIT_ROUNDOFF[dtype] * (want.abs() + product.abs()) + 1e-5 * bound
    assert bool((err <= allowed).all()), f"{dtype}: worst error {(err / bound).max():.2e} of sum |terms|"


def _rows_alone_and_together(weight: torch.Tensor, x: torch.Tensor) -> list[tuple[int, int, int]]:
    """(T, start, i) for every row i of x[start:start+T] whose product differs, in any bit, from that row's product
    computed alone; T in 1..17 (a verify pass of up to 16 drafts), rows taken from the start and from the end."""
    alone = [linear(x[i:i + 1], weight) for i in range(x.shape[0])]
    differ = []
    for tokens in range(1, x.shape[0] + 1):
        for start in sorted({0, x.shape[0] - tokens}):
            together = linear(x[start:start + tokens], weight)
            differ += [(tokens, start, i) for i in range(tokens) if not torch.equal(together[i], alone[start + i][0])]
    return differ


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["float32-invariant", "bfloat16", "float16"])
def test_a_rows_product_does_not_depend_on_the_other_rows(name, threads):
    """Greedy speculative == target-only needs verify rows bit-identical to one-token decode rows. The row-block
    path fails this in float32 from 4 rows on (MKL sums 4+ columns differently), F.linear from 2 (float32, and
    bfloat16 on weights of 2048 x 1536 and more)."""
    gen = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), path_of(name) as dtype:
            for name, shape in INVARIANCE_SHAPES.items():
                if threads == 2 and name not in ("tiny-mlp", "e2b-q", "e2b-mlp"):
                    continue  # keeps the suite fast: two threads on the shapes that split work between them
                weight = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
                x = torch.randn(17, shape[1], generator=gen).to(dtype)
                differ = _rows_alone_and_together(weight, x)
                assert not differ, f"{name} {shape} {dtype}, {threads} threads: (T, start, row) {differ[:5]}"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(64, 64), (256, 128), (2048, 1536)], ids=["tiny-64", "tiny-mlp", "e2b-q"])
def test_half_precision_rows_are_invariant_at_batch_and_prefill_row_counts(shape, dtype):
    """A batch of 8 verifying 8 drafts computes 72 rows, heuristic drafting 33 per prompt, a prefill piece 64, a
    batch's prefill hundreds: each row must still equal the row computed alone. F.linear failed this in bfloat16
    on a [64, 64] weight for some inputs from 2 rows on (an E4B-like tiny pair's greedy outputs differed in 2 of 50
    prompts), and every product of more than 32 rows took F.linear before all bfloat16 products took oneDNN.
    Float16 (row blocks up to 16 rows, F.linear above where oneDNN has no float16 kernel) up to 72 rows."""
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    x = torch.randn(300 if dtype == torch.bfloat16 else 72, shape[1], generator=gen).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([linear(x[i:i + 1], weight) for i in range(x.shape[0])])
        for tokens in (2, 17, 33, 64, 72, 264, 300)[:None if dtype == torch.bfloat16 else 5]:
            together = linear(x[:tokens], weight)
            assert torch.equal(together, alone[:tokens]), f"{shape}, {tokens} rows"


# bfloat16 weights small enough for the float64 path (every product of the bundled pair but its head), and one above
FLOAT64_SHAPES = {"tiny-q": (64, 128), "tiny-mlp": (512, 128), "tiny-down": (128, 512), "tiny-ple": (8, 128)}


@pytest.mark.parametrize("shape", list(FLOAT64_SHAPES.values()), ids=list(FLOAT64_SHAPES))
def test_a_small_bfloat16_product_is_the_exact_sum_rounded(shape):
    """What makes the float64 path row-invariant: its sums are exact (the oracle: Python fractions), so no order
    BLAS chooses for a row count can change them. Inputs spread over 2^12 in magnitude, as activations are."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(shape[0])
    weight = (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)
    x = (torch.randn(3, shape[1], generator=gen) * torch.rand(3, shape[1], generator=gen).mul(12).exp2()).to(
        torch.bfloat16)
    xs, ws = x.double().tolist(), weight.double().tolist()
    exact = [[float(sum(Fraction(a) * Fraction(b) for a, b in zip(row, w))) for w in ws] for row in xs]
    with torch.inference_mode():
        got = linear(x, weight)
    assert torch.equal(got, torch.tensor(exact, dtype=torch.float64).to(torch.bfloat16))


@pytest.mark.parametrize("shape", list(FLOAT64_SHAPES.values()) + [(2048, 128)],
                         ids=list(FLOAT64_SHAPES) + ["onednn"])
def test_the_compiled_operator_computes_what_eager_linear_does(shape):
    """Under torch.compile every row-invariant bfloat16 product runs as the operator `row_invariant_linear` (its
    kernel is eager `linear`'s): called directly, it must give eager's bits for 1 to 17 rows, with and without a
    bias."""
    from gemma4.kernels import row_invariant_linear

    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)
    bias = torch.randn(shape[0], generator=gen).to(torch.bfloat16)
    x = torch.randn(17, shape[1], generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        for tokens in (1, 2, 5, 17):
            for b in (None, bias):
                got = row_invariant_linear(x[:tokens], weight, b)
                assert got.shape == (tokens, shape[0]) and got._base is None
                assert torch.equal(got, linear(x[:tokens], weight, b)), f"{tokens} rows, bias {b is not None}"


def test_training_takes_the_differentiable_path():
    """oneDNN's inner product has no backward (torch warns and returns no gradient): with grad required, F.linear."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 128, generator=gen, requires_grad=True)
    x = torch.randn(1, 3, 128, generator=gen)
    linear(x, weight).square().sum().backward()
    reference = weight.detach().clone().requires_grad_()
    F.linear(x, reference).square().sum().backward()
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, reference.grad, atol=1e-4, rtol=1e-4)


def test_the_default_float32_path_is_not_row_invariant():
    """What set_row_invariant_float32 is for: without it a float32 verify row may differ from its decode row (if
    this starts failing, MKL became row-invariant and the float32 default can change)."""
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(2048, 1536, generator=gen) * 0.02, torch.randn(17, 1536, generator=gen)
    with torch.inference_mode():
        assert _rows_alone_and_together(weight, x) and not row_invariant(weight)  # what generate.py --compare says
        with path_of("float32-invariant"):
            assert not _rows_alone_and_together(weight, x) and row_invariant(weight)
