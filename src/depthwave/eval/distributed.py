"""Scale-out: the same evaluation spread over Ray workers, one model replica per worker (one GPU each on a GPU
cluster), samples handed out as workers free up, records streamed back to the driver, which alone writes the
output files, so a sharded run produces the same files as a single-process one and resumes the same way.

Locally, `ray.init` starts a private cluster bound to 127.0.0.1 with `workers` CPUs; given an address (for example
"auto" inside a cluster job, or "ray://head:10001"), it joins that cluster unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from depthwave.eval.harness import EvalSettings, Evaluator
from depthwave.eval.tasks import Sample
from depthwave.eval.tasks.base import require

Work = tuple[str, int, Sample, set[str]]


class _Worker:
    """Holds one Evaluator (model, tokenizer, samplers) for the life of the Ray actor."""

    def __init__(self, settings: EvalSettings) -> None:
        self.evaluator = Evaluator(settings)

    def run(self, item: Work) -> list[dict[str, Any]]:
        task_name, index, sample, skip = item
        return self.evaluator.run_sample(task_name, index, sample, skip)


def run_distributed(
    settings: EvalSettings, work: list[Work], workers: int, address: str | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Yield each sample's records as a worker finishes it (in completion order)."""
    ray = require("ray", "running the evaluation on several workers")
    if not work:
        return
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # Loopback only: by default Ray would advertise the machine's external interface.
            ray.init(
                num_cpus=workers,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
    try:
        gpus = 1 if (settings.device or "").startswith("cuda") else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(_Worker)
        pool = [actor.remote(settings) for _ in range(min(workers, len(work)))]
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
