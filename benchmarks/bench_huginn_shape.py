"""Static AR and the diffusion forcing sampler on a random model of the full Huginn-0125 shape, eager against
compiled, against the memory-bandwidth bound. For a GPU session (`benchmarks/gpu_check.sh` runs it):

    python benchmarks/bench_huginn_shape.py --device cuda --dtype bfloat16 --compile
    python benchmarks/bench_huginn_shape.py --width 256 --heads 4 --vocab 4096 --new-tokens 16   # a CPU smoke run

Shape: 5280 wide, 55 heads, MLP 17920, 2/4/2 layers, vocab 65536, r = 32 (random weights, so the text is
meaningless and the diffusion sampler's freezing reflects a random model's latent dynamics). Runs: static AR at
r = 32 (shared cache) at B = 1, the diffusion sampler at the paper's defaults at each `--batch-sizes`, each eager
and (with `--compile`) compiled (`EngineConfig(compile=True)`: inductor, CUDA graphs on a GPU), through the batched
engine, interleaved over `--repeats`; medians. Tokens/s counts generated tokens after each request's first over
the decode passes' wall time (prefill apart, reported separately). Each configuration first runs a short warm-up
(compiling, for a compiled one: its time is the table's first run).

Bound: a decode pass must read at least the weights it uses once: the prelude and coda once, the adapter and core
block r times (static) or r' times (diffusion; the whole wavefront and every row share one read), the head once.
tokens/s bound = bandwidth x tokens per pass / those bytes. Bandwidth: the measured device-to-device copy rate,
and the datasheet figure for known GPUs.
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
from bench_decode import bench_config  # type: ignore[import-not-found]

from depthwave import LLM, SamplingParams, random_model
from depthwave.engine import Request
from depthwave.model.loading import DTYPES
from depthwave.model.model import RecurrentDepthModel
from depthwave.samplers import DiffusionParams, StaticParams

RESULTS = Path(__file__).resolve().parent / "results"
DATASHEET_GBS = {
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H200": 4800,
    "A100-SXM4-40GB": 1555,
    "A100-SXM4-80GB": 2039,
}


def weight_bytes(model: RecurrentDepthModel) -> dict[str, int]:
    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    t = model.transformer
    return {
        "prelude": size(t.prelude),
        "recurrence": size(t.adapter) + size(t.core_block),
        "coda": size(t.coda) + size(t.ln_f),
        "head": model.lm_head.weight.numel() * model.lm_head.weight.element_size(),
    }


def copy_bandwidth_gbs(device: torch.device, megabytes: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy rate (read + write bytes per second)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            target.copy_(source)
            times.append(time.perf_counter() - began)
    return 2 * source.numel() / statistics.median(times) / 1e9


def run(
    llm: LLM, params: Any, prompts: list[list[int]], batch: int, compile: bool, tokens: int, lazy: bool = False
) -> dict[str, Any]:
    """One engine run of every prompt at `batch` rows: its decode rate, passes and tokens. `lazy`: a compiled engine
    compiles the graphs its passes reach as they reach them instead of warming every bucket up first."""
    sampling = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True, seed=0)
    requests = [Request(p, sampling, params) for p in prompts]
    engine = llm.engine(requests, params.cache_mode, max_num_seqs=batch, compile=compile)
    warmup_s = 0.0 if lazy else engine.warmup()  # 0 once a compiled engine is warm, and for eager ones
    results = engine.run(requests)
    stats = engine.stats
    return {
        "tokens_per_s": stats.decode_tokens_per_s,
        "decoded": stats.decoded_tokens,
        "decode_passes": stats.decode_passes,
        "prefill_s": stats.prefill_time_s,
        "warmup_s": warmup_s,
        "tokens": [r.token_ids for r in results],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--width", type=int, default=5280)
    parser.add_argument("--heads", type=int, default=55)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--num-steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="diffusion's rows (static runs at B = 1)")
    parser.add_argument("--no-static", action="store_true", help="diffusion only (gpu_check.sh splits its runs)")
    parser.add_argument("--no-diffusion", action="store_true", help="static only")
    parser.add_argument(
        "--lazy-compile", action="store_true", help="compile only the graphs the runs reach (no warm-up of all buckets)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also run every configuration compiled")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="datasheet bandwidth if not a known GPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    config = bench_config(args.width, args.heads, args.vocab, args.num_steps)
    llm = LLM(random_model(config, seed=0, device=device, dtype=DTYPES[args.dtype]), threads=None)
    model = llm.model
    generator = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    prompts = [
        torch.randint(0, args.vocab, (args.prompt_len,), generator=generator).tolist() for _ in range(max(batches))
    ]
    static = StaticParams(num_steps=args.num_steps, cache_mode="shared")
    diffusion = DiffusionParams(num_steps=args.num_steps)
    modes = (False, True) if args.compile else (False,)
    configs = [] if args.no_static else [("static", static, 1, c) for c in modes]
    configs += [] if args.no_diffusion else [("diffusion", diffusion, b, c) for b in batches for c in modes]
    warmups: dict[str, float] = {}
    for name, params, batch, compile in configs:  # compiles, kernels, the allocator; short runs
        began = time.perf_counter()
        run(llm, params, prompts[:batch], batch, compile, 4, args.lazy_compile)
        warmups[label(name, batch, compile)] = time.perf_counter() - began
        print(f"warm-up {label(name, batch, compile)}: {warmups[label(name, batch, compile)]:.1f} s", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {label(n, b, c): [] for n, _, b, c in configs}
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for name, params, batch, compile in configs[shift:] + configs[:shift]:
            result = run(llm, params, prompts[:batch], batch, compile, args.new_tokens, args.lazy_compile)
            runs[label(name, batch, compile)].append(result)
            print(f"repeat {repeat} {label(name, batch, compile)}: {result['tokens_per_s']:.1f} tok/s", flush=True)

    weights = weight_bytes(model)
    measured_gbs = copy_bandwidth_gbs(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    datasheet = args.bandwidth_gbs or next((v for k, v in DATASHEET_GBS.items() if k in gpu), None)
    rows = []
    for name, _, batch, compile in configs:
        records = runs[label(name, batch, compile)]
        recurrences = diffusion.inner_recurrence if name == "diffusion" else args.num_steps
        pass_bytes = weights["prelude"] + recurrences * weights["recurrence"] + weights["coda"] + weights["head"]
        per_pass = sum(r["decoded"] for r in records) / max(sum(r["decode_passes"] for r in records), 1)
        bound = (datasheet or measured_gbs) * 1e9 * per_pass / pass_bytes
        rate = statistics.median(r["tokens_per_s"] for r in records)
        reference = runs[label(name, batch, False)][0]["tokens"]
        rows.append(
            {
                "sampler": name,
                "batch": batch,
                "compiled": compile,
                "tokens_per_s": rate,
                "tokens_per_pass": per_pass,
                "median_prefill_ms": 1e3 * statistics.median(r["prefill_s"] for r in records),
                "first_run_s": warmups[label(name, batch, compile)],
                "weight_bytes_per_pass": pass_bytes,
                "bound_tokens_per_s": bound,
                "of_bound": rate / bound,
                "same_tokens_as_eager": agreement(records[0]["tokens"], reference),
            }
        )
    eager = {(r["sampler"], r["batch"]): r["tokens_per_s"] for r in rows if not r["compiled"]}
    print(
        f"\n{gpu}, {args.dtype}, width {args.width}, {args.heads} heads, vocab {args.vocab}, r = {args.num_steps}; "
        f"copy bandwidth {measured_gbs:.0f} GB/s, datasheet {datasheet or '-'} GB/s; weights "
        f"{sum(weights.values()) / 1e9:.2f} GB; medians of {args.repeats}\n"
    )
    print(
        "| sampler | B | pass | tokens/s | vs eager | tokens/pass | bound tok/s | of bound | first run s | "
        "tokens = eager |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['sampler']} | {row['batch']} | {'compiled' if row['compiled'] else 'eager'} | "
            f"{row['tokens_per_s']:.1f} | {row['tokens_per_s'] / eager[row['sampler'], row['batch']]:.2f}x | "
            f"{row['tokens_per_pass']:.2f} | {row['bound_tokens_per_s']:.1f} | {100 * row['of_bound']:.0f}% | "
            f"{row['first_run_s']:.1f} | {100 * row['same_tokens_as_eager']:.0f}% |"
        )
    out = args.out or RESULTS / f"bench_huginn_shape-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": gpu, "dtype": args.dtype, "torch": torch.__version__, "repeats": args.repeats}
    out.write_text(
        json.dumps(
            {
                "meta": meta,
                "config": config.to_dict(),
                "weight_bytes": weights,
                "copy_bandwidth_gbs": measured_gbs,
                "datasheet_bandwidth_gbs": datasheet,
                "results": rows,
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The share of generated tokens equal to the reference's at the same place."""
    same = sum(a == b for row, ref in zip(tokens, reference, strict=True) for a, b in zip(row, ref, strict=False))
    return same / max(1, sum(len(ref) for ref in reference))


def label(sampler: str, batch: int, compile: bool) -> str:
    return f"{sampler} B={batch} {'compiled' if compile else 'eager'}"


if __name__ == "__main__":
    main()
