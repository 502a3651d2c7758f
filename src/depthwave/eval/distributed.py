"""Scale-out: the same evaluation spread over Ray workers, one model replica per worker (one GPU each on a GPU
cluster), samples handed out as workers free up, records streamed back to the driver, which alone writes the
output files, so a sharded run produces the same files as a single-process one and resumes the same way.

Locally, a private cluster listening on 127.0.0.1 only, with `workers` CPUs, is started (`start_local_ray`); given
an address (for example "auto" inside a cluster job, or "ray://head:10001"), it joins that cluster unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from depthwave.eval.tasks.base import require

Result = tuple[list[dict[str, Any]], list[dict[str, Any]]]


class ChunkRunner(Protocol):
    """What a worker holds: the harness's Evaluator (this module does not import the harness, which imports it)."""

    def run_chunk(
        self, chunk: list[Any], turn: int, emit: Callable[[list[dict[str, Any]]], None]
    ) -> list[dict[str, Any]]: ...


class _Worker:
    """Holds one runner (model, tokenizer, samplers) for the life of the Ray actor."""

    def __init__(self, make_runner: Callable[[], ChunkRunner]) -> None:
        self.runner = make_runner()
        self.turn = 0

    def run(self, chunk: list[Any]) -> Result:
        """A chunk's records and batch lines."""
        records: list[dict[str, Any]] = []
        lines = self.runner.run_chunk(chunk, self.turn, records.extend)
        self.turn += 1
        return records, lines


def start_local_ray(cpus: int) -> None:
    """A private single-machine Ray cluster whose processes listen on 127.0.0.1 only.

    Ray turns a loopback `_node_ip_address` into the machine's external address, and its servers then listen on
    every interface. Its "no cluster" switch (named for Windows and macOS, honoured on Linux too) keeps the node on
    the loopback address, and the servers bind to it: set for this process and, through the environment, for the
    processes Ray starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = require("ray", "running the evaluation on several workers")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


def run_distributed(
    make_runner: Callable[[], ChunkRunner],
    work: list[list[Any]],
    workers: int,
    address: str | None = None,
    gpus: int = 0,
) -> Iterator[Result]:
    """Yield each chunk's records and batch lines as a worker finishes it (in completion order). Each worker
    builds its runner with `make_runner` (picklable: it travels to the Ray actor) and gets `gpus` GPUs."""
    if not work:
        return
    ray = require("ray", "running the evaluation on several workers")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            start_local_ray(workers)
    try:
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(_Worker)
        pool = [actor.remote(make_runner) for _ in range(min(workers, len(work)))]
        queue = list(reversed(work))
        running: dict[Any, Any] = {}
        for worker in pool:
            if queue:
                running[worker.run.remote(queue.pop())] = worker
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            worker = running.pop(ready[0])
            if queue:
                running[worker.run.remote(queue.pop())] = worker
            yield ray.get(ready[0])
    finally:
        if started_here:
            ray.shutdown()
