"""A preallocated KV pool built for recurrence and for many sequences at once.

The core block runs r times per token, so "one slot per layer" is a choice, not a given. Two semantics:

* ``per-step``: every recurrence step of every core layer owns a slot. A token decoded at recurrence t attends
  to the K/V that earlier tokens produced at their own recurrence t: the reference's ``full`` lookup, needed for
  exact parity with it. Slots: P + R·max_steps + C per position.
* ``shared``: one slot per layer. Each recurrence overwrites its core layer's slot, so earlier positions are seen
  through the K/V of the last recurrence that wrote them, and the positions being computed through the current
  one: the paper's KV sharing (the reference's ``latest-m4-compress-s4`` on the released 2/4/2 layout, but mapped
  by layer, so it is right for any layout). Slots: P + R + C per position, independent of r.

Storage is one tensor per K and V, [slots, rows, kv_heads, max_length, head_dim], allocated once per engine; a row
holds one sequence. A call writes the K/V of its (row, position) pairs by index (as gpt-fast's static cache does)
and reads each row's positions 0..T-1 as a view. `lengths[row]` counts the positions whose entries are final;
rolling a row back is lowering it (diffusion and speculative decoding roll rows back by different amounts), and
the entries beyond it are simply overwritten later. Nothing moves or reallocates per step.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from depthwave.errors import InvalidParameterError
from depthwave.model.config import HuginnConfig
from depthwave.model.positions import Positions

CacheMode = Literal["per-step", "shared"]
CACHE_MODES: tuple[str, ...] = ("per-step", "shared")


class KVPool:
    def __init__(
        self,
        config: HuginnConfig,
        max_length: int,
        mode: CacheMode = "shared",
        max_steps: int | None = None,
        rows: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if mode not in CACHE_MODES:
            raise InvalidParameterError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        if max_length < 1 or max_length > config.block_size:
            raise InvalidParameterError(
                f"cache max_length must be in [1, block_size={config.block_size}], got {max_length}"
            )
        if mode == "per-step" and (max_steps is None or max_steps < 1):
            raise InvalidParameterError(f"a per-step cache needs max_steps >= 1, got {max_steps}")
        if rows < 1:
            raise InvalidParameterError(f"a cache needs at least one row, got {rows}")
        self.mode = mode
        self.max_steps = max_steps if mode == "per-step" else None
        self.max_length = max_length
        self.rows = rows
        self.prelude_layers = config.n_layers_in_prelude
        self.core_layers = config.n_layers_in_recurrent_block
        core_slots = self.core_layers * (max_steps if mode == "per-step" else 1)  # type: ignore[operator]
        self._coda_base = self.prelude_layers + core_slots
        self.num_slots = self._coda_base + config.n_layers_in_coda
        shape = (self.num_slots, rows, config.kv_heads, max_length, config.head_dim)
        self.keys = _offset_zeros(shape, device, dtype)
        self.values = _offset_zeros(shape, device, dtype)
        # Per-slot views, so a write indexes once instead of twice.
        self._key_slots = self.keys.unbind(0)
        self._value_slots = self.values.unbind(0)
        self.lengths = [0] * rows

    # ---- slot arithmetic ------------------------------------------------------------------------------------
    def prelude_slot(self, layer: int) -> int:
        return layer

    def core_slot(self, step: int, layer: int) -> int:
        if self.max_steps is None:
            return self.prelude_layers + layer
        if step >= self.max_steps:
            raise InvalidParameterError(
                f"recurrence step {step} is beyond this per-step cache's max_steps={self.max_steps}"
            )
        return self.prelude_layers + self.core_layers * step + layer

    def coda_slot(self, layer: int) -> int:
        return self._coda_base + layer

    # ---- data -----------------------------------------------------------------------------------------------
    def write(self, slot: int, at: Positions, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store K/V [B, S, H, h] of the call's real queries; return each row's K/V [B, H, T, h] for 0..T-1."""
        if at.length > self.max_length:
            raise InvalidParameterError(f"position {at.length - 1} is beyond the cache's max_length={self.max_length}")
        keys, values = self._key_slots[slot], self._value_slots[slot]
        single = at.single
        if single is not None:
            row, start, end = single
            keys[row, :, start:end].copy_(key[0].transpose(0, 1))
            values[row, :, start:end].copy_(value[0].transpose(0, 1))
            return keys[row : row + 1, :, :end], values[row : row + 1, :, :end]
        key, value = key.flatten(0, 1), value.flatten(0, 1)
        if at.write_from is not None:
            key, value = key[at.write_from], value[at.write_from]
        rows, heads, length, width = keys.shape
        index = at.flat_writes(heads, length)
        keys.view(rows * heads * length, width).index_copy_(0, index, key.reshape(-1, width))
        values.view(rows * heads * length, width).index_copy_(0, index, value.reshape(-1, width))
        return keys[at.rows, :, : at.length], values[at.rows, :, : at.length]

    def by_loop(self, slot: int, at: Positions) -> bool:
        """Whether a call writes and reads `slot` per query loop (`at.loops`): a core slot of a per-step cache."""
        return at.loops is not None and self.max_steps is not None and self.prelude_layers <= slot < self._coda_base

    def write_by_loop(
        self, slot: int, at: Positions, key: Tensor, value: Tensor
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """`write` for queries at different loops (`at.loops`; `slot` is loop 0's): each query's K/V [B, S, G, h]
        go to its own loop's slot, in one index_copy over the whole pool. Returns, per loop among the queries, that
        slot's K/V [B, G, T, h] of each row and a [B, 1, S, 1] mask of the queries at that loop."""
        assert at.loops is not None
        deepest = slot + self.core_layers * at.loop_values[-1]
        if deepest >= self._coda_base:
            raise InvalidParameterError(
                f"loop {(deepest - self.prelude_layers) // self.core_layers} is beyond this per-step cache's "
                f"max_steps={self.max_steps}"
            )
        if at.length > self.max_length:
            raise InvalidParameterError(f"position {at.length - 1} is beyond the cache's max_length={self.max_length}")
        _, rows, heads, length, width = self.keys.shape
        index, chosen = self._loop_writes(at)
        index = index + slot * rows * heads * length
        key, value = key.flatten(0, 1), value.flatten(0, 1)
        if at.write_from is not None:
            key, value = key[at.write_from], value[at.write_from]
        self.keys.view(-1, width).index_copy_(0, index, key.reshape(-1, width))
        self.values.view(-1, width).index_copy_(0, index, value.reshape(-1, width))
        out = []
        for loop, mask in zip(at.loop_values, chosen, strict=True):
            here = slot + self.core_layers * loop
            out.append((self.keys[here, at.rows, :, : at.length], self.values[here, at.rows, :, : at.length], mask))
        return out

    def _loop_writes(self, at: Positions) -> tuple[Tensor, list[Tensor]]:
        """Per call, for every layer: the flat pool index of each real query's K/V at slot 0 plus its own loop's
        offset, and per loop a [B, 1, S, 1] mask of the queries at it."""
        _, rows, heads, length, _ = self.keys.shape
        key = ("loop-writes", rows, heads, length, self.core_layers)
        if key not in at.memo:
            assert at.loops is not None
            loops = at.loops.reshape(-1)
            if at.write_from is not None:
                loops = loops[at.write_from]
            offsets = (self.core_layers * loops * rows * heads * length)[:, None]
            index = (at.flat_writes(heads, length).view(-1, heads) + offsets).reshape(-1)
            at.memo[key] = index, [(at.loops == loop)[:, None, :, None] for loop in at.loop_values]
        return at.memo[key]

    def cached(self, slot: int, rows: slice | Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Each row's K/V [B, G, length, h] of positions 0..length-1: views for a slice of rows; for an index, copies
        of the rows laid out as the views are (one compiled graph serves both)."""
        keys, values = self._key_slots[slot], self._value_slots[slot]
        if isinstance(rows, slice):
            return keys[rows, :, :length], values[rows, :, :length]
        # Laid out as the views are (ordinary tensors, not inference ones; an offset storage, full-length rows):
        # a compiled graph's guards tell those apart.
        with torch.inference_mode(False):
            picked = []
            for source in (keys, values):
                out = _offset_zeros((len(rows), *source.shape[1:]), source.device, source.dtype)
                torch.index_select(source, 0, rows, out=out)
                picked.append(out[:, :, :length])
            return picked[0], picked[1]

    def write_fresh(self, first_slot: int, at: Positions, key: Tensor, value: Tensor) -> None:
        """Store the K/V [L, N, G, h] of a call's N real queries (in `at`'s write order) in the L slots from
        `first_slot` on, computed elsewhere (the compiled pass): one copy each for all L layers."""
        if at.length > self.max_length:
            raise InvalidParameterError(f"position {at.length - 1} is beyond the cache's max_length={self.max_length}")
        layers, end = key.shape[0], first_slot + key.shape[0]
        _, rows, heads, length, width = self.keys.shape
        index = at.flat_writes(heads, length)
        for store, fresh in ((self.keys, key), (self.values, value)):
            slots = store[first_slot:end].view(layers, rows * heads * length, width)
            slots.index_copy_(1, index, fresh.reshape(layers, -1, width))

    def repeat_loop(self, row: int, position: int, loop: int, until: int) -> None:
        """Per-step cache: copy the K/V of `position` at `loop` into its slots of loops loop+1..until-1, so that a
        position that stopped early is seen through its last loop's keys there."""
        if self.max_steps is None:
            return
        first, layers = self.prelude_layers, self.core_layers
        for store in (self.keys, self.values):
            core = store[first : first + layers * self.max_steps].view(self.max_steps, layers, *store.shape[1:])
            core[loop + 1 : until, :, row, :, position] = core[loop, :, row, :, position]

    def set_length(self, row: int, length: int) -> None:
        """The row's first `length` positions are final (after a call wrote up to there, or a rollback)."""
        if not 0 <= length <= self.max_length:
            raise InvalidParameterError(f"a cache row holds 0..{self.max_length} positions, not {length}")
        self.lengths[row] = length

    def rollback(self, row: int, length: int) -> None:
        """Roll one row back to its first `length` positions (a sampler's rejected positions)."""
        if not 0 <= length <= self.lengths[row]:
            raise InvalidParameterError(f"cannot roll back a cache row of length {self.lengths[row]} to {length}")
        self.lengths[row] = length

    def move_row(self, source: int, target: int) -> None:
        """Copy a row's final entries into another row (the engine keeps its live rows contiguous)."""
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length

    # ---- memory ---------------------------------------------------------------------------------------------
    @property
    def bytes_per_position(self) -> int:
        """K and V bytes that one sequence position occupies across all slots (per row)."""
        return 2 * self.num_slots * self.keys.shape[2] * self.keys.shape[4] * self.keys.element_size()

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


OFFSET = 16
"""Elements before a pool's first: every view of the pool starts at a storage offset of at least this, so that a
compiled graph, for which a view's offset is a dynamic value, meets no offset of 0 or 1 (which dynamo would
specialise on). 16 elements keep 64-byte alignment."""


def _offset_zeros(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> Tensor:
    numel = 1
    for size in shape:
        numel *= size
    return torch.zeros(OFFSET + numel, device=device, dtype=dtype)[OFFSET:].view(shape)
