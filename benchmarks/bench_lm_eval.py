"""The native lm-eval backend at lm-eval's batch sizes: 64 generation requests of the shipped arithmetic task
(`depthwave_arithmetic`, greedy, diffusion sampler) through lm-eval's own `simple_evaluate`, at `batch_size=16`
and `batch_size=1`, interleaved repeats, medians. Time is the backend's `generate_until` wall time (prefill
included: lm-eval hands over all requests at once); tokens are generated tokens.

    python benchmarks/bench_lm_eval.py [--requests 64] [--repeats 2] [--sampler diffusion]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(lm: Any, tasks: Any, requests: int) -> dict[str, Any]:
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=["depthwave_arithmetic"], task_manager=tasks, limit=requests)
    stats = lm.task_stats["depthwave_arithmetic"]
    return {
        "wall_s": stats.wall_s,
        "generated_tokens": stats.generated_tokens,
        "tokens_per_s": stats.tokens_per_s,
        "recurrences_per_token": stats.recurrences_per_token,
        "exact_match": out["results"]["depthwave_arithmetic"]["exact_match,strict-match"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sampler", default="diffusion")
    parser.add_argument("--batch-sizes", default="16,1")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_lm_eval.json")
    args = parser.parse_args(argv)

    from lm_eval.tasks import TaskManager

    from depthwave.eval.lm_harness import DepthwaveLM, write_tasks

    folder = tempfile.mkdtemp(prefix="depthwave-lm-eval-")
    write_tasks(folder)
    tasks = TaskManager(include_path=folder)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    models = {b: DepthwaveLM(pretrained="builtin", batch_size=b, sampler=args.sampler) for b in sizes}
    one_run(models[sizes[0]], tasks, 2)  # warm-up
    runs: dict[int, list[dict[str, Any]]] = {b: [] for b in sizes}
    for _ in range(args.repeats):
        for b in sizes:
            runs[b].append(one_run(models[b], tasks, args.requests))
    rows = {}
    for b in sizes:
        rows[b] = {
            "wall_s": statistics.median(r["wall_s"] for r in runs[b]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[b]),
            "recurrences_per_token": statistics.median(r["recurrences_per_token"] for r in runs[b]),
            "exact_match": runs[b][0]["exact_match"],
        }
    base = rows[min(sizes)]["tokens_per_s"]
    print(f"{args.requests} requests of depthwave_arithmetic, sampler {args.sampler}, medians of {args.repeats}")
    print("| batch_size | wall s | generated tok/s | speedup | recurrences/token | exact match |")
    print("|---|---|---|---|---|---|")
    for b in sizes:
        r = rows[b]
        print(
            f"| {b} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}× | "
            f"{r['recurrences_per_token']:.2f} | {100 * r['exact_match']:.1f}% |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "rows": rows, "runs": runs}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
