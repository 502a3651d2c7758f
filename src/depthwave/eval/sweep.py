"""Speed/accuracy sweeps of the diffusion forcing sampler, as in the paper's ablations: each parameter varied alone
around the paper's defaults (r' = 4, ε = 0.03, β = 0, η = 0.1, wavefront 128), all variants and static AR run
through the evaluation harness (interleaved, resumable), then a Pareto plot of accuracy against tokens/s and one
curve per parameter, saved as PNG."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from depthwave.errors import InvalidParameterError
from depthwave.eval.harness import EvalSettings, run_eval
from depthwave.samplers.diffusion import DiffusionParams
from depthwave.samplers.registry import SamplerSpec, parse_literal

PAPER_DEFAULTS: dict[str, Any] = {
    "inner_recurrence": 4,
    "exit_threshold": 0.03,
    "noise": 0.0,
    "momentum": 0.1,
    "max_wavefront": 128,
}
DEFAULT_GRID: dict[str, list[Any]] = {
    "inner_recurrence": [1, 2, 4, 8],
    "exit_threshold": [0.01, 0.03, 0.1, 0.3],
    "noise": [0.0, 0.1, 0.3],
    "momentum": [0.0, 0.1, 0.3],
    "max_wavefront": [2, 8, 32, 128],
}
STATIC_LABEL = "static"
DEFAULT_LABEL = "diffusion (paper defaults)"


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`name=v1,v2,...` items into a grid; empty = DEFAULT_GRID."""
    if not items:
        return dict(DEFAULT_GRID)
    grid = {}
    for item in items:
        name, eq, values = item.partition("=")
        if not eq or not values:
            raise InvalidParameterError(f"--param expects name=v1,v2,..., got {item!r}")
        grid[name.strip()] = [parse_literal(v.strip()) for v in values.split(",") if v.strip()]
    return grid


def variant_label(name: str, value: Any) -> str:
    return f"diffusion {name}={value}"


def sweep_samplers(grid: dict[str, list[Any]], base: dict[str, Any]) -> list[SamplerSpec]:
    """Static AR, the defaults, and one variant per (parameter, value) that differs from the default."""
    specs = [SamplerSpec("static", {}, STATIC_LABEL), SamplerSpec("diffusion", dict(base), DEFAULT_LABEL)]
    for name, values in grid.items():
        for value in values:
            if base.get(name) != value:
                specs.append(SamplerSpec("diffusion", {**base, name: value}, variant_label(name, value)))
    return specs


def sweep_settings(settings: EvalSettings, grid: dict[str, list[Any]]) -> tuple[EvalSettings, dict[str, Any]]:
    """The run's settings with the sweep's samplers, and the diffusion parameters every variant starts from: the
    paper's defaults, overridden by a `diffusion(...)` sampler given in `settings` (e.g. num_steps)."""
    base = {**PAPER_DEFAULTS, **_diffusion_base(settings)}
    unknown = set(grid) - set(DiffusionParams.__dataclass_fields__)
    if unknown:
        raise InvalidParameterError(f"the diffusion sampler has no parameter(s) {sorted(unknown)}")
    return replace(settings, samplers=tuple(sweep_samplers(grid, base))), base


def run_sweep(
    settings: EvalSettings, grid: dict[str, list[Any]], base: dict[str, Any], folder: Path, workers: int = 1, **run: Any
) -> dict[str, Any]:
    """Evaluate the sweep's samplers (settings from `sweep_settings`) and plot the results into `folder`."""
    summary = run_eval(settings, folder, workers=workers, **run)
    plot_sweep(summary, grid, base, folder)
    return summary


def _diffusion_base(settings: EvalSettings) -> dict[str, Any]:
    """Extra fixed diffusion parameters given as a `diffusion(...)` sampler in the settings (e.g. num_steps)."""
    given = [s for s in settings.samplers if s.kind == "diffusion"]
    return dict(given[0].params) if given else {}


def plot_sweep(summary: dict[str, Any], grid: dict[str, list[Any]], base: dict[str, Any], folder: Path) -> list[Path]:
    """pareto-<task>.png and <task>-<parameter>.png for every task; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for task in summary["settings"]["tasks"]:
        rows = {r["sampler"]: r for r in summary["rows"] if r["task"] == task}
        if DEFAULT_LABEL not in rows:
            continue
        written.append(_plot_pareto(task, rows, grid, folder))
        for name, values in grid.items():
            path = _plot_parameter(task, rows, name, values, base, folder)
            if path is not None:
                written.append(path)
    return written


def _plot_pareto(task: str, rows: dict[str, dict[str, Any]], grid: dict[str, list[Any]], folder: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = [(r["tokens_per_s"], 100 * r["accuracy"], label) for label, r in rows.items()]
    colors = {name: f"C{i + 2}" for i, name in enumerate(grid)}
    span = max(p[0] for p in points) - min(p[0] for p in points) or 1.0
    level, previous = 0, None
    for speed, accuracy, label in sorted(points):
        family = label.removeprefix("diffusion ").split("=")[0]
        if label == STATIC_LABEL:
            ax.scatter(speed, accuracy, s=90, marker="*", color="C0", zorder=3, label="static AR")
        elif label == DEFAULT_LABEL:
            ax.scatter(speed, accuracy, s=90, marker="*", color="C1", zorder=3, label="paper defaults")
        else:
            ax.scatter(speed, accuracy, s=30, color=colors.get(family, "grey"), zorder=3, label=family)
        # Stagger the labels of points that sit close together so that they stay readable.
        level = level + 1 if previous is not None and speed - previous < 0.04 * span else 0
        previous = speed
        text = label.split("=")[-1] if "=" in label else ""
        if text:
            offset = (3, 4 + 9 * (level % 5))
            color = colors.get(family, "grey")
            ax.annotate(text, (speed, accuracy), fontsize=7, xytext=offset, textcoords="offset points", color=color)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))  # one legend entry per parameter
    frontier: list[tuple[float, float]] = []
    for speed, accuracy, _ in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not frontier or accuracy > frontier[-1][1]:
            frontier.append((speed, accuracy))
    (line,) = ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "--", color="grey", lw=1)
    unique["Pareto frontier"] = line
    ax.set_xlabel("generated tokens/s")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{task}: diffusion forcing sampler variants vs static AR")
    ax.grid(alpha=0.3)
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8, title="varied (labels: value)")
    fig.tight_layout()
    path = folder / f"pareto-{task}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _plot_parameter(
    task: str, rows: dict[str, dict[str, Any]], name: str, values: list[Any], base: dict[str, Any], folder: Path
) -> Path | None:
    """Accuracy and tokens/s against one parameter (the others at the paper's defaults), or None with fewer than
    two measured values."""
    import matplotlib.pyplot as plt

    xs, accuracy, speed = [], [], []
    for value in sorted({*values, base.get(name)} - {None}, key=float):
        label = DEFAULT_LABEL if base.get(name) == value else variant_label(name, value)
        if label in rows:
            xs.append(float(value))
            accuracy.append(100 * rows[label]["accuracy"])
            speed.append(rows[label]["tokens_per_s"])
    if len(xs) < 2:
        return None
    fig, left = plt.subplots(figsize=(6.5, 4.5))
    left.plot(xs, accuracy, "o-", color="tab:blue")
    wide = min(xs) > 0 and max(xs) / min(xs) >= 16
    left.set_xlabel(name + (" (log scale)" if wide else ""))
    if wide:
        left.set_xscale("log")
    left.set_ylabel("accuracy (%)", color="tab:blue")
    right = left.twinx()
    right.plot(xs, speed, "s--", color="tab:orange")
    right.set_ylabel("generated tokens/s", color="tab:orange")
    if STATIC_LABEL in rows:
        left.axhline(100 * rows[STATIC_LABEL]["accuracy"], color="tab:blue", lw=0.8, ls=":")
        right.axhline(rows[STATIC_LABEL]["tokens_per_s"], color="tab:orange", lw=0.8, ls=":")
    left.set_title(f"{task}: {name}\n(others at the paper's defaults; dotted lines: static AR)", fontsize=10)
    left.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / f"{task}-{name}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
