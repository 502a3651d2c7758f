from __future__ import annotations

import json
from typing import Any

import pytest

from depthwave import ConfigError, HuginnConfig
from tests.conftest import REFERENCE_FIXTURES, fixture_dir, micro_config


def test_huginn_defaults_derived_values() -> None:
    cfg = HuginnConfig()
    assert cfg.head_dim == 96
    assert cfg.effective_expected_depth == 132
    assert cfg.init_std == pytest.approx(0.0087039, rel=1e-4)
    assert cfg.out_proj_std == pytest.approx(0.00053569, rel=1e-4)
    assert cfg.embed_scale == pytest.approx(72.6636, rel=1e-5)
    assert cfg.num_parameters() == 3_564_976_800


@pytest.mark.parametrize("name", REFERENCE_FIXTURES)
def test_reads_reference_config_and_round_trips(name: str) -> None:
    raw = json.loads((fixture_dir(name) / "config.json").read_text())
    cfg = HuginnConfig.from_dict(raw)
    assert cfg.n_embd == raw["n_embd"] and cfg.n_layers_in_prelude == raw["n_layers_in_prelude"]
    written = cfg.to_dict()
    for key in ("head_dim", "effective_expected_depth", "n_layers", "tie_word_embeddings"):
        assert written[key] == raw[key], key
    for key, value in raw["init_values"].items():
        assert written["init_values"][key] == pytest.approx(value), key
    assert HuginnConfig.from_dict(written) == cfg


def test_aliases() -> None:
    cfg = HuginnConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "tie_word_embeddings": False})
    assert (cfg.n_embd, cfg.n_heads, cfg.tie_embeddings) == (64, 4, False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_heads", 7, "'n_heads' = 7 does not divide 'n_embd' = 64"),
        ("n_embd", -8, "'n_embd' must be >= 1, got -8"),
        ("n_embd", 64.5, "'n_embd' must be an integer, got 64.5"),
        ("vocab_size", "512", "'vocab_size' must be an integer, got '512'"),
        ("n_layers_in_coda", -1, "'n_layers_in_coda' must be >= 0"),
        ("qk_bias", 1, "'qk_bias' must be true or false"),
        ("norm_eps", 0, "'norm_eps' must be a positive number"),
        ("rope_base", -1.0, "'rope_base' must be a positive number"),
        ("torch_dtype", "float8", "'torch_dtype' must be one of"),
        ("test_time_noise", 0.5, "'test_time_noise' = 0.5"),
        ("eos_token_id", [1, -2], "'eos_token_id' must be >= 0"),
    ],
)
def test_bad_field_is_named(field: str, value: Any, message: str) -> None:
    raw = micro_config().to_dict()
    raw[field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HuginnConfig.from_dict(raw)


def test_odd_head_dim_rejected() -> None:
    with pytest.raises(ConfigError, match="must be even: RoPE rotates pairs"):
        HuginnConfig(n_embd=60, n_heads=4)


def test_conflicting_alias_and_stored_head_dim() -> None:
    with pytest.raises(ConfigError, match="disagree"):
        HuginnConfig.from_dict({"n_embd": 64, "hidden_size": 128, "n_heads": 4})
    with pytest.raises(ConfigError, match="'head_dim' = 32 differs from n_embd/n_heads = 16"):
        HuginnConfig.from_dict({"n_embd": 64, "n_heads": 4, "head_dim": 32})


def test_bad_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        HuginnConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"no config\.json at"):
        HuginnConfig.from_json(tmp_path / "missing.json")
