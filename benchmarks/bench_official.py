"""depthwave's diffusion forcing sampler against the official `generate_diffusion_style`, end to end, on the same
checkpoint and the same test prompts, greedy, one thread, interleaved; medians and totals.

The official code is not part of depthwave and is never copied into it: point `--official` at a checkout of
seal-rg/recurrent-pretraining (the folder holding `recpre/raven_modeling_minimal.py`). It needs transformers 4.x,
which depthwave does not depend on; install it outside the project, e.g.

    pip install --target /tmp/offdeps "transformers<5"
    PYTHONPATH=/tmp/offdeps python benchmarks/bench_official.py --official /path/to/recurrent-pretraining

Both run the paper's sampler settings (r' = 4, ε = 0.03, η = 0.1, wavefront 128, the prompt prefilled at r = 32)
with β = 0 and zero initial states (`init_scale = 0`), so that greedy decoding is deterministic: depthwave in its
reference mode (token-identical to the official code, checked per prompt) and in its default mode (the shared
cache and the fixes its README lists), and with `--compile` in its default mode compiled (`LLM(compile=True)`,
warmed up before the timed runs). A problem's time is its whole call, prefill included; tokens are the
generated ones up to and including the first stop token. tokens/s = total tokens / total time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from depthwave import LLM, SamplingParams
from depthwave.data.arithmetic import make_split
from depthwave.data.tokenizer import question_prompt

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = dict(inner_recurrence=4, exit_threshold=0.03, momentum=0.1, noise=0.0, max_wavefront=128, init_scale=0.0)


def official_model(checkout: Path, model_dir: Path) -> Any:
    """The official RavenForCausalLM on `model_dir`, imported from a temporary package built from `checkout`."""
    package = Path(tempfile.mkdtemp()) / "raven_official"
    package.mkdir()
    (package / "__init__.py").touch()
    for name in ("raven_modeling_minimal.py", "raven_config_minimal.py"):
        shutil.copy(checkout / "recpre" / name, package / name)
    sys.path.insert(0, str(package.parent))
    modeling = importlib.import_module("raven_official.raven_modeling_minimal")
    fields = json.loads((model_dir / "config.json").read_text())
    fields.pop("tie_word_embeddings", None)  # RavenConfig sets it from tie_embeddings (both is an error)
    config = modeling.RavenConfig(**fields)
    return modeling.RavenForCausalLM.from_pretrained(str(model_dir), config=config, torch_dtype=torch.float32).eval()


def until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    cut = next((i for i, t in enumerate(tokens) if t in stops), None)
    return tokens if cut is None else tokens[: cut + 1]


def run_official(model: Any, ids: list[int], max_new_tokens: int, stops: set[int]) -> tuple[list[int], float]:
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, eos_token_id=sorted(stops), max_new_tokens=max_new_tokens)
    prompt = torch.tensor([ids])
    began = time.perf_counter()
    with torch.no_grad():
        out = model.generate_diffusion_style(
            prompt,
            generation_config=config,
            init_scale=SETTINGS["init_scale"],
            state_noise_mixing=SETTINGS["noise"],
            ema_embeds=SETTINGS["momentum"],
            inner_recurrence=SETTINGS["inner_recurrence"],
            exit_t=SETTINGS["exit_threshold"],
            max_wavefront=SETTINGS["max_wavefront"],
            num_steps=model.config.mean_recurrence,
            headway=1,
            max_new_tokens=max_new_tokens,
        )
    seconds = time.perf_counter() - began
    sequence = out.sequences if hasattr(out, "sequences") else out
    return until_stop(sequence[0, len(ids) :].tolist(), stops), seconds


def run_depthwave(sampler: Any, ids: list[int], max_new_tokens: int, stops: set[int]) -> tuple[list[int], float]:
    began = time.perf_counter()
    result = sampler.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0))
    return until_stop(result.token_ids, stops), time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of seal-rg/recurrent-pretraining")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--problems", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--compile", action="store_true", help="also depthwave's default mode compiled (warmed up before timing)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_official.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    llm = LLM(str(args.model or "builtin"), threads=args.threads)
    assert llm.folder is not None
    model_dir = llm.folder
    official = official_model(args.official, model_dir)
    stops = set(llm.stop_token_ids)
    problems = make_split("test", args.problems, seed=0)
    samplers = {
        "depthwave reference mode": llm.sampler("diffusion", mode="reference", **SETTINGS),
        "depthwave default mode": llm.sampler("diffusion", mode="default", **SETTINGS),
    }
    prompts = [llm.encode(question_prompt(p.question)) for p in problems]
    if args.compile:
        compiled = LLM(str(model_dir), threads=args.threads, compile=True).sampler("diffusion", **SETTINGS)
        # The longest prompt first: the sampler keeps one compiled engine sized for it, reused by every later call.
        # Then a few more problems, so that the buckets the timed runs reach are compiled before them.
        began = time.perf_counter()
        for ids in sorted(prompts, key=len, reverse=True)[:4]:
            compiled.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, seed=0))
        print(f"compiled warm-up {time.perf_counter() - began:.1f} s", flush=True)
        samplers["depthwave default mode, compiled"] = compiled
    graphs = counters["stats"]["unique_graphs"]
    runners = {
        "official generate_diffusion_style": lambda ids: run_official(official, ids, args.max_new_tokens, stops),
        **{
            name: lambda ids, sampler=sampler: run_depthwave(sampler, ids, args.max_new_tokens, stops)
            for name, sampler in samplers.items()
        },
    }
    names = list(runners)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for index, ids in enumerate(prompts):
        shift = index % len(names)  # rotate who goes first: warm caches and machine noise hit all alike
        for name in names[shift:] + names[:shift]:
            tokens, seconds = runners[name](ids)
            records[name].append({"tokens": tokens, "seconds": seconds})
        print(f"{index + 1}/{len(problems)} problems", flush=True)

    print(f"graphs compiled during the timed runs: {counters['stats']['unique_graphs'] - graphs}", flush=True)
    reference_tokens = [r["tokens"] for r in records[names[0]]]
    rows = []
    for name in names:
        recs = records[name]
        total_tokens = sum(len(r["tokens"]) for r in recs)
        total_s = sum(r["seconds"] for r in recs)
        rows.append(
            {
                "implementation": name,
                "tokens": total_tokens,
                "seconds": total_s,
                "tokens_per_s": total_tokens / total_s,
                "median_ms_per_token": 1e3 * statistics.median(r["seconds"] / max(len(r["tokens"]), 1) for r in recs),
                "same_tokens_as_official": sum(r["tokens"] == t for r, t in zip(recs, reference_tokens, strict=True)),
            }
        )
    base = rows[0]["tokens_per_s"]
    print(
        f"\n{platform.processor() or 'cpu'}, {args.threads} thread(s), {model_dir.name}, {len(problems)} problems, "
        f"max {args.max_new_tokens} new tokens, greedy, end to end\n"
    )
    print("| implementation | tokens | seconds | tokens/s | vs official | median ms/token | same tokens as official |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['implementation']} | {row['tokens']} | {row['seconds']:.1f} | {row['tokens_per_s']:.1f} | "
            f"{row['tokens_per_s'] / base:.2f}x | {row['median_ms_per_token']:.1f} | "
            f"{row['same_tokens_as_official']}/{len(problems)} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "problems": len(problems), "max_new_tokens": args.max_new_tokens}
    args.out.write_text(json.dumps({"meta": meta, "settings": SETTINGS, "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
