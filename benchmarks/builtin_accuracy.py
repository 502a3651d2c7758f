"""Accuracy of the built-in model (or any arithmetic model) on both shipped sets, as a function of the number of
recurrences, with the diffusion sampler beside static AR, and how fast its latent state converges: the
measurements behind the built-in model's card.

    python benchmarks/builtin_accuracy.py                              # built-in model, both sets, 500 each
    python benchmarks/builtin_accuracy.py --model runs/builtin/model --steps 1,32 --problems 100

* sets: `test` (the classic 500, unchanged since the first built-in model) and `unseen` (names, items, shops,
  activities and wordings held out of training; the bare-arithmetic kinds are reported on their own too);
* static AR: greedy, random initial state seeded per problem (init_scale 1, Huginn's default), every r of
  --steps; the r other than mean_recurrence on the first --curve-problems of each set;
* diffusion: the paper's defaults (r' = 4, ε = 0.03, η = 0.1, β = 0), greedy, seeded, at mean_recurrence's prefill.

Everything runs batched through the engine (a seeded request gives the same tokens whatever its batch).
Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from depthwave.data.arithmetic import extract_answer
from depthwave.eval.convergence import latent_change_per_step
from depthwave.eval.tasks.arithmetic import TEST_SET, UNSEEN_SET
from depthwave.llm import LLM
from depthwave.samplers import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
MAX_NEW_TOKENS = 128
SETS = {"test": TEST_SET, "unseen": UNSEEN_SET}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    kind: str


@dataclass
class Run:
    """One decoding setting on one set: per-problem correctness, kinds and generated tokens."""

    set: str
    sampler: str
    r: int
    correct: list[bool] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    def accuracy_of(self, prefix: str) -> tuple[float, int] | None:
        chosen = [ok for ok, kind in zip(self.correct, self.kinds, strict=True) if kind.startswith(prefix)]
        return (sum(chosen) / len(chosen), len(chosen)) if chosen else None

    def summary(self) -> dict[str, object]:
        bare = self.accuracy_of("bare_")
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("correct", "kinds")},
            "problems": len(self.correct),
            "accuracy": self.accuracy,
            "bare_arithmetic": None if bare is None else {"accuracy": bare[0], "problems": bare[1]},
            "by_kind": {
                kind: self.accuracy_of(kind)[0]  # type: ignore[index]
                for kind in sorted(set(self.kinds))
            },
        }


def load_set(path: Path, count: int) -> list[Problem]:
    problems = []
    for line in path.read_text(encoding="utf-8").splitlines()[:count]:
        record = json.loads(line)
        answer = extract_answer(record["answer"])
        assert answer is not None, record
        problems.append(Problem(record["question"], answer, record.get("kind", "story")))
    return problems


def evaluate(llm: LLM, name: str, problems: list[Problem], sampler: str, r: int) -> Run:
    params = [SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, seed=i) for i in range(len(problems))]
    options = {"num_steps": r, "init_scale": 1.0}
    began = time.perf_counter()
    results = llm.generate(
        [p.question for p in problems], params, sampler=sampler, chat=True, progress=False, **options
    )
    run = Run(name, sampler, r, seconds=time.perf_counter() - began)
    for problem, result in zip(problems, results, strict=True):
        run.correct.append(extract_answer(result.text or "") == problem.answer)
        run.kinds.append(problem.kind)
        run.new_tokens += len(result.token_ids)
    return run


def plot(path: Path, runs: list[Run], mean_recurrence: int, convergence: list[float], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'depthwave[eval]'): no plot")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in SETS:
        static = sorted((run.r, run.accuracy) for run in runs if run.set == name and run.sampler == "static")
        left.plot([r for r, _ in static], [100 * a for _, a in static], marker="o", label=f"{name} set")
    left.axvline(mean_recurrence, color="grey", linestyle="--", label=f"mean_recurrence = {mean_recurrence}")
    left.set_xscale("log", base=2)
    steps = sorted({run.r for run in runs})
    left.set_xticks(steps, [str(r) for r in steps])
    left.set_xlabel("recurrences r at test time")
    left.set_ylabel("accuracy (%), greedy static AR")
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


def print_table(runs: list[Run], mean_recurrence: int) -> None:
    print(f"{'set':<7} {'sampler':<10} {'r':>3} {'accuracy':>9} {'problems':>9} {'bare arithmetic':>17} {'s':>7}")
    for run in runs:
        bare = run.accuracy_of("bare_")
        bare_text = "" if bare is None else f"{100 * bare[0]:.1f}% of {bare[1]}"
        marker = "  <- mean_recurrence" if run.r == mean_recurrence and run.sampler == "static" else ""
        print(
            f"{run.set:<7} {run.sampler:<10} {run.r:>3} {100 * run.accuracy:8.1f}% {len(run.correct):9d} "
            f"{bare_text:>17} {run.seconds:7.1f}{marker}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--problems", type=int, default=500, help="first N problems of each set")
    parser.add_argument("--curve-problems", type=int, default=150, help="problems for the r other than the mean")
    parser.add_argument("--steps", default="1,2,4,8,16,32,64", help="recurrences of static AR")
    parser.add_argument("--no-diffusion", action="store_true", help="skip the diffusion sampler")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--convergence-prompts", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "builtin_accuracy.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: beside --out)")
    args = parser.parse_args(argv)

    llm = LLM(args.model, device="cpu", threads=args.threads)
    mean_recurrence = llm.model.config.mean_recurrence
    sets = {name: load_set(path, args.problems) for name, path in SETS.items()}
    runs: list[Run] = []
    for name, problems in sets.items():
        for r in [int(s) for s in args.steps.split(",")]:
            chosen = problems if r == mean_recurrence else problems[: args.curve_problems]
            runs.append(evaluate(llm, name, chosen, "static", r))
            print(f"{name} static r={r}: {100 * runs[-1].accuracy:.1f}% of {len(chosen)}", flush=True)
        if not args.no_diffusion:
            runs.append(evaluate(llm, name, problems, "diffusion", mean_recurrence))
            print(f"{name} diffusion: {100 * runs[-1].accuracy:.1f}% of {len(problems)}", flush=True)
    questions = [llm.encode(p.question, chat=True) for p in sets["test"][: args.convergence_prompts]]
    convergence = latent_change_per_step(llm.model, questions, 2 * mean_recurrence)
    below = next((t + 1 for t, c in enumerate(convergence) if c < 0.03), None)

    print(f"\n{args.model}: greedy decoding, {args.problems} problems per set at r = {mean_recurrence}")
    print_table(runs, mean_recurrence)
    print(
        "mean normalised latent change per step: "
        + ", ".join(f"t={t + 1}: {c:.4f}" for t, c in enumerate(convergence) if t + 1 in (1, 2, 4, 8, 16, 32, 64))
    )
    print(f"first step below 0.03: {below}")

    result = {
        "model": args.model,
        "init_scale": 1.0,
        "mean_recurrence": mean_recurrence,
        "runs": [run.summary() for run in runs],
        "latent_change_per_step": convergence,
        "first_step_below_0.03": below,
        "convergence_prompts": min(args.convergence_prompts, len(sets["test"])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    png = args.plot or args.out.with_suffix(".png")
    title = (
        f"{args.model}: greedy static AR; {args.problems} problems per set at r={mean_recurrence}, "
        f"{args.curve_problems} at the other r"
    )
    if plot(png, runs, mean_recurrence, convergence, title):
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
