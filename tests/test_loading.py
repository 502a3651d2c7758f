from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from depthwave import CheckpointError, load_model, random_model, save_model
from depthwave.model import loading
from tests.conftest import fixture_dir, micro_config

IDS = torch.tensor([[5, 17, 3, 99, 250, 7]])


def _copy_fixture(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    src = fixture_dir("reference-huginn-layout-a")
    dst = tmp_path / "model"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst, load_file(src / "model.safetensors")


def _logits(folder: Path) -> torch.Tensor:
    return load_model(folder, dtype=torch.float32)(IDS, num_steps=3, init_scale=0.0).logits


def test_missing_unexpected_and_misshaped_keys_listed_in_one_error(tmp_path: Path) -> None:
    folder, state = _copy_fixture(tmp_path)
    del state["transformer.core_block.2.mlp.fc.weight"]
    state["transformer.prelude.1.norm_3.weight"] = torch.ones(65)
    state["transformer.extra.weight"] = torch.zeros(3, 4)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    message = str(err.value)
    assert "3 problems" in message
    assert "missing: transformer.core_block.2.mlp.fc.weight, expected shape [256, 64]" in message
    assert "wrong shape: transformer.prelude.1.norm_3.weight, expected [64], found [65]" in message
    assert "unexpected: transformer.extra.weight, shape [3, 4]" in message


def test_tied_embedding_under_either_key_and_rope_table_ignored(tmp_path: Path) -> None:
    folder, state = _copy_fixture(tmp_path)
    assert "freqs_cis" in state and "lm_head.weight" in state
    save_file(state, folder / "model.safetensors")
    both = _logits(folder)
    for drop in ("lm_head.weight", "transformer.wte.weight"):
        partial = {k: v for k, v in state.items() if k != drop}
        save_file(partial, folder / "model.safetensors")
        torch.testing.assert_close(_logits(folder), both, atol=0, rtol=0)
    model = load_model(folder)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_no_embedding_at_all_is_reported(tmp_path: Path) -> None:
    folder, state = _copy_fixture(tmp_path)
    save_file({k: v for k, v in state.items() if k not in loading.TIED_KEYS}, folder / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"missing: transformer.wte.weight \(or lm_head.weight\), "
        r"expected shape \[512, 64\]",
    ):
        load_model(folder)


def test_differing_tied_copies_rejected(tmp_path: Path) -> None:
    folder, state = _copy_fixture(tmp_path)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from transformer\.wte\.weight"):
        load_model(folder)


def test_sharded_index(tmp_path: Path) -> None:
    folder, state = _copy_fixture(tmp_path)
    save_file(state, folder / "model.safetensors")
    single = _logits(folder)
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(_logits(folder), single, atol=0, rtol=0)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard model-00002-of-00002\.safetensors, which is not in"):
        load_model(folder)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model folder at"):
        load_model(tmp_path / "absent" / "dir")
    (tmp_path / "config.json").write_text(json.dumps(micro_config().to_dict()))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json in"):
        load_model(tmp_path)


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        CheckpointError,
        match=r"nobody/no-such-model is not a local folder and could not be "
        r"fetched from the Hugging Face hub: the hub is unreachable \(offline\)",
    ):
        load_model("nobody/no-such-model")


def test_hub_id_is_downloaded_with_huggingface_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online path: a hub id goes through snapshot_download (replaced here by a local copy)."""
    import huggingface_hub

    src = fixture_dir("reference-huginn-layout-a")
    calls = []

    def fake_snapshot_download(repo_id: str, revision: str | None = None, allow_patterns=None) -> str:  # type: ignore[no-untyped-def]
        calls.append((repo_id, revision, allow_patterns))
        dst = tmp_path / "hub-cache" / repo_id.replace("/", "--")
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("tomg-group-umd/huginn-0125", dtype="float32", revision="main")
    assert calls == [("tomg-group-umd/huginn-0125", "main", loading._HUB_PATTERNS)]
    assert "*.safetensors" in calls[0][2] and "*.json" in calls[0][2]
    assert model.config.n_layers_in_recurrent_block == 4


def test_save_and_load_round_trip_in_both_dtypes(tmp_path: Path) -> None:
    model = random_model(micro_config(), seed=3)
    save_model(model, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored
    expected = model(IDS, num_steps=2, init_scale=0.0).logits
    torch.testing.assert_close(_logits_at(tmp_path, torch.float32), expected, atol=0, rtol=0)
    bf16 = load_model(tmp_path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.rope.dtype == torch.complex64
    torch.testing.assert_close(bf16(IDS, num_steps=2, init_scale=0.0).logits, expected, atol=0.15, rtol=0.05)
    with pytest.raises(CheckpointError, match="unknown dtype 'int8'"):
        load_model(tmp_path, dtype="int8")


def _logits_at(folder: Path, dtype: torch.dtype) -> torch.Tensor:
    return load_model(folder, dtype=dtype)(IDS, num_steps=2, init_scale=0.0).logits
