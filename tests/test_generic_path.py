"""The generic path (gemma4/generic.py: what a CUDA device runs) on the CPU, inside `generic_path()`.

What the generic path promises, and these tests assert: logits within float rounding of transformers (float32
1e-4); SDPA called so that a GPU can run a fused kernel (no math fallback: checked against the rules of
`fused_backends`), without materialising [S, T] masks for a prefill from position 0; the MoE under torch.compile
reading only the chosen experts; greedy tokens of the loop, a batch, a chat turn and the compiled loop equal to
target-only greedy tokens *up to the first near-tie*. What it does not promise: a row's bits independent of the other
rows (F.linear and SDPA choose their kernels by shape), so greedy speculative output can differ from target-only
output after a position where the two best logits are within rounding of each other. The tests measure how often
(printed with -s); scripts/gpu_check.py measures it on a GPU.

Oracles: transformers 5.24.0 (eager attention), attention computed in float64 from its definition, the eager
expert loop, and target-only greedy output with the target's own logit margins.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemma4 import generic, kernels
from gemma4.generic import Causal, fused_backends, generic_path
from speculative import generate, generate_batch
from tests import tiny
from weights import load_drafter, load_target

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
# Largest target-only logit margin (best minus second best) at which a generic-path run may pick the other token:
# logits differ between a decode and a verify row by float rounding (measured on these models: float32 < 1e-5,
# bfloat16 < 0.07 in logits of up to 30).
NEAR_TIE = {torch.float32: 1e-3, torch.bfloat16: 0.25}


@pytest.fixture(autouse=True)
def _generic():
    with generic_path():
        yield


def _ids(n, seed=0, vocab=512):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- the switch ----------------------------------------------------------------------------------------------

def test_the_switch_makes_cpu_products_and_gelu_the_reference_definitions():
    """Inside generic_path() CPU products are F.linear and GELU is F.gelu bit for bit (the CPU paths are oneDNN
    in bfloat16, row blocks in float32, a padded GELU: other bits); outside it they are not."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=gen).bfloat16()
    x = torch.randn(1, 128, generator=gen).bfloat16()
    g = torch.randn(3, 37, generator=gen)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert torch.equal(kernels.gelu_tanh(g), F.gelu(g, approximate="tanh"))
    with generic_path(False):
        assert not generic.generic(x)
        assert torch.equal(kernels.linear(x.expand(2, -1), w)[:1], kernels.linear(x, w))  # the CPU path's promise
    assert generic.generic(x)


# ---- parity with transformers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(tiny.TARGET_CONFIGS))
def test_logits_match_transformers_prefill_and_chunked_decoding(family, target_pair):
    """A prefill of 40 tokens from position 0 (`Causal` masks: SDPA's causal full layers, blockwise sliding
    layers, W = 8), a prefill keeping 3 rows, and decoding in chunks (masked, folded heads) over a cache."""
    hf, ours = target_pair(family)
    ids = torch.cat([_ids(40, 1), _ids(40, 2)])
    with torch.no_grad():
        ref = hf(ids).logits
        full = ours(ids).logits
        kept = ours(ids, logits_to_keep=3).logits
        cache = ours.new_cache(batch_size=2, max_length=4)
        rows, start = [], 0
        for n in [11, 1, 1, 5, 2, 20]:
            rows.append(ours(ids[:, start:start + n], cache).logits)
            start += n
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(full, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(kept, ref[:, -3:], atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat(rows, 1), ref, atol=TOL, rtol=0)


# ---- attention: fused kernels, no materialised masks, numerics -----------------------------------------------

def reference_attention(q, k, v, visible):
    """softmax(q k^T masked) v in float64 from the definition, GQA by repeating K/V; visible [b, S, T] bool."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2)
    s = s.masked_fill(~visible[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v


class Calls:
    """Every SDPA call of the generic path: its fused kernels by `fused_backends` and its mask's size."""

    def __init__(self, monkeypatch):
        self.backends, self.mask_elements = [], []
        original = generic.sdpa

        def record(q, k, v, mask=None, *, is_causal=False, enable_gqa=False):
            self.backends.append(fused_backends(q, k, mask, is_causal=is_causal, enable_gqa=enable_gqa))
            self.mask_elements.append(0 if mask is None else mask.numel())
            return original(q, k, v, mask, is_causal=is_causal, enable_gqa=enable_gqa)

        monkeypatch.setattr(generic, "sdpa", record)


def test_the_old_call_for_head_dim_512_had_only_the_math_kernel():
    """The trap, stated by the rules: SDPA(enable_gqa=True) with head_dim 512 and a mask (what `attend` called on
    CUDA before) leaves no fused kernel; without grouped heads the memory-efficient kernel takes it."""
    q = torch.zeros(1, 8, 5, 512, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 256, 512, dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 5, 256, dtype=torch.bfloat16)
    assert fused_backends(q, k, mask, enable_gqa=True) == set()
    assert fused_backends(q.reshape(1, 1, 40, 512), k, mask) == {"efficient"}
    assert fused_backends(q[:, :, :, :256], k[:, :, :5, :256], None, is_causal=True, enable_gqa=True) == {"flash"}


ATTENTION_CASES = [  # name, S, T, mask builder (q positions first .. first + S - 1)
    ("decode", 1, 512, "cache"), ("verify", 9, 512, "cache"), ("long masked", 80, 256, "cache"),
    ("causal prefill", 40, 256, Causal(40)), ("causal kept rows", 3, 256, Causal(40).last(3)),
    ("window prefill", 50, 50, Causal(50, window=8)), ("short window prefill", 12, 12, Causal(12, window=8)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 1, 512), (8, 2, 512), (4, 2, 256), (4, 4, 32)])
@pytest.mark.parametrize("name,S,T,mask", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_runs_fused_kernels_without_full_masks_and_matches_the_definition(
        name, S, T, mask, heads, kv_heads, head_dim, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(S * 7 + head_dim)
    q = torch.randn(2, heads, S, head_dim, generator=gen).to(dtype) / head_dim**0.25
    k = torch.randn(2, kv_heads, T, head_dim, generator=gen).to(dtype) / head_dim**0.25
    v = torch.randn(2, kv_heads, T, head_dim, generator=gen).to(dtype)
    if isinstance(mask, Causal):
        visible = mask.visible(T, q.device)
    else:  # a cache step: queries at T - 100 - S .. ; keys past them and a few early ones hidden (a ring's gaps)
        pos = torch.arange(T - 100 - S, T - 100)[:, None]
        keys = torch.arange(T)[None]
        visible = ((keys <= pos) & (keys % 7 != 3))[None].expand(2, -1, -1)
        mask = kernels.additive_mask(visible, dtype)
    calls = Calls(monkeypatch)
    out = kernels.attend(q, k, v, mask)
    ref = reference_attention(q, k, v, visible)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    assert calls.backends and all(calls.backends), f"{name}: a call only the math kernel takes: {calls.backends}"
    if dtype == torch.bfloat16 and head_dim <= 256 and mask == Causal(S):  # flash where it applies
        assert all("flash" in b for b in calls.backends)
    if isinstance(mask, Causal) and mask.first == 0:  # no [S, T] mask: none at all, or O(S W) for a window
        W = mask.window
        if W is None or W >= S:
            limit = 0
        elif S > 2 * W:
            limit = 2 * -(-S // W) * W * 2 * W  # [B * blocks, 1, W, 2W]
        else:  # a prompt of at most 2W tokens: a small mask [S, S] (per folded head)
            limit = heads * S * S
        assert max(calls.mask_elements) <= limit, calls.mask_elements


def test_a_prefill_from_position_0_describes_its_masks_and_decoding_steps_materialise_small_ones():
    from gemma4 import FULL, SLIDING, KVCache

    config = load_target(tiny.save(tiny.build_target("e2b", seed=0), __import__("tempfile").mkdtemp())).config
    step = KVCache(config, max_length=300).begin(200)
    assert step.masks[FULL] == Causal(200) and step.masks[SLIDING] == Causal(200, window=8)
    cache = KVCache(config, max_length=300)
    cache.begin(3)
    step = cache.begin(5)  # a decode step: small [1, 5, T] masks
    assert all(isinstance(m, torch.Tensor) and m.shape[-2] == 5 for m in step.masks.values())
    with generic_path(False):  # the CPU path keeps its tensors
        assert isinstance(KVCache(config, max_length=300).begin(200).masks[FULL], torch.Tensor)


# ---- the MoE under torch.compile ------------------------------------------------------------------------------

@functools.cache
def moe_layer():
    target = load_target(tiny.save(tiny.build_target("moe", seed=0), __import__("tempfile").mkdtemp()))
    return target.layers[0]


def routed(layer, tokens: int, seed: int = 0):
    x = torch.randn(tokens, layer.router.proj.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    weights, experts = layer.router(x)
    return x, weights, experts


def test_gathered_experts_read_only_the_chosen_ones_and_equal_the_loop():
    """Unchosen experts' weights set to NaN: the gathered path never touches them (dense would multiply them by
    0: NaN), and it equals the eager loop within float32 rounding."""
    experts_module = moe_layer().experts
    x, weights, experts = routed(moe_layer(), 5)
    with torch.no_grad():
        loop = experts_module(x, weights, experts)
        saved = experts_module.gate_up_proj.clone(), experts_module.down_proj.clone()
        unchosen = torch.ones(experts_module.gate_up_proj.shape[0], dtype=torch.bool)
        unchosen[experts.unique()] = False
        assert unchosen.any()
        experts_module.gate_up_proj[unchosen] = float("nan")
        experts_module.down_proj[unchosen] = float("nan")
        try:
            out = experts_module.gathered(x, weights, experts)
            assert experts_module.dense(x, weights, experts).isnan().all()
        finally:
            experts_module.gate_up_proj.copy_(saved[0])
            experts_module.down_proj.copy_(saved[1])
    assert loop.abs().max() > 0.01
    torch.testing.assert_close(out, loop, atol=1e-6, rtol=1e-5)


def test_compiled_experts_take_the_gathered_path_on_the_generic_path():
    experts_module = moe_layer().experts
    x, weights, experts = routed(moe_layer(), 1, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(experts_module, fullgraph=True)
    with torch.no_grad():
        loop = experts_module(x, weights, experts)
        unchosen = torch.ones(experts_module.gate_up_proj.shape[0], dtype=torch.bool)
        unchosen[experts.unique()] = False
        saved = experts_module.gate_up_proj.clone()
        experts_module.gate_up_proj[unchosen] = float("nan")
        try:
            out = compiled(x, weights, experts)
        finally:
            experts_module.gate_up_proj.copy_(saved)
    torch.testing.assert_close(out, loop, atol=1e-6, rtol=1e-5)


# ---- the loop, a batch, a chat, the compiled loop: equal up to the first near-tie ----------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MISMATCHES: dict[str, list[int]] = {}  # what the tests measured: label -> [runs, runs differing]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(family, dtype) -> (target, drafter): a tiny family pair biased so that drafts are often accepted."""

    @functools.cache
    def make(family: str, dtype: str):
        target, drafter = tiny.build_target(family, seed=0), tiny.build_drafter(tiny.PAIRS[family], seed=1)
        tiny.bias_vocab(target, drafter, [10, 11, 12], amount=0.3)
        folder = tmp_path_factory.mktemp(f"generic-{family}")
        tiny.save(target, folder / "target", eos_token_id=())
        tiny.save(drafter, folder / "drafter", eos_token_id=())
        ours = load_target(folder / "target", dtype=DTYPES[dtype])
        return ours, load_drafter(folder / "drafter", target=ours, dtype=DTYPES[dtype])

    return make


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def equal_up_to_a_near_tie(target, prompt, want: list[int], got: list[int], label: str) -> None:
    """`got` equals target-only greedy `want`, or first differs where target-only's two best logits are within
    NEAR_TIE and `got` took the second best. Counts the run in MISMATCHES."""
    runs = MISMATCHES.setdefault(label, [0, 0])
    runs[0] += 1
    assert len(got) == len(want), label
    i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if i is None:
        return
    runs[1] += 1
    logits = target(torch.tensor([list(prompt) + want[:i]])).logits[0, -1].float()
    top = logits.topk(2)
    margin = (top.values[0] - top.values[1]).item()
    print(f"{label}: differs at token {i} of {len(want)}, target-only margin {margin:.2e}")
    assert margin < NEAR_TIE[target.dtype] and got[i] in top.indices.tolist(), (label, i, margin)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for label, (runs, differing) in MISMATCHES.items():
        print(f"generic path, {label}: {differing} of {runs} runs differ from target-only greedy output")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_verify_rows_are_within_rounding_of_one_token_decodes(dtype):
    """The bundled target after a prefill of 230 positions: a 9-row verify pass against nine one-token decodes.
    Within NEAR_TIE / 2 (bfloat16) or 1e-4 (float32); bit equality is not promised (printed: on this CPU float32
    rows differ in their last bits, bfloat16 rows happen not to)."""
    from tests.test_dtype_equivalence import _decoded_one_by_one, _prompt

    target = load_target(ROOT / "tiny_gemma4" / "target", dtype=DTYPES[dtype])
    block = torch.tensor([_prompt(9, 4)])
    with torch.inference_mode():
        decoded, many = _decoded_one_by_one(target, 230, block, max_length=270)
        error = (target(block, many).logits.float() - decoded.float()).abs().amax(-1)[0]  # [9]
    print(f"generic path, bundled {dtype}: {(error > 0).sum().item()} of 9 verify rows differ from one-token "
          f"decodes, by at most {error.max().item():.2e}")
    assert error.max() <= (1e-4 if dtype == "float32" else NEAR_TIE[torch.bfloat16] / 2)


@pytest.mark.parametrize("family", ["31b", "moe"])
def test_fixed_rows_make_verify_rows_equal_one_token_decodes_bit_for_bit(family, pair):
    """The policy that may keep the promise on a GPU (generic.fixed_rows): products and attention padded to 16
    rows. Float32, after a prefill of 230 positions, a 9-row verify pass against nine one-token decodes: every row
    differs in its last bits without the policy and none with it. (Families without per-layer embeddings: the
    tiny models' 8-wide PLE gate meets the CPU's scalar GELU tail, which a GPU's elementwise kernels do not have.)"""
    from tests.test_dtype_equivalence import _decoded_one_by_one, _prompt

    target, _ = pair(family, "float32")
    block = torch.tensor([_prompt(9, 4)])
    differing = {}
    for rows in (None, 16):
        with generic.fixed_rows(rows), torch.inference_mode():
            decoded, many = _decoded_one_by_one(target, 230, block, max_length=270)
            differing[rows] = (target(block, many).logits != decoded).any(-1).sum().item()
    assert differing[None] > 0 and differing[16] == 0, differing


@pytest.mark.parametrize("family", ["e2b", "moe"])
def test_target_only_greedy_equals_transformers_generate(family, target_pair):
    hf, ours = target_pair(family)
    for prompt in prompts([6, 40], seed=2):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)[0]
        got = generate(ours, None, prompt, max_new_tokens=20, stop_token_ids=[]).tokens
        equal_up_to_a_near_tie(ours, prompt, want[len(prompt):].tolist(), got, f"{family} float32 vs transformers")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["e2b", "moe"])  # 31b: the chat and compiled tests
def test_greedy_speculative_equals_target_only_up_to_a_near_tie(family, dtype, pair):
    """Not promised bit for bit on the generic path (see the module docstring): measured, tie-checked."""
    target, drafter = pair(family, dtype)
    accepted = 0
    for prompt in prompts([5, 80], seed=3):
        want = generate(target, None, prompt, max_new_tokens=24, stop_token_ids=[]).tokens
        for options in [{"num_draft_tokens": 4, "schedule": "constant"}, {"schedule": "heuristic"}]:
            got = generate(target, drafter, prompt, max_new_tokens=24, stop_token_ids=[], **options)
            equal_up_to_a_near_tie(target, prompt, want, got.tokens, f"{family} {dtype} speculative")
            accepted += sum(n for _, n in got.stats.rounds)
    assert accepted > 0


# Two prompts (from the Python standard library's ast.py and fractions.py, the bundled pair's training corpus) on
# which the bundled pair's bfloat16 speculative run on the generic path differs from target-only on this CPU: 2 of
# the 24 prompts scripts/gpu_check.py draws (64 new tokens), first differing at tokens 51 and 40.
NEAR_TIE_PROMPTS = [
    'kwargs):\n        return Tuple(list(dims), Load(), **kwargs)\n\n# If the ast module is loaded more than once, '
    'only add deprecated methods once\nif not hasattr(Tuple, \'dims\'):\n    # The following code is for backward '
    'compatibility.\n    # It will be removed in future.\n\n    def _dims_getter(self):\n        """Deprecated. Use '
    'elts instead."""',
    '\n\n    def __repr__(self):\n        """repr(self)"""\n        return \'%s(%s, %s)\' % (self.__class__.__name__,'
    '\n                               self._numerator, self._denominator)\n\n    def __str__(self):\n        '
    '"""str(self)"""\n        if self._denominator == 1:\n            return str(self._numerator)\n        else',
]


def test_bundled_bfloat16_differences_are_near_ties_and_fixed_rows_keep_target_only_output():
    """The bundled pair in bfloat16 on the generic path: where speculative output differs from target-only output
    (measured on this CPU: both prompts), it is at a near-tie, the second-best token taken (margins measured:
    0.031 and 0.0, an exact tie). With generic.fixed_rows(16) the same runs give target-only output (24 of 24
    gpu_check prompts here, against 22 of 24 without)."""
    from weights.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "tiny_gemma4" / "target")
    target = load_target(ROOT / "tiny_gemma4" / "target", dtype=torch.bfloat16)
    drafter = load_drafter(ROOT / "tiny_gemma4" / "drafter", target=target, dtype=torch.bfloat16)
    for text in NEAR_TIE_PROMPTS:
        prompt = [tokenizer.bos_id] + tokenizer.encode(text)
        runs = {}
        for rows in (None, 16):
            with generic.fixed_rows(rows):
                runs[rows] = [generate(target, d, prompt, max_new_tokens=52, stop_token_ids=[],
                                       schedule="constant").tokens for d in (None, drafter)]
        equal_up_to_a_near_tie(target, prompt, *runs[None], "bundled bfloat16 speculative")
        assert runs[16][0] == runs[16][1], "fixed rows: speculative == target-only"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_batch_rows_equal_target_only_up_to_a_near_tie(dtype, pair):
    target, drafter = pair("e4b", dtype)
    batch = prompts((5, 30, 80, 13), seed=1)
    want = [generate(target, None, p, max_new_tokens=16, stop_token_ids=[]).tokens for p in batch]
    for d in [None, drafter]:
        rows = generate_batch(target, d, batch, max_new_tokens=16, stop_token_ids=[], schedule="heuristic")
        for p, w, row in zip(batch, want, rows):
            equal_up_to_a_near_tie(target, p, w, row.tokens, f"e4b {dtype} batch" + (" speculative" if d else ""))


def test_chat_turns_equal_a_fresh_target_only_run_up_to_a_near_tie():
    from tests.test_chat import session

    s = session("31b", system="Be brief.")
    for message in ["Hello there", "And a second question?", "x" * 20]:
        turn = s.send(message)
        want = generate(s.target, None, turn.prompt_ids, max_new_tokens=len(turn.tokens),
                        stop_token_ids=[]).tokens
        equal_up_to_a_near_tie(s.target, turn.prompt_ids, want, turn.tokens, "31b float32 chat")


@pytest.mark.compile  # compiles a pair again for the generic path: minutes on 2 cores (python -m pytest -m compile)
def test_compiled_loop_equals_target_only_up_to_a_near_tie():
    """The compiled loop on the generic path."""
    from tests.test_compiled import small_pair

    target, drafter = small_pair("31b")
    for prompt in prompts([5, 30], seed=4):
        want = generate(target, None, prompt, max_new_tokens=12, stop_token_ids=[]).tokens
        got = generate(target, drafter, prompt, max_new_tokens=12, stop_token_ids=[], compile=True).tokens
        equal_up_to_a_near_tie(target, prompt, want, got, "31b float32 compiled speculative")
