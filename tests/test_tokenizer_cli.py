"""Tokenizer folder conventions, the LLM front end, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from depthwave import LLM, SamplingParams, random_model, save_model
from tests.conftest import depthwave_command, fixture_dir, micro_config

SPECIALS = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|begin_header|>"
    "{{ 'Huginn' if m['role'] == 'assistant' else m['role'] }}<|end_header|>\n\n"
    "{{ m['content'] | trim }}<|end_turn|>{% endfor %}"
    "{% if add_generation_prompt %}<|begin_header|>Huginn<|end_header|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("chat-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the answer is 42.", "two plus two is four", "hello world"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_text|> $A <|end_text|>",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("<|begin_text|>", "<|end_text|>")],
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": "<|begin_text|>", "eos_token": {"content": "<|end_text|>"}})
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|end_turn|>")]}))
    save_model(random_model(micro_config(vocab_size=tok.get_vocab_size()), seed=5), folder)
    return folder


def test_stop_ids_chat_template_and_prompt_encoding(model_dir: Path) -> None:
    llm = LLM(model_dir, device="cpu")
    tok = llm.tokenizer
    assert tok is not None
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    assert llm.stop_token_ids == sorted({ids["<|end_turn|>"], ids["<|end_text|>"], ids["<|begin_text|>"]})
    text = tok.apply_chat_template([{"role": "system", "content": " be brief "}, {"role": "user", "content": "hello"}])
    assert text == (
        "<|begin_text|><|begin_header|>system<|end_header|>\n\nbe brief<|end_turn|>"
        "<|begin_header|>user<|end_header|>\n\nhello<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n"
    )
    chat_ids = llm.encode("hello", chat=True, system="be brief")
    assert chat_ids == tok.encode(text) and chat_ids[0] == ids["<|begin_text|>"]
    # Raw text: BOS kept, the post-processor's trailing end-of-text dropped.
    raw = llm.encode("hello world")
    assert raw[0] == ids["<|begin_text|>"] and raw[-1] != ids["<|end_text|>"]
    assert tok.decode(raw) == "hello world"
    result = llm.generate("the answer", SamplingParams(temperature=0, max_new_tokens=5), num_steps=2, init_scale=0.0)[0]
    assert result.text == tok.decode(result.token_ids)


def test_cli_json_output(tmp_path: Path) -> None:
    folder = fixture_dir("reference-huginn-layout-a")
    result = depthwave_command(
        [
            "generate",
            "--model",
            str(folder),
            "--prompt-ids",
            "496, 487,219,228,408",
            "--sampler",
            "static",
            "--num-steps",
            "8",
            "--init-scale",
            "0",
            "--max-new-tokens",
            "6",
            "--json",
            "--dtype",
            "float32",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["token_ids"] == [279, 357, 454, 140, 200, 421]  # generate_minimal's first tokens for this prompt
    assert data["stats"]["generated_tokens"] == 6 and data["stats"]["core_steps_per_token"] == 8


def test_cli_streams_text(model_dir: Path) -> None:
    result = depthwave_command(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "hello",
            "--chat",
            "--num-steps",
            "2",
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "recurrences/token" in result.stderr and "tokens/s" in result.stderr


def test_cli_unknown_hub_id_offline_in_a_fresh_process() -> None:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "depthwave.cli", "generate", "--model", "nobody/no-such-model", "--prompt-ids", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("depthwave: error: nobody/no-such-model is not a local folder")
    assert "offline" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_error_contract_internal_errors_and_debug(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """An unexpected exception is one line on stderr naming it, exit status 1; `--debug` shows the traceback; a
    DepthwaveError that escapes a command is a user error, exit status 2; nothing goes to stdout."""
    from depthwave import cli
    from depthwave.errors import CheckpointError

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(LLM, "__init__", broken)
    monkeypatch.setattr(sys, "argv", ["depthwave", "generate", "--prompt", "What is 3 + 4?"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1 and out == ""
    assert err.strip().splitlines() == [
        "depthwave: internal error: RuntimeError: simulated bug (run again with --debug for the traceback)"
    ]
    monkeypatch.setattr(sys, "argv", ["depthwave", "generate", "--debug", "--prompt", "What is 3 + 4?"])
    with pytest.raises(RuntimeError, match="simulated bug"):
        cli.main()
    monkeypatch.setattr(cli, "app", lambda **_: (_ for _ in ()).throw(CheckpointError("no model.safetensors in x")))
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and capsys.readouterr().err == "depthwave: error: no model.safetensors in x\n"


def test_cuda_without_cuda_is_refused() -> None:
    import torch

    from depthwave.errors import InvalidParameterError
    from depthwave.runtime import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidParameterError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
