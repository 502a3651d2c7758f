"""Latent convergence of a recurrent-depth model, and the diffusion sampler against static AR on it: made for the
retrofitted-recurrence Llama / OLMo-2 checkpoints, whose states were trained at mean recurrence 4-32 rather than
from scratch at 32, so whether the diffusion sampler's latent-diff freezing pays off on them is an empirical
question.

    python benchmarks/retrofit_convergence.py                       # the two retrofit fixtures (random weights)
    python benchmarks/retrofit_convergence.py --model smcleish/Recurrent-Llama-3.2-train-recurrence-32 \\
        --device cuda --dtype bfloat16 --speed --problems 100       # the real checkpoint, on a GPU

For each model: the mean normalised latent change ‖s_t - s_(t-1)‖ / ‖s_t‖ per recurrence t = 1..2r (r the config's
mean_recurrence), over the prompts, from a random initial state (the models' default) and from zeros. With
--speed, every prompt is run greedily by static AR at r and by the diffusion sampler at the paper's defaults, in
turn: generated tokens per second of decode time (prefill reported separately), their ratio, and, for a model with
a tokenizer, the share of the built-in arithmetic test problems each answers right (`The answer is N.`). The
fixtures' weights are random (a contracting recurrence by construction), so their numbers say nothing about the
real models: they show the measurement runs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from depthwave.data.arithmetic import extract_answer
from depthwave.eval.convergence import latent_change_per_step
from depthwave.eval.tasks.arithmetic import TEST_SET
from depthwave.llm import LLM
from depthwave.samplers import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DEFAULT_MODELS = [str(FIXTURES / "retrofit-llama-a"), str(FIXTURES / "retrofit-olmo-a")]
PAPER_DIFFUSION = dict(inner_recurrence=4, exit_threshold=0.03, momentum=0.1, noise=0.0, max_wavefront=128)
SHOWN_STEPS = (1, 2, 4, 8, 16, 32, 64)


def prompts_for(llm: LLM, count: int) -> tuple[list[list[int]], list[int | None]]:
    """Arithmetic questions for a model with a tokenizer (with their answers); else the fixture's own prompts."""
    if llm.tokenizer is not None:
        rows = [json.loads(line) for line in TEST_SET.read_text().splitlines()[:count]]
        return [llm.encode(row["question"]) for row in rows], [extract_answer(row["answer"]) for row in rows]
    prompts = json.loads((llm.folder / "prompts.json").read_text())["prompts"]
    return prompts[:count], [None] * min(count, len(prompts))


def speed(llm: LLM, prompts: list[list[int]], answers: list[int | None], max_new_tokens: int) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    samplers = {"static": {}, "diffusion": PAPER_DIFFUSION}
    for name in samplers:
        rows[name] = {"tokens": 0, "decode_s": 0.0, "prefill_s": [], "rate": [], "right": 0, "recurrences": []}
    for prompt, answer in zip(prompts, answers, strict=True):
        for name, params in samplers.items():  # interleaved, so machine noise hits both alike
            sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
            result = llm.generate(prompt, sampling, sampler=name, **params)[0]
            stats, row = result.stats, rows[name]
            row["tokens"] += stats.generated_tokens
            row["decode_s"] += stats.decode_time_s
            row["prefill_s"].append(stats.prefill_time_s)
            if stats.decode_time_s > 0:
                row["rate"].append(max(stats.generated_tokens - 1, 0) / stats.decode_time_s)
            row["recurrences"].append(getattr(stats, "mean_recurrences_per_token", 0.0))
            if answer is not None and result.text is not None:
                row["right"] += extract_answer(result.text) == answer
    out = {}
    for name, row in rows.items():
        out[name] = {
            "generated_tokens": row["tokens"],
            "decode_s": row["decode_s"],
            "median_tokens_per_s": statistics.median(row["rate"]) if row["rate"] else 0.0,
            "median_prefill_s": statistics.median(row["prefill_s"]),
            "accuracy": row["right"] / len(prompts) if answers[0] is not None else None,
        }
    base = out["static"]["median_tokens_per_s"]
    out["diffusion_speedup"] = out["diffusion"]["median_tokens_per_s"] / base if base else None
    return out


def measure(model: str, args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(model, device=args.device, dtype=args.dtype, threads=args.threads or None)
    config = llm.model.config
    prompts, answers = prompts_for(llm, args.problems)
    steps = 2 * config.mean_recurrence
    started = time.perf_counter()
    result: dict[str, Any] = {
        "model": model,
        "block_type": config.block_type,
        "mean_recurrence": config.mean_recurrence,
        "prompts": len(prompts),
        "device": str(llm.model.device),
        "dtype": str(llm.model.dtype).removeprefix("torch."),
        "latent_change_random_init": latent_change_per_step(llm.model, prompts, steps, init_scale=1.0),
        "latent_change_zero_init": latent_change_per_step(llm.model, prompts, steps, init_scale=0.0),
    }
    if args.speed:
        result["speed"] = speed(llm, prompts, answers, args.max_new_tokens)
    result["seconds"] = time.perf_counter() - started
    return result


def print_report(result: dict[str, Any]) -> None:
    print(
        f"\n{result['model']} ({result['block_type']} blocks, mean_recurrence {result['mean_recurrence']}, "
        f"{result['prompts']} prompts, {result['device']} {result['dtype']})"
    )
    print(f"{'step t':>8} {'Δ random s0':>12} {'Δ zero s0':>10}")
    changes = zip(result["latent_change_random_init"], result["latent_change_zero_init"], strict=True)
    for t, (a, b) in enumerate(changes, 1):
        if t in SHOWN_STEPS or t == len(result["latent_change_zero_init"]):
            print(f"{t:>8} {a:12.4f} {b:10.4f}")
    below = next((t for t, c in enumerate(result["latent_change_random_init"], 1) if c < 0.03), None)
    print(f"first step below the paper's ε = 0.03 (random s0): {below}")
    if "speed" in result:
        s = result["speed"]
        print(f"{'sampler':<10} {'tok/s (median)':>15} {'prefill s':>10} {'accuracy':>9}")
        for name in ("static", "diffusion"):
            acc = s[name]["accuracy"]
            acc_text = "-" if acc is None else f"{100 * acc:.1f}%"
            print(
                f"{name:<10} {s[name]['median_tokens_per_s']:15.1f} {s[name]['median_prefill_s']:10.4f} {acc_text:>9}"
            )
        print(f"diffusion / static: {s['diffusion_speedup']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model folder or hub id (repeatable; default: fixtures)")
    parser.add_argument("--problems", type=int, default=20, help="prompts (arithmetic problems with a tokenizer)")
    parser.add_argument("--speed", action="store_true", help="also time diffusion against static AR")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when there is one)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: the config's)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: depthwave's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "retrofit_convergence.json")
    args = parser.parse_args(argv)
    results = [measure(model, args) for model in args.model or DEFAULT_MODELS]
    for result in results:
        print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
