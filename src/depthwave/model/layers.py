"""The building blocks of a recurrent-depth model: RMSNorm, RoPE in its two conventions, grouped-query attention
(with Huginn's learned q/k bias or OLMo-2's q/k norms), gated MLP, and the four block types: Huginn's sandwich
block (four norms), the Llama pre-norm block, the OLMo-2 block (norms on the branch outputs) and Ouro's (norms on
both sides of each branch).

Module and parameter names match the official checkpoint keys (`norm_1`, `attn.Wqkv`, `attn.qk_bias`,
`attn.q_norm`, ...), so a state dict loads without renaming (Ouro's keys are mapped at load, see
`depthwave.model.ouro`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depthwave.model.config import rope_scaling_type

if TYPE_CHECKING:
    from depthwave.model.config import HuginnConfig
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


def rope_table(config: HuginnConfig, max_positions: int, device: torch.device | str | None = None) -> Tensor:
    """Unit complex rotations for positions 0..max_positions-1, complex64:

    * "pairs" (Huginn): [P, h/2], e^(i·t·w_k) with w_k = base^(-2k/h), rotating the pair (x_2k, x_2k+1);
    * "half" (Llama / OLMo-2, transformers' layout): [P, h], cos + i·sin of the angles t·w_k with each half
      repeated, rotating the pair (x_k, x_k+h/2); w_k as transformers computes it, with `rope_scaling` applied."""
    head_dim, base = config.head_dim, config.rope_frequency_base
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    if config.rope_style == "pairs":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)[: head_dim // 2] / head_dim
        angles = torch.outer(positions, base ** (-exponents))
        return torch.polar(torch.ones_like(angles), angles)
    angles = torch.outer(positions, scaled_frequencies(head_dim, base, config.rope_scaling, device))
    angles = torch.cat((angles, angles), dim=-1)
    return torch.complex(angles.cos(), angles.sin())


def scaled_frequencies(
    head_dim: int, base: float, scaling: dict[str, Any] | None, device: torch.device | str | None = None
) -> Tensor:
    """transformers' inverse frequencies 1/base^(2k/h), then the checkpoint's rope_scaling: "linear" divides all of
    them by `factor`; "llama3" divides the low frequencies (wavelengths beyond L/low_freq_factor, L the original
    context) by `factor`, keeps the high ones (below L/high_freq_factor) and blends linearly in between."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    kind = rope_scaling_type(scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"]  # type: ignore[index]
    if kind != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]  # type: ignore[index]
    context = scaling["original_max_position_embeddings"]  # type: ignore[index]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, blended, scaled)


def rotate_pairs(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim (GPT-J convention, every dim rotates) in fp32, as
    complex products (a + ib)(cos + i sin). `rotation` must broadcast against x's shape with the last dim halved.
    A real `rotation` (its last dim (cos, sin), `torch.view_as_real` of the complex one) computes the same products
    in real arithmetic: the compiled pass's form, since inductor generates no code for complex tensors (each
    complex op would be a call of its own, outside the fused kernels)."""
    if rotation.is_complex():
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b, cos, sin = pairs[..., 0], pairs[..., 1], rotation[..., 0], rotation[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def rotate_half_split(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate the pairs (x[i], x[i+h/2]) as transformers' Llama does: x·cos + rotate_half(x)·sin, with cos and sin
    rounded to x's dtype and the products taken in it (in bf16 that rounds differently from Huginn's fp32).
    `rotation` complex, or real with a last dim (cos, sin) as in `rotate_pairs`."""
    if rotation.is_complex():
        cos, sin = rotation.real.to(x.dtype), rotation.imag.to(x.dtype)
    else:
        cos, sin = rotation[..., 0].to(x.dtype), rotation[..., 1].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


ROTATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"pairs": rotate_pairs, "half": rotate_half_split}


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, is_causal: bool) -> Tensor:
    """Softmax attention of q [B,H,S,h] over k, v [B,G,T,h] (G divides H: each key/value head serves H/G query
    heads); `bias` is an additive [B or 1,1,S,T] mask (0 = attend, -inf = not)."""
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if q.device.type == "cpu" and prefers_matmul_attention(q):
        return matmul_attention(q, k, v, bias, is_causal)
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal)


def prefix_attention(
    q: Tensor, k_new: Tensor, v_new: Tensor, k_old: Tensor, v_old: Tensor, old_bias: Tensor, new_bias: Tensor
) -> Tensor:
    """Attention of q [B, H, S, h] over two key sets: the cache's keys k_old, v_old [B, G, T, h] (positions before
    each row's chunk, `old_bias` [B, 1, 1 or S, T]) and the chunk's own k_new, v_new [B, G, S, h] (`new_bias`
    [B, 1, S, S]: causal, padding hidden). One fp32 softmax over both, as a single attention over the cache after
    the chunk's write would give, without writing or reading the cache in between (the compiled pass)."""
    groups = q.shape[1] // k_new.shape[1]
    if groups > 1:
        k_new, v_new, k_old, v_old = (t.repeat_interleave(groups, dim=1) for t in (k_new, v_new, k_old, v_old))
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.cat(
        (
            torch.matmul(q, k_old.transpose(-1, -2)) * scale + old_bias,
            torch.matmul(q, k_new.transpose(-1, -2)) * scale + new_bias,
        ),
        dim=-1,
    )
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    split = k_old.shape[2]
    return torch.matmul(weights[..., :split], v_old) + torch.matmul(weights[..., split:], v_new)


def prefers_matmul_attention(q: Tensor) -> bool:
    """On CPU, SDPA in bf16/fp16 is several times slower than two matmuls and a softmax for more than one query.
    In fp32 it is up to 2.7x slower on a batch of four or more sequences with 16 query rows in all (an engine pass
    over diffusion wavefronts, a batched prefill), and the faster one for one or two sequences at any query count
    (`benchmarks/bench_kernels.py`; about even at the edge)."""
    if q.dtype != torch.float32:
        return q.shape[2] > 1
    return q.shape[0] >= 4 and q.shape[0] * q.shape[2] >= 16


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, is_causal: bool) -> Tensor:
    """What SDPA computes, as two matmuls with the scale, mask and bias applied in place and an fp32 softmax."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        # Top-left aligned, as SDPA's is_causal (the model sets it only for an uncached pass, where S = T).
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores.masked_fill_(~mask, float("-inf"))
    if bias is not None:
        scores.add_(bias)
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)


class CausalSelfAttention(nn.Module):
    """`Wqkv` rows are [q: H·h | k: G·h | v: G·h]. Huginn adds a learned bias to q and k; OLMo-2 RMS-normalises
    the whole q and k projections before the head split."""

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        q_width, kv_width = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
        self.Wqkv = nn.Linear(c.n_embd, q_width + 2 * kv_width, bias=False)
        self.proj = nn.Linear(q_width, c.n_embd, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, c.n_heads, c.head_dim)) if c.qk_bias else None
        self.q_norm = RMSNorm(q_width, c.norm_eps) if c.block_type == "olmo2" else None
        self.k_norm = RMSNorm(kv_width, c.norm_eps) if c.block_type == "olmo2" else None
        self.rotate = ROTATIONS[c.rope_style]
        # q and k of equal shape rotate as one tensor: one op fewer per layer in the hot loop.
        self.fused = self.kv_heads == self.n_heads and self.q_norm is None

    def forward(self, x: Tensor, at: Positions, cache: KVPool | None, slot: int) -> Tensor:
        q, k, v = self.project(x, at.rotation)
        if cache is not None and cache.by_loop(slot, at):
            # Queries at different loops read different slots: attend over each loop's slot, keep each query's own.
            out = None
            for k_loop, v_loop, chosen in cache.write_by_loop(slot, at, k, v):
                attended = attention(q, k_loop, v_loop, at.bias, at.is_causal)
                out = attended if out is None else torch.where(chosen, attended, out)
            assert out is not None
            return self.output(out)
        if cache is not None:
            k, v = cache.write(slot, at, k, v)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        return self.output(attention(q, k, v, at.bias, at.is_causal))

    def project(self, x: Tensor, rotation: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, S, h] and k, v [B, S, G, h] of x [B, S, D], with the q/k bias or norms and RoPE applied."""
        batch, seq, _ = x.shape
        qkv = F.linear(x, self.Wqkv.weight)
        if self.fused:
            qkv = qkv.view(batch, seq, 3, self.n_heads, self.head_dim)
            qk = qkv[:, :, :2]
            if self.qk_bias is not None:
                qk = qk + self.qk_bias.view(2, self.n_heads, self.head_dim)
            qk = self.rotate(qk, rotation)
            q, k, v = qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]
        else:
            kv_width = self.kv_heads * self.head_dim
            q, k, v = qkv.split((self.n_heads * self.head_dim, kv_width, kv_width), dim=-1)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.view(batch, seq, self.n_heads, self.head_dim)
            k = k.view(batch, seq, self.kv_heads, self.head_dim)
            if self.qk_bias is not None:  # config validation: only with as many k heads as q heads
                q, k = q + self.qk_bias[0], k + self.qk_bias[1]
            q, k = self.rotate(q, rotation[:, :, 0]), self.rotate(k, rotation[:, :, 0])
            v = v.view(batch, seq, self.kv_heads, self.head_dim)
        return q.transpose(1, 2), k, v

    def output(self, out: Tensor) -> Tensor:
        """The heads' outputs [B, H, S, h] concatenated and projected to [B, S, D]."""
        batch, _, seq, _ = out.shape
        return F.linear(out.transpose(1, 2).reshape(batch, seq, -1), self.proj.weight)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2 * hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.fc.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.proj.weight)


class Block(nn.Module):
    """What every block type has: a norm and attention, a norm and the MLP. Subclasses say where the norms act
    (`mix`), whatever computes the attention branch: the cached call (`forward`) or the compiled pass's."""

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config.n_embd, config.intermediate_size)

    def forward(self, x: Tensor, at: Positions, cache: KVPool | None, slot: int) -> Tensor:
        """`slot`: the cache slot this call of the block writes (a core layer has one per recurrence step)."""
        return self.mix(x, lambda h: self.attn(h, at, cache, slot))

    def mix(self, x: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        raise NotImplementedError


class SandwichBlock(Block):
    """Huginn: pre-norms on the branch inputs and post-norms on the residual stream itself after each branch."""

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__(config)
        self.norm_3 = RMSNorm(config.n_embd, config.norm_eps)
        self.norm_4 = RMSNorm(config.n_embd, config.norm_eps)

    def mix(self, x: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        x = self.norm_2(x + attend(self.norm_1(x)))
        return self.norm_4(x + self.mlp(self.norm_3(x)))


class LlamaBlock(Block):
    """Llama: pre-norms on the branch inputs, the residual stream itself never normalised."""

    def mix(self, x: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        x = x + attend(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class Olmo2Block(Block):
    """OLMo-2: the raw stream enters each branch and the norms act on the branch outputs (the q/k norms live in the
    attention)."""

    def mix(self, x: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        x = x + self.norm_1(attend(x))
        return x + self.norm_2(self.mlp(x))


class OuroBlock(SandwichBlock):
    """Ouro: a norm on each branch's input and on its output; the residual stream itself is never normalised."""

    def mix(self, x: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        x = x + self.norm_2(attend(self.norm_1(x)))
        return x + self.norm_4(self.mlp(self.norm_3(x)))


BLOCKS: dict[str, type[Block]] = {
    "sandwich": SandwichBlock,
    "llama": LlamaBlock,
    "olmo2": Olmo2Block,
    "ouro": OuroBlock,
}
