"""Where a model runs: its device, and how many CPU threads torch gives it."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from depthwave.errors import InvalidParameterError

ONE_THREAD_WIDTH = 512
"""Below this hidden size a CPU pass is a stream of small matrix products, for which one thread is faster than two
(measured on the built-in model, 128 wide), and a second thread only adds a way to collapse: OpenMP threads wait
for each other at every op, so when another process holds one of the cores the run slows by up to 30x
(`benchmarks/bench_contention.py`)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto (None: CUDA when there is one), refused when torch does not know it or this
    machine does not have it."""
    if device is None:
        return torch.device(default_device())
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameterError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidParameterError(f"device {device!r}: this machine (or this torch build) has no CUDA device")
        if resolved.index is not None and resolved.index >= count:
            raise InvalidParameterError(f"device {device!r}: there are only {count} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidParameterError(f"device {device!r}: MPS is not available on this machine")
    return resolved


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or `taskset` narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidParameterError(f"threads must be an integer >= 1, got {threads!r}")


def choose_threads(width: int, threads: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The CPU threads for a model of hidden size `width`: `threads` when given; else OMP_NUM_THREADS when it is
    set (the user chose for this environment); else one thread below ONE_THREAD_WIDTH and every available core
    above it."""
    check_threads(threads)
    if threads is not None:
        return threads
    env = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return 1 if width < ONE_THREAD_WIDTH else available_cores()


def apply_threads(width: int, device: torch.device, threads: int | None = None) -> int:
    """Set torch's CPU threads for a model on `device` (see `choose_threads`) and return them. On a GPU only an
    explicit number is applied: the host threads there do little but launch kernels."""
    check_threads(threads)
    if device.type != "cpu" and threads is None:
        return torch.get_num_threads()
    chosen = choose_threads(width, threads)
    if chosen != torch.get_num_threads():
        torch.set_num_threads(chosen)
    return chosen
