"""generate(..., compile=True) (speculative/compiled.py): the same tokens as the eager path, and nothing compiled
after the warm-up.

Oracle: the eager loop with the same options (greedy: the same tokens; sampling with a seed: the same tokens, as
both draw the same random numbers). Compiling costs minutes on a 2-core CPU, so the default run compiles one small
pair once per session (its graphs are shared by the tests below) and `python -m pytest -m compile` runs the whole
matrix: every tiny family pair and the bundled pair, both schedules, sampling, a batch.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from speculative import compiled, generate, generate_batch
from tests import tiny
from weights import load_drafter, load_target

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("row_invariant_float32")  # tests/conftest.py


@functools.cache
def small_pair(family: str = "31b", layers: int = 2):
    """A family pair with `layers` target layers (31b: sliding and full in turn), biased so that drafts are often
    accepted."""
    overrides = {} if family != "31b" else dict(num_hidden_layers=layers,
                                                layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    target = tiny.build_target(family, seed=0, **overrides)
    drafter = tiny.build_drafter(tiny.PAIRS[family], seed=1)
    tiny.bias_vocab(target, drafter, [10, 11, 12], amount=0.3)
    folder = Path(__import__("tempfile").mkdtemp(prefix=f"compiled-{family}-"))
    tiny.save(target, folder / "target", eos_token_id=())
    tiny.save(drafter, folder / "drafter", eos_token_id=())
    ours = load_target(folder / "target")
    return ours, load_drafter(folder / "drafter", target=ours)


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(2, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compare(target, drafter, ids, **options):
    eager = generate(target, drafter, ids, stop_token_ids=[], **options)
    seen = []  # graphs compiled when each report came (the first one after the warm-up): none may be added
    compiled = generate(target, drafter, ids, stop_token_ids=[], compile=True,
                        on_round=lambda info: seen.append(graphs()), **options)
    assert compiled.tokens == eager.tokens, options
    assert len(set(seen)) == 1 and seen[-1] == graphs(), f"compiled during the decode loop: {seen}"
    return eager, compiled


def test_compiled_greedy_equals_eager_for_both_schedules_without_recompiling():
    target, drafter = small_pair()
    ids = prompt(30)
    _, first = compare(target, drafter, ids, max_new_tokens=24, num_draft_tokens=3, schedule="constant")
    before = graphs()
    eager, again = compare(target, drafter, prompt(45, seed=1), max_new_tokens=30, schedule="heuristic")
    assert graphs() == before, "a second generation, with other draft lengths, compiled nothing new"
    assert again.stats.rounds == eager.stats.rounds and len({k for k, _ in again.stats.rounds}) > 2
    assert first.stats.compile_seconds > again.stats.compile_seconds
    # auto (the default): k changes from round to round within 0..3, every length already compiled
    _, chosen = compare(target, drafter, prompt(45, seed=5), max_new_tokens=30, num_draft_tokens=3)
    assert graphs() == before and len(set(chosen.stats.draft_lengths)) > 1


def test_a_generation_of_shapes_already_warmed_skips_the_warm_up():
    """The warm-up (a target pass per verify length) runs once per pair and shapes: a second generation with the
    same rows, longest draft and cache size starts decoding at once and still gives the eager tokens; another
    cache size warms up again."""
    target, drafter = small_pair()
    options = dict(max_new_tokens=12, num_draft_tokens=3, schedule="constant")
    compare(target, drafter, prompt(30, seed=2), **options)
    before = graphs()
    _, again = compare(target, drafter, prompt(30, seed=3), **options)  # same lengths: the same cache
    assert again.stats.compile_seconds == 0.0 and graphs() == before
    _, longer = compare(target, drafter, prompt(30, seed=3), **dict(options, max_new_tokens=300))
    assert longer.stats.compile_seconds > 0.0


def test_a_generation_checks_each_regions_guards_once_per_input_shape(monkeypatch):
    """Within a generation a stored function's guards are checked at the first call of each input shape only
    (`CompiledSteps._trust`), and the tokens stay the eager ones; the next generation checks again."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    target, drafter = small_pair()
    checked = []
    check = AOTCompiledFunction.guard_check
    monkeypatch.setattr(AOTCompiledFunction, "guard_check", lambda self, *a, **k: checked.append(
        (id(self), tuple(t.shape for t in a if isinstance(t, torch.Tensor)))) or check(self, *a, **k))
    options = dict(max_new_tokens=40, num_draft_tokens=3, schedule="constant")
    for seed in (8, 9):
        checked.clear()
        _, fast = compare(target, drafter, prompt(30, seed=seed), **options)
        # calls: the drafter's step 3 times a round, the target's pass once (at 2, 3 or 4 tokens: one token runs
        # as two). Checked: each stored function at most once per shape (a function stored by this generation's
        # warm-up not at all; one whose guards refuse the shape is followed by the next variant), at most 4 shapes
        shapes = {shape for _, shape in checked}
        assert len(fast.stats.rounds) > 8 and len(checked) == len(set(checked)) and 0 < len(shapes) <= 4, checked
    # a call from outside a generation (here on a cache of the generation's geometry) checks the guards every time
    steps = compiled.compiled_steps(target, drafter)
    with torch.inference_mode():
        cache = target.new_cache(batch_size=1, max_length=30 + 40 + 3, max_rollback=4,
                                 min_sliding_history=drafter.sliding_history, static=True, position_slack=3)
        checked.clear()
        for _ in range(3):
            steps.forward(torch.tensor([prompt(3, seed=10)]), cache)
    assert len(checked) >= 3, checked


def test_a_generation_after_a_change_of_threads_compiles_in_its_warm_up():
    """Every compiled graph's guards hold the thread count: after `torch.set_num_threads` a generation of shapes
    already warmed warms up again (compiling for the new count there, reported) instead of compiling inside its
    decode loop (`compare` checks that no graph is added after the warm-up)."""
    target, drafter = small_pair()
    options = dict(max_new_tokens=12, num_draft_tokens=3, schedule="constant")
    compare(target, drafter, prompt(30, seed=10), **options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        _, other = compare(target, drafter, prompt(30, seed=10), **options)
        assert other.stats.compile_seconds > 0.0
    finally:
        torch.set_num_threads(threads)


def test_a_compiled_conversation_equals_the_eager_one():
    """Session(compile=True): each turn gives the eager session's tokens over a static cache that is continued,
    grown past KEY_BLOCK positions and brought back into the first turn (its ring snapshot restored), and no turn
    compiles inside its decode loop."""
    from speculative import Session

    target, drafter = small_pair()
    eager, fast = (Session(target, drafter, num_draft_tokens=3, stop_token_ids=[], compile=c) for c in (False, True))
    first = prompt(30, seed=4)
    for session in (eager, fast):
        seen = [[], [], []]  # per turn: graphs compiled when each report came (the first one after the warm-up)
        one = session.generate_ids(first, max_new_tokens=20, on_round=lambda info: seen[0].append(graphs()))
        two = session.generate_ids(session.tokens + prompt(25, seed=5), max_new_tokens=240,  # past 256 positions
                                   on_round=lambda info: seen[1].append(graphs()))
        three = session.generate_ids(first + prompt(10, seed=6), max_new_tokens=12,  # back into the first turn
                                     on_round=lambda info: seen[2].append(graphs()))
        session.result = [(t.tokens, t.cache) for t in (one, two, three)]
        if session is fast:
            assert all(len(set(turn)) == 1 for turn in seen), f"a turn compiled inside its decode loop: {seen}"
    assert fast.result == eager.result
    assert [how for _, how in fast.result] == ["new", "continued", "restored"]


@pytest.mark.parametrize("tokens", [1, 3])
def test_the_whole_pass_compiles_each_kind_of_layer_once(tokens):
    """The compiled pass (speculative/compiled.py) is one graph for the whole target, in which every layer is a call
    of a nested region and the layers of one kind share one: a 4-layer and an 8-layer target of the same 2 kinds
    (sliding, full) both trace 2 regions, called once per layer, for one token and for a symbolic count (torch
    inlines a region called once: a kind needs 2 layers). Traced with a backend that only looks at the graph (no
    kernels compiled)."""
    seen = []

    def backend(graph, example_inputs):
        calls = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        seen.append((len({n.args[0].target for n in calls}), len(calls)))
        return graph

    compiled.allow_cached_helpers()  # as `CompiledSteps` does
    for layers in (4, 8):
        target, _ = small_pair(layers=layers)
        compiled.prepare_regions(target)  # as `CompiledSteps` does
        cache = target.new_cache(max_length=64, static=True)
        ids = torch.tensor([prompt(tokens, seed=layers)])
        with torch.inference_mode():
            target(torch.tensor([prompt(20)]), cache)
            step = cache.begin(tokens)
            compiled.mark_dynamic_sizes(target, ids, step, cache)
            torch._dynamo.reset()
            with torch._dynamo.config.patch(specialize_float=True):
                traced = torch.compile(compiled.target_pass, fullgraph=True, backend=backend)
                logits, _ = traced(target, ids, step, cache)
            cache.rollback(tokens)
            want = target(ids, cache).logits
        torch.testing.assert_close(logits, want)
    assert seen == [(2, 4), (2, 8)]


def forget_compiled(target) -> None:
    """What a new process starts without: dynamo's graphs, the regions' functions and the pair's compiled steps."""
    torch._dynamo.reset()
    compiled.precompiled.cache_clear()
    compiled.STEPS.pop(target, None)


def test_a_second_process_loads_the_stored_functions_and_traces_nothing(tmp_path, monkeypatch):
    """The precompile store (speculative/compiled.py): a first process compiles each region ahead of time and
    stores it; a second one (dynamo reset, the regions forgotten) loads every region from the store, traces no
    graph, and gives the eager tokens, for a short generation and for one whose cache passes KEY_BLOCK positions
    (its full-attention layers and drafter then read several key blocks: variants of their own, stored too)."""
    target, drafter = small_pair()
    ids = prompt(30, seed=7)
    short, long = (dict(max_new_tokens=n, num_draft_tokens=3, stop_token_ids=[]) for n in (12, 240))
    eager = [generate(target, drafter, ids, **options).tokens for options in (short, long)]
    monkeypatch.setattr(compiled, "precompiled_dir", lambda: tmp_path)
    forget_compiled(target)
    try:
        first = generate(target, drafter, ids, compile=True, **short)
        stored = sorted(p.name for p in tmp_path.iterdir())
        assert len(stored) == 2, stored  # the target's pass (one graph for every token count), the drafter
        first_long = generate(target, drafter, ids, compile=True, **long)
        stored = sorted(p.name for p in tmp_path.iterdir())
        forget_compiled(target)
        traced = graphs()
        again = [generate(target, drafter, ids, compile=True, **options).tokens for options in (long, short)]
        assert graphs() == traced, "the second process traced"
        assert [first.tokens, first_long.tokens] == eager == again[::-1]
        assert sorted(p.name for p in tmp_path.iterdir()) == stored
    finally:
        forget_compiled(target)  # the other tests' regions use the default store


def test_a_stored_function_runs_only_where_its_key_and_guards_hold(tmp_path, monkeypatch):
    """A stored function is never run on what it was not traced for: another dtype, an edited model code or another
    row-invariance setting names another file (so a stale entry is never loaded), and inputs its guards refuse (here
    float64 where it traced float32) are traced into a variant of their own, stored beside the first, with the eager
    result."""
    from gemma4 import kernels

    monkeypatch.setattr(compiled, "precompiled_dir", lambda: tmp_path)
    module, x = torch.nn.Linear(8, 4), torch.randn(1, 3, 8)
    double, x2 = torch.nn.Linear(8, 4).double(), torch.randn(1, 5, 8)  # made outside inference mode, as `module`
    function = compiled.layer_function("test_store")

    def region(module):
        return compiled.Precompiled("test_store", function, compiled.structure(module, rows=1), dynamic=True)

    with torch.inference_mode():
        first = region(module)
        torch.testing.assert_close(first(module, x), module(x))
        assert [p.name for p in tmp_path.iterdir()] == [first.path.name]
        traced = graphs()
        os.utime(first.path, (0, 0))  # as if unused since 1970: the load below marks it as in use
        loaded = region(module)  # a new process's region: loads the file
        torch.testing.assert_close(loaded(module, x2), module(x2))
        assert time.time() - first.path.stat().st_mtime < 60
        assert graphs() == traced, "the loaded function traced"
        torch.testing.assert_close(loaded(double, x.double()), double(x.double()))
        assert graphs() == traced + 1, "the float64 call was traced, not run through the float32 function"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, first.variant_path(1).name])
        later = region(module)  # a later process: both variants loaded, neither input kind traced
        torch.testing.assert_close(later(double, x2.double()), double(x2.double()))
        torch.testing.assert_close(later(module, x), module(x))
        assert graphs() == traced + 1

    assert region(double).path != first.path
    kernels.set_row_invariant_float32(not kernels.row_invariant_float32())
    try:
        assert region(module).path != first.path
    finally:
        kernels.set_row_invariant_float32(not kernels.row_invariant_float32())
    assert region(module).path == first.path
    monkeypatch.setattr(compiled, "source_digest", lambda: "edited")
    assert region(module).path != first.path


def test_a_region_belongs_to_one_setting_of_the_module_switches(tmp_path, monkeypatch):
    """`precompiled_region` gives a region per setting of the module switches (row invariance, the generic path):
    a region made under another setting would hold a stored function whose guards refuse this one's inputs, so that
    every call traced again. Switching back finds the first region again."""
    from gemma4 import generic, kernels

    monkeypatch.setattr(compiled, "precompiled_dir", lambda: tmp_path)
    module, function = torch.nn.Linear(8, 4), compiled.layer_function("test_switches")
    first = compiled.precompiled_region("test_switches", function, module, dynamic=True)
    kernels.set_row_invariant_float32(not kernels.row_invariant_float32())
    try:
        flipped = compiled.precompiled_region("test_switches", function, module, dynamic=True)
    finally:
        kernels.set_row_invariant_float32(not kernels.row_invariant_float32())
    with generic.generic_path():
        generic_region = compiled.precompiled_region("test_switches", function, module, dynamic=True)
    assert len({id(first), id(flipped), id(generic_region)}) == 3
    assert len({first.path, flipped.path, generic_region.path}) == 3
    assert compiled.precompiled_region("test_switches", function, module, dynamic=True) is first


def test_the_store_deletes_only_its_own_entries_unused_for_a_month(tmp_path):
    """`prune_store`: an entry neither written nor loaded for STORE_KEEP_DAYS goes, a recent one and files the store
    did not name stay."""
    now = time.time()
    old_entries = [tmp_path / f"drafter-{'a' * 20}.pt2", tmp_path / f"drafter-{'a' * 20}-v1.pt2"]
    recent_entry = tmp_path / f"drafter-{'b' * 20}.pt2"
    foreign = [tmp_path / "notes.pt2", tmp_path / f"drafter-{'c' * 20}.txt"]
    for path in (*old_entries, recent_entry, *foreign):
        path.write_bytes(b"")
        age = compiled.STORE_KEEP_DAYS + 1 if path != recent_entry else compiled.STORE_KEEP_DAYS - 1
        os.utime(path, (now - age * 86400, now - age * 86400))
    assert sorted(compiled.prune_store(tmp_path, now)) == sorted(old_entries)
    assert sorted(tmp_path.iterdir()) == sorted([recent_entry, *foreign])


def test_compiled_sampling_with_a_seed_equals_eager():
    target, drafter = small_pair()
    compare(target, drafter, prompt(20, seed=2), max_new_tokens=20, num_draft_tokens=3, schedule="constant",
            temperature=0.9, top_k=40, seed=11)


def test_compiled_target_only_equals_eager():
    target, _ = small_pair()
    compare(target, None, prompt(33, seed=3), max_new_tokens=12)


@pytest.mark.compile
@pytest.mark.parametrize("family", ["e2b", "e4b", "31b", "moe", "bundled"])
def test_every_family_compiled_equals_eager(family):
    if family == "bundled":
        target = load_target(ROOT / "tiny_gemma4" / "target")
        drafter = load_drafter(ROOT / "tiny_gemma4" / "drafter", target=target)
    else:
        target, drafter = small_pair(family)
    for options in ({"num_draft_tokens": 4}, {"schedule": "heuristic"},
                    {"num_draft_tokens": 2, "schedule": "constant", "temperature": 1.0, "seed": 3}):
        compare(target, drafter, prompt(40, seed=4), max_new_tokens=32, **options)


@pytest.mark.compile
def test_a_compiled_batch_equals_eager():
    target, drafter = small_pair()
    batch = [prompt(n, seed=n) for n in (7, 30, 12)]
    eager = generate_batch(target, drafter, batch, max_new_tokens=16, schedule="heuristic", stop_token_ids=[])
    compiled = generate_batch(target, drafter, batch, max_new_tokens=16, schedule="heuristic", stop_token_ids=[],
                              compile=True)
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]


def test_compiling_prints_no_warning_about_the_models_cached_helpers():
    """The models' functools.cache helpers (gemma4's RMSNorm constant and RoPE frequencies) are pure: compiling
    (as generate(compile=True) prepares it) traces through them without dynamo's multi-line warning, which named
    this machine's source paths. Traced with the eager backend (no kernels compiled), dynamo's once-per-site
    memory cleared so that an earlier compile in this process cannot hide a warning."""
    import warnings

    from gemma4.layers import rope_cos_sin
    from speculative.compiled import CompiledSteps

    target, drafter = small_pair()
    CompiledSteps(target, drafter)
    torch._dynamo.utils.warn_once_cache.clear()
    norm, rope = target.norm, target.config.rope["full_attention"]
    traced = torch.compile(lambda x, p: norm(x) * rope_cos_sin(p, rope, 32, x.dtype)[0].sum(), backend="eager",
                           fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced(torch.randn(1, 3, target.config.hidden_size), torch.arange(3))
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]


@pytest.mark.compile
@pytest.mark.parametrize("dtype", ["bfloat16", "float32 without row invariance"])
def test_the_bundled_pair_compiled_equals_eager_in_other_settings(dtype):
    """bfloat16 (inductor keeps fused intermediates in float32 unless told to round them as eager code does) and
    float32 with the default, faster products (compiled: small products as inductor's own loops)."""
    from gemma4 import kernels

    kernels.set_row_invariant_float32(False)
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    target = load_target(ROOT / "tiny_gemma4" / "target", dtype=torch_dtype)
    drafter = load_drafter(ROOT / "tiny_gemma4" / "drafter", target=target, dtype=torch_dtype)
    # a prompt over the whole vocabulary, on which bfloat16 compiled without rounding its intermediates diverged
    ids = torch.randint(2, 4000, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    compare(target, None, ids, max_new_tokens=32)
    for options in ({"num_draft_tokens": 4, "schedule": "constant"}, {"schedule": "heuristic"}):
        compare(target, drafter, ids, max_new_tokens=32, **options)
