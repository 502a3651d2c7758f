"""`depthwave generate` on the built-in model, quiet and while another process keeps one core busy.

Two thread settings side by side: depthwave's default (`depthwave.runtime.choose_threads`: one thread for a model
this small) and torch's own default (every core: `--threads` set to the core count), each run quiet and busy, the
four runs interleaved in every repeat so that the machine's drift hits them alike. The busy load is a separate
Python process spinning on one core for the whole run. Reported: medians of the decode tokens/s and the prefill
time that `depthwave generate --json` measures (generated tokens only; prefill apart), and for each setting the
ratio busy / quiet. The target of the default: busy at least half of quiet.

    python benchmarks/bench_contention.py [--repeats 5]

JSON in benchmarks/results/bench_contention.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from depthwave.runtime import available_cores

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = (
    "A shop gets 26 stamps on Wednesday, 68 stamps on Friday and 92 stamps on Tuesday. It sells 168 stamps. "
    "How many stamps are left?"
)


def spin(stop_at: float) -> None:
    """Keep one core busy until `stop_at` (a time.time())."""
    x = 0
    while time.time() < stop_at:
        x = (x * 31 + 7) % 1_000_003


def generate(threads: int | None, sampler: str, env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, "-m", "depthwave.cli", "generate", "--chat", "--prompt", QUESTION, "--json"]
    command += ["--sampler", sampler, "--max-new-tokens", "128"]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    stats = json.loads(done.stdout)["stats"]
    return {"decode_tokens_per_s": stats["tokens_per_s"], "prefill_s": stats["prefill_time_s"]}


def measure(threads: int | None, sampler: str, busy: bool, env: dict[str, str]) -> dict[str, float]:
    if not busy:
        return generate(threads, sampler, env)
    load = multiprocessing.Process(target=spin, args=(time.time() + 600,), daemon=True)
    load.start()
    try:
        time.sleep(0.2)  # the load is running before the command starts
        return generate(threads, sampler, env)
    finally:
        load.terminate()
        load.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampler", default="diffusion")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_contention.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    cores = available_cores()
    # No OMP_NUM_THREADS: each setting is what the command picks by itself.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    settings = {"depthwave default": None, f"torch default ({cores} threads)": cores}
    runs: dict[tuple[str, bool], list[dict[str, float]]] = {(s, b): [] for s in settings for b in (False, True)}
    generate(None, args.sampler, env)  # warm-up: imports and file caches
    for repeat in range(args.repeats):
        order = list(runs)
        order = order[repeat % len(order) :] + order[: repeat % len(order)]
        for setting, busy in order:
            runs[setting, busy].append(measure(settings[setting], args.sampler, busy, env))
            last = runs[setting, busy][-1]
            print(f"repeat {repeat} {setting} {'busy' if busy else 'quiet'}: {last['decode_tokens_per_s']:.1f} tok/s")

    rows = []
    for setting in settings:
        quiet, busy = (
            {k: statistics.median(r[k] for r in runs[setting, b]) for k in ("decode_tokens_per_s", "prefill_s")}
            for b in (False, True)
        )
        rows.append(
            {
                "setting": setting,
                "threads": settings[setting],
                "quiet": quiet,
                "busy": busy,
                "busy_over_quiet": busy["decode_tokens_per_s"] / quiet["decode_tokens_per_s"],
                "runs": {"quiet": runs[setting, False], "busy": runs[setting, True]},
            }
        )
    print(f"\n`depthwave generate` ({args.sampler}, built-in model), {cores} cores, medians of {args.repeats}:\n")
    print("| threads | quiet tok/s | busy tok/s | busy / quiet | quiet prefill ms | busy prefill ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        q, b = row["quiet"], row["busy"]
        print(
            f"| {row['setting']} | {q['decode_tokens_per_s']:.1f} | {b['decode_tokens_per_s']:.1f} | "
            f"{row['busy_over_quiet']:.2f} | {1000 * q['prefill_s']:.0f} | {1000 * b['prefill_s']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cores": cores, "sampler": args.sampler, "repeats": args.repeats, "machine": platform.processor()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
