"""Greedy speculative decoding gives exactly the target-only tokens in float32, bfloat16 and float16.

That holds only if a position's logits come out the same bits in a one-token decode step and in any row of a
k + 1-token verify pass, whatever k, the schedule or the drafter. Oracles: target-only greedy decoding of the same
model (its own correctness is tested against transformers in test_speculative.py), the one-token decode of the same
position, and a float64 attention. Pairs: the bundled tiny pair and every tiny family of tests/tiny.py, biased so
that drafts are accepted part of the time (verify passes then use many row counts and rollbacks).

Float32 runs with `set_row_invariant_float32(True)`: by default `linear` keeps MKL's faster float32 kernels, whose
rows depend on the row count (gemma4/kernels.py), and float32 exactness is opt-in.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gemma4 import FULL
from gemma4.cache import SLIDING_SLACK, padded, sliding_capacity
from gemma4.kernels import KEY_BLOCK, _attend_rows, additive_mask
from speculative import generate
from tests import tiny
from weights import load_drafter, load_target

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAMILIES = ("e2b", "e4b", "31b", "moe")


pytestmark = pytest.mark.usefixtures("row_invariant_float32")  # tests/conftest.py


@pytest.fixture(scope="session")
def pair_folders(tmp_path_factory):
    """pair_folders(name) -> (target folder, drafter folder): the bundled pair, or a biased tiny family pair."""

    @functools.cache
    def make(name: str):
        if name == "bundled":
            return ROOT / "tiny_gemma4" / "target", ROOT / "tiny_gemma4" / "drafter"
        target, drafter = tiny.build_target(name, seed=0), tiny.build_drafter(tiny.PAIRS[name], seed=1)
        tiny.bias_vocab(target, drafter, [10, 11, 12], amount=0.3)
        folder = tmp_path_factory.mktemp(f"biased-{name}")
        return tiny.save(target, folder / "target", eos_token_id=()), tiny.save(drafter, folder / "drafter",
                                                                                  eos_token_id=())

    return make


@pytest.fixture(scope="session")
def pair(pair_folders):
    @functools.cache
    def make(name: str, dtype: str):
        target_dir, drafter_dir = pair_folders(name)
        target = load_target(target_dir, dtype=DTYPES[dtype])
        return target, load_drafter(drafter_dir, target=target, dtype=DTYPES[dtype])

    return make


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 512, (length,), generator=gen).tolist()


BUNDLED_TEXT = '''import os


def read_lines(path, encoding="utf-8"):
    """Return the lines of the file at path, without their line endings."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
'''


@functools.cache
def bundled_prompt() -> list[int]:
    from weights.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "tiny_gemma4" / "target")
    return [tokenizer.bos_id] + tokenizer.encode(BUNDLED_TEXT)


# ---- whole generations ------------------------------------------------------------------------------------------
# The constant draft length each (dtype, family) runs besides the heuristic schedule: the half-precision dtypes run
# all of 1..8 between them, every family three of them, one per dtype.
DRAFT_LENGTHS = {
    "float32": {"e2b": 5, "e4b": 1, "31b": 8, "moe": 3},
    "bfloat16": {"e2b": 1, "e4b": 4, "31b": 6, "moe": 8},
    "float16": {"e2b": 3, "e4b": 7, "31b": 2, "moe": 5},
}


def test_the_draft_lengths_cover_one_to_eight():
    assert {n for lengths in DRAFT_LENGTHS.values() for n in lengths.values()} == set(range(1, 9))
    assert sorted(n for d in ("bfloat16", "float16") for n in DRAFT_LENGTHS[d].values()) == list(range(1, 9))
    for family in FAMILIES:
        assert len({lengths[family] for lengths in DRAFT_LENGTHS.values()}) == 3, family


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_greedy_speculative_equals_target_only(family, dtype, pair):
    """Tiny families (W = 8): a 56-token prompt and 20 new tokens, 76 positions: 9.5 windows, and past the ring's
    71 slots, so decoding wraps it; constant N as DRAFT_LENGTHS says and the heuristic schedule (k grows after
    full acceptances)."""
    target, drafter = pair(family, dtype)
    prompt = _prompt(56, 0)
    want = generate(target, None, prompt, max_new_tokens=20, stop_token_ids=[]).tokens
    accepted = 0
    for options in ({"num_draft_tokens": DRAFT_LENGTHS[dtype][family], "schedule": "constant"},
                    {"schedule": "heuristic"}):
        result = generate(target, drafter, prompt, max_new_tokens=20, stop_token_ids=[], **options)
        assert result.tokens == want, f"{family} {dtype} {options}"
        accepted += sum(n for _, n in result.stats.rounds)
    assert accepted > 0  # the bias makes drafts pass: verify rows beyond the first are exercised


@pytest.mark.parametrize("dtype,options", [("float32", {"num_draft_tokens": 8, "schedule": "constant"}),
                                           ("bfloat16", {"schedule": "heuristic"}),
                                           ("float16", {"num_draft_tokens": 3, "schedule": "constant"})])
def test_bundled_pair_greedy_speculative_equals_target_only(dtype, options, pair):
    """The bundled pair (W = 64): a code prompt of 98 tokens and 40 new tokens: 138 positions, 2.2 windows, past
    the ring's 127 slots."""
    target, drafter = pair("bundled", dtype)
    prompt = bundled_prompt()
    want = generate(target, None, prompt, max_new_tokens=40, stop_token_ids=[]).tokens
    result = generate(target, drafter, prompt, max_new_tokens=40, stop_token_ids=[], **options)
    assert result.tokens == want
    assert result.stats.acceptance_rate > 0.2


# ---- one position: a row of a verify pass equals a one-token decode -------------------------------------------
def _decoded_one_by_one(target, prompt_len: int, block: torch.Tensor, max_length: int):
    """After the same prefill of `prompt_len` positions in two caches: the logits of `block` [1, k] decoded one
    token at a time in the first, and the second cache, ready for a verify pass over the same positions."""
    prompt = torch.tensor([_prompt(prompt_len, 3)])
    k = block.shape[1]
    one, many = target.new_cache(max_length=max_length), target.new_cache(max_length=max_length, max_rollback=k)
    target(prompt, one), target(prompt, many)
    return torch.cat([target(block[:, i : i + 1], one).logits for i in range(k)], dim=1), many


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_verify_rows_equal_one_token_decodes_bit_for_bit(family, dtype, pair):
    """After a prefill of 250 positions, k + 1 = 9 tokens as one verify pass (crossing the full layers' key block
    at 256, wrapping the ring) give, row for row, the logits of nine one-token decode steps: bit for bit. Then
    a rollback, and a 4-row pass over the same positions with other drafts: again bit for bit."""
    target, _ = pair(family, dtype)
    block = torch.tensor([_prompt(9, 4)])
    with torch.inference_mode():
        decoded, many = _decoded_one_by_one(target, 250, block, max_length=300)  # [1, 9, V]
        verified = target(block, many).logits
        assert torch.equal(verified, decoded)
        many.rollback(7)  # keep 2 of the 9
        again = target(torch.cat([block[:, 2:3], torch.tensor([[7, 8, 9]])], dim=1), many).logits
        assert torch.equal(again[:, 0], decoded[:, 2])


def test_bundled_bfloat16_verify_passes_up_to_33_rows_equal_one_token_decodes_bit_for_bit(pair):
    """The bundled target in bfloat16 (small weights: 128-wide layers, a 4096-token head) after a prefill of 230
    positions: verify passes of 2, 8, 17 and 33 rows (33: k = 32, the largest draft any schedule asks for) over
    the same positions, rolled back after each, give row for row the logits of 33 one-token decode steps, bit for
    bit. This failed while `linear` sent small bfloat16 weights and products of more than 32 rows to F.linear
    (row 7 of the 8-row pass differed). Float32 and float16 rows: the tiny families' test above."""
    dtype = "bfloat16"
    target, _ = pair("bundled", dtype)
    block = torch.tensor([_prompt(33, 4)])
    with torch.inference_mode():
        decoded, many = _decoded_one_by_one(target, 230, block, max_length=270)  # [1, 33, V]
        for rows in (2, 8, 17, 33):
            verified = target(block[:, :rows], many).logits
            many.rollback(rows)
            differ = (verified != decoded[:, :rows]).any(-1)[0].nonzero().flatten().tolist()
            assert differ == [], f"{dtype}: rows {differ} of a {rows}-row verify pass differ from one-token decodes"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 16), (4, 2, 16), (2, 1, 32), (8, 1, 256), (8, 1, 512)])
def test_attention_rows_do_not_depend_on_other_rows_or_masked_key_blocks(heads, kv_heads, head_dim, dtype):
    """`_attend_rows` on tiny and Gemma 4 E2B head shapes: row i of an S-row call equals the 1-row call for the
    same position (sliding: the same ring of T keys; full: T padded to the row's own key blocks, so a decode at
    255 reads 256 keys where a verify pass reads 512), and stays within float rounding of a float64 attention."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(heads * head_dim + kv_heads)
    for T in (71, 300):  # a tiny ring / full-layer keys crossing a block
        k, v = (torch.randn(1, kv_heads, padded(T), head_dim, generator=gen).to(dt) for _ in range(2))
        q = torch.randn(1, heads, 9, head_dim, generator=gen).to(dt) * head_dim**-0.25
        k = k * head_dim**-0.25
        for S in (2, 9):
            positions = torch.arange(T - S, T)
            full = T > KEY_BLOCK
            keys = padded(T) if full else T
            mask = additive_mask(torch.arange(keys)[None, :] <= positions[:, None], dt)
            rows = _attend_rows(q[:, :, :S], k[:, :, :keys], v[:, :, :keys], mask)
            for i, p in enumerate(positions.tolist()):
                own = padded(p + 1) if full else T
                alone = _attend_rows(q[:, :, i : i + 1], k[:, :, :own], v[:, :, :own], mask[i : i + 1, :own])
                assert torch.equal(rows[:, :, i : i + 1], alone), (T, S, i)
            exact = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, :S].double(), k[:, :, :keys].double(), v[:, :, :keys].double(), attn_mask=mask.double(),
                scale=1.0, enable_gqa=heads != kv_heads)
            tol = {torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}[dt]
            torch.testing.assert_close(rows.double(), exact, atol=tol, rtol=0)


# ---- one position: its K/V and logits do not depend on how its prompt was split ----------------------------------
SPLITS = ([300], [1, 5, 294], [37, 80, 3, 180])


def _fed_in_pieces(target, ids: torch.Tensor, pieces: list[int]):
    """ids [1, P] fed to a fresh cache as consecutive forwards of these lengths (a chat history continued turn by
    turn): (every position's logits [1, P, V], the cache)."""
    cache, logits, start = target.new_cache(max_length=KEY_BLOCK, max_rollback=40), [], 0
    for n in pieces:
        logits.append(target(ids[:, start:start + n], cache).logits)
        start += n
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", ["bundled", *FAMILIES])
def test_a_history_fed_in_pieces_gives_the_logits_and_kv_of_one_prefill_bit_for_bit(name, dtype, pair):
    """A chat turn prefills only what its cache does not hold, a fresh `generate` the whole history at once: a
    300-token history (past the bundled pair's 64-position window and 2.3 tiny rings, across the full layers' key
    block at 256) split as in SPLITS gives every position's logits, and the K/V the cache holds, bit for bit as
    one prefill does. This failed while prefills of more than 64 positions attended through SDPA over their own
    key layout (up to 0.12 apart in bfloat16, 0.023 in float16, 1e-5 in float32 on the bundled target)."""
    target, _ = pair(name, dtype)
    ids = torch.tensor([_prompt(300, 5)])
    with torch.inference_mode():
        want, one = _fed_in_pieces(target, ids, [300])
        for pieces in SPLITS[1:]:
            got, cache = _fed_in_pieces(target, ids, pieces)
            differ = (got != want).any(-1)[0].nonzero().flatten().tolist()
            assert differ == [], f"{name} {dtype} {pieces}: logits of positions {differ[:8]} differ"
            for kind, view in cache.views().items():
                held = one.views()[kind]
                assert torch.equal(view.positions, held.positions)
                kept = view.positions[0] >= 0  # ring slots that hold a position
                for got_kv, want_kv in ((view.k, held.k), (view.v, held.v)):
                    assert torch.equal(got_kv[:, :, kept], want_kv[:, :, kept]), f"{name} {dtype} {pieces} {kind}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_prompt_with_images_fed_in_pieces_gives_the_logits_of_one_prefill_bit_for_bit(dtype):
    """Images whose positions see each other (a 31B-like target, use_bidirectional_attention "vision"): an image
    of 90 positions (more than a piece) and one of 20 are never cut, each runs as a piece of its own; text around
    them in pieces of 64. Fed after text histories of other lengths (a chat whose first turns had no image), every
    position's logits are the same bits as one prefill's."""
    from gemma4 import Gemma4Config, Gemma4Model
    from gemma4.kernels import prefill_pieces
    from gemma4.model import image_blocks

    config = Gemma4Config(**dict(tiny.TARGET_CONFIGS["31b"], use_bidirectional_attention="vision",
                                 image_token_id=500))
    torch.manual_seed(0)
    target = Gemma4Model(config).eval()
    tiny.randomize(target, seed=0)
    target = target.to(DTYPES[dtype])
    ids = _prompt(130, 6)[:70] + [500] * 90 + _prompt(60, 7)[:30] + [500] * 20 + _prompt(60, 8)
    ids = torch.tensor([ids])  # 270 positions: images at 70..159 and 190..209
    features = torch.randn(110, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
    blocks = image_blocks(ids == 500)
    pieces = prefill_pieces(ids, blocks)
    assert (70, 160) in pieces and (190, 210) in pieces and all(b - a <= 64 for a, b in pieces
                                                               if not (a, b) in ((70, 160), (190, 210)))
    with torch.inference_mode():
        results = []
        for split in ([270], [1, 69, 200], [40, 230], [69, 1, 120, 80]):
            cache, logits, start = target.new_cache(max_length=KEY_BLOCK, max_rollback=40), [], 0
            for n in split:
                part = ids[:, start:start + n]
                before = int((ids[:, :start] == 500).sum())
                count = int((part == 500).sum())
                logits.append(target(part, cache, image_features=features[before:before + count] if count else None
                                     ).logits)
                start += n
            results.append(torch.cat(logits, dim=1))
        for split, got in zip(([1, 69, 200], [40, 230], [69, 1, 120, 80]), results[1:]):
            differ = (got != results[0]).any(-1)[0].nonzero().flatten().tolist()
            assert differ == [], f"{dtype} {split}: logits of positions {differ[:8]} differ"


# ---- the geometry depends on the config alone -------------------------------------------------------------------
def test_cache_geometry_is_the_same_for_every_draft_length_schedule_and_drafter(pair, monkeypatch):
    from gemma4 import KVCache

    target, drafter = pair("e2b", "float32")
    seen = []
    init = KVCache.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append((self.capacity, {i: k.shape for i, k in self._k.items()}))

    monkeypatch.setattr(KVCache, "__init__", recording)
    prompt = _prompt(10, 0)
    generate(target, None, prompt, max_new_tokens=12, stop_token_ids=[])
    for options in ({"num_draft_tokens": 1, "schedule": "constant"}, {"num_draft_tokens": 8, "schedule": "constant"},
                    {"schedule": "heuristic"}, {"schedule": "auto"}):
        generate(target, drafter, prompt, max_new_tokens=12, stop_token_ids=[], **options)
    assert len(seen) == 5 and all(s == seen[0] for s in seen)
    assert seen[0][0] == sliding_capacity(target.config) == target.config.sliding_window - 1 + SLIDING_SLACK
    assert all(shape[2] % KEY_BLOCK == 0 for i, shape in seen[0][1].items()
               if target.config.layers[i].attention_type == FULL)


def test_a_drafter_whose_history_does_not_fit_the_ring_is_refused_naming_the_limit(pair):
    target, _ = pair("31b", "float32")
    W = target.config.sliding_window
    wide = SimpleNamespace(sliding_history=W + 60, generation_config={"num_assistant_tokens": 4})
    with pytest.raises(ValueError, match=rf"ring holds {W - 1 + SLIDING_SLACK} slots .* at most 2 draft tokens"):
        generate(target, wide, [5, 6, 7], max_new_tokens=30, stop_token_ids=[])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gelu_gives_a_row_the_same_bits_whatever_the_row_count(dtype):
    """Width 8 (the tiny models' per-layer inputs): a lone row is all scalar tail in torch's elementwise loop, the
    same row among 9 is vectorised; gelu_tanh pads so that both take the vector kernel, and copies a non-contiguous
    input first. Oracle: the 1-row result."""
    from gemma4.kernels import gelu_tanh

    x = (torch.randn(4096, 8, generator=torch.Generator().manual_seed(0)) * 3).to(DTYPES[dtype])
    rows = torch.cat([gelu_tanh(x[i : i + 9])[:1] for i in range(0, 4096, 9)])
    assert torch.equal(rows, torch.cat([gelu_tanh(x[i : i + 1]) for i in range(0, 4096, 9)]))
    # the MoE's gate half: [n, 32] columns of [n, 64], not contiguous (torch then loops per row, a tail in each)
    gate = (torch.randn(4096, 64, generator=torch.Generator().manual_seed(1)) * 3).to(DTYPES[dtype]).chunk(2, -1)[0]
    rows = torch.cat([gelu_tanh(gate[i : i + 2])[:1] for i in range(0, 4096, 2)])
    assert torch.equal(rows, torch.cat([gelu_tanh(gate[i : i + 1]) for i in range(0, 4096, 2)]))
    torch.testing.assert_close(gelu_tanh(x).double(), torch.nn.functional.gelu(x.double(), approximate="tanh"),
                               atol={"float32": 1e-6, "bfloat16": 0.04, "float16": 0.01}[dtype], rtol=0)
