"""Self-speculative decoding: parity with the official `generate_speculative`, greedy output equal to full-depth
decoding, and exact speculative sampling (the output distribution of full-depth sampling), checked statistically."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from depthwave import InvalidParameterError, SamplingParams, StaticParams, StaticSampler
from depthwave.engine.selection import filtered_probs
from depthwave.llm import LLM
from depthwave.model import load_model
from depthwave.samplers import SpeculativeParams, SpeculativeSampler
from tests.conftest import (
    REFERENCE_FIXTURES,
    RETROFIT_FIXTURES,
    check_stops_streaming_and_seeds,
    depthwave_command,
    fixture_dir,
    fixture_json,
)

PROMPT = [3, 141, 59, 26, 5]


def _params_for(case: dict[str, Any], mode: str) -> SpeculativeParams:
    args = case["args"]
    assert args["cache_lookup_strategy"] == "full" and not args["continuous_compute"]
    return SpeculativeParams(
        draft_steps=args["draft_steps"],
        lookahead=args["lookahead_for_draft"],
        num_steps=args["num_steps"],
        verification_threshold=args["verification_threshold"],
        init_scale=args["init_scale"],
        cache_mode="per-step",
        mode=mode,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("name", REFERENCE_FIXTURES + RETROFIT_FIXTURES)
def test_reference_mode_matches_every_recorded_case(name: str) -> None:
    model = load_model(fixture_dir(name), dtype=torch.float32)
    prompts = fixture_json(name, "prompts.json")["prompts"]
    for case in fixture_json(name, "generate_speculative.json")["cases"]:
        assert case["generation_config"]["do_sample"] is False
        sampler = SpeculativeSampler(model, params=_params_for(case, "reference"))
        budget = SamplingParams(temperature=0.0, max_new_tokens=case["args"]["max_new_tokens"])
        result = sampler.generate(prompts[case["prompt_index"]], budget)
        # Including the reference's overshoot of the budget (up to lookahead - 1 tokens).
        assert result.token_ids == case["new_token_ids"], case["id"]


@pytest.mark.parametrize("name", REFERENCE_FIXTURES + RETROFIT_FIXTURES)
def test_default_greedy_is_full_depth_greedy_decoding(name: str) -> None:
    model = load_model(fixture_dir(name), dtype=torch.float32)
    prompts = fixture_json(name, "prompts.json")["prompts"]
    for case in fixture_json(name, "generate_speculative.json")["cases"]:
        if case["args"]["verification_threshold"] < 1:
            continue
        budget = SamplingParams(temperature=0.0, max_new_tokens=case["args"]["max_new_tokens"])
        prompt = prompts[case["prompt_index"]]
        result = SpeculativeSampler(model, params=_params_for(case, "default")).generate(prompt, budget)
        static = StaticSampler(model, params=StaticParams(num_steps=case["args"]["num_steps"], init_scale=0.0))
        assert result.token_ids == static.generate(prompt, budget).token_ids, case["id"]
        # The reference's output is the same sequence, cut to the budget here.
        assert result.token_ids == case["new_token_ids"][: budget.max_new_tokens], case["id"]


MICRO_MODEL_SEED = 4  # the `model` fixture of conftest


@pytest.mark.parametrize("cache_mode", ["per-step", "shared"])
@pytest.mark.parametrize(("draft_steps", "lookahead"), [(1, 3), (2, 5), (8, 2)])
def test_rollback_keeps_greedy_output_exact(model, cache_mode: str, draft_steps: int, lookahead: int) -> None:  # type: ignore[no-untyped-def]
    """Whatever the acceptance pattern, greedy speculative output equals static decoding at the verification depth."""
    budget = SamplingParams(temperature=0.0, max_new_tokens=20)
    # Against static decoding with the same cache: the shared cache's rollbacks must leave what static AR sees.
    static = StaticSampler(model, params=StaticParams(init_scale=0.0, cache_mode=cache_mode)).generate(PROMPT, budget)  # type: ignore[arg-type]
    params = SpeculativeParams(draft_steps=draft_steps, lookahead=lookahead, init_scale=0.0, cache_mode=cache_mode)  # type: ignore[arg-type]
    result = SpeculativeSampler(model, params=params).generate(PROMPT, budget)
    stats = result.stats
    assert result.token_ids == static.token_ids
    assert len(result.token_ids) == 20
    assert 0 <= stats.accepted_drafts <= stats.drafted_tokens
    # Every token after the first is an accepted draft, a kept bonus token or a correction; every round adds one
    # token beyond its accepted drafts, except a last round whose bonus the budget cuts.
    assert stats.accepted_drafts + stats.bonus_tokens + stats.corrections == 19
    assert stats.rounds - stats.corrections - stats.bonus_tokens in (0, 1)
    if draft_steps == 8:
        assert stats.acceptance_rate == 1.0 and stats.corrections == 0


def test_stop_budget_stream_and_seed(model) -> None:  # type: ignore[no-untyped-def]
    sampler = SpeculativeSampler(model, params=SpeculativeParams(draft_steps=2, lookahead=4, init_scale=1.0))
    check_stops_streaming_and_seeds(sampler, PROMPT, budget=13, stop_at=6)


def _rank_counts(llm: LLM, mode: str, prompt: list[int], runs: int, params: SamplingParams) -> tuple[Any, Any]:
    """Sample `runs` seeded generations; for every token after the first, find its rank (0, 1, >= 2) under the
    exact full-depth distribution of its context. Returns observed counts and the expected ones."""
    model = llm.model
    config = SpeculativeParams(draft_steps=2, lookahead=4, num_steps=16, init_scale=0.0, mode=mode)  # type: ignore[arg-type]
    sampler = SpeculativeSampler(model, params=config)
    observed, expected = torch.zeros(3), torch.zeros(3)
    for seed in range(runs):
        run = SamplingParams(
            temperature=params.temperature, max_new_tokens=params.max_new_tokens, seed=seed, ignore_eos=True
        )
        generated = sampler.generate(prompt, run).token_ids
        sequence = torch.tensor(prompt + generated)
        with torch.inference_mode():
            # With zero initial states a full-depth pass is deterministic: the exact target distributions.
            logits = model(sequence[None, :-1], 16, 0.0).logits[0, len(prompt) - 1 :]
        probs = filtered_probs(logits, run)
        # The first token comes from the shared prefill; the others from drafts, corrections and bonus tokens.
        for position in range(1, len(generated)):
            p = probs[position]
            order = p.argsort(descending=True)
            rank = int((order == generated[position]).nonzero()[0, 0])
            observed[min(rank, 2)] += 1
            expected += torch.stack((p[order[0]], p[order[1]], 1 - p[order[0]] - p[order[1]]))
    return observed, expected


@pytest.mark.slow
def test_speculative_sampling_matches_full_depth_sampling_and_argmax_acceptance_does_not(builtin_llm: LLM) -> None:
    """Pearson's statistic over the rank of each sampled token under its exact distribution (categories: top-1,
    top-2, rest). Draws are independent given their contexts but not identically distributed, so each count's
    variance is sum p(1-p) < sum p and the statistic is stochastically smaller than chi-square(2) under the null:
    the test is conservative. Critical value chi2(2) at p = 0.001: 13.82."""
    llm = builtin_llm
    prompt = llm.encode("A shop gets 26 stamps on Wednesday and 68 stamps on Friday. How many stamps?", chat=True)
    params = SamplingParams(temperature=1.5, max_new_tokens=32)
    critical = 13.82
    statistics = {}
    for mode in ("default", "reference"):
        observed, expected = _rank_counts(llm, mode, prompt, runs=60, params=params)
        assert observed.sum() > 1500 and expected.min() > 20
        statistics[mode] = float(((observed - expected) ** 2 / expected).sum())
    assert statistics["default"] < critical, statistics
    assert statistics["reference"] > critical, statistics


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"draft_steps": 0}, "draft_steps must be an integer >= 1"),
        ({"lookahead": 0}, "lookahead must be an integer >= 1"),
        ({"verification_threshold": 0}, "verification_threshold must be in"),
        ({"verification_threshold": 1.5}, "verification_threshold must be in"),
        ({"mode": "fast"}, "mode must be 'default' or 'reference'"),
    ],
)
def test_invalid_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        SpeculativeParams(**kwargs)


def test_threshold_with_exact_sampling_is_refused(model) -> None:  # type: ignore[no-untyped-def]
    sampler = SpeculativeSampler(model, params=SpeculativeParams(verification_threshold=0.5))
    with pytest.raises(InvalidParameterError, match="greedy relaxation"):
        sampler.generate(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=4))


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--sampler", "speculative", "--draft-steps", "2", "--lookahead", "3"], "acceptance_rate"),
        (["--sampler", "adaptive", "--criterion", "kl", "--exit-threshold", "0.01"], "early_exits"),
    ],
)
def test_cli_runs_the_baseline_samplers(flags: list[str], key: str) -> None:
    import json

    folder = fixture_dir("reference-huginn-layout-a")
    args = ["generate", "--model", str(folder), "--prompt-ids", "496,487,219,228,408", "--max-new-tokens", "12"]
    result = depthwave_command([*args, *flags, "--num-steps", "8", "--init-scale", "0", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert len(record["token_ids"]) == 12 and key in record["stats"]
    bad = depthwave_command([*args, *flags[:2], "--momentum", "0.2"])
    assert bad.exit_code == 2 and "has no parameter(s) ['momentum']" in bad.stderr
