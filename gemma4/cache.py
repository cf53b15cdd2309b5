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
from .generic import Causal, generic
from .kernels import KEY_BLOCK, additive_mask

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
    """Read-only K/V of one attention type. `positions[b, j]` is the absolute position row b holds at index j of
    the sequence axis, or -1 where that slot holds nothing readable for the row (empty, or past its accepted
    prefix). Hand-made views (training) may give one [T] row of positions shared by every batch row."""

    k: torch.Tensor  # [B, n_kv, T, d]
    v: torch.Tensor  # [B, n_kv, T, d]
    positions: torch.Tensor  # [B, T] (or [T]) int64


@dataclass(frozen=True)
class Step:
    """What one forward over S new tokens of b rows needs from the cache: each row's positions and, per attention
    type, the additive mask [b, S, T] (0 or -inf) over the keys that layer type will attend to (on the generic
    path a prefill from position 0 gets a `Causal` description instead)."""

    positions: torch.Tensor  # [b, S] int64
    masks: dict[str, torch.Tensor | Causal]


@dataclass(frozen=True)
class RingSnapshot:
    """The sliding rings of a one-row cache at `length` (`KVCache.save_rings`)."""

    length: int
    k: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]
    slot_pos: torch.Tensor
    floors: list[int]


class LayerKV:
    """One layer's K/V buffers in a cache, for the forward the cache has `begin`-ed: `update(k, v)` stores the
    layer's new K/V and returns what its attention reads. It holds the buffers, not the layer's index, so every
    layer of one kind runs the same code with other tensors: torch.compile compiles one graph per kind of layer
    and reuses it for all of them (speculative/compiled.py)."""

    def __init__(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor, full: bool):
        self.cache, self.k, self.v, self.full = cache, k, v, full

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's K/V [b, n_kv, S, d] and return the K/V [b, n_kv, T, d] the attention reads."""
        return self.cache._store(self.k, self.v, self.full, k, v)

    def scatter_index(self) -> torch.Tensor | None:
        """Where `update` puts the new K/V [B, n_kv, S, d] when it is one scatter along the sequence axis of the
        whole buffers, which attention then reads whole: in a static cache, a forward over every row on the ring
        path (every decode step and verify pass). [B, S]: the positions (full layers) or the ring slots (sliding
        layers). None otherwise. The compiled forward (speculative/compiled.py) stores K/V with this alone."""
        cache = self.cache
        if not (cache.static and cache._rows == slice(0, cache.batch_size)):
            return None
        if self.full:  # a static cache's full layers attend over their whole buffers (`_keys` is their length)
            return cache._positions
        return cache._ring_slots if cache._ring_path else None


class KVCache:
    """K/V of every layer that owns K/V, for batch B, laid out per attention type as described above.

    Rows are independent sequences: each has its own length (`lengths`), its own ring positions and its own
    rollbacks, so a batch of prompts of different lengths, accepting different numbers of drafts, shares one set of
    buffers. A forward normally processes S new tokens for every row; `begin(S, rows=slice(b, b + 1))` processes
    them for row b alone (a batch's prompts are prefilled one by one)."""

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
        static: bool = False,
        position_slack: int = 0,
    ):
        self.config = config
        # positions a forward may reach past max_position_embeddings - 1, to be rolled back: a batch's verify pass
        # computes, for a row near the limit, drafts beyond its own cap (speculative/loop.py). Kept positions stay
        # within the limit: the loop checks prompt + max_new_tokens up front.
        self.position_limit = config.max_position_embeddings + position_slack
        # static: every forward sees buffers of one shape (full layers attend over all max_length positions,
        # masked; writes go through index tensors), so a compiled forward never meets a new shape (no growing)
        self.static = static
        self.window = config.sliding_window
        self.max_rollback = max_rollback
        self.history = max(self.window - 1, min_sliding_history)
        # ring slots of every sliding layer: the config's, unless the caller needs more (see the module docstring)
        self.capacity = max(sliding_capacity(config), self.history + max_rollback)
        self.batch_size = batch_size
        self.lengths = [0] * batch_size  # per row, on the host: the loop knows them without a device sync
        self._floors = [0] * batch_size  # per row: oldest position still guaranteed to be in every ring
        self.device, self.dtype = torch.device(device), dtype
        self._slot_pos = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=self.device)
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        for spec in config.layers:
            if spec.kv_mode == "reuse":
                continue
            slots = padded(max_length) if spec.attention_type == FULL else self.capacity
            shape = (batch_size, spec.num_kv_heads, slots, spec.head_dim)
            self._k[spec.index] = torch.zeros(shape, dtype=dtype, device=self.device)
            self._v[spec.index] = torch.zeros(shape, dtype=dtype, device=self.device)
        self._full_size = padded(max_length)

    @property
    def length(self) -> int:
        """The common length of every row (a batch of rows with different lengths has none: read `lengths`)."""
        if len(set(self.lengths)) != 1:
            raise CacheError(f"the rows of this cache hold different lengths {self.lengths}: read cache.lengths")
        return self.lengths[0]

    # ---- the forward pass ------------------------------------------------------------------------------------
    def begin(self, num_new: int, rows: slice | None = None, blocks: torch.Tensor | None = None) -> Step:
        """Reserve positions [length_b, length_b + num_new) of each row b in `rows` (default: all) and build the
        per-type masks for this forward. `blocks` [b, num_new]: the image each new position belongs to (-1: text;
        `gemma4.model.image_blocks`); sliding layers then let a position see every position of its own image,
        later ones too (within the window), as a model with `use_bidirectional_attention: "vision"` was trained."""
        rows = slice(0, self.batch_size) if rows is None else rows
        starts = self.lengths[rows]
        ends = [s + num_new for s in starts]
        if max(ends) > self.position_limit:
            raise CacheError(
                f"position {max(ends) - 1} is past the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        start = torch.tensor(starts, device=self.device)[:, None]  # [b, 1]
        positions = start + torch.arange(num_new, device=self.device)  # [b, S]
        self._keys = self._full_size if self.static else padded(max(ends))
        self._grow(padded(max(ends)))
        masks: dict[str, torch.Tensor | Causal] = {}
        q = positions[:, :, None]  # [b, S, 1]
        # A prefill from position 0 on the generic path: masks described, not materialised (gemma4/generic.py)
        causal = max(starts) == 0 and generic(positions)
        if FULL in self.config.layer_types:  # keys [0, padded(end)): the padding (zeros or stale) is masked
            key_pos = torch.arange(self._keys, device=self.device)
            masks[FULL] = Causal(num_new) if causal else additive_mask(key_pos <= q, self.dtype)
        # every row writes the same positions: plain slices (not in a static cache: a slice's bounds would be
        # constants of a compiled graph)
        self._uniform = len(set(starts)) == 1 and not self.static
        if SLIDING in self.config.layer_types:
            # Ring path: the new tokens fit next to the W - 1 keys the first of them needs, so write, then attend
            # over the ring. Otherwise (long prefills) attend over [ring ; new] and write the tail afterwards.
            self._ring_path = num_new <= self.capacity - (self.window - 1)
            slot_pos = self._slot_pos[rows]  # [b, capacity], a view
            old = torch.where(slot_pos < start, slot_pos, -1)  # hide stale slots past a rollback
            tail = positions[:, -self.capacity:]
            self._ring_slots = tail % self.capacity  # [b, min(S, capacity)]
            slot_pos.scatter_(1, self._ring_slots, tail)
            self._fresh = max(starts) == 0
            if self._ring_path:
                key_pos = slot_pos
            elif self._fresh:  # a first prefill has no history: its keys are its own tokens, not an empty ring
                key_pos = positions
            else:
                key_pos = torch.cat([old, positions], dim=1)
            key_pos = key_pos[:, None, :]  # [b, 1, T]
            if causal and not self._ring_path and blocks is None:  # keys: this prefill's own tokens, in order
                masks[SLIDING] = Causal(num_new, window=self.window)
            else:
                seen = key_pos <= q  # [b, S, T]
                if blocks is not None:  # or in the query's image: a key's image is looked up among this step's
                    offset = key_pos - start[:, :, None]  # [b, 1, T]
                    ours = (offset >= 0) & (offset < num_new)
                    key_block = blocks.gather(1, offset.clamp(0, num_new - 1)[:, 0])[:, None]  # [b, 1, T]
                    query_block = blocks[:, :, None]  # [b, S, 1]
                    seen = seen | (ours & (key_block == query_block) & (query_block >= 0))
                masks[SLIDING] = additive_mask((key_pos >= 0) & seen & (key_pos > q - self.window), self.dtype)
        for b, end in enumerate(ends, start=rows.start):
            self._floors[b] = max(self._floors[b], end - self.capacity)
            self.lengths[b] = end
        self._rows, self._starts, self._positions = rows, starts, positions
        return Step(positions, masks)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's K/V [b, n_kv, S, d] of `layer` and return the K/V its attention reads."""
        return self.layer(layer).update(k, v)

    def layer(self, index: int) -> LayerKV:
        """Layer `index`'s part of the cache for this forward (after `begin`): what its attention writes and reads."""
        return LayerKV(self, self._k[index], self._v[index], self.config.layers[index].attention_type == FULL)

    def _store(self, k_buffer, v_buffer, full: bool, k: torch.Tensor, v: torch.Tensor):
        kb, vb = k_buffer[self._rows], v_buffer[self._rows]  # views of this step's rows
        S = k.shape[2]
        if full:
            if self._uniform:
                start = self._starts[0]
                kb[:, :, start:start + S] = k
                vb[:, :, start:start + S] = v
            else:  # position p of row b goes to index p of row b
                self._scatter(kb, vb, self._positions, k, v)
            return kb[:, :, : self._keys], vb[:, :, : self._keys]
        slots = self._ring_slots
        keep = slots.shape[1]
        if self._ring_path:
            self._scatter(kb, vb, slots, k[:, :, -keep:], v[:, :, -keep:])
            return kb, vb
        if self._fresh:
            k_all, v_all = k, v
        else:
            k_all, v_all = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)  # copies before the write below
        self._scatter(kb, vb, slots, k[:, :, -keep:], v[:, :, -keep:])
        return k_all, v_all

    @staticmethod
    def _scatter(kb, vb, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """kb[b, :, index[b, j]] = k[b, :, j] (and v): index [b, S], k [b, n_kv, S, d]."""
        if index.shape[0] == 1:  # one row: a plain index_copy_ along the sequence axis
            kb.index_copy_(2, index[0], k)
            vb.index_copy_(2, index[0], v)
            return
        row = torch.arange(index.shape[0], device=index.device)[:, None]  # [b, 1]
        kb[row, :, index] = k.transpose(1, 2)  # the indexed result is [b, S, n_kv, d]
        vb[row, :, index] = v.transpose(1, 2)

    # ---- speculative decoding --------------------------------------------------------------------------------
    def rollback(self, r: int | list[int]) -> None:
        """Forget the last r positions (rejected drafts) of every row, or the last r[b] of row b. Copies nothing."""
        counts = [r] * self.batch_size if isinstance(r, int) else list(r)
        if len(counts) != self.batch_size:
            raise CacheError(f"rollback got {len(counts)} counts for a cache of {self.batch_size} rows")
        for b, (n, length) in enumerate(zip(counts, self.lengths)):
            if n < 0 or n > length:
                raise CacheError(f"cannot roll back {n} positions of a cache row holding {length}")
            if SLIDING in self.config.layer_types and (n > self.max_rollback
                                                       or max(0, length - n - self.history) < self._floors[b]):
                raise CacheError(
                    f"cannot roll back {n} positions: the cache was built with max_rollback={self.max_rollback} "
                    f"(its sliding ring of {self.capacity} slots keeps the last {self.history} positions after at "
                    "most that)"
                )
        self.lengths = [length - n for length, n in zip(self.lengths, counts)]

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (a batch drops its finished rows): copies the kept rows' K/V once."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for store in (self._k, self._v):
            for layer, buffer in store.items():
                store[layer] = buffer.index_select(0, index)
        self._slot_pos = self._slot_pos.index_select(0, index)
        self.lengths = [self.lengths[b] for b in rows]
        self._floors = [self._floors[b] for b in rows]
        self.batch_size = len(rows)

    def save_rings(self) -> RingSnapshot:
        """A copy of the sliding rings (one row): with the full-attention buffers, which keep every position, they
        are the cache's whole state at this length. A conversation keeps one to return further back than a
        rollback can (speculative/session.py)."""
        if self.batch_size != 1:
            raise CacheError("save_rings keeps a one-row cache's rings")
        rings = [i for i in self._k if self.config.layers[i].attention_type == SLIDING]
        return RingSnapshot(self.length, {i: self._k[i].clone() for i in rings},
                            {i: self._v[i].clone() for i in rings}, self._slot_pos.clone(), list(self._floors))

    def restore_rings(self, snapshot: RingSnapshot) -> None:
        """Return to a `save_rings` state. Valid while the positions below snapshot.length were not rewritten since
        (a rollback to before them would have rewritten the full layers' copy)."""
        for i in snapshot.k:
            self._k[i].copy_(snapshot.k[i])
            self._v[i].copy_(snapshot.v[i])
        self._slot_pos.copy_(snapshot.slot_pos)
        self._floors = list(snapshot.floors)
        self.lengths = [snapshot.length]

    def reserve(self, max_length: int) -> None:
        """Make the full layers hold at least `max_length` positions. A static cache keeps one buffer shape within
        a generation; a conversation that continues it turn after turn (speculative/session.py) makes room before
        each turn: the full layers' K/V are copied once into larger buffers when it grows (position p stays at
        index p), never within a generation."""
        size = padded(max_length)
        for layer in self._k:
            if self.config.layers[layer].attention_type == FULL and self._k[layer].shape[2] < size:
                self._enlarge(layer, size)
        self._full_size = max(self._full_size, size)

    def buffers(self) -> list[torch.Tensor]:
        """Every K/V buffer, for code that must know their memory (CUDA graphs replay fixed addresses)."""
        return [*self._k.values(), *self._v.values()]

    def views(self) -> dict[str, KVView]:
        """K/V of each attention type's exporting layer over each row's accepted positions, without copies."""
        lengths = torch.tensor(self.lengths, device=self.device)[:, None]  # [B, 1]
        out = {}
        for attention_type, layer in self.config.export_layer.items():
            k, v = self._k[layer], self._v[layer]
            if attention_type == FULL:
                n = k.shape[2] if self.static else max(self.lengths)  # static: one shape for every round
                index = torch.arange(n, device=self.device)
                out[FULL] = KVView(k[:, :, :n], v[:, :, :n], torch.where(index < lengths, index, -1))
            else:
                out[SLIDING] = KVView(k, v, torch.where(self._slot_pos < lengths, self._slot_pos, -1))
        return out

    # ---- internals -------------------------------------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        """Double the full-layer buffers when `needed` positions no longer fit (amortised, rare). Position p stays
        at index p, so growing changes no key's place in attention."""
        for layer, kb in self._k.items():
            if self.config.layers[layer].attention_type != FULL or kb.shape[2] >= needed:
                continue
            if self.static:
                raise CacheError(f"a static cache holds {kb.shape[2]} positions; this step needs {needed}")
            self._enlarge(layer, max(needed, 2 * kb.shape[2]))

    def _enlarge(self, layer: int, size: int) -> None:
        """Copy a full layer's K/V into buffers of `size` positions (position p stays at index p)."""
        for store in (self._k, self._v):
            old = store[layer]
            store[layer] = old.new_zeros(old.shape[0], old.shape[1], size, old.shape[3])
            store[layer][:, :, : old.shape[2]] = old
