"""Accuracy of a model trained on the arithmetic task, as a function of the number of recurrences, and how fast
its latent state converges: the measurements behind the built-in model's card.

    python benchmarks/builtin_accuracy.py                          # built-in model, 500 test problems
    python benchmarks/builtin_accuracy.py --model runs/builtin/model --steps 1,32 --problems 100

Greedy static AR with a seeded random initial state (init_scale 1, Huginn's default). Problems are shared out
over worker processes (one thread each: at this size a decode step is bound by per-op overhead, so processes
scale and threads do not). Prints a table, writes JSON and a PNG plot of accuracy against r.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from depthwave.data.arithmetic import extract_answer, make_split
from depthwave.data.tokenizer import question_prompt
from depthwave.llm import LLM
from depthwave.samplers import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
MAX_NEW_TOKENS = 128

_llm: LLM | None = None


def _load(model: str) -> None:
    global _llm
    torch.set_num_threads(1)
    _llm = LLM(model, device="cpu")


def _solve(task: tuple[int, list[tuple[int, str, int]]]) -> list[tuple[int, int, bool, int]]:
    """(r, [(index, question, answer)]) -> [(r, index, correct, generated tokens)]."""
    assert _llm is not None
    num_steps, problems = task
    sampler = _llm.sampler("static", num_steps=num_steps, init_scale=1.0)
    out = []
    for index, question, answer in problems:
        ids = _llm.encode(question_prompt(question))
        result = sampler.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, seed=index))
        out.append((num_steps, index, extract_answer(result.text or "") == answer, len(result.token_ids)))
    return out


def latent_convergence(llm: LLM, questions: list[str], max_steps: int) -> list[float]:
    """Mean over prompts and positions of ‖s_t - s_(t-1)‖ / ‖s_t‖ for t = 1..max_steps (random s_0, seeded)."""
    model = llm.model
    changes = torch.zeros(max_steps)
    with torch.inference_mode():
        for index, question in enumerate(questions):
            ids = torch.tensor([llm.encode(question_prompt(question))])
            embedded = model.prelude(ids)
            state = model.initial_state(embedded, 1.0, torch.Generator().manual_seed(index))
            for t in range(max_steps):
                new = model.core_step(state, embedded, step=t)
                changes[t] += ((new - state).norm(dim=-1) / new.norm(dim=-1)).mean()
                state = new
    return (changes / len(questions)).tolist()


def plot(path: Path, curve: dict[int, float], mean_recurrence: int, convergence: list[float], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'depthwave[eval]'): no plot")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = sorted(curve)
    left.plot(steps, [100 * curve[r] for r in steps], marker="o")
    left.axvline(mean_recurrence, color="grey", linestyle="--", label=f"mean_recurrence = {mean_recurrence}")
    left.set_xscale("log", base=2)
    left.set_xticks(steps, [str(r) for r in steps])
    left.set_xlabel("recurrences r at test time")
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(0, 100)
    left.grid(alpha=0.3)
    left.legend()
    left.set_title("Accuracy grows with recurrence")
    right.plot(range(1, len(convergence) + 1), convergence)
    right.axhline(0.03, color="grey", linestyle="--", label="0.03 (diffusion freeze threshold)")
    right.set_yscale("log")
    right.set_xlabel("recurrence step t")
    right.set_ylabel("mean ‖s_t − s_(t−1)‖ / ‖s_t‖")
    right.grid(alpha=0.3)
    right.legend()
    right.set_title("The latent state converges")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--problems", type=int, default=500, help="first N problems of the test split")
    parser.add_argument(
        "--curve-problems",
        type=int,
        default=None,
        help="problems for the r other than mean_recurrence (default: --problems)",
    )
    parser.add_argument("--steps", default="1,2,4,8,16,32,48,64", help="recurrences to evaluate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--convergence-prompts", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "builtin_accuracy.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: beside --out)")
    args = parser.parse_args(argv)

    llm = LLM(args.model, device="cpu")
    mean_recurrence = llm.model.config.mean_recurrence
    problems = make_split("test", args.problems, seed=0)
    indexed = [(i, p.question, p.answer) for i, p in enumerate(problems)]
    steps = [int(s) for s in args.steps.split(",")]
    curve_count = args.problems if args.curve_problems is None else min(args.curve_problems, args.problems)
    tasks = []
    for r in steps:
        chosen = indexed if r == mean_recurrence else indexed[:curve_count]
        tasks += [(r, chosen[w :: args.workers]) for w in range(args.workers)]

    began = time.perf_counter()
    correct: dict[int, list[bool]] = {r: [] for r in steps}
    lengths: dict[int, list[int]] = {r: [] for r in steps}
    with ProcessPoolExecutor(args.workers, initializer=_load, initargs=(args.model,)) as pool:
        for rows in pool.map(_solve, tasks):
            for r, _, ok, length in rows:
                correct[r].append(ok)
                lengths[r].append(length)
    seconds = time.perf_counter() - began
    curve = {r: sum(v) / len(v) for r, v in correct.items()}
    torch.set_num_threads(max(1, args.workers))
    convergence = latent_convergence(
        llm, [p.question for p in problems[: args.convergence_prompts]], 2 * mean_recurrence
    )
    below = next((t + 1 for t, c in enumerate(convergence) if c < 0.03), None)

    print(
        f"\n{args.model}: greedy static AR on the first {len(problems)} arithmetic test problems "
        f"({seconds:.0f} s, {args.workers} workers)"
    )
    print(f"{'r':>4} {'accuracy':>9} {'problems':>9} {'mean new tokens':>16}")
    for r in steps:
        marker = "  <- mean_recurrence" if r == mean_recurrence else ""
        print(f"{r:>4} {100 * curve[r]:8.1f}% {len(correct[r]):9d} {statistics.mean(lengths[r]):16.1f}{marker}")
    print(
        "mean normalised latent change per step: "
        + ", ".join(f"t={t + 1}: {c:.3f}" for t, c in enumerate(convergence) if t + 1 in (1, 2, 4, 8, 16, 32, 64))
    )
    print(f"first step below 0.03: {below}")

    result: dict[str, Any] = {
        "model": args.model,
        "problems": len(problems),
        "init_scale": 1.0,
        "decoding": "greedy static AR",
        "mean_recurrence": mean_recurrence,
        "accuracy": {str(r): curve[r] for r in steps},
        "problems_per_r": {str(r): len(correct[r]) for r in steps},
        "mean_new_tokens": {str(r): statistics.mean(lengths[r]) for r in steps},
        "latent_change_per_step": convergence,
        "first_step_below_0.03": below,
        "seconds": seconds,
        "convergence_prompts": min(args.convergence_prompts, len(problems)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    png = args.plot or args.out.with_suffix(".png")
    if plot(
        png,
        curve,
        mean_recurrence,
        convergence,
        f"{args.model}: greedy static AR; {len(problems)} test problems at r={mean_recurrence}, "
        f"{curve_count} at the other r",
    ):
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
