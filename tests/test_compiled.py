"""The compiled pass (`EngineConfig(compile=True)`): the same greedy tokens as the eager pass for every sampler, batch
invariance, one graph per stage and bucket with no breaks, and no recompilation after warm-up in a long mixed run.

Most checks use dynamo's eager backend: the graphs, guards, padding and cache writes that inductor gets, run by
eager kernels without generating code (their time is mostly tracing, about a third of what AOT tracing takes).
Static and diffusion decoding on the built-in model also run under inductor, the backend users get, whose kernels
round differently (about 11 minutes for all four samplers, so two stand for the rest)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from depthwave import LLM, SamplingParams
from depthwave.engine import Engine, EngineConfig, Request
from depthwave.model import compiled
from depthwave.model.compiled import StaticCall, static_call
from depthwave.samplers import registry
from depthwave.samplers.frontend import Sampler
from tests.conftest import fixture_dir, fixture_json

pytestmark = pytest.mark.slow

SHARED = {"static": {"cache_mode": "shared"}, "speculative": {"cache_mode": "shared"}}
QUESTIONS = [
    "Sara buys 8 pens for 58 dollars each and 6 cups for 54 dollars each. How many dollars does Sara spend?",
    "Tom buys 5 shirts for 40 dollars each and 7 hats for 80 dollars each. How many dollars does Tom spend?",
    "A shop gets 26 stamps on Wednesday, 68 stamps on Friday and 92 stamps on Tuesday. It sells 168 stamps.",
]


def sampler(name: str, **extra: Any) -> Any:
    return registry.make(name, **{**SHARED.get(name, {}), **extra})


def generate(
    llm: LLM, prompts: list[list[int]], name: str, compile: bool, rows: int, tokens: int = 48, **extra: Any
) -> list[Any]:
    params = sampler(name, **extra)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=tokens, seed=0)
    requests = [Request(p, sampling, params) for p in prompts]
    engine = llm.engine(requests, params.cache_mode, max_num_seqs=rows, compile=compile)
    return [r.token_ids for r in engine.run(requests)]


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "BACKEND", "eager")


@pytest.mark.parametrize(
    "name, backend",
    [("static", "inductor"), ("diffusion", "inductor"), ("adaptive", "eager"), ("speculative", "eager")],
)
def test_compiled_gives_the_eager_tokens_on_the_builtin_model(
    builtin_llm: LLM, name: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled, "BACKEND", backend)
    prompts = [builtin_llm.encode(q, chat=True) for q in QUESTIONS]
    eager = generate(builtin_llm, prompts, name, compile=False, rows=1)
    assert generate(builtin_llm, prompts, name, compile=True, rows=1) == eager
    # Batched and compiled: the same tokens as one at a time (rows of 2 and 3 share one graph per bucket).
    assert generate(builtin_llm, prompts, name, compile=True, rows=3) == eager


@pytest.mark.parametrize("fixture", ["reference-huginn-layout-a"])
@pytest.mark.usefixtures("traced")
def test_compiled_gives_the_eager_tokens_on_the_fixtures(fixture: str) -> None:
    llm = LLM(fixture_dir(fixture), device="cpu", dtype="float32")
    prompts = [[496, 487, 219, 228, 408], [17, 33, 210, 5, 91, 12, 8]]
    for name in ("diffusion",):  # the wavefront's many shapes; static runs compiled on the built-in model
        extra = {"init_scale": 0.0}
        eager = generate(llm, prompts, name, compile=False, rows=2, tokens=16, **extra)
        assert generate(llm, prompts, name, compile=True, rows=2, tokens=16, **extra) == eager, name


def test_compiled_stages_agree_with_eager_within_float_tolerance(builtin_llm: LLM) -> None:
    """Under inductor: its kernels round differently from eager, within float tolerance."""
    model = builtin_llm.model
    engine = Engine(model, None, (), EngineConfig(max_num_seqs=2, max_model_len=64, compile=True))
    pool, stages = engine.pool, engine.stages
    torch.manual_seed(0)
    with torch.inference_mode():
        prompt = model.positions([0, 0], [20, 20], slice(0, 2))
        model.prelude(torch.randint(0, 500, (2, 20)), prompt, pool)  # eager prefill fills the cache
        at = model.positions([20, 17], [3, 4], slice(0, 2))
        state = torch.randn(2, 4, model.config.n_embd)
        ids = torch.randint(0, 500, (2, 4))
        eager = model.core_step(state, model.prelude(ids, at, pool), at, pool)
        at = model.positions([20, 17], [3, 4], slice(0, 2))
        fast = stages.core_step(state, stages.prelude(ids, at, pool), at, pool)  # type: ignore[union-attr]
    valid = at.valid()
    torch.testing.assert_close(fast[valid], eager[valid], rtol=1e-4, atol=1e-4)


def test_static_calls_pad_to_a_bucket_and_refuse_what_must_run_eagerly(builtin_llm: LLM) -> None:
    model = builtin_llm.model
    call = static_call(model.positions([10, 12], [3, 1], slice(0, 2)), model.rope)
    assert isinstance(call, StaticCall) and call.width == 4
    assert call.old_bias.shape == (2, 1, 1, 12) and call.new_bias.shape == (2, 1, 4, 4)
    assert call.real is not None and call.real.tolist() == [0, 1, 2, 4]
    assert torch.isinf(call.old_bias[0, 0, 0, 10:]).all() and not torch.isinf(call.old_bias[1, 0, 0]).any()
    assert static_call(model.positions([10], [9], slice(0, 1)), model.rope) is None  # wider than 8
    assert static_call(model.positions([1], [1], slice(0, 1)), model.rope) is None  # one cached key
    assert static_call(model.positions([0], [20], slice(0, 1)), model.rope) is None  # a prefill from 0
    # With exact widths (the CPU), two rows or more pad only to the widest row, and that width is dynamic.
    exact = static_call(model.positions([10, 12], [3, 1], slice(0, 2)), model.rope, exact_width=True)
    assert exact is not None and exact.width == 3 and exact.dynamic_width
    assert exact.new_bias.shape == (2, 1, 3, 3) and exact.real is not None and exact.real.tolist() == [0, 1, 2, 3]
    one = static_call(model.positions([10], [3], slice(0, 1)), model.rope, exact_width=True)
    assert one is not None and one.width == 4 and not one.dynamic_width  # a single row keeps its bucket
    ones = static_call(model.positions([10, 12], [1, 1], slice(0, 2)), model.rope, exact_width=True)
    assert ones is not None and ones.width == 1 and not ones.dynamic_width  # a dimension of 1 is never dynamic


@pytest.mark.usefixtures("traced")
def test_key_blocks_as_on_cuda_pad_the_cached_keys_and_keep_the_eager_tokens(builtin_llm: LLM) -> None:
    """CUDA graphs record one graph per shape, so on CUDA the cached keys are read in blocks of 64 (the bias hides
    the extra ones). The same padding on the CPU, with a block of 16, must not change a token."""
    model = builtin_llm.model
    call = static_call(model.positions([10, 12], [3, 1], slice(0, 2)), model.rope, key_block=16, max_keys=40)
    assert call is not None and call.old_bias.shape == (2, 1, 1, 16)
    assert torch.isinf(call.old_bias[0, 0, 0, 10:]).all() and torch.isinf(call.old_bias[1, 0, 0, 12:]).all()
    capped = static_call(model.positions([33], [1], slice(0, 1)), model.rope, key_block=16, max_keys=40)
    assert capped is not None and capped.old_bias.shape[-1] == 40
    prompts = [builtin_llm.encode(q, chat=True) for q in QUESTIONS[:2]]
    for name in ("static", "diffusion"):
        params = sampler(name)
        sampling = SamplingParams(temperature=0.0, max_new_tokens=24, seed=0)
        runs = []
        for block in (None, 16):
            requests = [Request(p, sampling, params) for p in prompts]
            engine = builtin_llm.engine(requests, params.cache_mode, max_num_seqs=2)  # a fresh engine each time
            if block is not None:
                engine.stages = compiled.CompiledModel(model, engine.pool, key_block=block)
            runs.append([r.token_ids for r in engine.run(requests)])
        assert runs[0] == runs[1], name


@pytest.mark.usefixtures("traced")
def test_no_graph_breaks_and_no_recompiles_after_warmup_in_a_mixed_run(builtin_llm: LLM) -> None:
    """64 requests of all four samplers (shared cache) through one engine of 16 rows with continuous batching, then
    batches of every width (what the warm-up compiled serves them all)."""
    torch._dynamo.reset()
    counters.clear()
    llm = builtin_llm
    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, EngineConfig(max_num_seqs=16, compile=True))
    engine.warmup()
    warm = counters["stats"]["unique_graphs"]
    names = ["static", "adaptive", "speculative", "diffusion"]
    requests = [
        Request(
            llm.encode(QUESTIONS[i % 3], chat=True),
            SamplingParams(temperature=0.0, max_new_tokens=4 + i % 5, seed=i),
            sampler(names[i % 4], **({"num_steps": 4} if names[i % 4] != "diffusion" else {})),
        )
        for i in range(64)
    ]
    results = engine.run(requests)
    assert len(results) == 64 and all(r.token_ids for r in results)
    assert counters["stats"]["unique_graphs"] == warm, "a graph was compiled after warm-up"
    every_width_agrees_with_eager(llm.model, engine)
    assert counters["stats"]["unique_graphs"] == warm, "a width compiled a graph of its own"
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def every_width_agrees_with_eager(model: Any, engine: Engine) -> None:
    """From two rows on, one graph per stage serves every width up to 8 (the warm-up compiled it with one): batches
    of mixed widths, each call padded only to its widest row, within 1e-4 of eager."""
    pool, stages = engine.pool, engine.stages
    assert isinstance(stages, compiled.CompiledModel)
    torch.manual_seed(0)
    with torch.inference_mode():
        model.prelude(torch.randint(0, 500, (5, 20)), model.positions([0] * 5, [20] * 5, slice(0, 5)), pool)
        for sizes in ([3, 5], [2, 7, 1, 8, 6], [6, 6, 6], [1, 1, 1, 1]):
            batch, starts = len(sizes), [20 - size for size in sizes]
            state = torch.randn(batch, max(sizes), model.config.n_embd)
            ids = torch.randint(0, 500, (batch, max(sizes)))
            at = model.positions(starts, sizes, slice(0, batch))
            eager = model.recur_then_coda(state, model.prelude(ids, at, pool), 8, at, pool)[1]
            at = model.positions(starts, sizes, slice(0, batch))
            fast = stages.recur_then_coda(state, stages.prelude(ids, at, pool), 8, at, pool)[1]
            call = at.memo["static"]
            assert call is not None and call.width == max(sizes) and call.dynamic_width == (max(sizes) > 1)
            valid = at.valid()
            torch.testing.assert_close(fast[valid], eager[valid], rtol=1e-4, atol=1e-4)


def test_the_compiled_graphs_hold_no_complex_tensor(builtin_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor generates no code for complex tensors: a complex op in a graph runs as a call of its own, outside
    the fused kernels (the rotation as complex products made the compiled diffusion pass at B = 1 about 1.5x slower
    on the CPU: 12.8 against 8.3 ms per pass). Every graph rotates in real arithmetic."""
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(compiled, "BACKEND", recording)
    torch._dynamo.reset()
    engine = Engine(builtin_llm.model, None, (), EngineConfig(max_num_seqs=1, max_model_len=32, compile=True))
    engine.stages.warmup(rows=(1,), widths=(4,))  # type: ignore[union-attr]
    assert len(graphs) == 5  # prelude, one recurrence, the unrolled loop, the loop then the coda, coda
    for gm in graphs:
        values = [node.meta.get("example_value") for node in gm.graph.nodes]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        assert tensors and not any(v.is_complex() for v in tensors), gm.graph
    torch._dynamo.reset()


@pytest.mark.usefixtures("traced")
def test_a_second_engine_on_the_same_model_compiles_nothing() -> None:
    """Dynamo keeps compiled graphs per stage function, guarded on the model and the inputs' shapes, not on an
    engine or its KV pool: another engine, of another size, on the same model reuses every graph."""
    torch._dynamo.reset()
    counters.clear()
    llm = LLM("builtin", device="cpu")
    prompts = [llm.encode(q, chat=True) for q in QUESTIONS[:2]]
    first = generate(llm, prompts, "static", compile=True, rows=2, tokens=8)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    assert generate(llm, prompts, "static", compile=True, rows=3, tokens=8) == first
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


@pytest.mark.usefixtures("traced")
def test_llm_reuses_its_compiled_engine_across_calls() -> None:
    """`LLM` keeps its compiled engine, so a second call compiles nothing and reports its own statistics."""
    torch._dynamo.reset()
    counters.clear()
    llm = LLM("builtin", device="cpu", max_num_seqs=2, compile=True)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8)
    first, first_stats = llm.run_with_stats([Request(llm.encode(QUESTIONS[0], chat=True), sampling, sampler("static"))])
    graphs = counters["stats"]["unique_graphs"]
    again, again_stats = llm.run_with_stats([Request(llm.encode(QUESTIONS[0], chat=True), sampling, sampler("static"))])
    assert counters["stats"]["unique_graphs"] == graphs > 0
    assert again[0].token_ids == first[0].token_ids
    assert again_stats.decode_passes == first_stats.decode_passes
    torch._dynamo.reset()


@pytest.mark.usefixtures("traced")
def test_the_one_prompt_front_end_reuses_its_compiled_engine(builtin_llm: LLM) -> None:
    torch._dynamo.reset()
    counters.clear()
    one = Sampler(builtin_llm.model, builtin_llm.tokenizer, builtin_llm.stop_token_ids, sampler("static"), compile=True)
    ids = builtin_llm.encode(QUESTIONS[1], chat=True)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8)
    first = one.generate(ids, sampling)
    graphs = counters["stats"]["unique_graphs"]
    abandoned = one.stream(ids, sampling)
    next(iter(abandoned))  # a stream left unfinished: its engine is not reused
    assert one.generate(ids, sampling).token_ids == first.token_ids
    assert one.generate(ids, sampling).token_ids == first.token_ids
    assert counters["stats"]["unique_graphs"] <= 2 * graphs
    torch._dynamo.reset()


@pytest.mark.usefixtures("traced")
def test_compiled_adaptive_compute_on_the_per_step_cache_hides_what_eager_hides(builtin_llm: LLM) -> None:
    """On the per-step cache, positions that exited before a recurrence are hidden from the later tokens at that
    recurrence: the hiding call is its own compiled call (it once reused the unhidden call's memoised inputs)."""
    prompts = [builtin_llm.encode(q, chat=True) for q in QUESTIONS]
    extra = {"cache_mode": "per-step"}
    eager = generate(builtin_llm, prompts, "adaptive", compile=False, rows=2, tokens=12, **extra)
    assert generate(builtin_llm, prompts, "adaptive", compile=True, rows=2, tokens=12, **extra) == eager


@pytest.mark.usefixtures("traced")
def test_a_diffusion_step_at_one_row_is_two_graph_calls(builtin_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last recurrences and the coda run as one graph when every row ends its recurrences together: a diffusion
    step (r' = 4) at B = 1 is the prelude's call and that one, and gives the eager tokens."""
    calls: list[str] = []
    run = compiled.CompiledModel._run

    def counting(self: Any, graph: Any, *args: Any) -> Any:
        calls.append(graph.__name__)
        return run(self, graph, *args)

    monkeypatch.setattr(compiled.CompiledModel, "_run", counting)
    prompts = [builtin_llm.encode(QUESTIONS[0], chat=True)]
    eager = generate(builtin_llm, prompts, "diffusion", compile=False, rows=1, tokens=16)
    assert generate(builtin_llm, prompts, "diffusion", compile=True, rows=1, tokens=16) == eager
    assert calls and set(calls) == {"_prelude_graph", "_finish_graph"}
    assert calls.count("_prelude_graph") == calls.count("_finish_graph")


@pytest.mark.usefixtures("traced")
def test_compiled_ouro_gives_the_eager_tokens() -> None:
    """Ouro has no prelude or coda layers: its last loops and the (empty) coda are one graph that writes only the
    loops' slots."""
    llm = LLM(fixture_dir("ouro-a"), device="cpu", dtype="float32")
    prompts = fixture_json("ouro-a", "prompts.json")["prompts"][:2]
    for name in ("static", "diffusion"):
        eager = generate(llm, prompts, name, compile=False, rows=2, tokens=12)
        assert generate(llm, prompts, name, compile=True, rows=2, tokens=12) == eager, name
        assert generate(llm, prompts, name, compile=True, rows=1, tokens=12) == eager, name
