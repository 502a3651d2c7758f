"""The compiled pass against the eager one: decode tokens/s of the engine on the built-in model.

    python benchmarks/bench_compile.py [--problems 16] [--repeats 3] [--batch-sizes 1,16]

For each sampler (diffusion at the paper's defaults, static AR at r = 32 on the shared cache) and batch size B, the
first `--problems` test problems run through one engine of B rows (continuous batching), eager and compiled
(`EngineConfig(compile=True)`), interleaved in every repeat; medians. Generated tokens after each request's first
over the decode passes' wall time (prefill apart). The compiled engines are warmed up first (their compile time is
reported, and a second start's, which inductor's cache makes fast). The fixed cost per pass is fitted as
`bench_batch` does: ms/pass = fixed + rows x per row over the runs' (rows per pass, ms per pass). One thread.
JSON in benchmarks/results/bench_compile.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TEST_SET = Path(__file__).resolve().parents[1] / "src" / "depthwave" / "assets" / "arithmetic" / "test.jsonl"
SAMPLERS = {"diffusion": {}, "static": {"cache_mode": "shared"}}


def run(llm: Any, sampler: str, prompts: list[list[int]], batch: int, compile: bool, tokens: int) -> dict[str, Any]:
    from depthwave.engine import Request
    from depthwave.samplers import SamplingParams, registry

    params = registry.make(sampler, **SAMPLERS[sampler])
    sampling = SamplingParams(temperature=0.0, max_new_tokens=tokens, seed=0)
    requests = [Request(p, sampling, params) for p in prompts]
    engine = llm.engine(requests, params.cache_mode, max_num_seqs=batch, compile=compile)
    results = engine.run(requests)
    stats = engine.stats
    return {
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "ms_per_pass": 1000 * stats.decode_time_s / max(stats.decode_passes, 1),
        "rows_per_pass": stats.decode_rows / max(stats.decode_passes, 1),
        "tokens": [r.token_ids for r in results],
    }


def start_time() -> float:
    """Seconds for a fresh process to load the model and compile (warm up) the graphs of B = 1."""
    code = (
        "import time; t = time.perf_counter(); from depthwave.llm import LLM; from depthwave.engine import Engine, "
        "EngineConfig; llm = LLM('builtin', device='cpu', threads=1); e = Engine(llm.model, None, (), "
        "EngineConfig(max_num_seqs=1, compile=True)); e.stages.warmup(rows=(1,)); print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ms = fixed + rows * per_row."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    return my - slope * mx, slope


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_compile.json")
    args = parser.parse_args(argv)
    from depthwave.data.tokenizer import question_prompt
    from depthwave.llm import LLM

    first_start, second_start = start_time(), start_time()
    llm = LLM("builtin", device="cpu", threads=1)
    rows = [json.loads(line) for line in TEST_SET.read_text().splitlines()[: args.problems]]
    prompts = [llm.encode(question_prompt(r["question"])) for r in rows]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    configs = [(s, b, c) for s in SAMPLERS for b in batches for c in (False, True)]
    # Warm-up: compiles every graph these runs reach, on engines sized as the measured runs (the longest prompts
    # and the full budget), which `LLM` then reuses.
    longest = sorted(prompts, key=len)[-2:]
    for sampler, batch, compile in configs:
        run(llm, sampler, longest, batch, compile, args.max_new_tokens)
    measured: dict[tuple[str, int, bool], list[dict[str, Any]]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for config in configs[shift:] + configs[:shift]:
            measured[config].append(run(llm, config[0], prompts, config[1], config[2], args.max_new_tokens))
            last = measured[config][-1]
            print(f"repeat {repeat} {config}: {last['decode_tokens_per_s']:.1f} tok/s", flush=True)
    from torch._dynamo.utils import counters

    table = []
    for sampler in SAMPLERS:
        for batch in batches:
            eager, compiled = (measured[sampler, batch, c] for c in (False, True))
            same = all(e["tokens"] == c["tokens"] for e, c in zip(eager, compiled, strict=True))
            e_tps = statistics.median(r["decode_tokens_per_s"] for r in eager)
            c_tps = statistics.median(r["decode_tokens_per_s"] for r in compiled)
            table.append(
                {"sampler": sampler, "batch": batch, "eager": e_tps, "compiled": c_tps, "speedup": c_tps / e_tps,
                 "same_tokens": same}
            )  # fmt: skip
    fixed = {}
    for sampler in SAMPLERS:
        for compile in (False, True):
            points = [(r["rows_per_pass"], r["ms_per_pass"]) for b in batches for r in measured[sampler, b, compile]]
            fixed[f"{sampler} {'compiled' if compile else 'eager'}"] = fit(points)
    print(f"\ncompiled vs eager decode tokens/s, built-in model, 1 thread, medians of {args.repeats}:\n")
    print("| sampler | B | eager | compiled | speedup | same tokens |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| {row['sampler']} | {row['batch']} | {row['eager']:.1f} | {row['compiled']:.1f} | "
            f"{row['speedup']:.2f}x | {row['same_tokens']} |"
        )
    print("\nms per decode pass = fixed + rows x per row:")
    for name, (a, b) in fixed.items():
        print(f"  {name}: {a:.2f} + {b:.2f} x rows")
    print(f"\nstart with warm-up of B = 1: first {first_start:.1f} s, second {second_start:.1f} s (inductor's cache)")
    print(f"graphs: {dict(counters['stats'])}, graph breaks: {dict(counters['graph_break'])}")
    from depthwave.model.compiled import WRAPPER

    meta = {"torch": torch.__version__, "machine": platform.processor(), "repeats": args.repeats, "wrapper": WRAPPER}
    out = {"meta": meta, "rows": table, "fixed_ms": fixed, "start_s": [first_start, second_start]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
