"""Turning a checkpoint folder or hub repo id into a model ready for inference.

The model is built on the meta device, given uninitialised storage in the requested dtype and device, and then
every parameter and buffer is filled from the checkpoint one tensor at a time. Peak memory therefore stays near one
copy of the weights, and a tensor the checkpoint lacks is an error, never a silent random weight.

Key mapping, in one place: our module names equal the checkpoint's names after a prefix, `model.language_model.`
for multimodal checkpoints (Gemma4ForConditionalGeneration) and `model.` for text-only ones (Gemma4ForCausalLM).
Vision and audio tensors lie outside that prefix and are not read by `load_target`; the k/v tensors some checkpoints
keep for KV-sharing ("reuse") layers are skipped, as transformers does. `load_vision` reads the vision encoder
(`model.vision_tower.*`, `model.embed_vision.*`: our `VisionModel`'s names after `model.`) only when a prompt has
images, so text-only use never holds it in memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from drafter import Drafter, DrafterConfig, check_compatible
from gemma4 import Gemma4Config, Gemma4Model
from gemma4.vision import VisionConfig, VisionModel

from .files import CheckpointError, TensorStore, read_json, read_optional_json, resolve_checkpoint
from .mapped import MappedEmbedding

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_REUSE_LAYER_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")


def parse_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but the MPS backend is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device}; use cpu, cuda or mps")
    return device


def load_target(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    map_per_layer_table: bool | None = None,
) -> Gemma4Model:
    """Load a Gemma 4 text model (multimodal checkpoints: their language model only).

    The returned model carries `checkpoint_dir` (where tokenizer files live) and `generation_config` (the dict
    from generation_config.json, empty when there is none: stop tokens and sampling defaults come from it).

    `map_per_layer_table`: keep the per-layer-embedding table (E2B/E4B) memory-mapped from the checkpoint file
    instead of loading it (a `weights.mapped.MappedEmbedding`: 4.7 GB of E2B that then cost no heap; the logits
    are bit for bit the same). Default (`None`): on CPU yes; on a GPU the table is loaded onto the device when it
    fits there (`per_layer_table_on_host`), since a host table costs a gather and a host-to-device copy per step."""
    dtype, device = parse_dtype(dtype), parse_device(device)
    folder = resolve_checkpoint(path_or_repo_id, revision=revision)
    config = parse_config(folder, Gemma4Config.from_dict)
    store = TensorStore(folder)
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in store.keys()) else "model."
    config = untie_if_head_differs(config, store, prefix)
    if map_per_layer_table is None and config.uses_ple:
        map_per_layer_table = per_layer_table_on_host(device, *_text_bytes(store, prefix, dtype),
                                                      _free_bytes(device))
    mapped = config.uses_ple and map_per_layer_table

    def map_table(meta: nn.Embedding) -> nn.Module:
        key = prefix + "embed_tokens_per_layer.weight"
        if key not in store or store.shape(key) != meta.weight.shape or not store.dtype(key).is_floating_point:
            return meta  # fill() reports the missing tensor, its shape or its dtype as for any other weight
        return MappedEmbedding(store.mapped(key), dtype=dtype, device=device)

    model = build_empty(Gemma4Model, config, dtype, device,
                        replace={"embed_tokens_per_layer": map_table} if mapped else None)
    reuse = {str(s.index) for s in config.layers if s.kv_mode == "reuse"}

    def ignored(key: str) -> bool:
        if not key.startswith(prefix):
            return key != "lm_head.weight" or config.tie_word_embeddings  # other towers; a tied head's copy
        m = _REUSE_LAYER_KV.match(key[len(prefix):])
        return m is not None and m.group(1) in reuse

    key_of = {name: ("lm_head.weight" if name == "lm_head.weight" else prefix + name) for name in model.state_dict()}
    done = {name + ".weight" for name, m in model.named_children() if isinstance(m, MappedEmbedding)}
    fill(model, store, key_of, ignored, done)
    return finish(model, folder)


VISION_PREFIXES = ("model.vision_tower.", "model.embed_vision.")


def load_vision(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> VisionModel:
    """Load the vision encoder and its projection into the text model (`gemma4.vision.VisionModel`) of a multimodal
    Gemma 4 checkpoint; a text-only checkpoint raises CheckpointError saying it takes no images."""
    dtype, device = parse_dtype(dtype), parse_device(device)
    folder = resolve_checkpoint(path_or_repo_id, revision=revision)
    config = parse_config(folder, VisionConfig.from_dict)
    store = TensorStore(folder)
    model = build_empty(VisionModel, config, dtype, device)
    fill(model, store, {name: "model." + name for name in model.state_dict()},
         lambda key: not key.startswith(VISION_PREFIXES))
    return finish(model, folder)


# Device memory a loaded model leaves free for activations and the KV cache, at least: a fraction of what was free
# and a fixed amount.
_HEADROOM_FRACTION, _HEADROOM_BYTES = 0.1, 2 << 30


def per_layer_table_on_host(device: torch.device, table_bytes: int, other_bytes: int, free_bytes: int | None) -> bool:
    """Whether `load_target` keeps the per-layer-embedding table mapped on the host by default: always on CPU (it
    costs no heap there); on another device only when the table does not fit next to the other weights with
    10% of the free memory (and at least 2 GB) left over. `free_bytes` None: unknown (mps), load it."""
    if device.type == "cpu":
        return True
    if free_bytes is None:
        return False
    headroom = max(_HEADROOM_BYTES, int(_HEADROOM_FRACTION * free_bytes))
    return other_bytes + table_bytes + headroom > free_bytes


def _text_bytes(store: TensorStore, prefix: str, dtype: torch.dtype) -> tuple[int, int]:
    """(per-layer-embedding table, every other text weight) in bytes once loaded in `dtype`."""
    size = torch.empty(0, dtype=dtype).element_size()
    table = other = 0
    for key in store.keys():
        if key.startswith(prefix) or key == "lm_head.weight":
            n = math.prod(store.shape(key)) * size
            if key == prefix + "embed_tokens_per_layer.weight":
                table += n
            else:
                other += n
    return table, other


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def untie_if_head_differs(config: Gemma4Config, store: TensorStore, prefix: str) -> Gemma4Config:
    """The config, untied when it says tie_word_embeddings but the checkpoint holds an lm_head.weight that is not a
    copy of the embeddings. transformers ties only when the head is absent or equal to the table; a different
    head is loaded untied, with a warning. Dropping it here would silently change every logit. The comparison
    reads both tables through the file's memory map (page cache, no heap copy), and only in this rare case."""
    head, table = "lm_head.weight", prefix + "embed_tokens.weight"
    if not config.tie_word_embeddings or head not in store or table not in store:
        return config
    if store.shape(head) == store.shape(table) and store.dtype(head) == store.dtype(table):
        if torch.equal(store.mapped(head), store.mapped(table)):
            return config
    warnings.warn(f"{store.folder}: config.json ties the output head to the embeddings (tie_word_embeddings), but the "
                  f"checkpoint holds a different {head!r}; loading it untied, as transformers does. Set "
                  "tie_word_embeddings to false in config.json to silence this warning.", stacklevel=3)
    return dataclasses.replace(config, tie_word_embeddings=False)


def parse_config(folder: Path, parse):
    path = folder / "config.json"
    raw = read_json(path)
    try:
        return parse(raw)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{path}: {e}") from None


def build_empty(cls, config, dtype: torch.dtype, device: torch.device, replace: dict | None = None) -> nn.Module:
    """The module with uninitialised storage: floating tensors in `dtype`, integer buffers unchanged. `replace`
    maps a submodule's name to a function of its meta-device form that returns the module to use instead, before
    any storage is allocated (the mapped per-layer-embedding table)."""
    with torch.device("meta"):
        model = cls(config).to(dtype)
    for name, make in (replace or {}).items():
        setattr(model, name, make(getattr(model, name)))
    return model.to_empty(device=device)


@torch.no_grad()
def fill(model: nn.Module, store: TensorStore, key_of: dict[str, str], ignored, done: set[str] = frozenset()) -> None:
    """Copy checkpoint tensor `key_of[name]` into every parameter and buffer `name` of `model` but those in `done`
    (already views of the checkpoint), checking shapes and that each checkpoint tensor was either used or
    deliberately ignored."""
    targets = model.state_dict(keep_vars=True)
    missing = [key_of[n] for n in targets if key_of[n] not in store]
    if missing:
        raise CheckpointError(
            f"{store.folder}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    used = set(key_of.values())
    unexpected = [k for k in store.keys() if k not in used and not ignored(k)]
    if unexpected:
        raise CheckpointError(
            f"{store.folder}: unexpected tensor {unexpected[0]!r}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            + "; the config does not describe this checkpoint"
        )
    for name, target in targets.items():
        key = key_of[name]
        shape = store.shape(key)
        if shape != tuple(target.shape):
            raise CheckpointError(
                f"{store.folder}: tensor {key!r} has shape {list(shape)}, expected {list(target.shape)}"
            )
        if store.dtype(key).is_floating_point != target.is_floating_point():
            raise CheckpointError(f"{store.folder}: tensor {key!r} has dtype {store.dtype(key)}, expected {target.dtype}")
        if name not in done:
            store.read_into(key, target)  # converts dtype; never a second full copy


def finish(model: nn.Module, folder: Path) -> nn.Module:
    model.requires_grad_(False).eval()
    model.checkpoint_dir = folder
    model.generation_config = read_optional_json(folder / "generation_config.json")
    return model


def load_drafter(
    path_or_repo_id: str | os.PathLike,
    *,
    target: Gemma4Model | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> Drafter:
    """Load a Gemma 4 MTP drafter (`gemma4_assistant`). With `target`, first check that the pair fits
    (IncompatibleDrafterError names the mismatch). Keys map one to one; the tied lm_head is not stored."""
    dtype, device = parse_dtype(dtype), parse_device(device)
    folder = resolve_checkpoint(path_or_repo_id, revision=revision)
    config = parse_config(folder, DrafterConfig.from_dict)
    if target is not None:
        check_compatible(config, target.config)
    store = TensorStore(folder)
    model = build_empty(Drafter, config, dtype, device)
    fill(model, store, {name: name for name in model.state_dict()},
         lambda key: key == "lm_head.weight" and config.tie_word_embeddings)
    return finish(model, folder)
