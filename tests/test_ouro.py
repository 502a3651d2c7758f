"""Ouro (ByteDance's LoopLMs) against the official modeling code's recorded outputs (`../shared/fixtures/ouro-a`):
loading, every loop's logits, the gate and the exit distribution, the official exit rules, every stage of one
traced forward and its cache, and greedy generation through the engine; plus a random GQA variant (cached equals
uncached, save and load) and the loader's errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from depthwave import LLM, SamplingParams
from depthwave.errors import CheckpointError, ConfigError, InvalidParameterError
from depthwave.model import KVPool, load_model, ouro, random_model, save_model
from depthwave.model.config import HuginnConfig
from depthwave.model.model import RecurrentDepthModel
from depthwave.samplers import registry
from tests.conftest import fixture_dir, fixture_json

FIXTURE = "ouro-a"
TOLERANCE = 1e-4  # the observed maximum is 1.1e-5 (reference eager vs SDPA differ by as much)


@pytest.fixture(scope="module")
def model() -> RecurrentDepthModel:
    return load_model(fixture_dir(FIXTURE), dtype="float32")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return fixture_json(FIXTURE, "prompts.json")["prompts"]


def loops(model: RecurrentDepthModel, prompt: list[int], cache: KVPool | None = None) -> torch.Tensor:
    """[T, S, D] the normed state after each loop, uncached (or writing `cache`)."""
    ids = torch.tensor([prompt])
    at = model.positions([0], [len(prompt)], cached=cache is not None)
    with torch.inference_mode():
        state = model.initial_state(model.prelude(ids, at, cache))
        states = []
        for step in range(model.config.mean_recurrence):
            state = model.core_step(state, state, at, cache, step)
            states.append(state[0])
    return torch.stack(states)


def test_the_config_and_checkpoint_load_as_a_looped_stack(model: RecurrentDepthModel) -> None:
    c = model.config
    assert (c.family, c.n_layers_in_prelude, c.n_layers_in_recurrent_block, c.n_layers_in_coda) == ("ouro", 0, 3, 0)
    assert c.mean_recurrence == 4 and c.rope_style == "half" and c.rope_frequency_base == 1e6
    assert model.transformer.adapter is None and model.transformer.exit_gate is not None
    assert sum(p.numel() for p in model.parameters()) == c.num_parameters() == 207_745
    assert ouro.exit_defaults(c) == (None, 1.0)


def test_every_loop_the_gate_and_the_exit_distribution_match_the_reference(
    model: RecurrentDepthModel, prompts: list[list[int]]
) -> None:
    tensors = load_file(fixture_dir(FIXTURE) / "forward_tensors.safetensors")
    recorded = fixture_json(FIXTURE, "forward.json")
    worst = 0.0
    for i, prompt in enumerate(prompts):
        states = loops(model, prompt)
        gate = model.exit_logits(states)
        logits = model.head(states)
        pdf = ouro.exit_pdf(gate)
        ours = {"hidden_states": states, "gate_logits": gate, "exit_pdf": pdf}
        ours |= {f"step{k}.logits": logits[k] for k in range(4)}
        ours["default.logits"] = ouro.select_logits(logits, pdf, exit_threshold=1.0)
        # Recorded with the config's threshold set to null: with 1.0 the threshold rule shadows the weighted one.
        ours["weighted.logits"] = ouro.select_logits(logits, pdf, use_weighted_exit=True)
        shadowed = ouro.select_logits(logits, pdf, exit_threshold=1.0, use_weighted_exit=True)
        assert torch.equal(shadowed, ours["default.logits"])
        for threshold in ("0.25", "0.5", "0.75", "1.0"):
            ours[f"thr{threshold}.logits"] = ouro.select_logits(logits, pdf, exit_threshold=float(threshold))
            chosen = ouro.threshold_exit(pdf, float(threshold)).tolist()
            assert chosen == recorded["exit_steps"][f"p{i}"][threshold], (i, threshold)
        for name, value in ours.items():
            reference = tensors[f"p{i}.{name}"]
            worst = max(worst, float((value - reference).abs().max()))
            torch.testing.assert_close(value, reference, rtol=0, atol=TOLERANCE, msg=f"p{i}.{name}")
        mixed = sum(pdf[t][:, None] * logits[t] for t in range(4))  # the head per loop, then weighted
        torch.testing.assert_close(ours["weighted.logits"], mixed)
        assert torch.equal(ouro.select_logits(logits, pdf), logits[-1])  # no rule at all: the last loop
    assert worst < 2e-5, worst


def test_out_of_range_exit_steps_are_ignored_as_the_reference_ignores_them(model: RecurrentDepthModel) -> None:
    logits, pdf = torch.randn(4, 2, 3), torch.full((4, 2), 0.25)
    for step in (4, -1):
        assert torch.equal(ouro.select_logits(logits, pdf, exit_at_step=step), logits[-1])
    assert torch.equal(ouro.select_logits(logits, pdf, exit_at_step=1, exit_threshold=0.1), logits[1])


def test_every_stage_of_the_traced_forward_and_its_cache(model: RecurrentDepthModel, prompts: list[list[int]]) -> None:
    trace = load_file(fixture_dir(FIXTURE) / "forward_trace.safetensors")
    prompt = prompts[fixture_json(FIXTURE, "forward_trace.json")["prompt_index"]]
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name: str) -> Any:
        return lambda module, args, out: seen.setdefault(name, []).append(out[0].detach().clone())

    stages = {"attn_in_normed": "norm_1", "attn_out": "attn", "attn_out_normed": "norm_2"}
    stages |= {"mlp_in_normed": "norm_3", "mlp_out": "mlp", "mlp_out_normed": "norm_4"}
    handles = []
    for j, block in enumerate(model.transformer.core_block):
        handles.append(block.register_forward_hook(record(f"layer{j}.out")))
        for stage, child in stages.items():
            handles.append(getattr(block, child).register_forward_hook(record(f"layer{j}.{stage}")))
    cache = KVPool(model.config, 32, "per-step", max_steps=4)
    try:
        states = loops(model, prompt, cache)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(model.embed(torch.tensor(prompt)), trace["embeddings"], rtol=0, atol=0)
    rotation = model.rope[: len(prompt)]
    torch.testing.assert_close(rotation.real, trace["rope_cos"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rotation.imag, trace["rope_sin"], rtol=0, atol=1e-6)
    for name, calls in seen.items():
        assert len(calls) == 4, name
        for k, value in enumerate(calls):
            torch.testing.assert_close(value, trace[f"loop{k}.{name}"], rtol=0, atol=TOLERANCE, msg=name)
    for k in range(4):
        torch.testing.assert_close(states[k], trace[f"loop{k}.normed_state"], rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(model.exit_logits(states[k]), trace[f"loop{k}.gate_logits"], rtol=0, atol=TOLERANCE)
        for j in range(3):
            slot, length = cache.core_slot(k, j), len(prompt)
            for kind, store in (("key", cache.keys), ("value", cache.values)):
                ours = store[slot, 0, :, :length]
                torch.testing.assert_close(ours, trace[f"cache.{kind}.loop{k}.layer{j}"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(model.head(states[-1]), trace["logits"], rtol=0, atol=TOLERANCE)


def generation_cases() -> list[dict[str, Any]]:
    path = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / FIXTURE / "generate.json"
    if not path.is_file():
        return []
    return [c for c in json.loads(path.read_text())["cases"] if "prompt_index" in c and "error" not in c]


def sampler_for(case: dict[str, Any]) -> Any:
    """The sampler that reproduces a case, or the reason none does. exit_at_step k selects loop k's logits; loop k
    reads only loop-k keys, so static decoding at k + 1 loops gives the same tokens. A threshold is the adaptive
    sampler's gate criterion with every loop computed (gate_compute "all"), the weighted exit its "weighted" mode."""
    kwargs = case["passed_kwargs"]
    if "num_beams" in str(kwargs):
        return "beam search (depthwave has none)"
    rule = case.get("exit_rule_in_effect", "")
    if rule.startswith("exit_at_step="):
        return registry.make("static", num_steps=int(rule.split("=")[1]) + 1)
    if rule == "last loop":
        return registry.make("static")
    gate = {"criterion": "gate", "cache_mode": "per-step"}
    if rule.startswith("exit_threshold="):
        return registry.make("adaptive", **gate, exit_threshold=float(rule.split("=")[1]), gate_compute="all")
    assert "weighted" in rule, rule
    return registry.make("adaptive", **gate, exit_threshold=1.5, gate_compute="weighted")


@pytest.mark.parametrize("case", generation_cases(), ids=lambda c: c["id"])
def test_greedy_generation_equals_the_reference_token_for_token(case: dict[str, Any], prompts: Any) -> None:
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    sampler = sampler_for(case)
    if isinstance(sampler, str):
        pytest.skip(f"{case['id']}: {sampler}")
    # The eos cases pass another eos id; the checkpoint's (0) stays a stop token, as it never comes up there.
    sampling = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=[case["effective_eos_token_id"]])
    out = llm.generate([prompts[case["prompt_index"]]], sampling, sampler=sampler)
    assert out[0].token_ids == case["new_token_ids"]
    if sampler.name == "adaptive" and "exit_step_per_new_token" in case:
        assert out[0].stats.early_exits == sum(step < 3 for step in case["exit_step_per_new_token"])


def test_a_gate_that_never_fires_equals_static_decoding_and_skipping_saves_loops(prompts: Any) -> None:
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=16)
    static = [r.token_ids for r in llm.generate(prompts, sampling, sampler="static")]
    never = registry.make("adaptive", criterion="gate", exit_threshold=1.5, cache_mode="per-step")
    assert [r.token_ids for r in llm.generate(prompts, sampling, sampler=never)] == static
    skip = registry.make("adaptive", criterion="gate", exit_threshold=0.5, cache_mode="per-step")
    results = llm.generate(prompts, sampling, sampler=skip)
    assert all(r.stats.mean_recurrences_per_token < 4 for r in results)


@pytest.mark.parametrize("name", ["static", "adaptive", "speculative", "diffusion"])
def test_every_sampler_batched_equals_alone_seeded(name: str, prompts: Any) -> None:
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    extra: dict[str, Any] = {"criterion": "gate", "exit_threshold": 0.5} if name == "adaptive" else {}
    if name == "diffusion":
        extra = {"inner_recurrence": 1, "max_wavefront": 4}  # a pipelined wavefront, drafts in flight
    sampler = registry.make(name, **extra)
    sampling = [SamplingParams(temperature=0.8, top_k=40, max_new_tokens=12, seed=i) for i in range(3)]
    batch = [r.token_ids for r in llm.generate(prompts, sampling, sampler=sampler)]
    assert batch == [llm.generate([p], s, sampler=sampler)[0].token_ids for p, s in zip(prompts, sampling, strict=True)]


def test_the_loop_wavefront_in_its_most_conservative_setting_equals_static_decoding(prompts: Any) -> None:
    """One position in flight: it runs all its loops before the next opens, i.e. static decoding on the shared
    cache. Wider wavefronts pipeline the loops (fewer sequential steps); on these random weights the drafts keep
    changing, and a position that restarts or runs its loops late still ends on the same tokens here."""
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
    static = [
        r.token_ids for r in llm.generate(prompts, sampling, sampler=registry.make("static", cache_mode="shared"))
    ]
    for wavefront, inner in ((1, 1), (1, 4)):
        one = registry.make("diffusion", max_wavefront=1, max_recurrences=4, inner_recurrence=inner)
        results = llm.generate(prompts, sampling, sampler=one)
        assert [r.token_ids for r in results] == static, (wavefront, inner)
        assert all(r.stats.sampler_steps == 11 * 4 // inner for r in results)
    pipelined = llm.generate(prompts, sampling, sampler=registry.make("diffusion", inner_recurrence=1))
    assert all(r.stats.sampler_steps < 11 * 4 and r.stats.mean_wavefront > 1 for r in pipelined)


@pytest.mark.parametrize(
    "extra",
    [
        {"inner_recurrence": 1},
        {"inner_recurrence": 3},
        {"inner_recurrence": 1, "max_wavefront": 3},
        {"max_wavefront": 1, "max_recurrences": 4},
    ],
)
def test_the_per_step_loop_wavefront_with_fixed_freezing_is_static_decoding_token_for_token(
    prompts: Any, extra: dict[str, Any]
) -> None:
    """On the per-step cache each position of the wavefront reads and writes its own loop's keys, and a draft that
    changes restarts every later one: whatever the wavefront, each final token is computed as static decoding
    computes it. Batched equals alone."""
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
    static = [r.token_ids for r in llm.generate(prompts, sampling, sampler="static")]
    sampler = registry.make("diffusion", cache_mode="per-step", freeze="fixed", **extra)
    results = llm.generate(prompts, sampling, sampler=sampler)
    assert [r.token_ids for r in results] == static
    assert [llm.generate([p], sampling, sampler=sampler)[0].token_ids for p in prompts] == static
    if extra.get("max_wavefront") != 1:
        assert all(r.stats.mean_wavefront > 1 for r in results)


def test_the_per_step_wavefront_shares_a_pass_with_other_samplers(prompts: Any) -> None:
    """One engine on the per-step cache: a wavefront row (queries at their own loops) beside a static row and a
    gate-exit row (every query at the pass's loop) in the same passes; each gives what it gives alone."""
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    samplers = [
        registry.make("diffusion", cache_mode="per-step", freeze="fixed", inner_recurrence=1),
        registry.make("static"),
        registry.make("adaptive", criterion="gate", exit_threshold=0.5, cache_mode="per-step"),
    ]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=10)
    together = [r.token_ids for r in llm.generate(prompts, sampling, sampler=samplers)]
    alone = [llm.generate([p], sampling, sampler=s)[0].token_ids for p, s in zip(prompts, samplers, strict=True)]
    assert together == alone


def test_the_diffusion_sampler_by_name_runs_on_the_per_step_cache_on_ouro_only(prompts: Any) -> None:
    """Chosen by name (`LLM`, the commands, `depthwave eval`, lm-eval), the diffusion sampler on an Ouro model takes
    the per-step cache unless told otherwise; on Huginn it keeps the paper's shared cache."""
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    assert llm.sampler("diffusion").params.cache_mode == "per-step"
    assert llm.sampler("diffusion", cache_mode="shared").params.cache_mode == "shared"
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8)
    static = [r.token_ids for r in llm.generate(prompts, sampling, sampler="static")]
    by_name = llm.generate(prompts, sampling, sampler="diffusion", freeze="fixed", inner_recurrence=1)
    assert [r.token_ids for r in by_name] == static
    assert registry.make("diffusion").cache_mode == "shared"  # no model, no family default
    huginn = LLM("builtin", device="cpu")
    assert huginn.sampler("diffusion").params.cache_mode == "shared"


def test_batched_generation_equals_single_runs_where_the_reference_breaks(prompts: Any) -> None:
    """The reference's cached batch with left padding goes wrong after the first token (`gen_batch_p0p1_cache`);
    depthwave's batch equals its single runs and the reference's uncached (and mask-fixed) batch."""
    case = {c["id"]: c for c in fixture_json(FIXTURE, "generate.json")["cases"]}
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=24)
    batch = [r.token_ids for r in llm.generate([prompts[0], prompts[1]], sampling)]  # static: Ouro's default
    assert batch == case["gen_batch_p0p1_nocache"]["new_token_ids"]
    assert batch == case["gen_batch_p0p1_cache_maskfix"]["new_token_ids"]
    assert batch[0] != case["gen_batch_p0p1_cache"]["new_token_ids"][0]
    assert batch == [llm.generate([p], sampling)[0].token_ids for p in prompts[:2]]


GQA = {
    "model_type": "ouro",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 128,
    "num_hidden_layers": 2,
    "total_ut_steps": 3,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "early_exit_threshold": 0.75,
}


def test_a_gqa_variant_caches_exactly_and_saves_in_ouro_layout(tmp_path: Path) -> None:
    model = random_model(ouro.config_from_ouro(GQA), seed=3)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        uncached = model(ids).logits
        cache = KVPool(model.config, 16, "per-step", max_steps=3, rows=2)
        first = model(ids[:, :6], cache=cache).logits
        rest = [model(ids[:, t : t + 1], cache=cache, start=t).logits for t in range(6, 9)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), uncached, rtol=0, atol=1e-5)
    folder = save_model(model, tmp_path / "gqa")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "ouro" and raw["num_key_value_heads"] == 2 and raw["early_exit_threshold"] == 0.75
    keys = set(load_file(folder / "model.safetensors"))
    assert "model.layers.1.self_attn.k_proj.weight" in keys and "model.early_exit_gate.bias" in keys
    assert load_file(folder / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    again = load_model(folder, dtype="float32")
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, uncached)


def test_missing_unknown_and_misshapen_keys_are_named(tmp_path: Path) -> None:
    source = fixture_dir(FIXTURE)
    tensors = load_file(source / "model.safetensors")
    tensors.pop("model.layers.2.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    tensors["model.norm.weight"] = torch.ones(32)
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "missing: model.layers.2.mlp.up_proj.weight" in message
    assert "unexpected: model.layers.0.self_attn.q_proj.bias" in message
    assert "wrong shape: model.norm.weight" in message


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"head_dim": 32}, "head_dim"),
        ({"early_exit_threshold": "high"}, "early_exit_threshold"),
        ({"total_ut_steps": 0}, "mean_recurrence"),
    ],
)
def test_unsupported_or_invalid_ouro_configs_are_refused_by_name(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        HuginnConfig.from_dict({**GQA, **change})


def test_continuous_compute_is_refused_for_a_model_that_starts_from_its_embedding() -> None:
    llm = LLM(fixture_dir(FIXTURE), device="cpu", dtype="float32")
    with pytest.raises(InvalidParameterError, match="continuous_compute"):
        llm.generate(
            [[5, 6, 7]], SamplingParams(max_new_tokens=2), sampler=registry.make("static", continuous_compute=True)
        )


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture model with a tokenizer like the released ones (SmolLM2's): <|endoftext|> (0, the config's
    bos/eos/pad), <|im_start|> (1) and <|im_end|> (2, the chat models' eos in tokenizer_config.json), ChatML."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("ouro-chat")
    source = fixture_dir(FIXTURE)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((source / name).read_bytes())
    tokenizer = FastTokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(["The capital of France is Paris.", "2 + 2 = 4"] * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_an_ouro_folder_with_its_tokenizer_stops_at_its_special_tokens(chat_folder: Path) -> None:
    llm = LLM(chat_folder, device="cpu", dtype="float32")
    assert llm.stop_token_ids == [0, 2]
    chat = llm.encode("2 + 2 =", chat=True)
    assert chat[0] == 1 and 2 in chat
    out = llm.generate("2 + 2 =", SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    assert out.token_ids and isinstance(out.text, str)


def test_lm_eval_runs_every_sampler_on_an_ouro_model(chat_folder: Path) -> None:
    pytest.importorskip("lm_eval", reason="needs the lm-eval extra")
    from lm_eval.api.instance import Instance

    from depthwave.eval.lm_harness import DepthwaveLM

    native = DepthwaveLM(pretrained=str(chat_folder), device="cpu", dtype="float32")
    assert native.sampler_name == "static"  # Ouro's default: the official output
    kinds = [
        {},
        {"sampler": "adaptive", "criterion": "gate", "exit_threshold": 0.5},
        {"sampler": "speculative"},
        {"sampler": "diffusion", "inner_recurrence": 1},
        {"sampler": "diffusion", "inner_recurrence": 1, "cache_mode": "per-step", "freeze": "fixed"},
    ]
    requests = [
        Instance("generate_until", {}, ("2 + 2 =", {"until": ["\n"], "max_gen_toks": 5, **kind}), i)
        for i, kind in enumerate(kinds)
    ]
    answers = native.generate_until(requests)
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
    (rolling,) = native.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("2 + 2 = 4",), 0)])
    assert rolling < 0


def test_the_server_runs_every_sampler_on_an_ouro_model(chat_folder: Path) -> None:
    """Each sampler chosen per request with its parameters in the body (the `openai` client's `extra_body`)."""
    import httpx

    from depthwave.serve.app import ServeSettings
    from tests.helpers import running

    settings = ServeSettings(model=str(chat_folder), dtype="float32", max_num_seqs=4, admission_delay=0.0)
    per_step = ServeSettings(
        model=str(chat_folder), dtype="float32", max_num_seqs=4, admission_delay=0.0, cache_mode="per-step"
    )
    bodies = [
        {},
        {"sampler": "static"},
        {"sampler": "adaptive", "criterion": "gate", "exit_threshold": 0.5},
        {"sampler": "speculative", "draft_steps": 1},
        {"sampler": "diffusion", "inner_recurrence": 1},
    ]
    with running(per_step) as url:  # Ouro's own cache: every sampler takes it
        for extra in bodies:
            body = {"model": str(chat_folder), "prompt": "2 + 2 =", "max_tokens": 4, "temperature": 0, **extra}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, (extra, response.text)
    with running(settings) as url:
        for extra in bodies:
            body = {"model": str(chat_folder), "prompt": "2 + 2 =", "max_tokens": 4, "temperature": 0, **extra}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, (extra, response.text)
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
        bad = {"model": str(chat_folder), "prompt": "2 + 2 =", "sampler": "adaptive", "criterion": "nope"}
        response = httpx.post(f"{url}/v1/completions", json=bad, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "criterion"
