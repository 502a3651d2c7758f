"""The diffusion forcing sampler: token parity with the official implementation (reference mode), and the
properties the corrected default mode must have."""

from __future__ import annotations

import itertools
import json as json_module
from typing import Any

import pytest
import torch

from depthwave import InvalidParameterError, SamplingParams, StaticParams, StaticSampler, random_model
from depthwave.model import load_model
from depthwave.samplers import DiffusionParams, DiffusionSampler
from tests.conftest import (
    check_larger_threshold_freezes_further,
    depthwave_command,
    fixture_dir,
    fixture_json,
    micro_config,
    static_like_diffusion,
)


def _reference_params(args: dict[str, Any]) -> DiffusionParams:
    return DiffusionParams(
        inner_recurrence=args["inner_recurrence"],
        exit_threshold=args["exit_t"],
        momentum=args["ema_embeds"],
        noise=args["state_noise_mixing"],
        dampened_noise=args["dampened_state_mixer"],
        sqrt_noise=args["sqrt_mixer"],
        headway=args["headway"],
        max_wavefront=args["max_wavefront"],
        freeze=args["freeze_strategy"],
        full_prefill=args["full_prefill"],
        num_steps=args["num_steps"],
        init_scale=args["init_scale"],
        continuous_compute=args["continuous_compute"],
        max_sampler_steps=args["max_diffusion_steps"],
        cache_mode="per-step" if args["cache_lookup_strategy"] == "full" else "shared",
        mode="reference",
    )


def _run_reference_cases(name: str, select: Any = lambda case: True) -> int:
    model = load_model(fixture_dir(name), dtype=torch.float32)
    prompts = fixture_json(name, "prompts.json")["prompts"]
    checked = 0
    for case in fixture_json(name, "generate_diffusion_style.json")["cases"]:
        if not select(case):
            continue
        args, recorded = case["args"], case["stats"]
        assert case["generation_config"] == {"do_sample": False, "return_dict_in_generate": True}
        sampler = DiffusionSampler(model, params=_reference_params(args))
        prompt = prompts[case["prompt_index"]]
        result = sampler.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=args["max_new_tokens"]))
        assert result.token_ids == case["new_token_ids"], case["id"]
        stats = result.stats
        ours = (
            stats.sampler_steps,
            stats.core_forward_passes,
            stats.token_positions_forwarded,
            stats.cache_rollback_positions,
            stats.standing_waves,
        )
        theirs = (
            recorded["diffusion_steps"],
            recorded["num_core_forward_passes"],
            recorded["num_tokens_forward"],
            recorded["num_cache_clears"],
            recorded["num_standing_waves"],
        )
        assert ours == theirs, case["id"]
        if args["full_prefill"]:
            # The reference counts recurrences per position (crediting the prefill's depth to the first new
            # position); ours are per generated token, i.e. of the state one position earlier.
            counts = recorded["recurrence_per_position"][0]
            expected = counts[len(prompt) - 1 : len(prompt) - 1 + len(result.token_ids)]
            expected[1:2] = [c - args["num_steps"] for c in expected[1:2]]
            assert stats.recurrences_per_token == expected, case["id"]
        checked += 1
    return checked


@pytest.mark.slow
def test_reference_mode_matches_every_case_on_the_released_layout() -> None:
    assert _run_reference_cases("reference-huginn-layout-a") == 69


def test_reference_mode_on_another_layout_with_the_per_step_cache() -> None:
    """With the shared cache the reference maps slots for the 2/4/2 layout only (on this 1/2/1 layout it mixes
    layers), so only the cases with its "full" cache are comparable."""
    checked = _run_reference_cases("reference-tiny-a", lambda c: c["args"]["cache_lookup_strategy"] == "full")
    assert checked == 3


# ---- properties of the default mode on a random model ----------------------------------------------------------
PROMPT = [3, 141, 59, 26, 5, 35, 89]


MICRO_MODEL_SEED = 11  # the `model` fixture of conftest


def test_one_position_wavefront_without_convergence_is_static_decoding(model) -> None:  # type: ignore[no-untyped-def]
    """Exact condition: ε = 0 (a latent change is never below 0, so nothing freezes by convergence),
    max_wavefront = 1 and max_recurrences = r with r' dividing r, momentum 0, noise 0, init_scale 0, greedy.
    Then only the last frozen position is in flight; it runs r/r' steps of r' recurrences (the same r
    recurrences, in the same order, as static decoding), its prediction is frozen, and the next position starts
    from a zero state. The cache keeps each position's last recurrence: static decoding with the shared cache."""
    for r, r_inner in ((8, 4), (6, 2), (4, 1)):
        static = StaticSampler(model, params=StaticParams(num_steps=r, init_scale=0.0, cache_mode="shared"))
        expected = static.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12))
        diffusion = DiffusionSampler(model, params=static_like_diffusion(r, r_inner))
        result = diffusion.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12))
        assert result.token_ids == expected.token_ids
        assert result.stats.recurrences_per_token == [r] * 12
        assert result.stats.sampler_steps == 11 * r // r_inner


def test_larger_threshold_freezes_at_least_as_far(model) -> None:  # type: ignore[no-untyped-def]
    """Two runs with thresholds ε1 < ε2 compute exactly the same until the first step where their freeze decisions
    differ (same states, same latent changes); at that step every row converged under ε1 has converged under ε2,
    so the larger threshold has frozen strictly further. In particular it never needs more steps to its first
    freeze. (The TOTAL number of steps is not monotone in ε: freezing earlier changes the tokens and so the rest
    of the run; on this model and prompt ε = 0.1 once took 55 steps for 24 tokens where ε = 0.03 took 53.)"""
    for prompt in (PROMPT, [7, 7, 300, 12]):
        traces = []
        for eps in (0.01, 0.03, 0.1, 0.3, 1.0):
            sampler = DiffusionSampler(
                model, params=DiffusionParams(exit_threshold=eps, init_scale=0.0, num_steps=8, trace=True)
            )
            result = sampler.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True))
            traces.append(result.stats.trace)
        check_larger_threshold_freezes_further(traces)


def test_seeded_sampling_repeats(model) -> None:  # type: ignore[no-untyped-def]
    # Noise keeps a random model's states from converging, so a recurrence cap guarantees progress.
    sampler = DiffusionSampler(
        model, params=DiffusionParams(noise=0.3, init_scale=1.0, num_steps=8, max_recurrences=16)
    )
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=20, seed=5)
    first = sampler.generate(PROMPT, params)
    again = sampler.generate(PROMPT, params)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 20
    assert first.stats.recurrences_per_token == again.stats.recurrences_per_token
    other = sampler.generate(PROMPT, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=20, seed=6))
    assert other.token_ids != first.token_ids


def test_stop_token_cuts_output_and_budget_is_exact(model) -> None:  # type: ignore[no-untyped-def]
    sampler = DiffusionSampler(model, params=DiffusionParams(init_scale=0.0, num_steps=8))
    free = sampler.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=30))
    assert len(free.token_ids) == 30 and free.finish_reason == "length"
    stop = free.token_ids[9]
    cut = free.token_ids.index(stop)
    stopped = sampler.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=(stop,)))
    assert stopped.token_ids == free.token_ids[: cut + 1] and stopped.finish_reason == "stop"
    streamed: list[int] = []
    again = sampler.generate(
        PROMPT, SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=(stop,)), on_token=streamed.append
    )
    assert streamed == again.token_ids == stopped.token_ids
    # The reference mode returns every frozen token: not cut at the stop token nor at the budget.
    # Its loop runs while fewer than the budget are frozen, so it returns exactly what the last step froze up to.
    params = DiffusionParams(init_scale=0.0, num_steps=8, mode="reference", trace=True)
    uncut = DiffusionSampler(model, params=params).generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=10))
    last = uncut.stats.trace[-1]  # type: ignore[index]
    assert last["frozen_before"] - len(PROMPT) < 10 <= last["frozen_after"] - len(PROMPT)
    assert len(uncut.token_ids) == last["frozen_after"] - len(PROMPT)
    assert len(uncut.token_ids) > 10, "this case freezes two tokens in its last step: one beyond the budget"


def test_statistics_and_trace(model) -> None:  # type: ignore[no-untyped-def]
    sampler = DiffusionSampler(model, params=DiffusionParams(init_scale=0.0, num_steps=8, trace=True, max_wavefront=6))
    result = sampler.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=16))
    stats = result.stats
    trace = stats.trace
    assert len(trace) == stats.sampler_steps > 0
    assert stats.core_forward_passes == 1 + 4 * stats.sampler_steps
    assert stats.token_positions_forwarded == len(PROMPT) + 4 * sum(s["size"] for s in trace)
    assert max(s["size"] for s in trace) <= 6
    assert stats.mean_wavefront == pytest.approx(sum(s["size"] for s in trace) / len(trace))
    assert stats.standing_waves == sum(1 for s in trace if s["size"] + 1 > 6)
    assert all(b["start"] >= a["start"] for a, b in itertools.pairwise(trace))
    assert trace[-1]["frozen_after"] - len(PROMPT) >= 16
    assert len(stats.recurrences_per_token) == 16 and stats.recurrences_per_token[0] == 8
    assert result.stats.core_steps == sum(stats.recurrences_per_token)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner_recurrence": 0}, "inner_recurrence must be an integer >= 1"),
        ({"exit_threshold": -1}, "exit_threshold must be a number >= 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"noise": 2}, r"noise must be in \[0, 1\]"),
        ({"headway": 0}, "headway must be an integer >= 1"),
        ({"max_wavefront": 1}, "max_wavefront must be at least 2 unless max_recurrences is set"),
        ({"freeze": "eager"}, "freeze must be one of"),
        ({"mode": "fast"}, "mode must be 'default' or 'reference'"),
        ({"cache_mode": "full"}, "cache_mode must be one of"),
        ({"max_recurrences": 0}, "max_recurrences must be None or an integer >= 1"),
    ],
)
def test_invalid_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        DiffusionParams(**kwargs)


def test_cli_diffusion_with_trace(tmp_path) -> None:  # type: ignore[no-untyped-def]

    folder = fixture_dir("reference-huginn-layout-a")
    png = tmp_path / "trace.png"
    args = [
        "generate",
        "--model",
        str(folder),
        "--prompt-ids",
        "496,487,219,228,408",
        "--sampler",
        "diffusion",
        "--num-steps",
        "8",
        "--init-scale",
        "0",
        "--max-new-tokens",
        "20",
        "--trace-out",
        str(png),
        "--json",
    ]
    result = depthwave_command(args)
    assert result.exit_code == 0, result.output
    record = json_module.loads(result.stdout)
    assert len(record["token_ids"]) == 20 and record["stats"]["sampler_steps"] > 0
    assert png.stat().st_size > 10_000 and png.with_suffix(".json").is_file()
    again = tmp_path / "again.png"
    rendered = depthwave_command(["trace", str(png.with_suffix(".json")), "--out", str(again)])
    assert rendered.exit_code == 0, rendered.output
    assert again.stat().st_size > 10_000
    static = depthwave_command([*args[:-3], "--sampler", "static", "--trace-out", str(png)])
    assert static.exit_code == 2 and "use it with --sampler diffusion" in static.stderr


@pytest.mark.parametrize("headway", [1, 16])
def test_runs_to_the_end_of_the_context_as_static_decoding_does(headway: int) -> None:
    """The wavefront reaching the end of the context opens no more positions, and the ones in flight are refined
    until they freeze: the output fills the room the context has (here 64 - 29 = 35 tokens), as static AR does."""
    short = random_model(micro_config(block_size=64, mean_recurrence=4), seed=11)
    prompt = [(7 * i) % 500 + 1 for i in range(29)]
    # A random model's latents hardly settle: max_recurrences freezes each position after 8, as a trained one would.
    params = DiffusionParams(headway=headway, init_scale=0.0, num_steps=4, max_recurrences=8)
    sampler = DiffusionSampler(short, params=params)
    fills = sampler.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=300, ignore_eos=True, seed=1))
    assert len(fills.token_ids) == 64 - 29 and fills.finish_reason == "length"
    static = StaticSampler(short, params=StaticParams(num_steps=4, init_scale=0.0))
    assert len(static.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=300)).token_ids) == 35
    budget = sampler.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True, seed=1))
    assert len(budget.token_ids) == 20 and budget.token_ids == fills.token_ids[:20]
