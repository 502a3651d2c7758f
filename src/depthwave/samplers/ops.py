"""Small tensor helpers that the policies share."""

from __future__ import annotations

import torch
from torch import Tensor

from depthwave.engine.selection import SamplingParams
from depthwave.model.config import HuginnConfig


def token_budget(prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> int:
    """Tokens to generate at most: max_new_tokens, or fewer where the model's context ends first."""
    return min(sampling.max_new_tokens, config.block_size - prompt_len)


def last_true(mask: Tensor) -> Tensor:
    """Per row of a [B, S] mask: 1 + the largest index where it is true, or 0 where it is nowhere."""
    ranks = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (ranks * mask).amax(dim=-1) if mask.shape[-1] else mask.new_zeros(mask.shape[:-1], dtype=torch.long)


def scatter_rows(buffer: Tensor, rows: list[int], positions: list[int], values: Tensor) -> None:
    """buffer[rows[i], positions[i]] = values[i] in one write (tokens, or states of a [rows, positions, D] buffer)."""
    if rows:
        device = buffer.device
        buffer[torch.tensor(rows, device=device), torch.tensor(positions, device=device)] = values


def cat(tensors: list[Tensor]) -> Tensor:
    """One tensor from several (no copy for one)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
