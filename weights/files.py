"""Finding a checkpoint (local folder or hub repo id) and reading its JSON and safetensors files.

Checkpoints come from the internet, so everything read here is validated, and every failure is a
`CheckpointError` whose message names the file or tensor. Weights are read lazily, one tensor at a time, through
safetensors' memory map; pickle files (`.bin`, `.pt`, `.pth`) are refused, never opened.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open

# What a hub download fetches: configs, safetensors weights and tokenizer files, nothing else.
HUB_ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
_CHUNK_BYTES = 64 << 20  # staging buffer when a tensor needs a dtype conversion or another device


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, incomplete, corrupt, or not what the caller asked for."""


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder as is, or a hub repo id downloaded with `huggingface_hub.snapshot_download` (which honours
    HF_HOME, HF_TOKEN and HF_HUB_OFFLINE) restricted to `HUB_ALLOW_PATTERNS`. A name shaped like a repo id whose
    first part is a local folder (`tiny_gemma4/targt`) is a mistyped local path, never a hub request."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; a checkpoint is a folder holding config.json and *.safetensors")
        return path
    name = str(path_or_repo_id)
    if not _REPO_ID.match(name):
        raise CheckpointError(f"checkpoint not found: no folder {path}, and {name!r} is not a hub repo id (org/name)")
    if path.parent.is_dir():
        inside = sorted(p.name for p in path.parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CheckpointError(
            f"checkpoint not found: no folder {path} ({path.parent}/ holds {', '.join(inside) or 'no folder'}); "
            f"a name whose first part is a local folder is read as a local path, not as a hub repo id"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"cannot fetch {name!r} from the hub (offline, or no connection) and no complete copy is cached "
            f"under HF_HOME: {e}"
        ) from None
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: caught first, it needs another remedy
        raise CheckpointError(
            f"{name!r} is gated: accept its licence on the model's hub page, then log in (`hf auth login`, or set "
            "HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no hub repository {name!r} (or it is private and HF_TOKEN is not set)") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"downloading {name!r} failed: {e}") from None


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_optional_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def shard_path(folder: Path, name: str) -> Path | None:
    """`folder / name` for a shard name from an index, or None when the name points outside the folder.

    The check is on the name as written (no absolute path, no drive, no `..` component), never on where the file
    resolves to: in huggingface_hub's cache `snapshots/<rev>/<shard>` is a symlink to `../../blobs/<hash>`, which
    resolves outside the snapshot folder and is exactly what a hub download gives. Symlinks are made by whoever
    wrote the folder (the user, the hub client); the index comes with the download and is what must not escape."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor or ".." in PureWindowsPath(name).parts:
        return None  # PureWindowsPath splits at both / and \\, so "a\\..\\b" is caught on any system too
    return folder / name


class TensorStore:
    """Lazy, validated access to the tensors of a checkpoint folder, choosing its files as transformers does:
    `model.safetensors` if present, else the shards `model.safetensors.index.json` names."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        single, index = folder / SINGLE_FILE, folder / INDEX_FILE
        if not single.is_file() and index.exists():  # transformers' order: model.safetensors first, then the index
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map' object")
            for key, name in weight_map.items():
                if not isinstance(name, str) or not name.endswith(".safetensors"):
                    raise CheckpointError(f"{index}: shard {name!r} of tensor {key!r} is not a *.safetensors file name")
                file = shard_path(folder, name)
                if file is None:
                    raise CheckpointError(f"{index}: shard {name!r} of tensor {key!r} is outside the checkpoint folder")
                if not file.is_file():
                    raise CheckpointError(f"{index}: shard {name!r} of tensor {key!r} does not exist")
                self._file_of[key] = file
            for file in sorted(set(self._file_of.values())):  # every key the index names must be in its shard
                present = set(self._open(file).keys())
                for key in (k for k, f in self._file_of.items() if f == file and k not in present):
                    raise CheckpointError(f"{index} maps tensor {key!r} to {file.name}, which does not contain it")
        elif single.is_file():  # any other *.safetensors beside it (an old copy, a second export) is not read
            for key in self._open(single).keys():
                self._file_of[key] = single
        else:
            others = sorted(p.name for p in folder.glob("*.safetensors"))
            if others:
                raise CheckpointError(
                    f"{folder} has no {SINGLE_FILE} and no {INDEX_FILE}, only {', '.join(others)}: rename the weights "
                    f"file to {SINGLE_FILE} (or write an index for shards), as transformers also reads only those names"
                )
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{folder} holds only pickle weights ({', '.join(pickles)}); this project reads safetensors "
                    "only and never unpickles files. Convert them with safetensors first."
                )
            raise CheckpointError(f"no *.safetensors weights in {folder}")

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._read(key, lambda h: h.get_slice(key).get_shape()))

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, as stored (for small tensors and tools; loading uses `read_into`)."""
        return self._read(key, lambda h: h.get_tensor(key))

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[1]

    def read_into(self, key: str, target: torch.Tensor) -> None:
        """Copy tensor `key` into `target` (same shape; any dtype and device) with plain file reads, straight
        into target's memory when dtype and device match, else through a 64 MB staging buffer. Never maps or holds
        a whole second copy: loading peaks near one copy of the weights even for the 4 GB per-layer-embedding
        table of E2B."""
        file, dtype, start, end = self._entry(key)
        numel = math.prod(target.shape)
        if end - start != numel * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {key!r} holds {end - start} bytes, its shape needs "
                                  f"{numel * dtype.itemsize}")
        flat = target.view(-1)
        direct = target.dtype == dtype and target.device.type == "cpu" and target.is_contiguous()
        step = numel if direct else max(1, _CHUNK_BYTES // dtype.itemsize)
        with open(file, "rb") as f:
            f.seek(start)
            for i in range(0, numel, step):
                part = flat[i : i + step] if direct else torch.empty(min(step, numel - i), dtype=dtype)
                view = memoryview(part.view(torch.uint8).numpy()) if part.numel() else memoryview(b"")
                if f.readinto(view) != len(view):
                    raise CheckpointError(f"{file}: tensor {key!r} is cut short (truncated file?)")
                if not direct:
                    flat[i : i + part.numel()].copy_(part)

    def mapped(self, key: str) -> torch.Tensor:
        """Tensor `key` as stored, as a view of its file's memory map: nothing is read or allocated until pages are
        used, and those pages are the OS's file cache, not this process's heap. Copy-on-write: a write changes this
        process's copy of a page, never the file. For tables that are only gathered by row (weights/mapped.py)."""
        file, dtype, start, end = self._entry(key)
        shape = self.shape(key)
        numel = math.prod(shape)
        if end - start != numel * dtype.itemsize or numel == 0:
            raise CheckpointError(f"{file}: tensor {key!r} holds {end - start} bytes, its shape {list(shape)} needs "
                                  f"{numel * dtype.itemsize}")
        with open(file, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # the map outlives the file handle
        if buffer.size() < end:
            raise CheckpointError(f"{file}: tensor {key!r} is cut short (truncated file?)")
        return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=start).view(shape)  # keeps `buffer` alive

    def _entry(self, key: str) -> tuple[Path, torch.dtype, int, int]:
        """(file, dtype, absolute start, absolute end) of a tensor's bytes, from the file's header."""
        file = self._file_of[key]
        if file not in self._headers:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = (8 + size, json.loads(f.read(size)))  # safe_open already validated it
        base, header = self._headers[file]
        info = header[key]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        return file, _DTYPES[info["dtype"]], base + start, base + end

    def _read(self, key, fn):
        file = self._file_of[key]
        try:
            return fn(self._open(file))
        except (SafetensorError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key!r}: {e}") from None

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"{file} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        return self._handles[file]
