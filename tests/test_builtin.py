"""The built-in model that ships in the package: it loads through the Huginn code path and solves problems."""

from __future__ import annotations

import json

import pytest

from depthwave import LLM, SamplingParams
from depthwave.data.arithmetic import extract_answer, make_split, make_unseen
from depthwave.data.tokenizer import question_prompt
from depthwave.model.loading import BUILTIN_DIR

TEST_SET = BUILTIN_DIR.parent / "arithmetic" / "test.jsonl"
UNSEEN_SET = BUILTIN_DIR.parent / "arithmetic" / "unseen.jsonl"


def test_shipped_test_set_is_the_generated_split() -> None:
    records = [json.loads(line) for line in TEST_SET.read_text().splitlines()]
    assert len(records) == 500
    assert records == [p.to_record() for p in make_split("test", 500, seed=0)]


def test_shipped_unseen_set_is_the_generated_set() -> None:
    records = [json.loads(line) for line in UNSEEN_SET.read_text().splitlines()]
    assert len(records) == 500
    assert records == [{**p.to_record(), "kind": p.template} for p in make_unseen(500, seed=0)]


@pytest.mark.slow
def test_builtin_model_loads_like_huginn_and_solves_problems(builtin_llm: LLM) -> None:
    llm = builtin_llm
    config = llm.model.config
    assert (config.n_layers_in_prelude, config.n_layers_in_recurrent_block, config.n_layers_in_coda) == (2, 4, 2)
    assert llm.tokenizer is not None and llm.tokenizer.chat_template
    assert sum(f.stat().st_size for f in BUILTIN_DIR.iterdir()) <= 20 * 2**20
    problems = make_split("test", 10, seed=0)
    sampler = llm.sampler("static", init_scale=1.0)
    correct = 0
    for index, problem in enumerate(problems):
        result = sampler.generate(
            llm.encode(question_prompt(problem.question)),
            SamplingParams(temperature=0.0, max_new_tokens=128, seed=index),
        )
        assert result.finish_reason == "stop", result.text
        correct += extract_answer(result.text or "") == problem.answer
    assert correct >= 7, f"{correct}/10"
