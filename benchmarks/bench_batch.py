"""Batched throughput of the engine: the built-in model's test problems at batch sizes 1, 4, 16 and 64.

    python benchmarks/bench_batch.py                       # 64 problems, diffusion and static, 1 and 2 threads
    python benchmarks/bench_batch.py --problems 16 --batch-sizes 1,16 --threads 1 --repeats 1

For each sampler and batch size B, all problems go into one engine whose rows hold B requests at once: it runs B at
a time and admits the next problem as soon as one finishes (continuous batching; B = 1 is one problem at a time
through the same engine). Every (threads, sampler, B) configuration runs in every repeat, in an order rotated per
repeat, so machine noise hits all alike; the table shows medians over repeats.

Columns: decode tokens/s = generated tokens after each request's first (which its prefill produces) over the wall
time of the decode passes, summed over the whole run (aggregate, not per request); full-batch tokens/s = the same
over only the decode passes with all B rows busy (the steady state of a loaded server; the rest of a run is the
batch filling and draining), with the share of decode time they took; prefill = the wall time of the
prefill passes and prompt tokens per second of it; end to end = all generated tokens over the run's wall time;
speedup = decode tokens/s over B = 1's at the same thread count; rows/pass = mean requests per decode pass;
ms/pass = mean decode pass time; accuracy = problems answered right (it must not depend on B).

Where the curve flattens: per (threads, sampler), a least-squares line through (rows/pass, ms/pass) splits a
decode pass into a fixed cost (what every pass pays whatever its rows: per-op overhead of the layer calls) and a
cost per row (the row's arithmetic and its attention reads). Throughput is then rows / (fixed + rows · per row),
which flattens towards 1 / per-row as the fixed cost is spread thin; "at full rows" is the speedup the line
predicts with every row busy, against the measured one, which also pays for the batch draining at the end of a
finite run (fewer rows per pass than B).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from depthwave.data.arithmetic import extract_answer
from depthwave.data.tokenizer import question_prompt
from depthwave.engine import Request
from depthwave.llm import LLM
from depthwave.samplers import SamplingParams, registry

RESULTS = Path(__file__).resolve().parent / "results"
TEST_SET = Path(__file__).resolve().parents[1] / "src/depthwave/assets/arithmetic/test.jsonl"
SAMPLERS = {"diffusion": {}, "static": {"cache_mode": "shared"}}


def run(llm: LLM, sampler: str, prompts: list[list[int]], answers: list[int], batch: int, tokens: int) -> dict:
    params = registry.make(sampler, **SAMPLERS[sampler])
    requests = [
        Request(ids, SamplingParams(temperature=0.0, max_new_tokens=tokens, seed=i), params)
        for i, ids in enumerate(prompts)
    ]
    engine = llm.engine(requests, params.cache_mode, max_num_seqs=batch)
    began = time.perf_counter()
    results = engine.run(requests)
    wall = time.perf_counter() - began
    s = engine.stats
    generated = sum(len(r.token_ids) for r in results)
    correct = sum(extract_answer(r.text or "") == a for r, a in zip(results, answers, strict=True))
    return {
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "full_batch_tokens_per_s": s.full_pass_tokens_per_s,
        "full_batch_pass_share": s.full_pass_time_s / s.decode_time_s if s.decode_time_s else 0.0,
        "prefill_s": s.prefill_time_s,
        "prefill_tokens_per_s": s.prompt_tokens / s.prefill_time_s if s.prefill_time_s else 0.0,
        "end_to_end_tokens_per_s": generated / wall,
        "wall_s": wall,
        "decode_s": s.decode_time_s,
        "decode_passes": s.decode_passes,
        "ms_per_decode_pass": 1e3 * s.decode_time_s / max(s.decode_passes, 1),
        "rows_per_decode_pass": s.decode_rows / max(s.decode_passes, 1),
        "generated_tokens": generated,
        "accuracy": correct / len(results),
    }


def summarize(configs: list[tuple], measured: dict[tuple, list[dict]]) -> list[dict[str, Any]]:
    """Medians over repeats per configuration, and speedups against B = 1 (same threads, and the best B = 1)."""
    table = []
    for threads, sampler, batch in configs:
        runs = measured[(threads, sampler, batch)]
        row: dict[str, Any] = {"threads": threads, "sampler": sampler, "batch": batch, "runs": runs}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        table.append(row)
    for row in table:
        base = next(
            r for r in table if r["threads"] == row["threads"] and r["sampler"] == row["sampler"] and r["batch"] == 1
        )
        row["speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["full_batch_speedup"] = row["full_batch_tokens_per_s"] / base["decode_tokens_per_s"]
        best = max(r["decode_tokens_per_s"] for r in table if r["sampler"] == row["sampler"] and r["batch"] == 1)
        row["speedup_vs_best_batch1"] = row["decode_tokens_per_s"] / best
    return table


def print_tables(table: list[dict[str, Any]], fits: list[dict[str, Any]]) -> None:
    print()
    print(
        "| threads | sampler | B | decode tok/s | speedup | vs best B=1 | full-batch tok/s (share of decode) | "
        "full-batch speedup | prefill s | prefill tok/s | end-to-end tok/s | rows/pass | ms/pass | accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['threads']} | {r['sampler']} | {r['batch']} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}× | {r['speedup_vs_best_batch1']:.2f}× | {r['full_batch_tokens_per_s']:.1f} "
            f"({100 * r['full_batch_pass_share']:.0f}%) | {r['full_batch_speedup']:.2f}× | {r['prefill_s']:.2f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['end_to_end_tokens_per_s']:.1f} | {r['rows_per_decode_pass']:.1f} | "
            f"{r['ms_per_decode_pass']:.2f} | {100 * r['accuracy']:.1f}% |"
        )
    print()
    print("| threads | sampler | fixed ms/pass | ms per row | ceiling (B → ∞) | B=16 at full rows | B=16 measured |")
    print("|---|---|---|---|---|---|---|")
    for fit in fits:
        print(
            f"| {fit['threads']} | {fit['sampler']} | {fit['fixed_ms']:.2f} | {fit['ms_per_row']:.3f} | "
            f"{fit['ceiling_speedup']:.1f}× | {fit['full_rows_speedup'].get(16, 0):.2f}× | "
            f"{fit['measured_speedup'].get(16, 0):.2f}× |"
        )


def cost_lines(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (threads, sampler): ms/pass = fixed + per_row · rows/pass, least squares over the batch sizes."""
    fits = []
    for key in sorted({(r["threads"], r["sampler"]) for r in table}):
        rows = [r for r in table if (r["threads"], r["sampler"]) == key]
        if len(rows) < 2:
            continue
        xs, ys = [r["rows_per_decode_pass"] for r in rows], [r["ms_per_decode_pass"] for r in rows]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        fixed = my - slope * mx
        one = fixed + slope  # one row per pass
        fits.append(
            {
                "threads": key[0],
                "sampler": key[1],
                "fixed_ms": fixed,
                "ms_per_row": slope,
                "ceiling_speedup": one / slope,
                "full_rows_speedup": {r["batch"]: r["batch"] * one / (fixed + slope * r["batch"]) for r in rows},
                "measured_speedup": {r["batch"]: r["speedup"] for r in rows},
            }
        )
    return fits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--samplers", default="diffusion,static")
    parser.add_argument("--threads", default="1,2", help="torch CPU thread counts to measure each configuration at")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_batch.json")
    parser.add_argument("--reprint", type=Path, help="print the tables of a saved run's JSON instead of measuring")
    args = parser.parse_args(argv)
    if args.reprint:
        saved = json.loads(args.reprint.read_text())
        configs = [(r["threads"], r["sampler"], r["batch"]) for r in saved["rows"]]
        table = summarize(configs, {c: r["runs"] for c, r in zip(configs, saved["rows"], strict=True)})
        print_tables(table, cost_lines(table))
        return

    llm = LLM(args.model, device="cpu")
    rows = [json.loads(line) for line in TEST_SET.read_text().splitlines()[: args.problems]]
    prompts = [llm.encode(question_prompt(row["question"])) for row in rows]
    answers = [extract_answer(row["answer"]) for row in rows]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    samplers = args.samplers.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    configs = [(t, s, b) for t in threads for s in samplers for b in batches]
    run(llm, samplers[0], prompts[:2], answers[:2], 2, 8)  # warm-up
    measured: dict[tuple, list[dict]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for config in configs[shift:] + configs[:shift]:
            torch.set_num_threads(config[0])
            measured[config].append(run(llm, config[1], prompts, answers, config[2], args.max_new_tokens))
            print(
                f"repeat {repeat} threads {config[0]} {config[1]} B={config[2]}: "
                f"{measured[config][-1]['decode_tokens_per_s']:.0f} tokens/s",
                flush=True,
            )

    table = summarize(configs, measured)
    fits = cost_lines(table)
    print_tables(table, fits)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "torch": torch.__version__,
                },
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "rows": table,
                "cost_lines": fits,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
