"""Static AR decode speed on a random model of the released 2/4/2 layout, scaled down, for both cache modes.

For each (dtype, cache mode) it measures, interleaved over repetitions so that machine noise hits all alike:
  * generated tokens/s of the static sampler (decode only: tokens after the first, which the prefill makes),
  * milliseconds per core step: `recur` over one decode position against a cache filled to the prompt length,
  * the same step's matmuls alone: the linear layers (adapter; per layer Wqkv, attention out, MLP in and out)
    on the same weights and shapes, plus the attention products q·Kᵀ and p·V over the cached positions;
    overhead ratio = step wall time / that matmul time (also given against the linear layers only),
  * KV cache bytes per position and the number of slots (shared mode must use exactly P + R + C).

    python benchmarks/bench_decode.py                      # CPU, fp32 and bf16
    python benchmarks/bench_decode.py --device cuda --dtypes bfloat16

Prints a table and writes JSON to benchmarks/results/bench_decode-<device>.json.
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
import torch.nn.functional as F

from depthwave import HuginnConfig, KVPool, SamplingParams, StaticParams, StaticSampler, random_model
from depthwave.model.loading import DTYPES
from depthwave.model.model import RecurrentDepthModel

RESULTS = Path(__file__).resolve().parent / "results"
MEASURES = ("tokens_per_s", "prefill_ms", "step_ms", "matmul_ms", "linear_ms")


def bench_config(width: int, heads: int, vocab: int, mean_recurrence: int) -> HuginnConfig:
    # Huginn's MLP is 17920/5280 = 3.39 times the width; keep that shape.
    hidden = round(width * 17920 / 5280 / 64) * 64
    return HuginnConfig(
        n_embd=width,
        n_heads=heads,
        intermediate_size=hidden,
        vocab_size=vocab,
        block_size=4096,
        n_layers_in_prelude=2,
        n_layers_in_recurrent_block=4,
        n_layers_in_coda=2,
        mean_recurrence=mean_recurrence,
        torch_dtype="float32",
    )


class Clock:
    """Wall time on CPU; CUDA events on a GPU (device time, no host-side guesswork)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Any, repeats: int) -> float:
        """Median seconds of one call of fn over `repeats` calls."""
        samples = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


def core_step_timers(model: RecurrentDepthModel, mode: str, prompt_len: int, steps: int) -> dict[str, Any]:
    """Callables for one decode position's `steps` core steps: through the model ("step"); the same steps'
    linear layers alone on the same weights and shapes ("linear"); and those plus the attention products
    q·Kᵀ and p·V over the cached positions ("matmul")."""
    cfg = model.config
    device, dtype = model.device, model.dtype
    cache = KVPool(cfg, prompt_len + 1, mode, steps, device=device, dtype=dtype)  # type: ignore[arg-type]
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len + 1), device=device)
    model(ids[:, :prompt_len], steps, 0.0, cache=cache)
    at = model.positions([prompt_len], [1])
    embedded = model.prelude(ids[:, prompt_len:], at, cache)
    state = model.initial_state(embedded, 1.0)

    def step() -> None:
        model.recur(state, embedded, steps, at, cache)

    x = torch.randn(1, 1, cfg.n_embd, device=device, dtype=dtype)
    x2 = torch.randn(1, 1, 2 * cfg.n_embd, device=device, dtype=dtype)
    h = torch.randn(1, 1, cfg.intermediate_size, device=device, dtype=dtype)
    q = torch.randn(1, cfg.n_heads, 1, cfg.head_dim, device=device, dtype=dtype)
    keys = torch.randn(1, cfg.n_heads, prompt_len + 1, cfg.head_dim, device=device, dtype=dtype)
    probs = torch.randn(1, cfg.n_heads, 1, prompt_len + 1, device=device, dtype=dtype)
    adapter = model.transformer.adapter.weight
    layers = [
        (b.attn.Wqkv.weight, b.attn.proj.weight, b.mlp.fc.weight, b.mlp.proj.weight)
        for b in model.transformer.core_block
    ]

    def linear() -> None:
        for _ in range(steps):
            F.linear(x2, adapter)
            for wqkv, wo, fc, proj in layers:
                F.linear(x, wqkv)
                F.linear(x, wo)
                F.linear(x, fc)
                F.linear(h, proj)

    def matmul() -> None:
        for _ in range(steps):
            F.linear(x2, adapter)
            for wqkv, wo, fc, proj in layers:
                F.linear(x, wqkv)
                torch.matmul(q, keys.transpose(-1, -2))
                torch.matmul(probs, keys)
                F.linear(x, wo)
                F.linear(x, fc)
                F.linear(h, proj)

    return {"step": step, "linear": linear, "matmul": matmul}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--num-steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (medians are reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = bench_config(args.width, args.heads, args.vocab, args.num_steps)
    clock = Clock(device)
    modes = ("per-step", "shared")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    setups: dict[tuple[str, str], tuple[Any, ...]] = {}
    for dtype_name in args.dtypes.split(","):
        model = random_model(cfg, seed=0, device=device, dtype=DTYPES[dtype_name])
        for mode in modes:
            sampler = StaticSampler(
                model, params=StaticParams(num_steps=args.num_steps, init_scale=1.0, cache_mode=mode)
            )  # type: ignore[arg-type]
            timers = core_step_timers(model, mode, args.prompt_len, args.num_steps)
            setups[(dtype_name, mode)] = (sampler, timers)
            rows[(dtype_name, mode)] = {k: [] for k in MEASURES}

    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    for sampler, timers in setups.values():  # warm-up
        sampler.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))
        for fn in timers.values():
            fn()
    for rep in range(args.repeats):
        for key, (sampler, timers) in setups.items():
            result = sampler.generate(prompt, params)
            row = rows[key]
            row["tokens_per_s"].append(result.stats.tokens_per_s)
            row["prefill_ms"].append(result.stats.prefill_time_s * 1e3)
            for name, fn in timers.items():
                row[f"{name}_ms"].append(clock.time(fn, 3) / args.num_steps * 1e3)
            row.update(
                cache_bytes_per_position=result.stats.cache_bytes_per_position,
                cache_slots=result.stats.cache_bytes_per_position
                // (2 * cfg.n_embd * torch.empty(0, dtype=DTYPES[key[0]]).element_size()),
                generated_tokens=result.stats.generated_tokens,
            )
        print(f"repetition {rep + 1}/{args.repeats} done", flush=True)

    summary = []
    for (dtype_name, mode), row in rows.items():
        med = {k: statistics.median(row[k]) for k in MEASURES}
        summary.append(
            {
                "dtype": dtype_name,
                "cache_mode": mode,
                **med,
                "overhead_ratio": med["step_ms"] / med["matmul_ms"],
                "overhead_ratio_vs_linear_only": med["step_ms"] / med["linear_ms"],
                "cache_bytes_per_position": row["cache_bytes_per_position"],
                "cache_slots": row["cache_slots"],
                "generated_tokens": row["generated_tokens"],
                "samples": {k: row[k] for k in med},
            }
        )
    header = (
        f"{'dtype':9} {'cache':9} {'tok/s':>8} {'prefill ms':>10} {'ms/step':>8} {'matmul ms':>9} "
        f"{'linear ms':>9} {'overhead':>8} {'vs linear':>9} {'B/pos':>8} {'slots':>5}"
    )
    print(
        f"\nstatic AR decode, {device}, {cfg.n_embd} wide, {cfg.n_heads} heads, I={cfg.intermediate_size}, "
        f"2/4/2, vocab {cfg.vocab_size}, r={args.num_steps}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, medians of {args.repeats}, threads {torch.get_num_threads()}"
    )
    print(header)
    for s in summary:
        print(
            f"{s['dtype']:9} {s['cache_mode']:9} {s['tokens_per_s']:8.2f} {s['prefill_ms']:10.1f} "
            f"{s['step_ms']:8.3f} {s['matmul_ms']:9.3f} {s['linear_ms']:9.3f} {s['overhead_ratio']:8.2f} "
            f"{s['overhead_ratio_vs_linear_only']:9.2f} "
            f"{s['cache_bytes_per_position']:8d} {s['cache_slots']:5d}"
        )
    out = args.out or RESULTS / f"bench_decode-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": cfg.to_dict(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    out.write_text(json.dumps({"meta": meta, "results": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
