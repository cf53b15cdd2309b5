"""An embedding table that stays in the checkpoint file: E2B/E4B's per-layer-embedding table.

`embed_tokens_per_layer` is [262144, L * 256]: 4.7 GB in bfloat16 for E2B (35 layers), more than all of E2B's
other text weights together, and 9.4 GB once converted to float32. It is never multiplied, only gathered by token
id, so a decode step reads a few rows of it (one per new token, 17.5 KB each). Mapped from the safetensors file,
it costs no heap at all: the OS reads in the pages that are gathered, keeps them as evictable file cache shared with
every process that maps the file, and the resident memory of loading is that of the other weights.

Exactness: rows are gathered in the checkpoint's dtype and then converted to the compute dtype. A dtype conversion
is elementwise, so a row converted alone is bit for bit the same row of the whole table converted first; the model
then scales it as it would a row of a loaded table (`Gemma4Model.per_layer_inputs`).

Devices: the table always stays in host memory. `.to()`, `.half()`, `.cuda()` and `.to_empty()` never move or
convert it (that would allocate the full table); they set the dtype and device of the rows `forward` returns, so on
a GPU the rows are gathered on the host and copied over each forward (a few KB, but a host synchronisation).
`weights.load_target` therefore maps the table by default on CPU only and, on a GPU, loads it onto the device like
every other weight when it fits there with room to spare (`weights.loader.per_layer_table_on_host`), else maps it;
`map_per_layer_table=True/False` decides either way. scripts/gpu_check.py times a decode step's rows both ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MappedEmbedding(nn.Module):
    """`embedding(input_ids)` -> rows [*ids.shape, D] in `dtype` on `device`, gathered from `weight` [N, D], a
    read-only host tensor kept as given (in practice a view of a memory-mapped checkpoint, `TensorStore.mapped`).

    `weight` is a parameter (frozen), so `parameters()`, `state_dict()` and `load_state_dict()` see it: state_dict
    holds it in the checkpoint's dtype, and load_state_dict replaces it with a private in-memory copy of the given
    tensor (values exactly as given, not rounded to the checkpoint's dtype)."""

    def __init__(self, weight: torch.Tensor, *, dtype: torch.dtype, device: str | torch.device = "cpu"):
        super().__init__()
        if weight.dim() != 2 or weight.device.type != "cpu" or not weight.is_floating_point():
            raise ValueError(f"MappedEmbedding needs a 2-D floating-point host tensor, got {weight.dtype} "
                             f"{list(weight.shape)} on {weight.device}")
        self.weight = nn.Parameter(weight, requires_grad=False)  # shares weight's memory: no copy
        self.dtype, self.device = dtype, torch.device(device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, D]
        rows = F.embedding(input_ids.to(self.weight.device), self.weight)  # [B, S, D], the stored dtype
        return rows.to(device=self.device, dtype=self.dtype)

    def _apply(self, fn, recurse=True):
        """Module.to / half / cuda / to_empty: learn the new dtype and device from a 0-element probe, leave the
        table alone."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        self.dtype, self.device = probe.dtype, probe.device
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        if tuple(value.shape) != tuple(self.weight.shape):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {list(value.shape)}, the "
                              f"mapped table has shape {list(self.weight.shape)}")
            return
        self.weight = nn.Parameter(value.detach().to("cpu", copy=True), requires_grad=False)

    def extra_repr(self) -> str:
        n, d = self.weight.shape
        return f"{n}, {d}, stored {self.weight.dtype} on the host, rows as {self.dtype} on {self.device}"
