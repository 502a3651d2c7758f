"""A preallocated KV cache built for recurrence.

The core block runs r times per token, so "one slot per layer" is a choice, not a given. Two semantics:

* ``per-step``: every recurrence step of every core layer owns a slot. A token decoded at recurrence t attends
  to the K/V that earlier tokens produced at their own recurrence t: the reference's ``full`` lookup, needed for
  exact parity with it. Slots: P + R·max_steps + C per position.
* ``shared``: one slot per layer. Each recurrence overwrites its core layer's slot, so earlier positions are seen
  through the K/V of the last recurrence that wrote them, and the positions being computed through the current
  one: the paper's KV sharing (the reference's ``latest-m4-compress-s4`` on the released 2/4/2 layout, but mapped
  by layer, so it is right for any layout). Slots: P + R + C per position, independent of r.

Storage is one tensor per K and V, [slots, batch, heads, max_length, head_dim], allocated once. Writing copies
into it; reading returns views. `length` is the number of positions whose entries are final; rolling back is
moving it, and the entries beyond it are simply overwritten later.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from depthwave.errors import InvalidParameterError
from depthwave.model.config import HuginnConfig

CacheMode = Literal["per-step", "shared"]
CACHE_MODES: tuple[str, ...] = ("per-step", "shared")


class KVCache:
    def __init__(
        self,
        config: HuginnConfig,
        max_length: int,
        mode: CacheMode = "shared",
        max_steps: int | None = None,
        batch_size: int = 1,
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
        self.mode = mode
        self.max_steps = max_steps if mode == "per-step" else None
        self.max_length = max_length
        self.prelude_layers = config.n_layers_in_prelude
        self.core_layers = config.n_layers_in_recurrent_block
        core_slots = self.core_layers * (max_steps if mode == "per-step" else 1)  # type: ignore[operator]
        self._coda_base = self.prelude_layers + core_slots
        self.num_slots = self._coda_base + config.n_layers_in_coda
        shape = (self.num_slots, batch_size, config.n_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        # Per-slot views, so a write indexes once instead of twice.
        self._key_slots = self.keys.unbind(0)
        self._value_slots = self.values.unbind(0)
        self.length = 0

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
    def write(self, slot: int, start: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store K/V [B, H, S, h] for positions start..start+S-1 and return the slot's K/V for 0..start+S-1."""
        end = start + key.shape[2]
        if end > self.max_length:
            raise InvalidParameterError(f"position {end - 1} is beyond the cache's max_length={self.max_length}")
        keys, values = self._key_slots[slot], self._value_slots[slot]
        keys[:, :, start:end].copy_(key)
        values[:, :, start:end].copy_(value)
        return keys[:, :, :end], values[:, :, :end]

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` positions (the samplers' cache rollback)."""
        if not 0 <= length <= self.length:
            raise InvalidParameterError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    # ---- memory ---------------------------------------------------------------------------------------------
    @property
    def bytes_per_position(self) -> int:
        """K and V bytes that one sequence position occupies across all slots (per batch row)."""
        return 2 * self.num_slots * self.keys.shape[2] * self.keys.shape[4] * self.keys.element_size()

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
