"""Accuracy and speed of the samplers side by side, on the built-in model's arithmetic test problems.

    python benchmarks/bench_samplers.py --threads 1          # tune on 40 validation problems, then 500 test ones
    python benchmarks/bench_samplers.py --problems 50 --sweep-problems 20 --model runs/builtin/model

Rows: static AR at r = mean_recurrence (the baseline); adaptive-compute AR with the best exit criterion and
self-speculative decoding with the best draft depth and lookahead, both picked by a small sweep on the validation
split (the fastest setting whose accuracy there is at most one problem below static AR's); the diffusion forcing
sampler with the paper's defaults (r' = 4, ε = 0.03, η = 0.1, β = 0, wavefront 128) in depthwave's default mode,
and the same in reference mode. Every test problem is run by every sampler in turn (interleaved), same prompts, one
process, so machine noise hits all rows alike. tokens/s counts generated tokens after the first (which the prefill
produces) over decode time, summed over problems; prefill is reported separately.

The ideal speedup of the diffusion sampler is the ratio of layer passes per token, (P + r·R + C) / (P + r'·R + C):
it assumes that a sampler step costs the same whatever the number of positions in its wavefront, as on a GPU, where
a small model's step is bound by weight reads and launches. On a CPU the extra rows cost real arithmetic, so the
script also times one sampler step's model work (prelude, r' recurrences, coda) against the wavefront size and
reports the ceiling that this puts on the speedup at the measured mean wavefront and tokens per step. Prints the
tables and writes JSON.
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

from depthwave.data.arithmetic import Problem, extract_answer, make_split
from depthwave.data.tokenizer import question_prompt
from depthwave.llm import LLM
from depthwave.model.kv_cache import KVPool
from depthwave.model.model import RecurrentDepthModel
from depthwave.samplers import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"

PAPER_DIFFUSION = dict(inner_recurrence=4, exit_threshold=0.03, momentum=0.1, noise=0.0, max_wavefront=128)


CRITERIA = ("latent-diff", "kl", "minp-kl", "entropy-diff", "argmax-stability", "cosine")
ADAPTIVE_SWEEP = [{"criterion": c} for c in CRITERIA]
SPECULATIVE_SWEEP = [{"draft_steps": d, "lookahead": k} for d in (1, 2, 4, 8) for k in (2, 4, 8, 16, 32)]

Row = tuple[str, dict[str, Any]]


def run_problems(
    llm: LLM,
    rows: dict[str, Row],
    problems: list[Problem],
    max_new_tokens: int,
    init_scale: float,
    label: str,
) -> dict[str, list[dict[str, Any]]]:
    """Every problem through every row's sampler in turn; one record per problem and row."""
    samplers = {name: llm.sampler(kind, init_scale=init_scale, **kw) for name, (kind, kw) in rows.items()}
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    began = time.perf_counter()
    for index, problem in enumerate(problems):
        ids = llm.encode(question_prompt(problem.question))
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=index)
        for name, sampler in samplers.items():
            result = sampler.generate(ids, params)
            records[name].append(
                {
                    "correct": extract_answer(result.text or "") == problem.answer,
                    "tokens": result.stats.generated_tokens,
                    "prefill_s": result.stats.prefill_time_s,
                    "decode_s": result.stats.decode_time_s,
                    "core_steps_per_token": result.stats.core_steps_per_token,
                    "sampler_steps": getattr(result.stats, "sampler_steps", None),
                    "mean_wavefront": getattr(result.stats, "mean_wavefront", None),
                    "acceptance_rate": getattr(result.stats, "acceptance_rate", None),
                }
            )
        if (index + 1) % 25 == 0:
            print(f"{label}: {index + 1}/{len(problems)} problems, {time.perf_counter() - began:.0f} s", flush=True)
    return records


def rate_and_accuracy(records: list[dict[str, Any]]) -> tuple[float, float]:
    decoded = sum(x["tokens"] - 1 for x in records)
    return decoded / sum(x["decode_s"] for x in records), sum(x["correct"] for x in records) / len(records)


def tune(llm: LLM, problems: list[Problem], args: argparse.Namespace, static: Row) -> tuple[Row, Row, list[dict]]:
    """The fastest adaptive and speculative settings on the tuning problems whose accuracy is at most one problem
    below static AR's there."""
    candidates: dict[str, Row] = {"static": static}
    for kw in ADAPTIVE_SWEEP:
        candidates[f"adaptive {kw['criterion']}"] = ("adaptive", kw)
    for kw in SPECULATIVE_SWEEP:
        candidates[f"speculative draft {kw['draft_steps']} lookahead {kw['lookahead']}"] = ("speculative", kw)
    records = run_problems(llm, candidates, problems, args.max_new_tokens, args.init_scale, "sweep")
    results = []
    for name, (kind, kw) in candidates.items():
        rate, accuracy = rate_and_accuracy(records[name])
        results.append({"setting": name, "sampler": kind, "params": kw, "tokens_per_s": rate, "accuracy": accuracy})
    floor = results[0]["accuracy"] - 1 / len(problems) - 1e-9
    print(f"\nsweep on {len(problems)} validation problems (acceptable: accuracy >= {100 * floor:.1f}%)")
    for r in results:
        print(f"  {r['setting']:36} {100 * r['accuracy']:6.1f}% {r['tokens_per_s']:8.1f} tokens/s")

    def best(kind: str) -> Row:
        ok = [r for r in results if r["sampler"] == kind and r["accuracy"] >= floor]
        chosen = max(ok or [r for r in results if r["sampler"] == kind], key=lambda r: r["tokens_per_s"])
        return kind, chosen["params"]

    return best("adaptive"), best("speculative"), results


@torch.inference_mode()
def model_work_ms(model: RecurrentDepthModel, rows: int, recurrences: int, position: int, repeats: int) -> float:
    """Median time of prelude + `recurrences` core steps + coda on `rows` positions after `position` cached ones."""
    config = model.config
    cache = KVPool(config, position + rows, "shared", device=model.device, dtype=model.dtype)
    ids = torch.randint(0, config.vocab_size, (1, position + rows), generator=torch.Generator().manual_seed(0))
    model(ids[:, :position], 4, cache=cache)
    state = model.initial_state(torch.zeros(1, rows, config.n_embd, device=model.device, dtype=model.dtype))
    at = model.positions([position], [rows])
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        embedded = model.prelude(ids[:, position:], at, cache)
        model.coda_logits(model.recur(state, embedded, recurrences, at, cache), at, cache)
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--problems", type=int, default=500, help="test problems of the table")
    parser.add_argument("--sweep-problems", type=int, default=40, help="validation problems of the tuning sweep")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--init-scale", type=float, default=1.0, help="random initial states (seeded per problem)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cost-repeats", type=int, default=200, help="timings of the step-cost table")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_samplers.json")
    args = parser.parse_args(argv)
    llm = LLM(args.model, device=args.device, threads=args.threads)
    config = llm.model.config
    r_mean = config.mean_recurrence
    static: Row = ("static", {"num_steps": r_mean})
    adaptive, speculative, sweep = tune(llm, make_split("validation", args.sweep_problems, seed=0), args, static)
    rows: dict[str, Row] = {
        f"static AR r={r_mean}": static,
        f"adaptive ({adaptive[1]['criterion']})": adaptive,
        f"speculative (d={speculative[1]['draft_steps']}, k={speculative[1]['lookahead']})": speculative,
        "diffusion (default)": ("diffusion", {**PAPER_DIFFUSION, "num_steps": r_mean}),
        "diffusion (reference)": ("diffusion", {**PAPER_DIFFUSION, "num_steps": r_mean, "mode": "reference"}),
    }
    problems = make_split("test", args.problems, seed=0)
    records = run_problems(llm, rows, problems, args.max_new_tokens, args.init_scale, "test")

    p, r, c = config.n_layers_in_prelude, config.n_layers_in_recurrent_block, config.n_layers_in_coda
    ideal = (p + config.mean_recurrence * r + c) / (p + PAPER_DIFFUSION["inner_recurrence"] * r + c)
    summary = []
    baseline_rate = None
    for name, rs in records.items():
        rate, accuracy = rate_and_accuracy(rs)
        baseline_rate = baseline_rate or rate
        steps = [x["sampler_steps"] for x in rs if x["sampler_steps"] is not None]
        wavefront = sum(x["mean_wavefront"] * x["sampler_steps"] for x in rs) / sum(steps) if steps else None
        summary.append(
            {
                "sampler": name,
                "accuracy": accuracy,
                "params": rows[name][1],
                "tokens_per_s": rate,
                "speedup": rate / baseline_rate,
                "median_prefill_ms": 1e3 * statistics.median(x["prefill_s"] for x in rs),
                "mean_tokens": statistics.mean(x["tokens"] for x in rs),
                "tokens_per_sampler_step": sum(x["tokens"] - 1 for x in rs) / sum(steps) if steps else None,
                "core_steps_per_token": statistics.mean(x["core_steps_per_token"] for x in rs),
                "mean_wavefront": wavefront,
            }
        )

    # What a step costs against its wavefront size, at a typical position (the prompt plus half the answer).
    position = int(statistics.median(len(llm.encode(question_prompt(p.question))) for p in problems[:20])) + 30
    token_ms = model_work_ms(llm.model, 1, config.mean_recurrence, position, args.cost_repeats)
    sizes = sorted({1, 2, 3, 4, 6, 8, 16} | {round(s["mean_wavefront"]) for s in summary if s["mean_wavefront"]})
    r_inner = PAPER_DIFFUSION["inner_recurrence"]
    step_ms = {size: model_work_ms(llm.model, size, r_inner, position, args.cost_repeats) for size in sizes}
    for s in summary:
        if s["mean_wavefront"]:
            # Interpolate the step cost at the mean wavefront, then: static token cost / diffusion cost per token.
            low = max(x for x in sizes if x <= s["mean_wavefront"])
            high = min(x for x in sizes if x >= s["mean_wavefront"])
            weight = 0.0 if high == low else (s["mean_wavefront"] - low) / (high - low)
            cost = step_ms[low] + weight * (step_ms[high] - step_ms[low])
            s["step_ms_at_mean_wavefront"] = cost
            s["hardware_ceiling"] = token_ms / (cost / s["tokens_per_sampler_step"])
    print(
        f"\n{args.model} on {len(problems)} arithmetic test problems, greedy, {platform.machine()} "
        f"{args.device}, {torch.get_num_threads()} threads; ideal speedup (P+rR+C)/(P+r'R+C) = {ideal:.2f}"
    )
    for s in summary:
        per_token = (p + r_inner * r + c) / s["tokens_per_sampler_step"] if s["tokens_per_sampler_step"] else None
        s["layer_pass_speedup"] = (p + config.mean_recurrence * r + c) / per_token if per_token else None
    print(
        f"{'sampler':24} {'accuracy':>8} {'tokens/s':>9} {'speedup':>8} {'of ideal':>8} {'prefill ms':>10} "
        f"{'tok/step':>8} {'recur/tok':>9} {'wavefront':>9} {'layer-pass':>10} {'CPU ceiling':>11}"
    )
    for s in summary:
        dash = f"{'-':>8}"
        per_step = f"{s['tokens_per_sampler_step']:8.2f}" if s["tokens_per_sampler_step"] else dash
        wavefront = f"{s['mean_wavefront']:9.2f}" if s["mean_wavefront"] else f"{'-':>9}"
        ceiling = f"{s['hardware_ceiling']:10.2f}x" if s.get("hardware_ceiling") else f"{'-':>11}"
        layer_pass = f"{s['layer_pass_speedup']:9.2f}x" if s["layer_pass_speedup"] else f"{'-':>10}"
        # The ideal is the diffusion sampler's (layer passes per token at r' against r); other rows get none.
        of_ideal = f"{100 * s['speedup'] / ideal:7.0f}%" if s["mean_wavefront"] else f"{'-':>8}"
        print(
            f"{s['sampler']:24} {100 * s['accuracy']:7.1f}% {s['tokens_per_s']:9.1f} {s['speedup']:7.2f}x "
            f"{of_ideal} {s['median_prefill_ms']:10.1f} {per_step} "
            f"{s['core_steps_per_token']:9.1f} {wavefront} {layer_pass} {ceiling}"
        )
    print(
        "\nlayer-pass: speedup in sequential layer passes per token (what the ideal counts); CPU ceiling: the speedup "
        "that the measured step cost at the mean wavefront allows at the measured tokens per step."
    )
    print(f"model work at position {position}: one static token (r={config.mean_recurrence}) {token_ms:.2f} ms")
    print(f"{'wavefront':>9} " + " ".join(f"{size:>6}" for size in sizes))
    print(f"{'step ms':>9} " + " ".join(f"{step_ms[size]:6.2f}" for size in sizes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": args.model,
                "problems": len(problems),
                "ideal_speedup": ideal,
                "static_token_ms": token_ms,
                "step_ms_by_wavefront": step_ms,
                "results": summary,
                "threads": torch.get_num_threads(),
                "device": args.device,
                "torch": torch.__version__,
                "sweep_problems": args.sweep_problems,
                "sweep": sweep,
                "per_problem": records,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
