"""The `depthwave` command's own surface: help that a 80-column terminal shows whole, --version, and the eval
progress bar's tokens/s."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer

from depthwave import cli

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
    progress: Any = cli._EvalProgress(None, tmp_path)
    record = {"task": "arithmetic", "sampler": "diffusion", "correct": True, "generated_tokens": 101, "decode_s": 2.0}
    progress.records([record, {**record, "correct": False}])
    assert "50%" in progress.progress.tasks[0].description
    assert "tok/s" not in progress.progress.tasks[0].description  # no batch has finished yet
    progress.batches([{"task": "arithmetic", "sampler": "diffusion", "decoded_tokens": 200, "decode_s": 2.0}])
    assert "arithmetic/diffusion 50% 100 tok/s" in progress.progress.tasks[0].description
