"""The KV cache, built for speculative decoding.

Full-attention layers append to a growable buffer [B, n_kv, T, d] (position p at index p); attention reads the
prefix [0, length) padded to a multiple of `KEY_BLOCK` positions, the padding masked. Sliding-window layers write
into a ring buffer of `capacity` slots (position p lives in slot p % capacity) and keep each slot's absolute position
in a small per-type tensor. Attention over a ring needs no ordering: the mask is built from those positions, so
writing never moves data.

The geometry is a function of the model config alone: the ring holds `sliding_capacity(config)` = W - 1 +
`SLIDING_SLACK` slots whatever the draft length, schedule or drafter, and a full layer's keys are the positions
themselves, padded to whole blocks. So a position's key layout, and with it the order in which attention sums over
its keys, is the same in a target-only run and in a speculative one; `attend` then gives a row the same bits
whether it is computed alone (a decode step) or with other rows (a verify pass), which is what makes greedy
speculative decoding give exactly the target-only tokens in every dtype.

Invariants:
- `length` is the number of positions whose K/V are kept; a forward over S new tokens processes positions
  [length, length + S).
- `rollback(r)` forgets the last r positions by moving `length` back. It copies and writes nothing: stale ring slots
  hold positions >= length, which every later mask hides until they are overwritten by the same positions again.
- A ring must hold `history + max_rollback` slots, `history = max(W - 1, min_sliding_history)`: that keeps, after
  any rollback of up to `max_rollback` positions, the W - 1 positions the target's next query needs and the
  `min_sliding_history` positions a drafter reads. The config's capacity covers every generation
  (`speculative.generate` checks its needs against it); a caller that asks for more (training a drafter over whole
  sequences) gets a larger ring. A rollback that would break this raises.
- Only layers that own K/V have buffers; KV-sharing ("reuse") layers attend to the K/V of their source layer.

The drafter reads the cache through `views()`: per attention type, the K/V of the type's exporting layer (the last
non-reuse layer of that type), restricted to accepted positions, as views into the buffers (never copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FULL, SLIDING, Gemma4Config
from .layers import KEY_BLOCK, additive_mask

# Ring slots beyond the W - 1 positions a target query reads: room for a drafter's longer history (the released
# drafters read W + 1 positions: 2 more) plus a rollback of up to MAX_DRAFT_TOKENS + 1 = 33 positions
# (speculative/schedule.py), with room to spare. Attending over 64 more keys costs little next to W (512 or 1024).
SLIDING_SLACK = 64


def sliding_capacity(config: Gemma4Config) -> int:
    """Ring slots of every sliding layer: a function of the config alone, the same for every generation."""
    return config.sliding_window - 1 + SLIDING_SLACK


def padded(n: int) -> int:
    """n rounded up to whole KEY_BLOCKs: the key length full layers attend over."""
    return -(-max(n, 1) // KEY_BLOCK) * KEY_BLOCK


class CacheError(RuntimeError):
    """A cache operation that would silently corrupt attention (too long a rollback, positions past the limit)."""


@dataclass(frozen=True)
class KVView:
    """Read-only K/V of one attention type. `positions[j]` is the absolute position held at index j of the
    sequence axis, or -1 where the slot holds nothing readable (empty, or past the accepted prefix)."""

    k: torch.Tensor  # [B, n_kv, T, d]
    v: torch.Tensor  # [B, n_kv, T, d]
    positions: torch.Tensor  # [T] int64


@dataclass(frozen=True)
class Step:
    """What one forward over S new tokens needs from the cache: their positions and, per attention type, the
    additive mask [S, T] (0 or -inf) over the keys that layer type will attend to."""

    positions: torch.Tensor  # [S] int64
    masks: dict[str, torch.Tensor]


class KVCache:
    """K/V of every layer that owns K/V, for batch B, laid out per attention type as described above."""

    def __init__(
        self,
        config: Gemma4Config,
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_length: int = 256,
        max_rollback: int = 16,
        min_sliding_history: int = 0,
    ):
        self.config = config
        self.window = config.sliding_window
        self.max_rollback = max_rollback
        self.history = max(self.window - 1, min_sliding_history)
        # ring slots of every sliding layer: the config's, unless the caller needs more (see the module docstring)
        self.capacity = max(sliding_capacity(config), self.history + max_rollback)
        self.length = 0
        self._floor = 0  # oldest position still guaranteed to be in every ring
        self.device, self.dtype = torch.device(device), dtype
        self._slot_pos = torch.full((self.capacity,), -1, dtype=torch.long, device=self.device)  # ring positions
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        for spec in config.layers:
            if spec.kv_mode == "reuse":
                continue
            slots = padded(max_length) if spec.attention_type == FULL else self.capacity
            shape = (batch_size, spec.num_kv_heads, slots, spec.head_dim)
            self._k[spec.index] = torch.zeros(shape, dtype=dtype, device=self.device)
            self._v[spec.index] = torch.zeros(shape, dtype=dtype, device=self.device)
        self._ring_path = False  # whether the current step writes before attending (see `begin`)

    # ---- the forward pass ------------------------------------------------------------------------------------
    def begin(self, num_new: int) -> Step:
        """Reserve positions [length, length + num_new) and build the per-type masks for this forward."""
        start, end = self.length, self.length + num_new
        if end > self.config.max_position_embeddings:
            raise CacheError(
                f"position {end - 1} is past the model's max_position_embeddings={self.config.max_position_embeddings}"
            )
        positions = torch.arange(start, end, device=self.device)
        self._grow(padded(end))
        masks: dict[str, torch.Tensor] = {}
        if FULL in self.config.layer_types:  # keys [0, padded(end)): the padding (zeros or stale) is masked
            key_pos = torch.arange(padded(end), device=self.device)
            masks[FULL] = additive_mask(key_pos[None, :] <= positions[:, None], self.dtype)
        if SLIDING in self.config.layer_types:
            # Ring path: the new tokens fit next to the W - 1 keys the first of them needs, so write, then attend
            # over the ring. Otherwise (long prefills) attend over [ring ; new] and write the tail afterwards.
            self._ring_path = num_new <= self.capacity - (self.window - 1)
            old = torch.where(self._slot_pos < start, self._slot_pos, -1)  # hide stale slots past a rollback
            tail = positions[-self.capacity:]
            self._slot_pos.index_copy_(0, tail % self.capacity, tail)
            if self._ring_path:
                key_pos = self._slot_pos
            elif start:
                key_pos = torch.cat([old, positions])
            else:  # a first prefill has no history: its keys are its own tokens, not an empty ring beside them
                key_pos = positions
            q = positions[:, None]
            masks[SLIDING] = additive_mask((key_pos >= 0) & (key_pos <= q) & (key_pos > q - self.window), self.dtype)
        self._floor = max(self._floor, end - self.capacity)
        self._span = (start, end)
        self._ring_slots = positions[-self.capacity:] % self.capacity
        self.length = end
        return Step(positions, masks)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's K/V [B, n_kv, S, d] of `layer` and return the K/V its attention reads."""
        kb, vb = self._k[layer], self._v[layer]
        start, end = self._span
        if self.config.layers[layer].attention_type == FULL:
            kb[:, :, start:end] = k
            vb[:, :, start:end] = v
            return kb[:, :, : padded(end)], vb[:, :, : padded(end)]
        slots = self._ring_slots
        keep = slots.shape[0]
        if self._ring_path:
            kb.index_copy_(2, slots, k[:, :, -keep:])
            vb.index_copy_(2, slots, v[:, :, -keep:])
            return kb, vb
        if start == 0:
            k_all, v_all = k, v
        else:
            k_all, v_all = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)  # copies before the write below
        kb.index_copy_(2, slots, k[:, :, -keep:])
        vb.index_copy_(2, slots, v[:, :, -keep:])
        return k_all, v_all

    # ---- speculative decoding --------------------------------------------------------------------------------
    def rollback(self, r: int) -> None:
        """Forget the last r positions (rejected drafts). Copies nothing."""
        if r < 0 or r > self.length:
            raise CacheError(f"cannot roll back {r} positions of a cache holding {self.length}")
        if SLIDING in self.config.layer_types and (r > self.max_rollback
                                                   or max(0, self.length - r - self.history) < self._floor):
            raise CacheError(
                f"cannot roll back {r} positions: the cache was built with max_rollback={self.max_rollback} (its "
                f"sliding ring of {self.capacity} slots keeps the last {self.history} positions after at most that)"
            )
        self.length -= r

    def views(self) -> dict[str, KVView]:
        """K/V of each attention type's exporting layer over the accepted positions [0, length), without copies."""
        out = {}
        for attention_type, layer in self.config.export_layer.items():
            k, v = self._k[layer], self._v[layer]
            if attention_type == FULL:
                n = self.length
                out[FULL] = KVView(k[:, :, :n], v[:, :, :n], torch.arange(n, device=self.device))
            else:
                visible = torch.where(self._slot_pos < self.length, self._slot_pos, -1)
                out[SLIDING] = KVView(k, v, visible)
        return out

    # ---- internals -------------------------------------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        """Double the full-layer buffers when `needed` positions no longer fit (amortised, rare). Position p stays
        at index p, so growing changes no key's place in attention."""
        for layer, kb in self._k.items():
            if self.config.layers[layer].attention_type != FULL or kb.shape[2] >= needed:
                continue
            size = max(needed, 2 * kb.shape[2])
            for store in (self._k, self._v):
                old = store[layer]
                new = old.new_zeros(old.shape[0], old.shape[1], size, old.shape[3])
                new[:, :, : old.shape[2]] = old
                store[layer] = new
