"""Parity with outputs recorded from the official implementation (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from depthwave.model import load_model
from depthwave.samplers import SamplingParams, StaticParams, StaticSampler
from tests.conftest import REFERENCE_FIXTURES, fixture_dir, fixture_json

ATOL = 1e-4


@pytest.mark.parametrize("name", REFERENCE_FIXTURES)
def test_forward_logits_and_latents(name: str) -> None:
    folder = fixture_dir(name)
    model = load_model(folder, dtype=torch.float32)
    prompts = fixture_json(name, "prompts.json")["prompts"]
    tensors = load_file(folder / "forward_tensors.safetensors")
    cases = fixture_json(name, "forward.json")["cases"]
    assert len(cases) == 12
    for case in cases:
        ids = torch.tensor([prompts[case["prompt_index"]]])
        out = model(ids, num_steps=case["args"]["num_steps"], init_scale=0.0)
        for ours, key in ((out.logits[0], "logits"), (out.latents[0], "latent_states")):
            expected = tensors[case["tensors"][key]]
            torch.testing.assert_close(
                ours, expected, atol=ATOL, rtol=0, msg=lambda m, c=case, k=key: f"{c['id']} {k}: {m}"
            )
        assert out.logits[0].argmax(-1).tolist() == case["argmax_token_ids"]


@pytest.mark.parametrize("name", REFERENCE_FIXTURES)
def test_stage_entry_points_match_reference_trace(name: str) -> None:
    """prelude, every core step and coda+head, checked one stage at a time."""
    folder = fixture_dir(name)
    model = load_model(folder, dtype=torch.float32)
    trace = load_file(folder / "forward_trace.safetensors")
    ids = torch.tensor([fixture_json(name, "prompts.json")["prompts"][1]])
    torch.testing.assert_close(model.embed(ids)[0], trace["embeddings_scaled"], atol=ATOL, rtol=0)
    embedded = model.prelude(ids)
    torch.testing.assert_close(embedded[0], trace["prelude_out"], atol=ATOL, rtol=0)
    steps = sorted(k for k in trace if k.startswith("state_after_step"))
    assert len(steps) == model.config.mean_recurrence
    state = model.initial_state(embedded, init_scale=0.0)
    for step, key in enumerate(steps):
        state = model.core_step(state, embedded, step=step)
        torch.testing.assert_close(state[0], trace[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    logits, latents = model.coda_logits(state)
    torch.testing.assert_close(latents[0], trace["latent_ln_f"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[0], trace["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", REFERENCE_FIXTURES)
def test_generate_minimal_greedy_tokens(name: str) -> None:
    folder = fixture_dir(name)
    model = load_model(folder, dtype=torch.float32)
    prompts = fixture_json(name, "prompts.json")["prompts"]
    cases = fixture_json(name, "generate_minimal.json")["cases"]
    assert {c["args"]["continuous_compute"] for c in cases} == {True, False}
    for case in cases:
        args, gen = case["args"], case["generation_config"]
        assert args["cache_lookup_strategy"] == "full"
        stops = [gen["eos_token_id"]] if "eos_token_id" in gen else []
        sampler = StaticSampler(
            model,
            default_stop_ids=stops,
            params=StaticParams(
                num_steps=args["num_steps"],
                init_scale=args["init_scale"],
                continuous_compute=args["continuous_compute"],
                cache_mode="per-step",
            ),
        )
        result = sampler.generate(
            prompts[case["prompt_index"]], SamplingParams(temperature=0.0, max_new_tokens=args["max_new_tokens"])
        )
        assert result.token_ids == case["new_token_ids"], case["id"]
        assert result.finish_reason == ("stop" if stops else "length"), case["id"]
