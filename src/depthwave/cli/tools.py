"""`depthwave lm-eval-tasks` and `depthwave train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from depthwave.cli.common import app


@app.command("lm-eval-tasks")
def lm_eval_tasks(
    out: Annotated[Path, typer.Argument(help="Folder for the task YAMLs (lm-eval's --include_path).")] = Path(
        "lm_eval_tasks"
    ),
    data: Annotated[
        Path | None, typer.Option(help="JSON-lines file with question and answer (default: the shipped test set).")
    ] = None,
) -> None:
    """Write lm-eval tasks for the built-in model's arithmetic problems, reading local files (offline):
    depthwave_arithmetic (generation), depthwave_arithmetic_chat (the bare question, for --apply_chat_template)
    and depthwave_arithmetic_mc (multiple choice by log-likelihood)."""
    from depthwave.eval.lm_harness import write_tasks

    for path in write_tasks(out, data):
        typer.echo(f"wrote {path}", err=True)
    # The command to run next; lm-eval's own default device (cuda:0) is replaced by this machine's (see lm_harness).
    typer.echo(
        f"lm_eval --model depthwave --model_args pretrained=builtin --include_path {out} "
        "--tasks depthwave_arithmetic,depthwave_arithmetic_mc"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train a recurrent-depth model with the Huginn recipe (see `depthwave train --help`)."""
    from depthwave.train import main as train_main

    raise typer.Exit(train_main(ctx.args, prog="depthwave train"))
