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


def test_queries_at_their_own_loops_read_and_write_their_own_slots() -> None:
    """A loop wavefront on the per-step cache: in one call, position 6 runs loop 1 and position 7 loop 0; each
    reads and writes its own loop's slots, as two calls of one position each would."""
    model = random_model(CFG, seed=3)
    caches = [KVPool(CFG, 16, "per-step", 3) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(IDS[:, :6], 3, 0.0, cache=cache)
        at6, at7, both = model.positions([6], [1]), model.positions([7], [1]), model.positions([6], [2])
        e6, e7 = model.prelude(IDS[:, 6:7], at6, caches[0]), model.prelude(IDS[:, 7:8], at7, caches[0])
        model.prelude(IDS[:, 6:8], both, caches[1])
        s6 = model.initial_state(e6, init_scale=0.0)
        for cache in caches:  # position 6 has run loop 0
            s6_loop0 = model.core_step(s6, e6, at6, cache, step=0)
        alone = [model.core_step(s6_loop0, e6, at6, caches[0], step=1), model.core_step(s6, e7, at7, caches[0], step=0)]
        states, embedded = torch.cat((s6_loop0, s6), 1), torch.cat((e6, e7), 1)
        mixed = model.core_step(states, embedded, both.at_loops([[1, 0]]), caches[1])
    torch.testing.assert_close(mixed, torch.cat(alone, 1), atol=1e-5, rtol=0)
    for step, position in ((1, 6), (0, 7)):
        slot = caches[0].core_slot(step, 0)
        torch.testing.assert_close(caches[1].keys[slot, 0, :, position], caches[0].keys[slot, 0, :, position])
    with pytest.raises(InvalidParameterError, match="loop 3 is beyond this per-step cache's max_steps=3"):
        model.core_step(torch.cat((s6, s6), 1), torch.cat((e6, e7), 1), both.at_loops([[2, 0]]), caches[1], step=1)
    # A position that stops early is seen through its last loop's keys at the deeper loops.
    caches[1].repeat_loop(0, 6, 1, 3)
    deeper, last = caches[1].core_slot(2, 3), caches[1].core_slot(1, 3)
    assert torch.equal(caches[1].keys[deeper, 0, :, 6], caches[1].keys[last, 0, :, 6])
    assert torch.equal(caches[1].values[deeper, 0, :, 6], caches[1].values[last, 0, :, 6])


def test_fresh_writes_of_several_layers_land_where_per_layer_writes_do() -> None:
    """The compiled pass writes every layer of a graph in one copy per K and V: the same entries as writing each
    layer's slot on its own, for padded rows too (their padding writes nothing)."""
    model = random_model(micro_config())
    config = model.config
    at = model.positions([3, 5], [2, 1], slice(0, 2))
    layers, real = 3, 3  # rows of 2 and 1 real queries
    key = torch.randn(layers, real, config.kv_heads, config.head_dim)
    value = torch.randn(layers, real, config.kv_heads, config.head_dim)
    together = KVPool(config, 16, rows=2)
    together.write_fresh(1, at, key, value)
    alone = KVPool(config, 16, rows=2)
    for layer in range(layers):
        shape = (2, 2, config.kv_heads, config.head_dim)
        padded = torch.zeros(shape), torch.zeros(shape)
        for t, source in zip(padded, (key, value), strict=True):
            t.flatten(0, 1)[at.write_from] = source[layer]
        alone.write(1 + layer, at, *padded)
    assert torch.equal(together.keys, alone.keys) and torch.equal(together.values, alone.values)
    assert together.keys[0].abs().sum() == 0 and together.keys[4:].abs().sum() == 0  # other slots untouched
    assert together.keys[1, 0, :, 3:5].abs().sum() > 0 and together.keys[1, 1, :, 5].abs().sum() > 0
