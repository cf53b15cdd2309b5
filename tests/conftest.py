"""Session fixtures: tiny random transformers models saved as checkpoints once, and our models loaded from them."""

import functools

import pytest
import torch

from tests import tiny

torch.set_num_threads(1)  # tiny models run as fast on one thread; two spin-wait badly on a shared CPU


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> folder of a saved tiny target (built once per session)."""

    @functools.cache
    def make(family: str):
        return tiny.save(tiny.build_target(family, seed=0), tmp_path_factory.mktemp(f"target-{family}"))

    return make


@pytest.fixture(scope="session")
def drafter_checkpoint(tmp_path_factory):
    """drafter_checkpoint(kind) -> folder of a saved tiny drafter."""

    @functools.cache
    def make(kind: str):
        return tiny.save(tiny.build_drafter(kind, seed=1), tmp_path_factory.mktemp(f"drafter-{kind}"))

    return make


@pytest.fixture(scope="session")
def vision_checkpoint(tmp_path_factory):
    """vision_checkpoint(family) -> folder of a saved tiny Gemma4ForConditionalGeneration with a vision tower
    ("e2b" or "31b": tiny.VISION_FAMILIES)."""

    @functools.cache
    def make(family: str):
        return tiny.save(tiny.build_vision_target(family, seed=0), tmp_path_factory.mktemp(f"vision-{family}"))

    return make


@pytest.fixture(scope="session")
def target_pair(checkpoint):
    """target_pair(family) -> (transformers model, our model loaded from the same checkpoint)."""
    from transformers import Gemma4ForCausalLM

    from weights import load_target

    @functools.cache
    def make(family: str):
        folder = checkpoint(family)
        return Gemma4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval(), load_target(folder)

    return make


@pytest.fixture
def row_invariant_float32():
    """Float32 products through oneDNN's row-invariant path for one test (gemma4.kernels.set_row_invariant_float32):
    comparisons of runs that compute a position with different row counts (verify vs decode, a batch vs one
    prompt, a chat suffix vs a whole prefill) are then exact in float32 too. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("row_invariant_float32")`."""
    from gemma4 import kernels

    kernels.set_row_invariant_float32(True)
    yield
    kernels.set_row_invariant_float32(False)
