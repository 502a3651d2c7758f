"""The engine's batched throughput before and after a change, measured side by side in one run.

    python benchmarks/compare_revisions.py --before 92dd1df [--rounds 3]

Checks out `--before` into a temporary git worktree and runs each revision's own `benchmarks/bench_batch.py`
(the built-in model's first `--problems` test problems, diffusion and static, B = 1 and B = 16, one thread) in
alternating rounds, before then after then before ..., each in a fresh process with that revision's `src` first on
the path, so that the machine's drift hits both alike. Reports the medians of decode tokens/s per (sampler, B)
and the ratio after / before. JSON in benchmarks/results/compare_revisions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_bench(tree: Path, args: argparse.Namespace, out: Path) -> dict[tuple[str, int], float]:
    command = [sys.executable, str(tree / "benchmarks" / "bench_batch.py"), "--problems", str(args.problems)]
    command += ["--batch-sizes", args.batch_sizes, "--samplers", "diffusion,static", "--threads", "1"]
    command += ["--repeats", "1", "--max-new-tokens", str(args.max_new_tokens), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["rows"]
    return {(r["sampler"], r["batch"]): r["decode_tokens_per_s"] for r in rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare against (the working tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "compare_revisions.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], check=True, cwd=ROOT)
        try:
            measured: dict[str, list[dict[tuple[str, int], float]]] = {"before": [], "after": []}
            for round_ in range(args.rounds):
                for name, tree in (("before", before), ("after", ROOT)):
                    measured[name].append(run_bench(tree, args, Path(scratch) / f"{name}-{round_}.json"))
                    print(f"round {round_} {name}: {measured[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], check=False, cwd=ROOT)
    keys = sorted(measured["before"][0])
    rows: list[dict[str, Any]] = []
    for key in keys:
        b = statistics.median(run[key] for run in measured["before"])
        a = statistics.median(run[key] for run in measured["after"])
        rows.append({"sampler": key[0], "batch": key[1], "before": b, "after": a, "ratio": a / b})
    print(f"\ndecode tokens/s, medians of {args.rounds} alternating rounds (before = {args.before}):\n")
    print("| sampler | B | before | after | after / before |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sampler']} | {row['batch']} | {row['before']:.1f} | {row['after']:.1f} | {row['ratio']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = {name: [[[*k, v] for k, v in run.items()] for run in values] for name, values in measured.items()}
    args.out.write_text(json.dumps({"before": args.before, "rows": rows, "runs": runs}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
