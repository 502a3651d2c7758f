from __future__ import annotations

import pytest
import torch

from depthwave import InvalidParameterError, KVPool, random_model
from tests.conftest import micro_config

CFG = micro_config()
IDS = torch.tensor([[3, 141, 59, 26, 5, 358, 97, 93, 238, 46]])


def test_slot_counts_and_bytes_per_position() -> None:
    shared = KVPool(CFG, max_length=16, mode="shared")
    assert shared.num_slots == 2 + 4 + 2
    assert shared.bytes_per_position == 2 * 8 * CFG.n_embd * 4
    per_step = KVPool(CFG, max_length=16, mode="per-step", max_steps=32, dtype=torch.bfloat16)
    assert per_step.num_slots == 2 + 4 * 32 + 2
    assert per_step.bytes_per_position == 2 * 132 * CFG.n_embd * 2
    assert per_step.allocated_bytes == 16 * per_step.bytes_per_position
    assert [per_step.core_slot(1, j) for j in range(4)] == [6, 7, 8, 9]
    assert [shared.core_slot(31, j) for j in range(4)] == [2, 3, 4, 5]
    assert per_step.coda_slot(1) == 131 and shared.coda_slot(0) == 6
    with pytest.raises(InvalidParameterError, match="step 32 is beyond this per-step cache's max_steps=32"):
        per_step.core_slot(32, 0)


def test_invalid_construction() -> None:
    with pytest.raises(InvalidParameterError, match="cache mode must be one of"):
        KVPool(CFG, 8, mode="full")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="needs max_steps >= 1"):
        KVPool(CFG, 8, mode="per-step")
    with pytest.raises(InvalidParameterError, match=r"max_length must be in \[1, block_size=256\]"):
        KVPool(CFG, 300)


def _decode_logits(model, mode: str, num_steps: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Prompt of 4 tokens, then the rest one token at a time through the cache."""
    cache = KVPool(CFG, IDS.shape[1], mode, num_steps)  # type: ignore[arg-type]
    rows = [model(IDS[:, :4], num_steps, 0.0, cache=cache).logits]
    for pos in range(4, IDS.shape[1]):
        rows.append(model(IDS[:, pos : pos + 1], num_steps, 0.0, cache=cache, start=pos).logits)
    assert cache.lengths[0] == IDS.shape[1]
    return torch.cat(rows, dim=1)


def test_per_step_cache_decoding_equals_full_forward() -> None:
    """With one slot per recurrence, a token at step t sees the others' step-t K/V, exactly as a full pass."""
    model = random_model(CFG, seed=1)
    full = model(IDS, num_steps=5, init_scale=0.0).logits
    torch.testing.assert_close(_decode_logits(model, "per-step", 5), full, atol=1e-5, rtol=0)


def test_shared_cache_semantics() -> None:
    model = random_model(CFG, seed=1)
    # One recurrence: nothing to overwrite, so sharing changes nothing.
    torch.testing.assert_close(_decode_logits(model, "shared", 1), model(IDS, 1, 0.0).logits, atol=1e-5, rtol=0)
    # Deeper: decoded tokens see the prompt's LAST recurrence instead of the matching one.
    assert not torch.allclose(_decode_logits(model, "shared", 4), model(IDS, 4, 0.0).logits, atol=1e-3)


def test_truncate_then_recompute_matches_fresh_pass() -> None:
    model = random_model(CFG, seed=2)
    for mode in ("shared", "per-step"):
        cache = KVPool(CFG, 16, mode, 3)  # type: ignore[arg-type]
        model(IDS, 3, 0.0, cache=cache)
        keys_before = cache.keys.data_ptr()
        cache.rollback(0, 6)
        assert cache.lengths[0] == 6
        other = torch.tensor([[11, 12, 13]])
        after = model(other, 3, 0.0, cache=cache, start=6).logits
        fresh_cache = KVPool(CFG, 16, mode, 3)  # type: ignore[arg-type]
        model(IDS[:, :6], 3, 0.0, cache=fresh_cache)
        fresh = model(other, 3, 0.0, cache=fresh_cache, start=6).logits
        torch.testing.assert_close(after, fresh, atol=1e-6, rtol=0)
        assert cache.keys.data_ptr() == keys_before, "the cache must not reallocate"
        with pytest.raises(InvalidParameterError, match="cannot roll back a cache row of length 9 to 10"):
            cache.rollback(0, 10)


def test_write_past_capacity_is_an_error() -> None:
    model = random_model(CFG, seed=2)
    cache = KVPool(CFG, 4, "shared")
    with pytest.raises(InvalidParameterError, match="position 9 is beyond the cache's max_length=4"):
        model(IDS, 1, 0.0, cache=cache)
