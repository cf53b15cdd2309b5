"""The compiled fast path: the same model code, run through `torch.compile`, for `generate(..., compile=True)`.

A small model's decode step is bound by the number of PyTorch ops it launches (about 1,700 per forward of the
bundled target), not by arithmetic; inductor fuses them into a few dozen kernels. Nothing here is a second model:
the decoder layers (`DecoderLayer.forward`) and `Drafter.forward` are compiled as they are, because they were
written to be compile-friendly (tensors in, tensors out, no branch on a tensor's value). What makes shapes fixed
lives in the cache: a static cache (`KVCache(static=True)`) has one buffer shape for the whole generation (full
layers attend over all `max_length` positions, masked) and writes through index tensors, and the Python bookkeeping
(lengths, masks, rollbacks) runs outside the graphs, in `KVCache.begin`.

One function per pass: on the CPU a decode step or verify pass of the target is one compiled function
(`target_pass`: embedding, per-layer inputs, rotary tables, every layer, final norm, head), called once per pass;
the cache's bookkeeping (`KVCache.begin`, rollbacks) stays outside it. Compiled one layer at a time instead (24
calls per pass of the bundled target), each call paid dynamo's guards and frame wrappers and inductor's Python
wrapper again, and the ops between layers ran eagerly: 4.4-4.6 ms per one-token step, against 2.8-3.1 ms as one
function (bundled target, float32, 1 thread, 2-core EPYC at load 0.9-1.2, interleaved runs). Inside the pass every
layer is a call of a nested compile region (`torch.compiler.nested_compile_region`, `nested_layer`): torch traces
one layer of each kind (attention type, owning or reusing K/V, widths) and reuses that graph for every other layer
of the kind, and inductor compiles it once. A plain unrolled graph of the 24 layers took about twice the compile
time (87 s for a one-token pass, against 38-49 s) for a step time within 10%. The cost that remains: a first process
compiles the bundled pair in 56-60 s instead of 38 s (scripts/bench_warmup.py: 2 regions, larger ones, instead of
5). torch reuses a region only for a call whose inputs are tensors, sizes, constants and modules, with no side
effect, so the cache enters as each layer's buffers and write index (`LayerKV.scatter_index`, `ScatterKV`), and the
K/V a reuse layer reads are handed over outside the region.

What is compiled: a pass whose token count, number of rows and full-attention key length (the cache's size) are
symbolic (`mark_dynamic_sizes`; a token count or row count of 1 and every other size are constants), which serves
every verify length 2..K + 1, so a schedule whose draft length changes every round (auto, heuristic) compiles
nothing after the warm-up (which runs every length); and the drafter's forward (one token per row; the length of
the cache it reads symbolic). A size of 1 is a constant of its own graph, so a pass of one token (auto's rounds
without drafts, a budget's last round) would compile a second pass: with a drafter it runs as two tokens instead,
the token and a copy of it that the cache forgets at once (`CompiledSteps.forward`), for a one-token pass that
costs what a two-token one does. A target-only generation runs one token every step and keeps a pass of one token.
Nothing in the layers may test the token count (a test is a guard, and a guard a graph per outcome): `linear` and
`gelu_tanh` (gemma4/kernels.py) decide by the width under compilation. Prefill stays eager: it runs once per
prompt, at a length no later call repeats. `fullgraph=True` turns any graph break into an error, so a change that
breaks compilation fails loudly (tests/test_compiled.py counts compiled graphs and the regions inside the pass).

On CUDA the target is still compiled one decoder layer at a time (`Gemma4Model.run_step(..., run_layer=...)`,
`CompiledSteps._run_layer`), with `mode="reduce-overhead"`, which adds CUDA graphs (the cache's buffers are marked
as static addresses so the graphs write into them in place): a CUDA graph replays a layer without Python, so the
costs above are the CPU's. dynamo keeps a graph per set of guards, and the guards see only what a layer's code
reads: its kind and the shapes and dtypes of its tensors, never its index (a layer reads its cache slot through a
`LayerKV`, which holds the buffers, and every owning layer exports its K/V), so the layers of one kind share a
graph, and each kind and token count calls a compiled function of its own (`layer_function`).

The first call of each shape compiles; `generate` runs those calls before its timed decode loop and reports them as
`stats.compile_seconds`, once per pair and shapes (a later generation with the same rows, longest draft and cache
size skips them: `loop.Steps.cold`). inductor keeps the kernels it compiled on disk (`cache_dir()`: torch's default
folder in the temporary directory, or $TORCHINDUCTOR_CACHE_DIR), but that alone leaves a second process tracing
every graph again through dynamo and AOTAutograd (46-56 s for the bundled pair on 2 cores; torch's
`save_cache_artifacts` / `load_cache_artifacts` move the same entries and do not skip the tracing). So on the CPU
each region (the target's pass, the drafter) is compiled ahead of time (`Precompiled`: dynamo's `aot_compile`) and
stored, guards and all, in `precompiled_dir()`, a folder inside `cache_dir()`; a later process loads the stored
functions and traces nothing (bundled pair: 2.6-3.2 s of warm-up; BENCHMARKS.md, section 11). A stored function runs
only on inputs its guards accept (others are compiled into a variant, stored too: `Precompiled`; within a
generation they are checked at the first call of each input shape only, `CompiledSteps._trust`), and its file name
holds a digest of the model code, torch, Python and the module switches, so an edit or an upgrade stores a new entry
and never loads a stale one; entries that no process wrote or loaded for 30 days are deleted whenever a new one is
stored (`prune_store`), so old versions do not pile up. Delete `precompiled_dir()` to make the next process trace
again, `cache_dir()` to start cold. The files are pickles written by torch, which run code when they are loaded:
only this module writes and reads them, under names it derives, in that folder (the project's weights are read from
safetensors only); never copy files there from elsewhere. On CUDA the regions are compiled in every process, as CUDA
graphs (`mode="reduce-overhead"`) are not stored.

The models' `functools.cache` helpers (constants such as RoPE's inverse frequencies, made once for eager mode) are
pure functions of their arguments, so dynamo may trace through their cache: `allow_cached_helpers` tells it so, and
it no longer warns about each of them (a multi-line warning naming this machine's source paths). Keep every
`functools.cache` function of gemma4/ and drafter/ pure.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import time
import warnings
import weakref
from pathlib import Path

import torch

from gemma4.cache import KVCache
from gemma4.config import FULL
from gemma4.model import ModelOutput


def cache_dir() -> str:
    """Where inductor keeps compiled kernels between processes (set TORCHINDUCTOR_CACHE_DIR before starting
    Python to choose another place, e.g. one that survives a reboot)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return inductor_cache_dir()


def precompiled_dir() -> Path:
    """Where the precompiled functions are kept (module docstring): a folder inside `cache_dir()`, so deleting
    inductor's cache deletes them too; deleting this folder alone makes the next process trace again."""
    return Path(cache_dir()) / "precompiled"


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
        self.warmed: set[tuple] = set()  # shapes a generation's warm-up ran (`loop.Steps.cold`)
        self._whole = target.device.type == "cpu"  # one function per pass, through the precompile store
        self._layers: dict[tuple, object] = {}  # CUDA: (kind of layer, one token?, one row?) -> its compiled function
        self._run_step = target.run_step
        self._target = target
        self._passes: dict[tuple, object] = {}  # (one token?, one row?) -> the whole pass's compiled function
        if self._whole:
            prepare_regions(target)
        self._drafter = drafter
        if drafter is not None:
            # dynamic: the full-attention views it reads are as long as the target's cache (one graph for all)
            self._drafter_step = (precompiled_region("drafter", drafter_step, drafter, dynamic=True) if self._whole
                                  else torch.compile(drafter_step, fullgraph=True, dynamic=True, mode=mode))

    def _trust(self, generation, tensor: torch.Tensor):
        """The key under which a generation's calls of a region with `tensor`'s shape check the region's guards at
        the first call only (`Precompiled`'s `trust`); None: at every call (a call from outside a generation, or
        CUDA, where torch.compile checks its own).

        `generation` is an object the loop makes for one generation (`loop.Steps`) and passes with every call of
        it. Why the guards of its first call of a shape hold for the later ones: within one generation the calls of
        a region with one input shape pass the same model, the same static cache, whose buffers keep their shape
        for the whole generation (`KVCache.reserve` grows it before, `begin` never does), and step tensors
        (positions, masks, write indices, the drafter's views) built the same way for that shape. What the guards
        test (shapes, strides and dtypes of every tensor, the module switches, the thread count, the Python values
        read while tracing) is therefore the same at every call; only the tensors' values change, and no guard
        reads them. A new generation (a new cache, a model cast to another dtype in between) checks again. What it
        saves: the bundled target's pass has about 2,100 guards (every parameter's and buffer's shape, stride and
        dtype), 0.15 ms to check with warm caches and 0.3-0.4 ms inside a decode loop, whose weights evict them:
        15% of a compiled decode step."""
        return None if generation is None or not self._whole else (generation, tuple(tensor.shape))

    def forward(self, input_ids: torch.Tensor, cache, generation=None):
        """target(input_ids, cache) for a decode step or verify pass, compiled (the cache must be static). With a
        drafter, one token runs as two, the token and a copy of it that is forgotten at once, so that the graph of
        2+ tokens serves every pass and no graph of one token is compiled (module docstring)."""
        S = input_ids.shape[1]
        if S > 1 or self._drafter is None:
            return self._pass(input_ids, cache.begin(S), cache, generation)
        out = self._pass(input_ids.expand(-1, 2).contiguous(), cache.begin(2), cache, generation)  # [B, 2, ...]
        cache.rollback(1)
        return ModelOutput(out.logits[:, :1], out.hidden_states[:, :1])

    def _pass(self, input_ids: torch.Tensor, step, cache, generation=None) -> ModelOutput:
        """The target's forward over the positions `step` reserved: one compiled function for the whole pass on
        the CPU, one per layer on CUDA (module docstring)."""
        B, S = input_ids.shape
        if not self._whole:
            return self._run_step(input_ids, step, cache, S, run_layer=self._run_layer)
        key = (S == 1, B == 1)
        compiled = self._passes.get(key)
        if compiled is None:
            name = "target" + ("_one_token" if S == 1 else "") + ("" if B == 1 else "_rows")
            compiled = self._passes[key] = precompiled_region(name, target_pass, self._target, dynamic=None,
                                                              rows=B, mark=mark_dynamic_sizes)
        return ModelOutput(*compiled(self._target, input_ids, step, cache, trust=self._trust(generation, input_ids)))

    def _run_layer(self, layer, x, *inputs):
        """layer(x, *inputs) through the compiled function of its kind and token count (`layer_function`). The
        per-layer input, a strided view, is passed contiguous: the guards then see the same strides for every S."""
        if inputs[-1] is not None:
            inputs = (*inputs[:-1], inputs[-1].contiguous())
        spec = layer.self_attn.spec
        key = (spec.attention_type, spec.head_dim, spec.num_kv_heads, spec.kv_mode == "reuse", spec.has_v_proj,
               spec.mlp_width, x.shape[1] == 1, x.shape[0] == 1)
        compiled = self._layers.get(key)
        if compiled is None:
            name = "_".join(map(str, key[:-1]))  # the rows belong to the store's key, not to dynamo's code object
            compiled = self._layers[key] = torch.compile(layer_function(name), fullgraph=True, dynamic=True,
                                                          mode=self._mode)
        return compiled(layer, x, *inputs)

    def step(self, target, token, hidden, position, views, context=None, generation=None):
        """Drafter.step, compiled: the embedding of the last token and the hidden state in, one draft step out
        (`generation`: see `_trust`)."""
        inputs_embeds = torch.cat([target.embed(token), hidden], dim=-1)
        if not self._whole:
            return self._drafter_step(self._drafter, inputs_embeds, position, views, context)
        return self._drafter_step(self._drafter, inputs_embeds, position, views, context,
                                  trust=self._trust(generation, inputs_embeds))


def drafter_step(drafter, inputs_embeds, position, views, context):
    """The drafter's forward with the drafter as an argument: a stored function cannot hold a module."""
    return drafter(inputs_embeds, position, views, context)


def target_pass(model, input_ids, step, cache):
    """The CPU's compiled function: the target's whole forward over the positions `step` reserved (embedding,
    per-layer inputs, rotary tables, every layer, final norm, head), each layer through `nested_layer`."""
    out = model.run_step(input_ids, step, cache, input_ids.shape[1], run_layer=nested_layer)
    return out.logits, out.hidden_states


def target_pass_inline(model, input_ids, step, cache):
    """`target_pass` with every layer inline (one unrolled graph, about twice the compile time). torch 2.13
    sometimes fails to reuse a nested region's graph in a process that compiled other passes before (a KeyError
    inside its invoke_subgraph; seen in the test suite, the bundled target compiled after small test models):
    `Precompiled.store` then compiles this instead, the same function."""
    out = model.run_step(input_ids, step, cache, input_ids.shape[1])
    return out.logits, out.hidden_states


def nested_layer(layer, x, cos, sin, mask, kv, shared, per_layer_input):
    """`layer(x, cos, sin, mask, kv, shared, per_layer_input)` as a nested compile region (module docstring).
    torch reuses a region's graph for a later call only if the call passes tensors, sizes, constants and modules
    alone and has no side effect, so the cache's part is passed as its buffers and write index
    (`LayerKV.scatter_index`), and the K/V handed to the reuse layers through `shared` (those of their type's
    last owning layer, which attention reads whole) are set here, outside the region. A layer whose store is more
    than one scatter (not on the ring path), or whose attention pads a symbolic token count (`reusable`), runs
    inline."""
    kind = layer.self_attn.kind
    if kv is None:
        k, v = shared[kind]
        if not reusable(layer, x, k):
            return layer(x, cos, sin, mask, kv, shared, per_layer_input)
        return layer.compiled_regions[1](layer, x, cos, sin, mask, k, v, per_layer_input)
    index = kv.scatter_index()
    if index is None or not reusable(layer, x, kv.k):
        return layer(x, cos, sin, mask, kv, shared, per_layer_input)
    shared[kind] = (kv.k, kv.v)
    return layer.compiled_regions[0](layer, x, cos, sin, mask, kv.k, kv.v, index, per_layer_input)


def reusable(layer, x: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether torch can reuse a nested region's graph for this layer. Attention pads the queries of a KV head to
    at least `kernels._MIN_ROWS` rows: with a symbolic token count S that may fall short (S >= 2 and one query head
    per KV head), the padded size is the expression max(S, 4), which torch's reuse of a region's graph cannot map
    (its stamp-out fails), so such layers run inline. A constant S always passes."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    from gemma4 import kernels

    S, per_kv_head = x.shape[1], layer.self_attn.q_proj.out_features // layer.self_attn.head_dim // k.shape[1]
    return isinstance(S, int) or statically_known_true(S >= -(-kernels._MIN_ROWS // per_kv_head))


def prepare_regions(target) -> None:
    """Give every layer of `target` its nested compile regions (`layer_regions`), as a plain attribute that
    `nested_layer` reads while torch traces the pass (the structure is read here, in eager code)."""
    for layer in target.layers:
        layer.__dict__["compiled_regions"] = layer_regions(structure(layer, 2))


@functools.cache
def layer_regions(structure: str):
    """(owning_layer, reusing_layer): the nested compile regions of the layers of one structure (`structure`:
    parameter names, shapes and dtypes). torch keeps what it traced of a region with the region's function, and a
    region shared by layers of two models of other sizes failed to trace in the second (a KeyError inside torch's
    invoke_subgraph: a process that compiled a small test model, then the bundled target), so each structure has
    functions of its own (`prepare_regions`)."""
    def owning_layer(layer, x, cos, sin, mask, k_buffer, v_buffer, index, per_layer_input):
        return layer(x, cos, sin, mask, ScatterKV(k_buffer, v_buffer, index), {}, per_layer_input)

    def reusing_layer(layer, x, cos, sin, mask, k, v, per_layer_input):
        return layer(x, cos, sin, mask, None, {layer.self_attn.kind: (k, v)}, per_layer_input)

    return (torch.compiler.nested_compile_region(owning_layer),
            torch.compiler.nested_compile_region(reusing_layer))


class ScatterKV:
    """A `LayerKV` whose store is one scatter at `index` ([B, S]) along the sequence axis of whole buffers
    [B, n_kv, T, d], which attention then reads whole: what `LayerKV.update` does where `scatter_index` is
    not None, made of tensors alone (`nested_layer`)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
        self.k, self.v, self.index = k, v, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        KVCache._scatter(self.k, self.v, self.index, k, v)
        return self.k, self.v


def mark_dynamic_sizes(model, input_ids, step, cache) -> None:
    """Mark symbolic, in every tensor of a pass that has them (`Precompiled`): the token count (2+), the number of
    rows (2+) and the full-attention layers' key length (the cache's size), so that one graph serves every verify
    length, batch size and generation length. The other sizes stay constants. A size of 1 stays a constant: it has
    graphs of its own (`CompiledSteps._pass`)."""
    B, S = input_ids.shape
    dims = [d for d, size in ((0, B), (1, S)) if size > 1]
    layers = [cache.layer(spec.index) for spec in cache.config.layers if spec.kv_mode != "reuse"]
    index = [kv.scatter_index() for kv in layers]
    for tensor in [input_ids, step.positions, *step.masks.values(), *[i for i in index if i is not None]]:
        for d in dims:
            torch._dynamo.mark_dynamic(tensor, d)
    if B > 1:
        for buffer in cache.buffers():
            torch._dynamo.mark_dynamic(buffer, 0)
    for kv in layers:  # maybe: where the code tests T (one key block or several), that graph keeps it constant
        if kv.full:  # [B, n_kv, T, d], and the mask [B, S, T] over them
            torch._dynamo.maybe_mark_dynamic(kv.k, 2)
            torch._dynamo.maybe_mark_dynamic(kv.v, 2)
    if FULL in step.masks:
        torch._dynamo.maybe_mark_dynamic(step.masks[FULL], 2)


@functools.cache
def layer_function(name: str):
    """CUDA's regions: `layer(*inputs)` as a function with a code object of its own. dynamo keeps its graphs on the
    code object and, on every call, checks their guards until one set passes. With one function for every layer
    (4 graphs in a target-only generation of the bundled target) finding the graph took 204 us a call, 16% of a
    compiled decode step's CPU time (torch.profiler, 2-core EPYC at load 6.4); with one function per kind and
    token count, 122 us (load 7). Made once per name and process, so that models of the same kinds share the
    graphs (their guards tell models apart)."""
    def run_layer(layer, *inputs):
        return layer(*inputs)

    run_layer.__code__ = run_layer.__code__.replace(co_name=f"run_layer_{name}")
    return run_layer


# inductor's settings for the CPU regions. size_asserts: a compiled graph checks no input's sizes and strides again
# (dynamo's guards, and a stored function's, check them before every call): about 30 checks in Python per layer call.
# emulate_precision_casts: a fused kernel rounds each intermediate to the model's dtype where eager code does (else
# bfloat16 intermediates stay float32 inside a kernel, and compiled tokens drifted from eager ones).
CPU_OPTIONS = {"size_asserts": False, "emulate_precision_casts": True}


def precompiled_region(name: str, function, module, *, dynamic: bool | None, rows: int = 1,
                       mark=None) -> Precompiled:
    """`function(module, ...)` compiled through the precompile store (`Precompiled`), one per region, process
    and setting of the module switches, shared by every model of that structure."""
    from gemma4 import generic, kernels

    return precompiled(name, function, structure(module, rows), dynamic, mark, kernels.row_invariant_float32(),
                       generic._on_cpu)


@functools.cache
def precompiled(name: str, function, structure: str, dynamic: bool | None, mark, *switches) -> Precompiled:
    """Keyed on the module switches too (`switches`): a region made under another setting holds a stored function
    whose guards refuse this one's inputs, and every call would trace again."""
    return Precompiled(name, function, structure, dynamic, mark)


class Precompiled:
    """A region compiled once per machine rather than once per process: dynamo's ahead-of-time compilation
    (`torch.compile(...).aot_compile`) traces it into a function that is saved in `precompiled_dir()` and that a
    later process loads without tracing anything. The file holds the graph's guards (shapes, dtypes and strides of
    every tensor, grad mode, the module's structure, the module globals it read, such as the row-invariance
    switch): a stored function is never run on inputs it was not traced for. The file's name holds a digest of
    everything a stale entry could differ by (`store_key`), so an edit of the models' code, another torch or
    Python, or another dtype writes a new entry instead of loading the old one.

    Inputs that every stored function's guards refuse are traced into one more stored function, a variant, saved
    beside the first (`-v1`, `-v2`...; at most MAX_VARIANTS, then `torch.compile` in the process). A full-attention
    layer has two: its key length is one block (a cache of up to KEY_BLOCK positions) or several, and the
    attention's reshapes of the blocks test which (gemma4/kernels.py `_attend_rows`). With one stored function a
    generation past KEY_BLOCK positions traced those layers again in every process (30 s for the bundled pair). The
    variant that ran last is checked first.

    The files are pickles written by torch, which run code when they are loaded: this class loads only files of
    `precompiled_dir()` that it writes itself, under the names it derives, with the trust inductor's own cache
    (compiled kernels loaded from the same folder) already asks for. Never copy a file there from elsewhere."""

    def __init__(self, name: str, function, structure: str, dynamic: bool | None, mark=None):
        self.path = precompiled_dir() / f"{name}-{store_key(name, structure, dynamic)}.pt2"  # the first variant
        # dynamic=None: sizes are static unless `mark(*args)` marks them symbolic (`mark_dynamic_sizes`)
        self.function, self.dynamic, self.mark = function, dynamic, mark
        self.traced = torch.compile(function, fullgraph=True, dynamic=dynamic,  # past MAX_VARIANTS
                                    options=CPU_OPTIONS)
        self.variants: list | None = None  # the stored functions, loaded at the first call
        self.trusted: dict = {}  # a caller's key -> the stored function its first call's guards chose

    def __call__(self, *args, trust=None):
        """The stored function whose guards accept `args`, run on them. `trust`: a key (hashable) under which the
        caller vouches that its calls pass inputs of one kind, so that the guards of the first call hold for the
        others (`CompiledSteps._trust`): after that first call, the function it chose runs without checking its
        guards again."""
        if trust is not None and (known := self.trusted.get(trust)) is not None:
            return known.fn(*args)
        if self.variants is None:
            self.variants = self.load()
        for i, stored in enumerate(self.variants):
            if stored.guard_check(*args):
                if i:  # the inputs changed kind (a cache past KEY_BLOCK positions): this one first from now on
                    self.variants.insert(0, self.variants.pop(i))
                return self._run(stored, args, trust)
        if len(self.variants) >= MAX_VARIANTS:
            if self.mark is not None:
                self.mark(*args)
            with torch._dynamo.config.patch(specialize_float=True):  # as `store`: a nested region takes no float
                return self.traced(*args)
        self.variants.insert(0, self.store(args))
        return self._run(self.variants[0], args, trust)

    def _run(self, stored, args, trust):
        if trust is not None:
            if len(self.trusted) >= MAX_TRUSTED:  # keys of generations that are over
                self.trusted.clear()
            self.trusted[trust] = stored
        return stored.fn(*args)

    def variant_path(self, index: int) -> Path:
        return self.path if index == 0 else self.path.with_name(f"{self.path.stem}-v{index}.pt2")

    def load(self) -> list:
        """The stored variants of this region, in the order they were stored."""
        variants = []
        while len(variants) < MAX_VARIANTS and (path := self.variant_path(len(variants))).exists():
            with open(path, "rb") as file:
                variants.append(torch.compiler.load_compiled_function(file))
            os.utime(path)  # in use: `prune_store` keeps it
        return variants

    def store(self, args):
        """Compile the region ahead of time from these inputs and store it as the next variant."""
        # A float argument becomes a constant: the ahead-of-time tracer cannot restart a trace that turned one
        # into a tensor. Each symbolic size gets a symbol of its own: one graph serves every size, and a token
        # count that happens to equal another size (2 heads, 2 tokens) must not tie the two together, as a stored
        # function cannot recompile. The guards keep only what a new process can check (`storable_guards`).
        with torch._dynamo.config.patch(specialize_float=True), torch.fx.experimental._config.patch(
                use_duck_shape=False):
            if self.mark is not None:
                self.mark(*args)
            compiler = torch.compile(self.function, fullgraph=True, dynamic=self.dynamic,
                                     options={**CPU_OPTIONS, "guard_filter_fn": storable_guards})
            try:
                stored = compiler.aot_compile((args, {}))
            except KeyError:  # torch's reuse of a nested region failed (`target_pass_inline`)
                if self.function is not target_pass:
                    raise
                compiler = torch.compile(target_pass_inline, fullgraph=True, dynamic=self.dynamic,
                                         options={**CPU_OPTIONS, "guard_filter_fn": storable_guards})
                stored = compiler.aot_compile((args, {}))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        index = len(self.variants)
        while self.variant_path(index).exists():  # another process stored one meanwhile: keep it
            index += 1
        stored.save_compiled_function(str(self.variant_path(index)))  # written to a temporary file, then renamed
        prune_store(self.path.parent)
        return stored


MAX_VARIANTS = 8  # stored functions per region (`Precompiled`)
MAX_TRUSTED = 64  # keys a region remembers (`Precompiled.__call__`); then it forgets them all
STORE_KEEP_DAYS = 30  # a stored function neither written nor loaded for this long is deleted
STORE_NAME = re.compile(r"[\w.-]+-[0-9a-f]{20}(-v\d+)?\.pt2")  # `Precompiled`: region, `store_key` digest, variant


def prune_store(folder: Path, now: float | None = None) -> list[Path]:
    """Delete the stored functions of `folder` that no process wrote or loaded for STORE_KEEP_DAYS (a load touches
    its file), and return them. Each edit of the model code, torch upgrade or new dtype writes new entries (their
    names' digests differ) and leaves the old ones unused: without this the folder would grow with every
    checkout. Runs whenever a new entry is stored; only files named as this module names them are touched."""
    cutoff = (time.time() if now is None else now) - STORE_KEEP_DAYS * 86400
    gone = []
    for path in folder.glob("*.pt2"):
        if STORE_NAME.fullmatch(path.name) and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)  # another process may have pruned it first
            gone.append(path)
    return gone


def storable_guards(entries) -> list[bool]:
    """Which of a graph's guards a stored function keeps: those a new process can check. torch's default for
    ahead-of-time compilation also drops every guard on a global, and with them the module switches the layers
    read (`gemma4.kernels.set_row_invariant_float32`, `gemma4.generic.generic_path`); these are kept. Dropped:
    identities (of objects, functions, modules), which a new process cannot match (the code they stand for is in
    the file name's digest, `store_key`), and the builtins' dict, which a loaded function cannot look up."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [not (e.guard_type in unsupported or e.name.startswith("G['__builtins_dict")) for e in entries]


def structure(module: torch.nn.Module, rows: int) -> str:
    """What tells two modules of one kind of region apart: their parameters' and buffers' names, shapes and
    dtypes, their device, and whether they run one row."""
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in [*module.named_parameters(), *module.named_buffers()]]
    return repr((tensors, str(module_device(module)), rows == 1))


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def store_key(name: str, structure: str, dynamic: bool) -> str:
    """Digest of what a stored function depends on besides its inputs' guards: the region and the module's
    structure, the code (every source file of gemma4/, drafter/ and this module), torch and Python, and the
    module switches, so that each setting keeps its own entry."""
    from gemma4 import generic, kernels

    state = (name, structure, dynamic, torch.__version__, sys.version, kernels.row_invariant_float32(),
             generic._on_cpu, source_digest())
    return hashlib.sha256(repr(state).encode()).hexdigest()[:20]


@functools.cache
def source_digest() -> str:
    """sha256 of the model code the regions trace."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("gemma4/*.py"), *root.glob("drafter/*.py"), Path(__file__).resolve()]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


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


# target -> {id(drafter): (drafter, its CompiledSteps)}. Not an attribute of the target: the target is an argument of
# its compiled pass, and a stored function's guards are pickled with it (the compiled steps cannot be).
STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_steps(target, drafter) -> CompiledSteps:
    """The CompiledSteps of this (target, drafter) pair, made once per pair (`STEPS`)."""
    cache = STEPS.setdefault(target, {})
    key = id(drafter)
    if key not in cache or cache[key][0] is not drafter:
        cache[key] = (drafter, CompiledSteps(target, drafter))
    return cache[key][1]


def mark_static(cache) -> None:
    """CUDA graphs replay fixed memory addresses: the static cache's buffers are such addresses."""
    for buffer in cache.buffers():
        torch._dynamo.mark_static_address(buffer)
