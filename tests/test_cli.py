"""The `depthwave` command's own surface: help that a 80-column terminal shows whole, --version, the eval progress
bar's tokens/s, and every sampler parameter reachable from every front end through the one registry."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer

from depthwave import cli
from depthwave.cli import eval as cli_eval
from depthwave.samplers import registry

COMMANDS = ["generate", "trace", "eval", "sweep", "serve", "lm-eval-tasks"]


def help_text(command: str, columns: int = 80) -> str:
    env = {"COLUMNS": str(columns), "PATH": "", "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-m", "depthwave.cli", command, "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_shows_every_option_whole(command: str) -> None:
    text = help_text(command)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    click_command = typer.main.get_command(cli.app).commands[command]  # type: ignore[attr-defined]
    for param in click_command.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("--"):
                assert name in text, (command, name)


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "depthwave.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"depthwave {version('depthwave')} (torch ")


def test_lm_eval_tasks_help_names_every_task_it_writes(tmp_path: Path) -> None:
    from depthwave.eval.lm_harness import write_tasks

    written = [p.stem for p in write_tasks(tmp_path)]
    text = " ".join(help_text("lm-eval-tasks", 200).split())
    assert len(written) == 3 and all(name in text for name in written), (written, text)


def test_eval_progress_shows_the_batches_aggregate_tokens_per_s(tmp_path: Path) -> None:
    """Two requests decoding side by side for 2 s make 100 tokens each: 100 tok/s, not the 50 that the sum of
    their own decode times would give."""
    progress: Any = cli_eval._EvalProgress(None, tmp_path)
    record = {"task": "arithmetic", "sampler": "diffusion", "correct": True, "generated_tokens": 101, "decode_s": 2.0}
    progress.records([record, {**record, "correct": False}])
    assert "50%" in progress.progress.tasks[0].description
    assert "tok/s" not in progress.progress.tasks[0].description  # no batch has finished yet
    progress.batches([{"task": "arithmetic", "sampler": "diffusion", "decoded_tokens": 200, "decode_s": 2.0}])
    assert "arithmetic/diffusion 50% 100 tok/s" in progress.progress.tasks[0].description


def _options(command: str) -> set[str]:
    click_command = typer.main.get_command(cli.app).commands[command]  # type: ignore[attr-defined]
    return {name for param in click_command.params for name in [*param.opts, *param.secondary_opts]}


@pytest.mark.parametrize("sampler", list(registry.PARAMS))
def test_every_sampler_parameter_is_reachable_from_every_front_end(sampler: str, builtin_llm: Any) -> None:
    """Each field of each sampler's parameter dataclass: a flag of `generate` and `serve`, a body field of the
    server, a key of an eval spec, of `LLM.generate` and of lm-eval's arguments, all through `registry.make`."""
    from dataclasses import fields

    from depthwave.eval.lm_harness import DepthwaveLM
    from depthwave.serve.protocol import ChatCompletionRequest, CompletionRequest, _sampler_fields

    cls = registry.PARAMS[sampler]
    names = [f.name for f in fields(cls)]
    for command in ("generate", "serve"):
        missing = [n for n in names if "--" + n.replace("_", "-") not in _options(command)]
        assert not missing, (command, missing)
    assert set(names) <= _sampler_fields({"sampler": sampler}, None)
    for body in (CompletionRequest, ChatCompletionRequest):  # typed request fields, documented in /openapi.json
        assert set(names) <= set(body.model_fields), body
    spec = registry.SamplerSpec.parse(f"{sampler}(" + ",".join(f"{n}={_text(cls, n)}" for n in names) + ")")
    assert spec.build() == cls()
    name, params = registry.from_mapping({"sampler": sampler, **{n: _text(cls, n) for n in names}})
    assert registry.make(name, **params) == cls()
    lm = DepthwaveLM.__new__(DepthwaveLM)
    lm.sampler_name, lm.sampler_defaults, lm.max_gen_toks, lm.llm = sampler, {}, 8, builtin_llm
    _, made = lm.parse_gen_kwargs({"sampler": sampler, **{n: getattr(cls(), n) for n in names}}, seed=0)
    assert made == cls()
    for n in names:
        assert registry.describe(n), n  # every field has its help text


def _text(cls: type, name: str) -> str:
    return str(getattr(cls(), name))


def test_sampler_flags_reach_the_sampler_and_wrong_ones_are_refused(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "depthwave.cli", "generate", "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    done = subprocess.run(
        [
            *base,
            "--sampler",
            "diffusion",
            "--inner-recurrence",
            "2",
            "--max-recurrences",
            "4",
            "--no-full-prefill",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    stats = __import__("json").loads(done.stdout)["stats"]
    assert stats["sequential_core_steps"] == 2 * stats["sampler_steps"]  # no prefill, r' = 2 per step
    bad = subprocess.run([*base, "--sampler", "static", "--headway", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "sampler 'static' has no parameter(s) ['headway']" in bad.stderr
