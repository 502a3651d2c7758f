"""Where one model call's queries sit: per row, a chunk of consecutive positions start..start+size-1.

Rows of a batch hold different sequences at different places (a prompt being prefilled, a diffusion wavefront of
five positions, a single decoded token), so positions are per row. A `Positions` is built once per engine pass from
the rows' starts and sizes and shared by every layer of every stage: the RoPE rotations of the queries, one boolean
attention mask over the cache, and the (row, position) pairs whose K/V the call writes.

A row shorter than the longest is padded at its end; a padded query repeats the row's last position, so its
rotation and mask are valid, and it writes nothing, so it can never overwrite a real cache entry. Its output is
garbage that nobody reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from depthwave.errors import PromptError


@dataclass(frozen=True)
class Positions:
    rows: slice | Tensor
    """Cache rows of the call: a slice for contiguous rows (reads are views), or an index (reads are copies)."""
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    pos: Tensor
    """[B, S] absolute positions (padding repeats a row's last position)."""
    rotation: Tensor
    """[B or 1, S, 1, 1, head_dim/2] complex rotations, broadcasting over the (q|k) and head axes."""
    mask: Tensor | None
    """[B or 1, 1, S, T] boolean (True = attend), or None when every query sees every key < T (or `is_causal`)."""
    is_causal: bool
    length: int
    """T: the keys a call reads, positions 0..T-1 of each row."""
    write_rows: Tensor | None
    """[N] cache rows and [N] positions of the real (unpadded) queries, in the order of `write_from`."""
    write_pos: Tensor | None
    write_from: Tensor | None
    """[N] flat indices into [B*S] of the real queries, or None when no row is padded."""
    bias: Tensor | None = field(init=False, compare=False, repr=False)
    """The mask as an additive fp32 bias (0 or -inf), built once per call instead of once per layer (a plain
    field, so that a compiled graph reads it as an input)."""
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    """What other modules derive from this call once and reuse across its layers (write indices, the compiled
    pass's inputs)."""
    loops: Tensor | None = None
    """[B, S] per-step cache only: the loop each query's first recurrence of the call runs, so that recurrence i
    reads and writes the slots of loop loops + i (a loop wavefront: queries at different depths in one call).
    None: every query's recurrence i runs loop i."""
    loop_rows: tuple[tuple[int, ...], ...] = ()
    """`loops` on the host, per row (padding repeats a row's last)."""
    loop_values: tuple[int, ...] = field(init=False, compare=False, repr=False)
    """The distinct values of `loop_rows`: the loops whose slots a call reads."""

    def __post_init__(self) -> None:
        mask = self.mask
        bias = None if mask is None else torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "loop_values", tuple(sorted({loop for row in self.loop_rows for loop in row})))

    def flat_writes(self, heads: int, length: int) -> Tensor:
        """Indices of the written (row, head, position) entries in a cache slot viewed as [rows·heads·length, h],
        in the order of the real queries' K/V viewed as [N·heads, h] (one index_copy per write)."""
        key = ("writes", heads, length)
        if key not in self.memo:
            assert self.write_rows is not None and self.write_pos is not None, "an uncached call writes nothing"
            head = torch.arange(heads, device=self.pos.device)
            self.memo[key] = ((self.write_rows[:, None] * heads + head) * length + self.write_pos[:, None]).reshape(-1)
        return self.memo[key]

    @property
    def batch(self) -> int:
        return len(self.starts)

    @property
    def width(self) -> int:
        return int(self.pos.shape[1])

    @property
    def padded(self) -> bool:
        return self.write_from is not None

    @property
    def single(self) -> tuple[int, int, int] | None:
        """(row, start, end) when the call is one unpadded row of a contiguous pool slice: writes are slice copies."""
        if self.batch == 1 and isinstance(self.rows, slice):
            return self.rows.start, self.starts[0], self.starts[0] + self.sizes[0]
        return None

    def valid(self) -> Tensor:
        """[B, S] True for real (unpadded) queries."""
        sizes = torch.tensor(self.sizes, device=self.pos.device)
        return torch.arange(self.width, device=self.pos.device)[None, :] < sizes[:, None]

    def hiding(self, visible: Tensor) -> Positions:
        """The same call with cached keys hidden where `visible` [B, T] is False (adaptive compute's per-step cache
        hides positions that never ran the current recurrence)."""
        keys = visible[:, None, None, : self.length]
        base = self.mask if self.mask is not None else _causal(self.pos, self.length) if self.is_causal else None
        # A fresh memo: what was derived from the unhidden call (the compiled pass's biases) must not be reused.
        return replace(self, mask=keys if base is None else base & keys, is_causal=False, memo={})

    def at_loops(self, loops: list[list[int]]) -> Positions:
        """The same call with each query's own first loop (`loops[b][s]` for the real queries of row b)."""
        padded = tuple(tuple(row) + (row[-1],) * (self.width - len(row)) for row in loops)
        return replace(self, loops=torch.tensor(padded, device=self.pos.device), loop_rows=padded, memo={})

    def subset(self, index: Tensor, rows: Tensor) -> Positions:
        """The rows `index` of this call (an exit or a shorter depth drops rows from later recurrences)."""
        host = index.tolist()
        mask = self.mask[index] if self.mask is not None and self.mask.shape[0] > 1 else self.mask
        rotation = self.rotation[index] if self.rotation.shape[0] > 1 else self.rotation
        starts = tuple(self.starts[i] for i in host)
        sizes = tuple(self.sizes[i] for i in host)
        pos = self.pos[index]
        write_rows, write_pos, write_from = _writes(rows, pos, sizes)
        return replace(
            self,
            rows=rows,
            starts=starts,
            sizes=sizes,
            pos=pos,
            rotation=rotation,
            mask=mask,
            write_rows=write_rows,
            write_pos=write_pos,
            write_from=write_from,
            loops=None if self.loops is None else self.loops[index],
            loop_rows=tuple(self.loop_rows[i] for i in host) if self.loop_rows else (),
            memo={},
        )


def _causal(pos: Tensor, length: int) -> Tensor:
    keys = torch.arange(length, device=pos.device)
    return (keys[None, None, :] <= pos[:, :, None])[:, None]


def _writes(rows: slice | Tensor, pos: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor | None]:
    batch, width = pos.shape
    device = pos.device
    row_index = torch.arange(rows.start, rows.start + batch, device=device) if isinstance(rows, slice) else rows
    row_index = row_index[:, None].expand(batch, width)
    if all(size == width for size in sizes):
        return row_index.reshape(-1), pos.reshape(-1), None
    flat = torch.tensor(
        [b * width + s for b, size in enumerate(sizes) for s in range(size)], dtype=torch.long, device=device
    )
    return row_index.reshape(-1)[flat], pos.reshape(-1)[flat], flat


def make_positions(
    rope: Tensor,
    starts: list[int] | tuple[int, ...],
    sizes: list[int] | tuple[int, ...],
    rows: slice | Tensor | None = None,
    cached: bool = True,
) -> Positions:
    """Positions for rows whose chunks start at `starts` and hold `sizes` queries. `rows`: the cache rows (default
    0..B-1). `cached`: keys come from a cache holding every position < start (else from the chunk alone, which
    must then start at 0)."""
    batch = len(starts)
    if batch == 0 or len(sizes) != batch or min(sizes) < 1:
        raise ValueError(f"positions need one chunk of >= 1 query per row, got starts {starts} and sizes {sizes}")
    context = rope.shape[0]
    end = max(s + n for s, n in zip(starts, sizes, strict=True))
    if end > context:
        raise PromptError(f"positions up to {end - 1} exceed the model's context of {context} positions (block_size)")
    if not cached and any(starts):
        raise ValueError("a call without a cache sees only its own chunk, which must start at position 0")
    device = rope.device
    rows = slice(0, batch) if rows is None else rows
    width = max(sizes)
    starts, sizes = tuple(starts), tuple(sizes)
    if batch == 1:
        start = starts[0]
        pos = torch.arange(start, start + width, device=device)[None]
        rotation = rope[start : start + width][None, :, None, None]
        # One row needs no mask for a single query (it sees every key < T) or a chunk from 0 (causal).
        mask = None if width == 1 or start == 0 else _causal(pos, end)
        is_causal = width > 1 and start == 0
    else:
        offsets = torch.tensor(
            [[start + min(s, size - 1) for s in range(width)] for start, size in zip(starts, sizes, strict=True)],
            dtype=torch.long,
        )
        pos = offsets.to(device)
        rotation = rope[pos][:, :, None, None]
        is_causal = not cached
        mask = None if is_causal else _causal(pos, end)
    write_rows, write_pos, write_from = _writes(rows, pos, sizes)
    return Positions(rows, starts, sizes, pos, rotation, mask, is_causal, end, write_rows, write_pos, write_from)
