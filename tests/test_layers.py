"""The CPU fast paths of `gemma4.layers.linear` (weight-first products for a few tokens, row blocks for one token)
against F.linear: the tiny test models are too small to reach them, the real checkpoints always do."""

import pytest
import torch
import torch.nn.functional as F

from gemma4.layers import linear


@pytest.mark.parametrize("tokens", [1, 2, 5, 32, 33])
@pytest.mark.parametrize("shape", [(4096, 256), (256, 4096), (2048, 1000)], ids=["tall", "wide", "odd"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear_on_every_path(tokens, shape, with_bias):
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(shape, generator=gen)
    assert weight.numel() >= 1 << 20  # large enough for the fast paths
    bias = torch.randn(shape[0], generator=gen) if with_bias else None
    x = torch.randn(1, tokens, shape[1], generator=gen)
    want = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    for contiguous in (True, False):
        got = linear(x, weight, bias, contiguous=contiguous)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-5)


def test_one_token_row_blocks_run_with_one_thread_too():
    weight, x = torch.randn(4096, 256), torch.randn(1, 1, 256)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(linear(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
