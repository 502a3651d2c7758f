"""Where a compiled engine's start-up time goes, and what one compiled call saves, per graph: each (rows, queries)
bucket's first call (compiling) and second call (CUDA graphs record on a later call than the first), then the time
of one recurrence group (`UNROLL` recurrences), eager against compiled, warm. Prints a line as each graph finishes,
so a run cut short by a timeout still says how far it got.

    python benchmarks/compile_probe.py                                   # the built-in model, this machine
    python benchmarks/compile_probe.py --device cuda --shape huginn      # the full Huginn-0125 shape, bf16
    python benchmarks/compile_probe.py --device cuda --mode default      # inductor without CUDA graphs
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_decode import bench_config  # type: ignore[import-not-found]
from torch._dynamo.utils import counters

from depthwave import LLM, SamplingParams, random_model
from depthwave.engine import Request
from depthwave.model.compiled import UNROLL, CompiledModel
from depthwave.model.loading import DTYPES
from depthwave.samplers import StaticParams

MODES = {"reduce-overhead": "reduce-overhead", "default": None}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Any, *args: Any) -> float:
    sync(device)
    began = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=("builtin", "huginn"), default="builtin")
    parser.add_argument("--width", type=int, default=5280, help="of --shape huginn (random weights)")
    parser.add_argument("--heads", type=int, default=55)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--mode", choices=sorted(MODES), default=None, help="default: CUDA graphs on CUDA only")
    parser.add_argument("--rows", default="1,2")
    parser.add_argument("--widths", default="1,2,4,8")
    parser.add_argument("--cached", type=int, default=64, help="cached positions of the timed calls")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.shape == "builtin":
        llm = LLM("builtin", device=device, dtype="float32")
    else:
        config = bench_config(args.width, args.heads, args.vocab, 32)
        model = random_model(config, seed=0, device=device, dtype=DTYPES[args.dtype])
        llm = LLM(model, threads=None)
    model = llm.model
    rows = [int(r) for r in args.rows.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    request = Request([1] * args.cached, SamplingParams(max_new_tokens=64), StaticParams(cache_mode="shared"))
    engine = llm.engine([request], "shared", max_num_seqs=max(rows), compile=False)
    mode_name = args.mode or ("reduce-overhead" if device.type == "cuda" else "default")
    pool, n = engine.pool, args.repeats
    stages = CompiledModel(model, pool, MODES[mode_name])
    print(f"{args.shape} on {device}, mode {mode_name}, torch {torch.__version__}", flush=True)

    records: list[dict[str, Any]] = []
    for batch, width in itertools.product(rows, widths):
        graphs = counters["stats"]["unique_graphs"]
        first = stages.warmup(rows=(batch,), widths=(width,))
        second = stages.warmup(rows=(batch,), widths=(width,))
        at = model.positions([args.cached] * batch, [width] * batch, slice(0, batch))
        with torch.inference_mode():
            state = torch.randn(batch, width, model.config.n_embd, device=device, dtype=model.dtype)
            e = torch.randn_like(state)
            eager = [timed(device, model.recur, state, e, UNROLL, at, pool) for _ in range(n)]
            compiled = [timed(device, stages.recur, state, e, UNROLL, at, pool) for _ in range(n)]
        record = {
            "rows": batch,
            "width": width,
            "first_s": first,
            "second_s": second,
            "new_graphs": counters["stats"]["unique_graphs"] - graphs,
            "eager_ms": 1e3 * statistics.median(eager),
            "compiled_ms": 1e3 * statistics.median(compiled),
        }
        records.append(record)
        print(
            f"B={batch} W={width}: compile {first:.1f} s, second {second:.2f} s, {record['new_graphs']} graphs; "
            f"{UNROLL} recurrences eager {record['eager_ms']:.2f} ms, compiled {record['compiled_ms']:.2f} ms "
            f"({record['eager_ms'] / record['compiled_ms']:.2f}x)",
            flush=True,
        )
    out = args.out or Path(__file__).resolve().parent / "results" / f"compile_probe-{args.shape}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shape": args.shape, "device": str(device), "mode": mode_name, "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
