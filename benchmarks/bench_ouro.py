"""The samplers on an Ouro model: decode tokens/s, loops per token and agreement with static decoding.

Runs each sampler configuration over the same prompts, interleaved in every repeat (so that the machine's drift hits
them alike), one thread, greedy. Reported per configuration: the median decode tokens/s (generated tokens only; the
prefill apart), its ratio to static decoding measured in the same repeats, the mean loops per generated token, and
the share of generated tokens equal to static decoding's (per-step cache: the official model's tokens).

The diffusion rows are the wavefront over loops (`depthwave.samplers.diffusion.looped`, shared cache; compare them
with static decoding on the shared cache). The adaptive rows use Ouro's own exit gate (`criterion="gate"`): "skip"
stops a token at its exit loop (real savings; later tokens see it through the cache mode), "all" computes every loop
and reads the exit loop, the official code's behaviour, which saves nothing.

    python benchmarks/bench_ouro.py [--model ../shared/fixtures/ouro-a] [--repeats 5] [--threshold 0.5]

Random weights (the fixture) say nothing about accuracy; they show the cost structure. JSON in
benchmarks/results/bench_ouro.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from depthwave import LLM, SamplingParams
from depthwave.samplers import registry

RESULTS = Path(__file__).resolve().parent / "results"
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ouro-a"


def configurations(threshold: float) -> dict[str, Any]:
    gate = {"criterion": "gate", "exit_threshold": threshold}
    return {
        "static (per-step cache)": registry.make("static"),
        "static (shared cache)": registry.make("static", cache_mode="shared"),
        f"adaptive gate>={threshold} skip, per-step": registry.make("adaptive", **gate, cache_mode="per-step"),
        f"adaptive gate>={threshold} skip, shared": registry.make("adaptive", **gate, cache_mode="shared"),
        f"adaptive gate>={threshold} all (official)": registry.make(
            "adaptive", **gate, gate_compute="all", cache_mode="per-step"
        ),
        "speculative (draft 1 loop)": registry.make("speculative", draft_steps=1),
        "diffusion (loop wavefront, r'=1)": registry.make("diffusion", inner_recurrence=1),
        "diffusion (loop wavefront, r'=2)": registry.make("diffusion", inner_recurrence=2),
    }


def run(llm: LLM, prompts: list[list[int]], sampler: Any, tokens: int) -> dict[str, Any]:
    results = [
        llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=tokens), sampler=sampler)[0] for p in prompts
    ]
    decoded = sum(r.stats.generated_tokens - 1 for r in results)
    seconds = sum(r.stats.decode_time_s for r in results)
    loops = sum(r.stats.core_steps for r in results) / max(1, sum(r.stats.generated_tokens for r in results))
    return {"tokens_per_s": decoded / seconds, "loops_per_token": loops, "tokens": [r.token_ids for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = LLM(args.model, device="cpu", dtype="float32", threads=1)
    vocab = llm.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(1, vocab, (int(n),), generator=generator).tolist()
        for n in torch.randint(4, 24, (args.prompts,), generator=generator)
    ]
    configs = configurations(args.threshold)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, sampler in configs.items():
            samples[name].append(run(llm, prompts, sampler, args.tokens))
    reference = samples["static (per-step cache)"][0]["tokens"]
    base = [s["tokens_per_s"] for s in samples["static (per-step cache)"]]
    rows = []
    for name, runs in samples.items():
        speeds = [r["tokens_per_s"] for r in runs]
        ratios = [a / b for a, b in zip(speeds, base, strict=True)]
        same = sum(
            x == y
            for ours, ref in zip(runs[0]["tokens"], reference, strict=True)
            for x, y in zip(ours, ref, strict=False)
        )
        total = sum(len(ref) for ref in reference)
        rows.append(
            {
                "sampler": name,
                "decode_tokens_per_s": statistics.median(speeds),
                "ratio_to_static": statistics.median(ratios),
                "loops_per_token": runs[0]["loops_per_token"],
                "tokens_equal_to_static": same / total,
            }
        )
    print(f"{'sampler':44} {'tok/s':>8} {'x static':>9} {'loops/tok':>10} {'= static':>9}")
    for row in rows:
        print(
            f"{row['sampler']:44} {row['decode_tokens_per_s']:8.1f} {row['ratio_to_static']:9.2f} "
            f"{row['loops_per_token']:10.2f} {row['tokens_equal_to_static']:9.1%}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = {"model": args.model, "args": vars(args), "machine": platform.processor() or platform.machine(), "rows": rows}
    (RESULTS / "bench_ouro.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
