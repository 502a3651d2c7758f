"""The CPU attention kernel choice of `depthwave.model.layers`, measured on the shapes the engine runs.

`F.scaled_dot_product_attention` against `layers.matmul_attention` (two matmuls and a softmax) in fp32, for one
sequence decoding (1 query row), a diffusion wavefront (about 5), a prefill (48), and engine passes of 2 to 64
sequences. `layers.attention` takes the matmul path for four or more sequences with 16 query rows in all.

Medians of interleaved repeats, microseconds per call; a table and JSON (`benchmarks/results/bench_kernels.json`).

    python benchmarks/bench_kernels.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from depthwave.model.layers import matmul_attention, prefers_matmul_attention

RESULTS = Path(__file__).resolve().parent / "results"
# (batch rows B, queries per row S, keys T): the engine's attention calls on the built-in model (4 heads of 32).
ATTENTION_SHAPES = [(1, 1, 60), (1, 5, 60), (1, 48, 48), (2, 5, 60), (2, 16, 60), (2, 48, 48), (4, 1, 60)]
ATTENTION_SHAPES += [(4, 5, 60), (4, 48, 48), (8, 5, 100), (16, 1, 100), (16, 48, 48), (64, 1, 100), (64, 5, 100)]
ATTENTION_SHAPES += [(64, 8, 150), (64, 48, 48)]


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def compare(a: Callable[[], object], b: Callable[[], object], repeats: int, calls: int) -> tuple[float, float]:
    """Medians of interleaved repeats, so that the machine's drift hits both alike."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(per_call_us(a, calls))
        times_b.append(per_call_us(b, calls))
    return statistics.median(times_a), statistics.median(times_b)


def attention_rows(repeats: int) -> list[dict[str, object]]:
    rows = []
    for batch, queries, keys in ATTENTION_SHAPES:
        q = torch.randn(batch, 4, queries, 32)
        k, v = torch.randn(batch, 4, keys, 32), torch.randn(batch, 4, keys, 32)
        visible = torch.rand(batch, 1, queries, keys) > 0.2
        bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
        sdpa, matmul = compare(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),  # noqa: B023
            lambda: matmul_attention(q, k, v, bias, False),  # noqa: B023
            repeats,
            calls=max(10, 2000 // (batch * queries)),
        )
        chosen = "matmul" if prefers_matmul_attention(q) else "sdpa"
        rows.append({"shape": [batch, queries, keys], "sdpa_us": sdpa, "matmul_us": matmul, "chosen": chosen})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_kernels.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attention = attention_rows(args.repeats)
    print(f"attention, fp32, 4 heads of 32, {args.threads} threads, µs per call (medians of {args.repeats})")
    print("| B | S | T | SDPA | matmul | SDPA / matmul | chosen |")
    print("|---|---|---|---|---|---|---|")
    for r in attention:
        b, s, t = r["shape"]  # type: ignore[misc]
        ratio = r["sdpa_us"] / r["matmul_us"]  # type: ignore[operator]
        print(f"| {b} | {s} | {t} | {r['sdpa_us']:.0f} | {r['matmul_us']:.0f} | {ratio:.2f} | {r['chosen']} |")
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    settings = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "settings": settings, "attention": attention}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
