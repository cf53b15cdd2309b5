"""The CPU row-block path of `gemma4.layers.linear` (a few tokens, a weight of 64 KB or more) against F.linear in
float64, on every shape class it takes or declines: it must equal a plain product within float rounding."""

import pytest
import torch
import torch.nn.functional as F

from gemma4.layers import linear

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
