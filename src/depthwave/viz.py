"""Pictures of what the samplers do. Needs matplotlib (`pip install 'depthwave[eval]'`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from depthwave.errors import DepthwaveError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DepthwaveError("plotting needs matplotlib: pip install 'depthwave[eval]'") from None
    return plt


def trace_grid(trace: list[dict[str, Any]], prompt_len: int) -> tuple[list[list[float]], list[list[bool]], int]:
    """(latent change per [step][position] or NaN, frozen flag per [step][position], first position shown)."""
    first = max(prompt_len - 1, 0)
    last = max(max(s["start"] + s["size"] for s in trace), max(s["frozen_after"] for s in trace))
    width = last - first
    changes = [[math.nan] * width for _ in trace]
    frozen = [[False] * width for _ in trace]
    for row, step in enumerate(trace):
        for i, value in enumerate(step["latent_change"]):
            column = step["compared_from"] + i - first
            if 0 <= column < width:
                changes[row][column] = max(float(value), 1e-6)
        for p in range(first, min(step["frozen_after"], last)):
            frozen[row][p - first] = True
    return changes, frozen, first


def plot_trace(trace: list[dict[str, Any]], prompt_len: int, path: str | Path, title: str = "") -> Path:
    """Heat map of a diffusion forcing run: sampler steps down, positions across. Coloured cells are the
    wavefront (colour = normalised latent change, log scale); grey cells are frozen; the wavefront moves
    diagonally as positions converge and freeze."""
    if not trace:
        raise DepthwaveError("the trace is empty: the sampler ran no steps (was the prompt's answer one token?)")
    plt = _pyplot()
    from matplotlib.colors import ListedColormap, LogNorm

    changes, frozen, first = trace_grid(trace, prompt_len)
    width = len(changes[0])
    fig, ax = plt.subplots(figsize=(min(4 + width * 0.12, 18), min(3 + len(trace) * 0.08, 12)))
    extent = (first - 0.5, first + width - 0.5, len(trace) - 0.5, -0.5)
    masked_frozen = [[1.0 if f else math.nan for f in row] for row in frozen]
    ax.imshow(masked_frozen, cmap=ListedColormap(["#b0b0b0"]), aspect="auto", extent=extent, interpolation="nearest")
    finite = [v for row in changes for v in row if not math.isnan(v)]
    if finite:
        image = ax.imshow(
            changes,
            cmap="viridis",
            norm=LogNorm(vmin=max(min(finite), 1e-4), vmax=max(finite)),
            aspect="auto",
            extent=extent,
            interpolation="nearest",
        )
        fig.colorbar(image, ax=ax, label="‖z_t − z_(t−1)‖ / ‖z_t‖ (wavefront)")
    ax.set_xlabel("position (grey: frozen)")
    ax.set_ylabel("sampler step")
    ax.set_title(title or "diffusion forcing: the wavefront moving through positions")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
