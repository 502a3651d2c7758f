"""On CUDA (skipped without it; `benchmarks/gpu_check.sh` runs them on a GPU machine): the engine on the GPU gives
the CPU's greedy tokens on the built-in model, and the compiled pass with CUDA graphs gives the eager tokens, batched
as alone, without recording graphs again once warm."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from depthwave import LLM, SamplingParams
from depthwave.engine import Request
from depthwave.samplers import registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QUESTIONS = [
    "Sara buys 8 pens for 58 dollars each and 6 cups for 54 dollars each. How many dollars does Sara spend?",
    "A shop gets 26 stamps on Wednesday, 68 stamps on Friday and 92 stamps on Tuesday. It sells 168 stamps.",
]
SAMPLERS = {"static": {"cache_mode": "shared"}, "diffusion": {}}


def tokens(llm: LLM, name: str, rows: int, compile: bool = False) -> list[list[int]]:
    params = registry.make(name, **SAMPLERS[name])
    sampling = SamplingParams(temperature=0.0, max_new_tokens=32, seed=0)
    requests = [Request(llm.encode(q, chat=True), sampling, params) for q in QUESTIONS]
    engine = llm.engine(requests, params.cache_mode, max_num_seqs=rows, compile=compile)
    return [r.token_ids for r in engine.run(requests)]


@pytest.fixture(scope="module")
def gpu_llm() -> LLM:
    return LLM("builtin", device="cuda", dtype="float32")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_engine_on_cuda_gives_the_cpu_tokens(builtin_llm: LLM, gpu_llm: LLM, name: str) -> None:
    assert tokens(gpu_llm, name, rows=2) == tokens(builtin_llm, name, rows=2)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_compiled_with_cuda_graphs_gives_the_eager_tokens_batched_as_alone(gpu_llm: LLM, name: str) -> None:
    eager = tokens(gpu_llm, name, rows=1)
    assert tokens(gpu_llm, name, rows=1, compile=True) == eager
    assert tokens(gpu_llm, name, rows=2, compile=True) == eager
    graphs: Any = dict(counters["stats"])
    assert tokens(gpu_llm, name, rows=2, compile=True) == eager  # warm: nothing compiles again
    assert dict(counters["stats"]) == graphs
