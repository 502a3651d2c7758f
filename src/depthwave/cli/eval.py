"""`depthwave eval` and `depthwave sweep`: the harness with a progress bar and a summary table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from depthwave.cli.common import COMPILE_HELP, THREADS_HELP, app, parse_data

BATCH_SIZE_HELP = "Requests per batch: each sampler runs a chunk of this many samples together (1 = one at a time)."
EVAL_SAMPLERS_HELP = (
    "Comma-separated samplers, each NAME or NAME(key=value,...), optionally LABEL=NAME(...): "
    "e.g. 'static,adaptive,speculative(draft_steps=2,lookahead=8),diffusion'."
)


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


class _EvalProgress:
    """A progress bar over (sample, sampler) records with running accuracy per sampler, and its tokens/s as the
    summary computes them: the finished batches' decoded tokens over their decode-pass time (requests of a batch
    decode at the same time, so the sum of their own decode times would count that time many times over)."""

    def __init__(self, settings: Any, folder: Path) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from depthwave.eval.harness import BATCHES_FILE, read_records

        self.accuracy: dict[str, list[int]] = {}
        self.speed: dict[str, list[float]] = {}
        self.records(read_records(folder))
        self.batches(read_records(folder, BATCHES_FILE))
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.bar = self.progress.add_task("eval", total=None)

    def records(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            total = self.accuracy.setdefault(f"{record['task']}/{record['sampler']}", [0, 0])
            total[0] += 1
            total[1] += record["correct"]
        self._show(len(records))

    def batches(self, lines: list[dict[str, Any]]) -> None:
        for line in lines:
            total = self.speed.setdefault(f"{line['task']}/{line['sampler']}", [0, 0.0])
            total[0] += line["decoded_tokens"]
            total[1] += line["decode_s"]
        self._show(0)

    def _show(self, advance: int) -> None:
        if not hasattr(self, "progress"):
            return
        shown = "  ".join(
            f"{name} {100 * correct / n:.0f}%" + self._rate(name) for name, (n, correct) in self.accuracy.items()
        )
        self.progress.update(self.bar, advance=advance, description=shown)

    def _rate(self, name: str) -> str:
        tokens, seconds = self.speed.get(name, (0, 0.0))
        return f" {tokens / seconds:.0f} tok/s" if seconds > 0 else ""


def _run_with_progress(settings: Any, folder: Path, run: Any) -> Any:
    from depthwave.eval.harness import load_samples, pending_work, prepare_folder
    from depthwave.eval.tasks import get_task

    # The data before the folder: a bad data path must not leave a settings.json that refuses the corrected rerun.
    samples = load_samples(settings, {name: get_task(name) for name in settings.tasks})
    done = prepare_folder(folder, settings)
    labels = [s.label for s in settings.samplers]
    pending = sum(len(labels) - len(skip) for *_, skip in pending_work(samples, labels, done))
    progress = _EvalProgress(settings, folder)
    progress.progress.update(progress.bar, total=pending)
    with progress.progress:
        return run(progress)


def _print_summary(summary: dict[str, Any], folder: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['settings']['model']} (baseline {summary['baseline']})")
    columns = ("task", "sampler", "n", "errors", "accuracy", "Δ acc", "tokens/s", "speedup", "prefill ms", "recur/tok")
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "sampler") else "right")
    for row in summary["rows"]:
        table.add_row(
            row["task"],
            row["sampler"],
            str(row["samples"]),
            str(row["errors"]),
            f"{100 * row['accuracy']:.1f}%",
            f"{100 * row['accuracy_delta']:+.1f}" if "accuracy_delta" in row else "-",
            f"{row['tokens_per_s']:.1f}",
            f"{row['speedup']:.2f}x" if row.get("speedup") else "-",
            f"{row['median_prefill_ms']:.1f}",
            f"{row['recurrences_per_token']:.1f}",
        )
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(table)
    typer.echo(f"wrote {folder / 'samples.jsonl'}, summary.json, table.md", err=True)


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a hub id.")] = "builtin",
    tasks: Annotated[str, typer.Option(help="Comma-separated: arithmetic, gsm8k, math500, humaneval, mbpp.")] = (
        "arithmetic"
    ),
    samplers: Annotated[str, typer.Option(help=EVAL_SAMPLERS_HELP)] = "diffusion",
    limit: Annotated[int | None, typer.Option(help="First N samples of each task.")] = None,
    seed: Annotated[int, typer.Option(help="Sample i uses seed*1000003+i.")] = 0,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: each task's.")] = None,
    chat: Annotated[bool | None, typer.Option(help="Force chat/plain prompts (default: each task's choice).")] = None,
    system: Annotated[str | None, typer.Option(help="Replace the tasks' system prompt.")] = None,
    data: Annotated[list[str] | None, typer.Option(help="TASK=PATH: a local data file or folder.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (resumes if it holds the same run).")] = Path("runs/eval"),
    workers: Annotated[int, typer.Option(help="Ray workers, one model replica each (1 = this process).")] = 1,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster instead of a local one.")] = None,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option()] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP + " Per process with --workers.")] = None,
    batch_size: Annotated[int, typer.Option(help=BATCH_SIZE_HELP)] = 64,
    compile: Annotated[bool, typer.Option(help=COMPILE_HELP)] = False,
) -> None:
    """Evaluate samplers on benchmark tasks: the paper's table of accuracy and tokens/s."""
    from depthwave.eval.harness import EvalSettings, run_eval
    from depthwave.samplers.registry import parse_specs

    settings = EvalSettings(
        model=model,
        tasks=_tasks(tasks),
        samplers=tuple(parse_specs(samplers)),
        limit=limit,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        chat=chat,
        system=system,
        data=parse_data(data),
        device=device,
        dtype=dtype,
        threads=threads,
        batch_size=batch_size,
        compile=compile,
    )
    summary = _run_with_progress(
        settings,
        out,
        lambda p: run_eval(settings, out, workers, ray_address, on_records=p.records, on_batches=p.batches),
    )
    _print_summary(summary, out)


@app.command()
def sweep(
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a hub id.")] = "builtin",
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks.")] = "arithmetic",
    param: Annotated[
        list[str] | None,
        typer.Option(help="NAME=v1,v2,... (repeatable); default: r', ε, β, η and wavefront around the paper's."),
    ] = None,
    base: Annotated[
        str, typer.Option(help="Fixed diffusion parameters for every variant, e.g. 'diffusion(num_steps=32)'.")
    ] = "diffusion",
    limit: Annotated[int | None, typer.Option(help="First N samples of each task.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    temperature: Annotated[float, typer.Option()] = 0.0,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
    data: Annotated[list[str] | None, typer.Option(help="TASK=PATH.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (records, table, PNG plots).")] = Path("runs/sweep"),
    workers: Annotated[int, typer.Option(help="Ray workers.")] = 1,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option()] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    batch_size: Annotated[int, typer.Option(help=BATCH_SIZE_HELP)] = 64,
) -> None:
    """Sweep the diffusion sampler's parameters one at a time; Pareto and per-parameter plots."""
    from depthwave.eval.harness import EvalSettings
    from depthwave.eval.sweep import parse_grid, run_sweep, sweep_settings
    from depthwave.samplers.registry import parse_specs

    given = EvalSettings(
        model=model,
        tasks=_tasks(tasks),
        samplers=tuple(parse_specs(base)),
        limit=limit,
        seed=seed,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        data=parse_data(data),
        device=device,
        dtype=dtype,
        threads=threads,
        batch_size=batch_size,
    )
    grid = parse_grid(param or [])
    settings, fixed = sweep_settings(given, grid)
    summary = _run_with_progress(
        settings,
        out,
        lambda p: run_sweep(settings, grid, fixed, out, workers, on_records=p.records, on_batches=p.batches),
    )
    _print_summary(summary, out)
    typer.echo(f"plots in {out}", err=True)
