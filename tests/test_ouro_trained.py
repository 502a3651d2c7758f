"""The trained Ouro test model (tests/assets/ouro-arithmetic, 1.43M parameters, Ouro's objective): it answers the
classic arithmetic problems at its 4 loops, its exit gate saves loops per token while keeping most answers, and a
gate that never fires is static decoding token for token. Speed and the other samplers: benchmarks/bench_ouro.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from depthwave import LLM, SamplingParams
from depthwave.data.arithmetic import extract_answer
from depthwave.data.tokenizer import question_prompt
from depthwave.eval.tasks.arithmetic import TEST_SET
from depthwave.samplers import registry

MODEL = Path(__file__).resolve().parent / "assets" / "ouro-arithmetic"
PROBLEMS = 64


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(MODEL), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def problems(llm: LLM) -> tuple[list[list[int]], list[int | None]]:
    rows = [json.loads(line) for line in TEST_SET.read_text().splitlines()[:PROBLEMS]]
    return [llm.encode(question_prompt(r["question"])) for r in rows], [extract_answer(r["answer"]) for r in rows]


def accuracy(results: list, answers: list[int | None]) -> float:  # type: ignore[type-arg]
    return sum(extract_answer(r.text or "") == a for r, a in zip(results, answers, strict=True)) / len(answers)


def test_it_is_a_small_ouro_model_that_answers_at_its_four_loops(llm: LLM, problems) -> None:  # type: ignore[no-untyped-def]
    assert llm.model.config.family == "ouro" and llm.model.config.mean_recurrence == 4
    assert sum(p.numel() for p in llm.model.parameters()) < 2_000_000
    prompts, answers = problems
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=96), sampler="static")
    assert accuracy(results, answers) >= 0.65  # 79.7% measured


def test_its_gate_saves_loops_and_a_gate_that_never_fires_is_static(llm: LLM, problems) -> None:  # type: ignore[no-untyped-def]
    prompts, answers = problems
    sampling = SamplingParams(temperature=0.0, max_new_tokens=96)
    static = llm.generate(prompts[:16], sampling, sampler="static")
    never = registry.make("adaptive", criterion="gate", exit_threshold=1.5, cache_mode="per-step")
    assert [r.token_ids for r in llm.generate(prompts[:16], sampling, sampler=never)] == [r.token_ids for r in static]
    skip = registry.make("adaptive", criterion="gate", exit_threshold=0.5, cache_mode="per-step")
    results = llm.generate(prompts, sampling, sampler=skip)
    loops = sum(r.stats.core_steps for r in results) / sum(r.stats.generated_tokens for r in results)
    assert loops < 3.0  # 2.49 measured: the gate exits early on most tokens
    assert accuracy(results, answers) >= 0.5  # 67.2% measured


def test_the_loop_wavefront_opens_no_draft_past_the_budget(llm: LLM, problems) -> None:  # type: ignore[no-untyped-def]
    """A 128-wide wavefront used to keep opening drafts past the last token the budget needs, until a pass ran past
    the model's context (problem 20 at 96 new tokens: 44 + 96 positions needed, 257 reached)."""
    prompts, _ = problems
    sampler = registry.make("diffusion", inner_recurrence=1)
    results = llm.generate(prompts[18:22], SamplingParams(temperature=0.0, max_new_tokens=96), sampler=sampler)
    assert all(len(r.token_ids) <= 96 for r in results)
    assert max(len(p) for p in prompts[18:22]) + 96 < llm.model.config.block_size


def test_the_per_step_loop_wavefront_gives_static_tokens_in_about_one_step_per_token(llm: LLM, problems) -> None:  # type: ignore[no-untyped-def]
    """On the trained model the drafts (a position's prediction before its last loop) are mostly right, so the
    pipeline fills: about one sampler step (one loop over the positions in flight) per token instead of four
    sequential loops, on static decoding's tokens."""
    prompts, _ = problems
    sampling = SamplingParams(temperature=0.0, max_new_tokens=96)
    static = llm.generate(prompts[:16], sampling, sampler="static")
    sampler = registry.make("diffusion", cache_mode="per-step", freeze="fixed", inner_recurrence=1)
    results = llm.generate(prompts[:16], sampling, sampler=sampler)
    assert [r.token_ids for r in results] == [r.token_ids for r in static]
    steps = sum(r.stats.sampler_steps for r in results) / sum(r.stats.generated_tokens for r in results)
    assert steps < 1.5  # 1.04 measured
