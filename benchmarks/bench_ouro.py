"""The samplers on an Ouro model: decode tokens/s, loops per token and agreement with static decoding.

Runs each sampler configuration over the same prompts, interleaved in every repeat (so that the machine's drift hits
them alike), one thread, greedy. Reported per configuration: the median decode tokens/s (generated tokens only; the
prefill apart), its ratio to static decoding measured in the same repeats, the mean loops per generated token, and
the share of generated tokens equal to static decoding's (per-step cache: the official model's tokens).

The diffusion rows are the wavefront over loops (`depthwave.samplers.diffusion.looped`): on the per-step cache each
position reads and writes its own loop's keys (with `freeze="fixed"`, static decoding's tokens); on the shared cache
every position reads the others' latest loop (compare those with static decoding on the shared cache). The adaptive
rows use Ouro's own exit gate (`criterion="gate"`): "skip" stops a token at its exit loop (real savings; later
tokens see it through the cache mode), "all" computes every loop and reads the exit loop, the official code's
behaviour, which saves nothing.

    python benchmarks/bench_ouro.py [--model ../shared/fixtures/ouro-a] [--repeats 5] [--threshold 0.5]
    python benchmarks/bench_ouro.py --model runs/ouro/model --problems 100 --tokens 96 --repeats 3

Random weights (the fixture) say nothing about accuracy; they show the cost structure (random prompts of 4 to 24
tokens, a fixed number of new tokens). With `--problems N` the prompts are the first N classic arithmetic test
problems (a model trained with `depthwave train --preset ouro`), generation stops at the model's stop tokens, and
each configuration's accuracy (`The answer is N.` right) is reported too. JSON in `--out` (default
benchmarks/results/bench_ouro.json).
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
from depthwave.data.arithmetic import extract_answer
from depthwave.data.tokenizer import question_prompt
from depthwave.eval.tasks.arithmetic import TEST_SET
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
        "diffusion (loop wavefront, per-step, r'=1)": registry.make(
            "diffusion", cache_mode="per-step", freeze="fixed", inner_recurrence=1
        ),
        "diffusion (loop wavefront, per-step, r'=1, latent ε=0.3)": registry.make(
            "diffusion", cache_mode="per-step", exit_threshold=0.3, inner_recurrence=1
        ),
        "diffusion (loop wavefront, per-step, r'=2)": registry.make(
            "diffusion", cache_mode="per-step", freeze="fixed", inner_recurrence=2
        ),
        "diffusion (loop wavefront, shared, r'=1)": registry.make("diffusion", inner_recurrence=1),
        "diffusion (loop wavefront, shared, r'=2)": registry.make("diffusion", inner_recurrence=2),
    }


def run(
    llm: LLM, prompts: list[list[int]], sampler: Any, tokens: int, answers: list[int | None] | None
) -> dict[str, Any]:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=answers is None)
    results = [llm.generate([p], sampling, sampler=sampler)[0] for p in prompts]
    decoded = sum(r.stats.generated_tokens - 1 for r in results)
    seconds = sum(r.stats.decode_time_s for r in results)
    loops = sum(r.stats.core_steps for r in results) / max(1, sum(r.stats.generated_tokens for r in results))
    right = None
    if answers is not None:
        right = sum(extract_answer(r.text or "") == a for r, a in zip(results, answers, strict=True)) / len(answers)
    return {
        "tokens_per_s": decoded / seconds,
        "loops_per_token": loops,
        "accuracy": right,
        "tokens": [r.token_ids for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--problems", type=int, default=0, help="classic arithmetic test problems (trained models)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_ouro.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = LLM(args.model, device="cpu", dtype="float32", threads=1)
    answers: list[int | None] | None = None
    if args.problems:
        rows = [json.loads(line) for line in TEST_SET.read_text().splitlines()[: args.problems]]
        prompts = [llm.encode(question_prompt(r["question"])) for r in rows]
        answers = [extract_answer(r["answer"]) for r in rows]
    else:
        generator = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(1, llm.model.config.vocab_size, (int(n),), generator=generator).tolist()
            for n in torch.randint(4, 24, (args.prompts,), generator=generator)
        ]
    configs = configurations(args.threshold)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        shift = repeat % len(configs)  # each repeat starts elsewhere: no configuration always runs first
        for name in list(configs)[shift:] + list(configs)[:shift]:
            samples[name].append(run(llm, prompts, configs[name], args.tokens, answers))
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
                "accuracy": runs[0]["accuracy"],
            }
        )
    print(f"\n{args.model}, 1 thread, greedy, medians of {args.repeats}:\n")
    print("| sampler | decode tok/s | x static | loops/token | tokens = static | accuracy |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.1%}"
        print(
            f"| {row['sampler']} | {row['decode_tokens_per_s']:.1f} | {row['ratio_to_static']:.2f}x | "
            f"{row['loops_per_token']:.2f} | {row['tokens_equal_to_static']:.1%} | {accuracy} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    out = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}, **meta, "rows": rows}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
