"""Per-row buffers indexed by absolute position, allocated once per engine, and per-request random states.

A row holds one request: its tokens (prompt, final and proposed), the recurrent state of every position (the
diffusion sampler keeps refining them across steps; the others write a fresh initial state before each chunk),
how many recurrences each position's state has run, and, for the samplers that need them, the previous step's
embeddings (momentum), proposal agreement counts (token-stability freezing) and the states of two steps back
(latent-acceleration freezing). Moving a wavefront or rolling back is index arithmetic on these rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthwave.model.config import HuginnConfig
from depthwave.model.positions import Positions


class RowBuffers:
    def __init__(self, config: HuginnConfig, rows: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows, self.length, self.width = rows, length, config.n_embd
        self.device, self.dtype = device, dtype
        self.tokens = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.states = torch.zeros(rows, length, config.n_embd, dtype=dtype, device=device)
        self.counts = torch.zeros(rows, length, dtype=torch.long, device=device)
        self._optional: dict[str, Tensor] = {}

    def optional(self, name: str) -> Tensor:
        """`embeddings`, `stability` or `older`: allocated the first time a request needs it."""
        if name not in self._optional:
            if name == "stability":
                self._optional[name] = torch.zeros(self.rows, self.length, dtype=torch.long, device=self.device)
            else:
                self._optional[name] = torch.zeros_like(self.states)
        return self._optional[name]

    def all(self) -> list[Tensor]:
        return [self.tokens, self.states, self.counts, *self._optional.values()]

    def reset(self, row: int, prompt: list[int]) -> None:
        """A new request in `row`: its prompt tokens, and no recurrence counts or agreements left from before."""
        self.tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.counts[row].zero_()
        if "stability" in self._optional:
            self._optional["stability"][row].zero_()

    def move(self, source: int, target: int) -> None:
        for buffer in self.all():
            buffer[target] = buffer[source]

    # ---- gathers and scatters over a pass's positions -----------------------------------------------------
    def gather(self, buffer: Tensor, at: Positions) -> Tensor:
        """The values at the pass's positions, [B, S(, D)] (padding repeats a row's last position)."""
        rows = buffer[at.rows]
        if buffer.dim() == 2:
            return rows.gather(1, at.pos)
        return rows.gather(1, at.pos[:, :, None].expand(-1, -1, buffer.shape[-1]))

    def scatter(self, buffer: Tensor, at: Positions, values: Tensor) -> None:
        """Write [B, S(, D)] values at the pass's real (unpadded) positions."""
        flat = values.flatten(0, 1)
        if at.write_from is not None:
            flat = flat[at.write_from]
        buffer[at.write_rows, at.write_pos] = flat


class RandomStates:
    """A request's random initial states (and noise), drawn from its own generator in blocks, so that a row costs no
    draw per step and its states do not depend on its neighbours. init_scale 0 gives zeros."""

    BLOCK = 32

    def __init__(
        self,
        config: HuginnConfig,
        init_scale: float,
        generator: torch.Generator | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.std = config.init_std * init_scale
        self.scale = config.embed_scale
        self.generator = generator
        self.shape = (self.BLOCK, config.n_embd)
        self.device, self.dtype = device, dtype
        self.block = torch.zeros(self.shape, device=device, dtype=dtype)
        self.used = self.BLOCK if self.std else 0

    def take(self, count: int) -> Tensor:
        """[count, D] fresh states."""
        if not self.std:
            return self.block[:count] if count <= self.BLOCK else self.block.new_zeros(count, self.shape[1])
        if count > self.BLOCK:
            return self._draw(count)
        if self.used + count > self.BLOCK:
            self.block = self._draw(self.BLOCK)
            self.used = 0
        states = self.block[self.used : self.used + count]
        self.used += count
        return states

    def _draw(self, count: int) -> Tensor:
        std = self.std
        states = torch.empty(count, self.shape[1], device=self.device, dtype=self.dtype)
        nn.init.trunc_normal_(states, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=self.generator)
        return states.mul_(self.scale)
