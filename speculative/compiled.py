"""The compiled fast path: the same model code, run through `torch.compile`, for `generate(..., compile=True)`.

A small model's decode step is bound by the number of PyTorch ops it launches (about 1,700 per forward of the
bundled target), not by arithmetic; inductor fuses them into a few dozen kernels. Nothing here is a second model:
the decoder layers (`DecoderLayer.forward`) and `Drafter.forward` are compiled as they are, because they were
written to be compile-friendly (tensors in, tensors out, no branch on a tensor's value). What makes shapes fixed
lives in the cache: a static cache (`KVCache(static=True)`) has one buffer shape for the whole generation (full
layers attend over all `max_length` positions, masked) and writes through index tensors, and the Python bookkeeping
(lengths, masks, rollbacks) runs outside the graphs, in `KVCache.begin`.

Regional compilation: the target is compiled one decoder layer at a time (`Gemma4Model.run_step(...,
run_layer=...)`). dynamo keeps a graph per set of guards, and the guards see only what a layer's code reads: its kind
(attention type, owning or reusing K/V, widths) and the shapes and dtypes of its tensors, never its index (a layer
reads its cache slot through a `LayerKV`, which holds the buffers, and every owning layer exports its K/V). So the
bundled target's 24 layers compile 4 kinds x 2 token counts = 8 graphs, not 24 layers' worth of code, and a deeper
model of the same kinds compiles nothing new. Each kind and token count calls a compiled function of its own
(`layer_function`, one per process, shared by every model), so that a call finds its graph without trying the
other kinds' guards. The embedding, per-layer inputs, rotary tables and head (a few dozen ops) run eagerly between
the graphs.

What is compiled, per kind of layer: a graph for one token per row (dynamo specialises size 1) and a graph whose
token count is symbolic (`dynamic=True`), which serves every verify length 2..K + 1, so a schedule whose draft
length changes every round (auto, heuristic) compiles nothing after the warm-up (which runs every length); and the
drafter's forward (one token per row, a fixed shape). Nothing in the layers may test the token count (a test is a
guard, and a guard a graph per outcome): `linear` and `gelu_tanh` (gemma4/kernels.py) decide by the width under
compilation. Prefill stays eager: it runs once per prompt, at a length no later call repeats. `fullgraph=True` turns
any graph break into an error, so a change that breaks compilation fails loudly (tests/test_compiled.py counts
compiled graphs). On CUDA, `mode="reduce-overhead"` adds CUDA graphs (the cache's buffers are marked as static
addresses so the graphs write into them in place).

The first call of each shape compiles; `generate` runs those calls before its timed decode loop and reports them as
`stats.compile_seconds`. inductor keeps what it compiled on disk (`cache_dir()`: torch's default folder in the
temporary directory, or $TORCHINDUCTOR_CACHE_DIR; delete that folder to start cold), so a second process skips the
code generation and the C++ compiler and only traces: dynamo and AOTAutograd trace each graph again, which is most
of what a second process spends (BENCHMARKS.md, section 11). torch's `save_cache_artifacts`/`load_cache_artifacts`
pack the same on-disk entries into one blob: they move the cache, they do not skip the tracing.

The models' `functools.cache` helpers (constants such as RoPE's inverse frequencies, made once for eager mode) are
pure functions of their arguments, so dynamo may trace through their cache: `allow_cached_helpers` tells it so, and
it no longer warns about each of them (a multi-line warning naming this machine's source paths). Keep every
`functools.cache` function of gemma4/ and drafter/ pure.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch


def cache_dir() -> str:
    """Where inductor keeps compiled kernels between processes (set TORCHINDUCTOR_CACHE_DIR before starting
    Python to choose another place, e.g. one that survives a reboot)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return inductor_cache_dir()


class CompiledSteps:
    """Compiled target and drafter forwards behind the calls the loop makes: `forward(ids, cache)` (the target over
    new tokens of every row) and `step(...)` (Drafter.step)."""

    def __init__(self, target, drafter):
        mode = "reduce-overhead" if target.device.type == "cuda" else None
        # Every model's graphs hang on the same two functions below (dynamo caches per code object, and guards on
        # the model): a process that compiles several models must not hit dynamo's default limit of 8 entries.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        allow_cached_helpers()

        self._mode = mode
        self._layers: dict[tuple, object] = {}  # (kind of layer, one token?) -> its compiled function
        self._run_step = target.run_step
        self._drafter = None
        if drafter is not None:
            def drafter_step(inputs_embeds, position, views, context):
                return drafter(inputs_embeds, position, views, context)

            self._drafter = torch.compile(drafter_step, fullgraph=True, dynamic=False, mode=mode)

    def forward(self, input_ids: torch.Tensor, cache):
        """target(input_ids, cache) for a decode step or verify pass, compiled (the cache must be static)."""
        S = input_ids.shape[1]
        return self._run_step(input_ids, cache.begin(S), cache, S, run_layer=self._run_layer)

    def _run_layer(self, layer, x, *inputs):
        """layer(x, *inputs) through the compiled function of its kind and token count (`layer_function`)."""
        spec = layer.self_attn.spec
        key = (spec.attention_type, spec.head_dim, spec.num_kv_heads, spec.kv_mode == "reuse", spec.has_v_proj,
               spec.mlp_width, x.shape[1] == 1)
        compiled = self._layers.get(key)
        if compiled is None:
            compiled = self._layers[key] = torch.compile(layer_function("_".join(map(str, key))), fullgraph=True,
                                                         dynamic=True, mode=self._mode)
        return compiled(layer, x, *inputs)

    def step(self, target, token, hidden, position, views, context=None):
        """Drafter.step, compiled: the embedding of the last token and the hidden state in, one draft step out."""
        return self._drafter(torch.cat([target.embed(token), hidden], dim=-1), position, views, context)


@functools.cache
def layer_function(name: str):
    """`layer(*inputs)` as a function with a code object of its own. dynamo keeps its graphs on the code object and,
    on every call, checks their guards until one set passes. With one function for every layer (4 graphs in a
    target-only generation of the bundled target) finding the graph took 204 us a call, 16% of a compiled decode
    step's CPU time (torch.profiler, 2-core EPYC at load 6.4); with one function per kind and token count, 122 us
    (load 7). Made once per name and process, so that models of the same kinds share the graphs (their guards tell
    models apart)."""
    def run_layer(layer, *inputs):
        return layer(*inputs)

    run_layer.__code__ = run_layer.__code__.replace(co_name=f"run_layer_{name}")
    return run_layer


def allow_cached_helpers() -> None:
    """Let dynamo trace the `functools.cache` functions of gemma4/ and drafter/ without a warning (module
    docstring). torch versions without that registration get a warnings filter for the same message instead."""
    allow = getattr(torch._dynamo.utils, "allow_lru_cache_wrapper_trace_without_warning", None)
    if allow is None:
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped",
                                module=r"torch\._dynamo")
        return
    for name, module in list(sys.modules.items()):
        if module is not None and name.split(".")[0] in ("gemma4", "drafter"):
            for value in list(vars(module).values()):
                if isinstance(value, functools._lru_cache_wrapper):
                    allow(value)


def compiled_steps(target, drafter) -> CompiledSteps:
    """The CompiledSteps of this (target, drafter) pair, made once and kept on the target."""
    cache = target.__dict__.setdefault("_compiled_steps", {})
    key = id(drafter)
    if key not in cache or cache[key][0] is not drafter:
        cache[key] = (drafter, CompiledSteps(target, drafter))
    return cache[key][1]


def mark_static(cache) -> None:
    """CUDA graphs replay fixed memory addresses: the static cache's buffers are such addresses."""
    for buffer in cache.buffers():
        torch._dynamo.mark_static_address(buffer)
