"""The bad-input catalogue: every bad checkpoint, prompt, parameter and command is a clear error that names the
problem, with exit status 2 at the command line, one line on stderr, nothing on stdout and nothing lost.

The commands run in-process through `depthwave.cli.main`, the real entry point and its error contract, on a small
random checkpoint written here (these tests never need ../shared)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from depthwave import LLM, SamplingParams, random_model
from depthwave.errors import CheckpointError, DepthwaveError, InvalidParameterError, PromptError
from depthwave.model.loading import BUILTIN_DIR, load_model, save_model
from depthwave.samplers import registry
from tests.conftest import micro_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2/4/2 model with the built-in tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("bad-inputs-model")
    save_model(random_model(micro_config(vocab_size=592), seed=3), folder)
    for name in TOKENIZER_FILES:
        shutil.copy(BUILTIN_DIR / name, folder / name)
    return folder


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    return folder


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `depthwave ARGS` in-process; returns (exit status, stderr), and checks the error contract: a user error
    is exit status 2 and one line `depthwave: error: ...` on stderr, with nothing on stdout."""
    from depthwave import cli

    monkeypatch.setattr(sys, "argv", ["depthwave", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    if code == 2:
        assert out == "", out
        assert err.startswith("depthwave: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
    return int(code or 0), err


# ---- commands ---------------------------------------------------------------------------------------------------
GENERATE_CASES = [
    (["--prompt-ids", "1,x"], "--prompt-ids must be integers"),
    (["--prompt-ids", "1,2", "--prompt", "x"], "give exactly one of --prompt or --prompt-ids"),
    (["--prompt-ids", "1", "--temperature", "-1"], "temperature must be 0 (greedy) or a finite number >= 1e-06"),
    (
        ["--prompt-ids", "1", "--temperature", "inf"],
        "temperature must be 0 (greedy) or a finite number >= 1e-06, got inf",
    ),
    (["--prompt-ids", "1", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["--prompt-ids", "1", "--num-steps", "0"], "num_steps must be None or an integer >= 1"),
    (["--prompt-ids", ",".join(["1"] * 300)], "the prompt has 300 tokens but the model's context holds 256"),
    (["--prompt-ids", "1,99999"], "prompt token ids [99999] are outside the vocabulary [0, 592)"),
    (["--prompt-ids", "1", "--stop-token-ids", "99999"], "stop_token_ids [99999] are outside"),
    (["--prompt-ids", "1", "--device", "banana"], "unknown device 'banana'"),
    (["--prompt", "caf\udce9"], "the prompt is not valid UTF-8 text: the byte 0xe9 at character 3"),
    (["--prompt-ids", "1", "--exit-threshold", "0"], "exit_threshold must be > 0 with freeze='latent-diff'"),
    (
        ["--prompt-ids", ",".join(["1"] * 250), "--headway", "16", "--mode", "reference"],
        "headway=16 after a 250-token prompt does not fit",
    ),
    (["--prompt-ids", "1", "--sampler", "static", "--trace-out", "t.png"], "--trace-out records the diffusion"),
    (["--prompt", "hi", "--system", "be brief"], "--system is a chat message; add --chat"),
    (["--prompt-ids", "1", "--dtype", "banana"], "unknown dtype 'banana'"),
    (["--prompt-ids", "1", "--top-p", "2"], "top_p must be in [1e-06, 1], got 2.0"),
    (["--prompt-ids", "1", "--seed", "-1"], "seed must be None or an integer >= 0, got -1"),
    (["--prompt-ids", "1", "--threads", "0"], "threads must be an integer >= 1, got 0"),
    # Mistakes the command-line parser catches are one line too.
    (["--prompt-ids", "1", "--temperature", "abc"], "Invalid value for '--temperature'"),
    (["--prompt-ids", "1", "--no-such-flag"], "No such option: --no-such-flag"),
]


@pytest.mark.parametrize(("args", "message"), GENERATE_CASES)
def test_generate_refuses(
    args: list[str], message: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["generate", "--model", str(model_dir), *args], monkeypatch, capsys)
    assert code == 2 and message in err, err


def test_trace_out_under_a_file_is_refused_before_generating(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    args = ["generate", "--model", str(model_dir), "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    code, err = run_cli([*args, "--trace-out", str(taken / "trace.png")], monkeypatch, capsys)
    assert code == 2 and f"{taken} is a file, not a folder" in err
    code, err = run_cli([*args, "--trace-out", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "is a folder; give a file path" in err
    assert taken.read_text() == "mine"


EVAL_CASES = [
    (["--threads", "-1"], "threads must be an integer >= 1, got -1"),
    (["--temperature", "-1"], "temperature must be 0 (greedy) or a finite number >= 1e-06, got -1.0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["--device", "banana"], "unknown device 'banana'"),
    (["--samplers", "adaptive(continuous_compute=no)"], "continuous_compute must be true or false, got 'no'"),
    (["--samplers", "static(num_steps=true)"], "num_steps must be None or an integer >= 1, got True"),
    (["--samplers", "banana"], "unknown sampler 'banana'"),
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--data", "arithmetic=/nonexistent/test.jsonl"], "/nonexistent/test.jsonl does not exist"),
    (["--data", "gsm8k=/tmp/x.jsonl"], "data given for tasks not in the run: ['gsm8k']"),
]


@pytest.mark.parametrize(("args", "message"), EVAL_CASES)
def test_eval_refuses_before_writing_anything(
    args: list[str],
    message: str,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Refused up front: the run folder stays unwritten, so the corrected command is not refused as another run."""
    out = tmp_path / "run"
    base = ["eval", "--model", str(model_dir), "--tasks", "arithmetic", "--limit", "1", "--out", str(out)]
    code, err = run_cli([*base, *args], monkeypatch, capsys)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_eval_out_that_is_a_file_is_refused(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    args = ["eval", "--model", str(model_dir), "--limit", "1", "--out", str(taken)]
    code, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "is a file; give a folder" in err
    assert taken.read_text() == "mine"


def test_serve_and_train_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["serve", "--threads", "0"], monkeypatch, capsys)
    assert code == 2 and "--threads must be >= 1, got 0" in err
    # Refused before the model loads: a port out of range, an address that is not this machine's, a taken port.
    for port in ("-1", "70000"):
        code, err = run_cli(["serve", "--port", port], monkeypatch, capsys)
        assert code == 2 and f"--port must be in 0..65535, got {port}" in err
    code, err = run_cli(["serve", "--host", "192.0.2.1", "--port", "8123"], monkeypatch, capsys)
    assert code == 2 and "cannot listen on 192.0.2.1:8123" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, err = run_cli(["serve", "--port", port], monkeypatch, capsys)
        assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    # train reports its errors the same way: one line on stderr, exit status 2, its parser's mistakes included.
    code, err = run_cli(["train", "--out", str(tmp_path / "t"), "--steps", "many"], monkeypatch, capsys)
    assert code == 2 and "argument --steps: invalid int value: 'many'" in err
    code, err = run_cli(["train", "--preset", "smoke", "--out", str(tmp_path / "t"), "--lr", "-1"], monkeypatch, capsys)
    assert code == 2 and "training setting 'lr' must be a number >= 0, got -1.0" in err
    code, err = run_cli(["train", "--out", str(tmp_path / "t"), "--init-from", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "init_from must be a model folder with a config.json" in err


# ---- checkpoints --------------------------------------------------------------------------------------------------
def _damage_weights(folder: Path, change: Any, dtype: torch.dtype = torch.float32) -> str:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    key = "transformer.core_block.0.mlp.fc.weight"
    change(tensors[key])
    save_file({k: v.to(dtype) for k, v in tensors.items()}, path)
    return key


@pytest.mark.parametrize("cut", ["truncated", "garbage", "header"])
def test_damaged_safetensors_name_the_file(
    cut: str,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = copy_of(model_dir, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"not safetensors", "header": data[:8] + b"\xff" * 16}
    path.write_bytes(damaged[cut] + (data[24:] if cut == "header" else b""))
    with pytest.raises(CheckpointError, match=f"cannot read {path}: the file is truncated, corrupted"):
        load_model(folder)
    code, err = run_cli(["generate", "--model", str(folder), "--prompt-ids", "1"], monkeypatch, capsys)
    assert code == 2 and str(path) in err


def test_nan_and_inf_weights_name_the_tensor(model_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(model_dir, tmp_path)
    for bad in (float("nan"), float("inf")):
        key = _damage_weights(folder, lambda t, bad=bad: t.view(-1).__setitem__(0, bad))
        with pytest.raises(CheckpointError, match=f"tensor {key} in .* holds NaN or inf values"):
            load_model(folder)


def test_float16_overflow_names_the_tensor_and_suggests_bfloat16(model_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(model_dir, tmp_path)
    key = _damage_weights(folder, lambda t: t.view(-1).__setitem__(0, 1e6), dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=f"tensor {key} in .* overflows float16.*load the model as bfloat16"):
        load_model(folder, dtype="float16")
    assert load_model(folder, dtype="bfloat16").transformer.core_block[0].mlp.fc.weight.view(-1)[0] == 999424.0


def test_chat_template_syntax_error_names_tokenizer_config(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_of(model_dir, tmp_path)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"the chat_template in .*tokenizer_config\.json is not valid Jinja"):
        LLM(folder, device="cpu")
    code, err = run_cli(["generate", "--model", str(folder), "--prompt", "hi", "--chat"], monkeypatch, capsys)
    assert code == 2 and "tokenizer_config.json is not valid Jinja" in err


# ---- prompts and parameters through the library ------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    torch.set_num_threads(1)
    return LLM(model_dir, device="cpu")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([1.5, 2.0], r"prompt token ids must be integers, got 1.5 \(float\) at position 0"),
        ([3, True], r"prompt token ids must be integers, got True \(bool\) at position 1"),
        (torch.tensor([1.0, 2.0]), "prompt token ids must be integers, got a torch.float32 tensor"),
        ("caf\udce9", "the prompt is not valid UTF-8 text: the byte 0xe9 at character 3"),
        ([[]], "the prompt is empty"),
    ],
)
def test_bad_prompts_are_refused(llm: LLM, prompt: Any, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        llm.generate(prompt, SamplingParams(max_new_tokens=2), sampler="static")


def test_integer_tensors_and_numpy_ids_are_accepted_exactly(llm: LLM) -> None:
    import numpy as np

    params = SamplingParams(temperature=0.0, max_new_tokens=3, seed=0)
    expected = llm.generate([5, 6, 7], params, sampler="static")[0].token_ids
    assert llm.generate(torch.tensor([5, 6, 7]), params, sampler="static")[0].token_ids == expected
    assert llm.generate(np.array([5, 6, 7]), params, sampler="static")[0].token_ids == expected
    # A 2-D tensor is a batch of prompts, one per row; as a single prompt it is refused.
    rows = llm.generate(torch.tensor([[5, 6, 7], [5, 6, 7]]), params, sampler="static")
    assert [r.token_ids for r in rows] == [expected, expected]
    with pytest.raises(PromptError, match=r"one sequence \(a 1-D tensor\), got shape \[1, 2\]"):
        llm.encode(torch.tensor([[1, 2]]))


@pytest.mark.parametrize(
    ("sampler", "params", "message"),
    [
        ("static", {"num_steps": True}, "num_steps must be None or an integer >= 1, got True"),
        ("adaptive", {"continuous_compute": "no"}, "continuous_compute must be true or false, got 'no'"),
        ("diffusion", {"continuous_compute": "no"}, "continuous_compute must be true or false, got 'no'"),
        ("diffusion", {"headway": True}, "headway must be an integer >= 1, got True"),
        ("diffusion", {"exit_threshold": 0.0}, "exit_threshold must be > 0 with freeze='latent-diff'"),
        ("speculative", {"lookahead": 2.5}, "lookahead must be an integer >= 1, got 2.5"),
    ],
)
def test_bad_sampler_parameters_are_refused(sampler: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        registry.make(sampler, **params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": float("inf")}, r"temperature must be 0 \(greedy\) or a finite number >= 1e-06, got inf"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
        ({"ignore_eos": "no"}, "ignore_eos must be true or false, got 'no'"),
        ({"stop_token_ids": (1.5,)}, r"stop_token_ids must be non-negative integers, got \[1.5\]"),
    ],
)
def test_bad_sampling_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        SamplingParams(**params)


def test_a_single_stop_string_is_one_stop_string() -> None:
    assert SamplingParams(stop="The answer").stop == ("The answer",)


def test_reference_diffusion_settings_that_could_never_progress_are_refused(llm: LLM) -> None:
    long_prompt = [1] * 250
    with pytest.raises(InvalidParameterError, match="headway=16 after a 250-token prompt does not fit"):
        llm.generate(long_prompt, SamplingParams(max_new_tokens=4), sampler="diffusion", headway=16, mode="reference")
    with pytest.raises(InvalidParameterError, match="random token ids below 65510"):
        llm.generate([1, 2], SamplingParams(max_new_tokens=4), sampler="diffusion", headway=2, mode="reference")


def test_a_library_error_is_a_depthwave_error(llm: LLM) -> None:
    """Every refusal above is catchable as one type, and the LLM keeps working after it."""
    with pytest.raises(DepthwaveError):
        llm.generate([1.5], SamplingParams(max_new_tokens=2), sampler="static")
    assert len(llm.generate([1, 2], SamplingParams(max_new_tokens=2), sampler="static")[0].token_ids) == 2


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("config.json", lambda text: "{not json", r"config\.json is not valid JSON"),
        ("config.json", lambda text: text.replace('"n_heads": 4', '"n_heads": "four"'), "'n_heads' must be an integer"),
        ("tokenizer.json", lambda text: "{bad", r"cannot read .*tokenizer\.json"),
        ("generation_config.json", lambda text: '{"eos_token_id": "x"}', "eos_token_id must be a token id or a list"),
    ],
)
def test_damaged_model_files_name_the_file(
    file: str,
    change: Any,
    message: str,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = copy_of(model_dir, tmp_path)
    (folder / file).write_text(change((folder / file).read_text()))
    code, err = run_cli(["generate", "--model", str(folder), "--prompt", "hi"], monkeypatch, capsys)
    assert code == 2 and re.search(message, err), err


@pytest.mark.parametrize(
    ("command", "what"),
    [
        (["lm-eval-tasks"], "the task folder"),
        (["train", "--preset", "smoke", "--out"], "the training folder"),
        (["eval", "--limit", "1", "--out"], "the output folder"),
    ],
)
def test_output_folders_where_a_file_stands_are_refused(
    command: list[str], what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    code, err = run_cli([*command, str(taken)], monkeypatch, capsys)
    assert code == 2 and f"{what} {taken} is a file; give a folder" in err
    code, err = run_cli([*command, str(taken / "sub")], monkeypatch, capsys)
    assert code == 2 and f"{what} {taken / 'sub'}: {taken} is a file, not a folder" in err
    assert taken.read_text() == "mine"


def test_unknown_commands_are_one_line_and_help_and_version_are_not_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["banana"], monkeypatch, capsys)
    assert code == 2 and "No such command 'banana'" in err
    code, _ = run_cli(["--version"], monkeypatch, capsys)
    assert code == 0
    code, _ = run_cli([], monkeypatch, capsys)
    assert code == 0
