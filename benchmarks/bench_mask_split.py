"""Rows that stop recurring early: split the pass (the rows still recurring go on alone, as the engine does) or mask
them (every row runs the deepest row's recurrences, the extra results thrown away). Measured on the built-in
model, eager and compiled, for the two cases a pass meets:

* mixed depths: one row runs a static token's r = 32 recurrences beside B - 1 diffusion rows' r' = 4 (one call of 4
  on all rows, then 28 on the one row; or 32 on all rows);
* exits: each row exits at its own recurrence, spread evenly over 8..32 (an adaptive sampler's rows, one
  recurrence per call as exit checks need): the live rows shrink as they exit, or all rows run all 32.

The recurrences run on the engine's stages (`EngineConfig(compile=...)`) over its KV pool, 4 queries per row, 64
cached positions; splitting includes its row gathers and scatters. Medians over `--repeats`, interleaved, one thread.
JSON in benchmarks/results/bench_mask_split.json.

    python benchmarks/bench_mask_split.py [--batch-sizes 2,4,8,16] [--repeats 20]
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
from torch import Tensor

from depthwave import LLM, SamplingParams
from depthwave.engine import Request
from depthwave.model.positions import Positions
from depthwave.samplers import StaticParams

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH, CACHED, DEEPEST, SHALLOW = 4, 64, 32, 4


def mixed(stages: Any, pool: Any, state: Tensor, e: Tensor, at: Positions, mask: bool) -> Tensor:
    if mask:
        return stages.recur(state, e, DEEPEST, at, pool)
    state = stages.recur(state, e, SHALLOW, at, pool)
    index = torch.tensor([0])
    deep = stages.recur(state[index], e[index], DEEPEST - SHALLOW, at.subset(index, index), pool, SHALLOW)
    return state.index_copy(0, index, deep)


def exits(stages: Any, pool: Any, state: Tensor, e: Tensor, at: Positions, mask: bool) -> Tensor:
    batch = state.shape[0]
    stops = [8 + (DEEPEST - 8) * (b + 1) // batch for b in range(batch)]
    full, live, current, step_at, index = state, list(range(batch)), state, at, None
    for i in range(DEEPEST):
        if not mask:
            still = [b for b in live if stops[b] > i]
            if still != live:
                if index is not None:
                    full = full.index_copy(0, index, current)
                live, index = still, torch.tensor(still)
                current, step_at = full[index], at.subset(index, index)
        current = stages.recur(current, e if index is None else e[index], 1, step_at, pool, i)
    return current if index is None else full.index_copy(0, index, current)


CASES = {"mixed depths": mixed, "exits": exits}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="2,4,8,16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_mask_split.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    llm = LLM("builtin", device="cpu", dtype="float32", threads=1)
    model = llm.model
    batches = [int(b) for b in args.batch_sizes.split(",")]
    request = Request([1] * CACHED, SamplingParams(max_new_tokens=8), StaticParams(cache_mode="shared"))
    engines = {c: llm.engine([request], "shared", max_num_seqs=max(batches), compile=c) for c in (False, True)}
    print(f"compile warm-up {engines[True].warmup():.1f} s", flush=True)
    rows = []
    for batch in batches:
        at = model.positions([CACHED] * batch, [WIDTH] * batch, slice(0, batch))
        generator = torch.Generator().manual_seed(batch)
        state = torch.randn(batch, WIDTH, model.config.n_embd, generator=generator)
        e = torch.randn(batch, WIDTH, model.config.n_embd, generator=generator)
        times: dict[tuple[str, bool, bool], list[float]] = {}
        keys = [(case, c, m) for case in CASES for c in (False, True) for m in (False, True)]
        with torch.inference_mode():
            for key in keys:  # warm: kernels, and a compiled B = 1 call
                CASES[key[0]](engines[key[1]].stages, engines[key[1]].pool, state, e, at, key[2])
            for _ in range(args.repeats):
                for case, compiled, mask in keys:
                    engine = engines[compiled]
                    began = time.perf_counter()
                    CASES[case](engine.stages, engine.pool, state, e, at, mask)
                    times.setdefault((case, compiled, mask), []).append(time.perf_counter() - began)
        for case in CASES:
            for compiled in (False, True):
                split = 1e3 * statistics.median(times[case, compiled, False])
                masked = 1e3 * statistics.median(times[case, compiled, True])
                rows.append({"case": case, "batch": batch, "compiled": compiled, "split_ms": split, "mask_ms": masked})
                print(
                    f"B={batch} {case}, {'compiled' if compiled else 'eager'}: split {split:.2f} ms, "
                    f"mask {masked:.2f} ms",
                    flush=True,
                )
    print("\n| case | B | pass | split ms | mask ms | mask / split |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['batch']} | {'compiled' if r['compiled'] else 'eager'} | {r['split_ms']:.2f} | "
            f"{r['mask_ms']:.2f} | {r['mask_ms'] / r['split_ms']:.2f} |"
        )
    meta = {"torch": torch.__version__, "machine": platform.processor(), "repeats": args.repeats}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
