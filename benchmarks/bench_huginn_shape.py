"""Static AR against the diffusion forcing sampler on a random model of the full Huginn-0125 shape, against the
memory-bandwidth bound. For a GPU session:

    python benchmarks/bench_huginn_shape.py --device cuda --dtype bfloat16
    python benchmarks/bench_huginn_shape.py --width 256 --heads 4 --vocab 4096 --new-tokens 16   # a CPU smoke run

Shape: 5280 wide, 55 heads, MLP 17920, 2/4/2 layers, vocab 65536, r = 32 (random weights, so the text is
meaningless and the diffusion sampler's freezing reflects a random model's latent dynamics, reported as tokens per
sampler step). Each sampler decodes the same random prompts in turn (interleaved); decode time comes from the
samplers' own timing (CUDA events on a GPU); tokens/s counts generated tokens after the first.

Bound: a decoded token must read at least the weights it uses once: the prelude and coda once, the adapter and
core block r times (static) or r' times per sampler step (diffusion; the whole wavefront shares one read), the
head once. tokens/s bound = bandwidth / those bytes (per token for static, per step × tokens per step for
diffusion). Bandwidth: the measured device-to-device copy rate, and the datasheet figure for known GPUs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
from bench_decode import bench_config  # type: ignore[import-not-found]

from depthwave import SamplingParams, random_model
from depthwave.model.loading import DTYPES
from depthwave.model.model import RecurrentDepthModel
from depthwave.samplers import DiffusionParams, DiffusionSampler, StaticParams, StaticSampler

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
            import time

            began = time.perf_counter()
            target.copy_(source)
            times.append(time.perf_counter() - began)
    return 2 * source.numel() / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--width", type=int, default=5280)
    parser.add_argument("--heads", type=int, default=55)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--num-steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="datasheet bandwidth if not a known GPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    config = bench_config(args.width, args.heads, args.vocab, args.num_steps)
    model = random_model(config, seed=0, device=device, dtype=DTYPES[args.dtype])
    samplers = {
        f"static AR r={args.num_steps}": StaticSampler(model, params=StaticParams(num_steps=args.num_steps)),
        "diffusion (paper defaults)": DiffusionSampler(model, params=DiffusionParams(num_steps=args.num_steps)),
    }
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, args.vocab, (args.prompt_len,), generator=generator).tolist() for _ in range(args.prompts)
    ]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    for sampler in samplers.values():  # warm-up: kernels, allocator
        sampler.generate(prompts[0][:8], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in samplers}
    for prompt in prompts:
        for name, sampler in samplers.items():
            stats = sampler.generate(prompt, params).stats
            runs[name].append(
                {
                    "tokens": stats.generated_tokens,
                    "decode_s": stats.decode_time_s,
                    "prefill_s": stats.prefill_time_s,
                    "sampler_steps": getattr(stats, "sampler_steps", None),
                    "mean_wavefront": getattr(stats, "mean_wavefront", None),
                }
            )

    weights = weight_bytes(model)
    measured_gbs = copy_bandwidth_gbs(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    datasheet = args.bandwidth_gbs or next((v for k, v in DATASHEET_GBS.items() if k in name), None)
    r_inner = DiffusionParams().inner_recurrence
    rows = []
    for label, records in runs.items():
        decoded = sum(r["tokens"] - 1 for r in records)
        rate = decoded / sum(r["decode_s"] for r in records)
        steps = sum(r["sampler_steps"] or 0 for r in records)
        per_step = decoded / steps if steps else 1.0
        recurrences = r_inner if steps else args.num_steps
        step_bytes = weights["prelude"] + recurrences * weights["recurrence"] + weights["coda"] + weights["head"]
        token_bytes = step_bytes / per_step
        row = {
            "sampler": label,
            "tokens_per_s": rate,
            "median_prefill_ms": 1e3 * statistics.median(r["prefill_s"] for r in records),
            "tokens_per_sampler_step": per_step if steps else None,
            "mean_wavefront": statistics.mean(r["mean_wavefront"] for r in records) if steps else None,
            "weight_bytes_per_token": token_bytes,
            "bound_measured_bw": measured_gbs * 1e9 / token_bytes,
            "bound_datasheet_bw": datasheet * 1e9 / token_bytes if datasheet else None,
        }
        rows.append(row)
    baseline = rows[0]["tokens_per_s"]
    print(
        f"\n{name}, {args.dtype}, width {args.width}, {args.heads} heads, vocab {args.vocab}, r = {args.num_steps}; "
        f"copy bandwidth {measured_gbs:.0f} GB/s, datasheet {datasheet or '-'} GB/s; weights "
        f"{sum(weights.values()) / 1e9:.2f} GB"
    )
    print(f"{'sampler':28} {'tokens/s':>9} {'speedup':>8} {'tok/step':>8} {'GB/token':>9} {'bound':>9} {'of bound':>8}")
    for row in rows:
        bound = row["bound_datasheet_bw"] or row["bound_measured_bw"]
        per_step = f"{row['tokens_per_sampler_step']:8.2f}" if row["tokens_per_sampler_step"] else f"{'-':>8}"
        print(
            f"{row['sampler']:28} {row['tokens_per_s']:9.1f} {row['tokens_per_s'] / baseline:7.2f}x {per_step} "
            f"{row['weight_bytes_per_token'] / 1e9:9.3f} {bound:9.1f} {100 * row['tokens_per_s'] / bound:7.0f}%"
        )
    out = args.out or RESULTS / f"bench_huginn_shape-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": name,
                "dtype": args.dtype,
                "config": config.to_dict(),
                "weight_bytes": weights,
                "copy_bandwidth_gbs": measured_gbs,
                "datasheet_bandwidth_gbs": datasheet,
                "torch": torch.__version__,
                "results": rows,
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
