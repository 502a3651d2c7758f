"""Properties of the batched engine under random schedules (hypothesis): arrivals at random steps, aborts of
waiting and running requests, the four samplers mixed, greedy and seeded sampling, token budgets, row counts and
KV budgets. After each schedule every request finished or was aborted, no row or KV position is held, and every
finished request's tokens are those it gets alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from depthwave import SamplingParams  # noqa: E402
from depthwave.engine import Request  # noqa: E402
from depthwave.engine.policy import sizing  # noqa: E402
from depthwave.llm import LLM  # noqa: E402
from depthwave.samplers import registry  # noqa: E402

QUESTIONS = ["What is 3 + 4?", "What is 17 * 24?", "A shop has 26 stamps and gets 68 more. How many?"]
# Each sampler through the registry, on the engine's shared cache, shallow enough to keep the examples quick.
SAMPLERS = {
    "static": {"num_steps": 8},
    "adaptive": {"criterion": "kl", "exit_threshold": 1e-3, "num_steps": 8},
    "speculative": {"draft_steps": 2, "lookahead": 3, "num_steps": 8},
    "diffusion": {"inner_recurrence": 4, "max_recurrences": 8},
}


@dataclass(frozen=True)
class Arrival:
    question: int
    sampler: str
    temperature: float
    seed: int
    budget: int
    step: int
    """The engine step before which it is added."""
    abort_at: int | None
    """The step before which it is aborted (if it has arrived and not finished by then)."""


arrivals = st.builds(
    Arrival,
    question=st.integers(0, len(QUESTIONS) - 1),
    sampler=st.sampled_from(list(SAMPLERS)),
    temperature=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 3),
    budget=st.integers(1, 8),
    step=st.integers(0, 6),
    abort_at=st.none() | st.integers(0, 10),
)
schedules = st.fixed_dictionaries(
    {
        "arrivals": st.lists(arrivals, min_size=1, max_size=5),
        "rows": st.integers(1, 3),
        # KV budget: this many times the largest request's positions (None: every row's full length).
        "kv_factor": st.sampled_from([1, 2, None]),
    }
)


@pytest.fixture(scope="module")
def llm(builtin_llm: LLM) -> LLM:
    return builtin_llm


def make_request(llm: LLM, arrival: Arrival) -> Request:
    sampler = registry.make(arrival.sampler, engine_cache="shared", **SAMPLERS[arrival.sampler])
    sampling = SamplingParams(
        temperature=arrival.temperature, max_new_tokens=arrival.budget, seed=arrival.seed, ignore_eos=True
    )
    return Request(llm.encode(QUESTIONS[arrival.question], chat=True), sampling, sampler)


def run_schedule(llm: LLM, schedule: dict[str, Any]) -> tuple[Any, list[Request], dict[str, Any]]:
    plan: list[Arrival] = schedule["arrivals"]
    requests = [make_request(llm, a) for a in plan]
    config: dict[str, Any] = {"max_num_seqs": schedule["rows"], "prefill_batch": 1}
    if schedule["kv_factor"] is not None:
        largest = max(sizing(r.sampler, len(r.prompt_token_ids), r.sampling, llm.model.config).cache for r in requests)
        config["max_cached_positions"] = schedule["kv_factor"] * largest
    engine = llm.engine(requests, "shared", **config)
    results: dict[str, Any] = {}
    step = 0
    while step <= max(a.step for a in plan) or engine.has_unfinished:
        for arrival, request in zip(plan, requests, strict=True):
            if arrival.step == step:
                engine.add(request)
            if arrival.abort_at == step and arrival.step <= step:
                engine.abort(request.request_id)
        for output in engine.step():
            if output.result is not None:
                results[output.request_id] = output.result
        assert len(engine.scheduler.running) <= schedule["rows"]
        step += 1
        assert step < 500, "the schedule did not finish"
    return engine, requests, results


@settings(max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(schedule=schedules)
def test_random_schedules_finish_everything_leak_nothing_and_match_runs_alone(
    llm: LLM, schedule: dict[str, Any]
) -> None:
    engine, requests, results = run_schedule(llm, schedule)
    # Every request finished or was aborted, exactly once, and the engine holds nothing.
    assert set(results) == {r.request_id for r in requests}
    assert not engine.requests and not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.scheduler.reserved == 0, "KV positions still reserved"
    assert engine.config.max_num_seqs - len(engine.scheduler.running) == schedule["rows"]
    assert engine.pool.lengths == [0] * engine.config.max_num_seqs, f"rows still hold positions: {engine.pool.lengths}"
    for arrival, request in zip(schedule["arrivals"], requests, strict=True):
        result = results[request.request_id]
        hypothesis.event(f"{arrival.sampler} {result.finish_reason}")
        if result.finish_reason == "abort":
            assert arrival.abort_at is not None and len(result.token_ids) < arrival.budget
            continue
        assert result.finish_reason == "length" and len(result.token_ids) == arrival.budget
        alone = llm.generate(request.prompt_token_ids, request.sampling, sampler=request.sampler)[0]
        assert result.token_ids == alone.token_ids, (arrival, result.token_ids, alone.token_ids)


def test_a_freed_row_has_no_cached_positions(llm: LLM) -> None:
    request = make_request(llm, Arrival(0, "static", 0.0, 0, 2, 0, None))
    engine = llm.engine([request], "shared")
    engine.run([request])
    assert engine.pool.lengths == [0] * engine.config.max_num_seqs
