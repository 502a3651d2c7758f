"""The building blocks of a Huginn recurrent-depth model: RMSNorm, interleaved-pair RoPE, attention with a
learned q/k bias, gated MLP, and the sandwich block with its four norms.

Module and parameter names match the official checkpoint keys (`norm_1`, `attn.Wqkv`, `attn.qk_bias`, ...), so a
state dict loads without renaming.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from depthwave.model.kv_cache import KVPool
    from depthwave.model.positions import Positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The reference normalises in fp32, rounds back to the activation dtype and only then scales. rms_norm
        # without a weight computes in fp32 internally and rounds its output, so it gives the same bits in one op;
        # in fp32 there is no rounding in between, and the scale can go inside (the same bits, one op fewer).
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


def rope_table(head_dim: int, max_positions: int, base: float, device: torch.device | str | None = None) -> Tensor:
    """Unit complex rotations e^(i·t·w_k), [max_positions, head_dim/2] complex64, w_k = base^(-2k/head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)[: head_dim // 2] / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim (GPT-J convention, every dim rotates) in fp32, as
    complex products (a + ib)(cos + i sin). `rotation` must broadcast against x's shape with the last dim halved."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, is_causal: bool) -> Tensor:
    """Softmax attention of q [B,H,S,h] over k, v [B,H,T,h]; `bias` is an additive [B or 1,1,S,T] mask (0 = attend,
    -inf = not)."""
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if q.device.type == "cpu" and q.dtype != torch.float32 and q.shape[2] > 1:
        # On CPU, SDPA in bf16/fp16 is several times slower than a plain matmul + softmax for many queries
        # (for a single query it is the faster of the two).
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        if is_causal:
            s, t = scores.shape[-2:]
            mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
            scores = scores.masked_fill(~mask, float("-inf"))
        if bias is not None:
            scores = scores + bias
        return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qk_bias: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.Wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, n_heads, self.head_dim)) if qk_bias else None

    def forward(self, x: Tensor, at: Positions, cache: KVPool | None, slot: int) -> Tensor:
        batch, seq, dim = x.shape
        qkv = F.linear(x, self.Wqkv.weight).view(batch, seq, 3, self.n_heads, self.head_dim)
        qk = qkv[:, :, :2]
        if self.qk_bias is not None:
            qk = qk + self.qk_bias.view(2, self.n_heads, self.head_dim)
        qk = apply_rope(qk, at.rotation)
        k, v = qk[:, :, 1], qkv[:, :, 2]
        if cache is not None:
            k, v = cache.write(slot, at, k, v)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = attention(qk[:, :, 0].transpose(1, 2), k, v, at.bias, at.is_causal)
        return F.linear(out.transpose(1, 2).reshape(batch, seq, dim), self.proj.weight)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2 * hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.fc.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.proj.weight)


class SandwichBlock(nn.Module):
    """Pre-norms on the branch inputs and post-norms on the residual stream itself after each branch."""

    def __init__(self, dim: int, n_heads: int, hidden: int, eps: float, qk_bias: bool) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(dim, eps)
        self.attn = CausalSelfAttention(dim, n_heads, qk_bias)
        self.norm_2 = RMSNorm(dim, eps)
        self.mlp = GatedMLP(dim, hidden)
        self.norm_3 = RMSNorm(dim, eps)
        self.norm_4 = RMSNorm(dim, eps)

    def forward(self, x: Tensor, at: Positions, cache: KVPool | None, slot: int) -> Tensor:
        """`slot`: the cache slot this call of the block writes (a core layer has one per recurrence step)."""
        x = self.norm_2(x + self.attn(self.norm_1(x), at, cache, slot))
        return self.norm_4(x + self.mlp(self.norm_3(x)))
