"""The CPU attention kernel choice: the matmul path computes what SDPA computes, on every shape it is chosen for.
The rotations' real form (the compiled pass's) computes what the complex form computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from depthwave.model.config import HuginnConfig
from depthwave.model.layers import ROTATIONS, attention, matmul_attention, prefers_matmul_attention, rope_table


def _inputs(batch: int, queries: int, keys: int, kv_heads: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(batch * 100 + queries)
    q = torch.randn(batch, 4, queries, 8, generator=gen).to(dtype)
    k, v = (torch.randn(batch, kv_heads, keys, 8, generator=gen).to(dtype) for _ in range(2))
    visible = torch.rand(batch, 1, queries, keys, generator=gen) > 0.3
    visible[..., 0] = True  # every query sees at least one key, as in the engine (its own position)
    bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return q, k, v, bias


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_matmul_attention_equals_sdpa(kv_heads: int, causal: bool) -> None:
    q, k, v, bias = _inputs(8, 5, 12, kv_heads, torch.float32)  # S != T: the causal mask is top-left, as SDPA
    bias = None if causal else bias
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(matmul_attention(q, k, v, bias, causal), expected, atol=1e-6, rtol=1e-5)


def test_matmul_attention_in_bf16_is_close_to_fp32() -> None:
    q, k, v, bias = _inputs(4, 6, 10, 2, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    got = matmul_attention(*(t.bfloat16() for t in (q, k, v, bias)), False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    ("batch", "queries", "dtype", "matmul"),
    [
        (1, 48, torch.float32, False),
        (2, 16, torch.float32, False),
        (4, 1, torch.float32, False),
        (4, 5, torch.float32, True),
        (64, 1, torch.float32, True),
        (1, 1, torch.bfloat16, False),
        (1, 5, torch.bfloat16, True),
    ],
)
def test_kernel_choice(batch: int, queries: int, dtype: torch.dtype, matmul: bool) -> None:
    assert prefers_matmul_attention(torch.empty(batch, 4, queries, 8, dtype=dtype)) is matmul


@pytest.mark.parametrize(("batch", "queries"), [(1, 5), (16, 5)])
def test_attention_gives_the_same_on_either_path(batch: int, queries: int) -> None:
    q, k, v, bias = _inputs(batch, queries, 9, 2, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v, bias, False), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("style", ["pairs", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_real_rotation_is_the_complex_one(style: str, dtype: torch.dtype) -> None:
    """The compiled pass rotates with (cos, sin) pairs, as inductor compiles no complex arithmetic: the same
    rotation as the complex products, to rounding."""
    config = HuginnConfig(n_embd=64, n_heads=2, rope_base=10000.0)
    if style == "half":
        config = HuginnConfig(n_embd=64, n_heads=2, block_type="llama", rope_theta=10000.0)
    assert config.rope_style == style
    table = rope_table(config, 40)
    pos = torch.tensor([[3, 17, 39], [0, 1, 2]])
    x = torch.randn(2, 3, 2, 2, config.head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    rotate = ROTATIONS[style]
    complex_form = rotate(x, table[pos][:, :, None, None])
    real_form = rotate(x, torch.view_as_real(table[pos])[:, :, None, None])
    assert real_form.dtype == complex_form.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(real_form, complex_form, atol=tolerance, rtol=tolerance)
    assert not torch.equal(complex_form, x)  # the positions rotate at all
