from __future__ import annotations

import copy

import pytest
import torch

from depthwave import (
    InvalidParameterError,
    KVPool,
    PromptError,
    SamplingParams,
    StaticParams,
    StaticSampler,
)

PROMPT = [3, 141, 59, 26, 5]


MICRO_MODEL_SEED = 4  # the `model` fixture of conftest
MICRO_MODEL_CONFIG: dict[str, int] = {}  # mean_recurrence 4


def _greedy(model, prompt=PROMPT, **kwargs):  # type: ignore[no-untyped-def]
    sampler = StaticSampler(model, params=StaticParams(num_steps=4, init_scale=0.0))
    return sampler.generate(prompt, SamplingParams(temperature=0.0, **kwargs))


def test_stop_token_ends_generation_where_it_appears(model) -> None:  # type: ignore[no-untyped-def]
    free = _greedy(model, max_new_tokens=12)
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop = free.token_ids[6]
    first = free.token_ids.index(stop)
    stopped = _greedy(model, max_new_tokens=12, stop_token_ids=(stop,))
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop"
    # The model's default stop ids apply unless ignore_eos.
    sampler = StaticSampler(model, default_stop_ids=[stop], params=StaticParams(num_steps=4, init_scale=0.0))
    assert sampler.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=12)).token_ids == stopped.token_ids
    ignoring = sampler.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    assert ignoring.token_ids == free.token_ids


def test_stream_yields_the_result_tokens_in_order(model) -> None:  # type: ignore[no-untyped-def]
    sampler = StaticSampler(model, params=StaticParams(num_steps=3, init_scale=0.0))
    stream = sampler.stream(PROMPT, SamplingParams(temperature=0, max_new_tokens=7))
    seen = list(stream)
    assert stream.result is not None and seen == stream.result.token_ids and len(seen) == 7
    callback: list[int] = []
    result = sampler.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=7), on_token=callback.append)
    assert callback == result.token_ids == seen


def test_seeded_sampling_repeats(model) -> None:  # type: ignore[no-untyped-def]
    sampler = StaticSampler(model, params=StaticParams(num_steps=3, init_scale=1.0))
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=123)
    first = sampler.generate(PROMPT, params).token_ids
    assert sampler.generate(PROMPT, params).token_ids == first
    others = {
        tuple(sampler.generate(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=16, seed=s)).token_ids)
        for s in range(4)
    }
    assert len(others) > 1, "different seeds should give different samples"


def test_statistics(model) -> None:  # type: ignore[no-untyped-def]
    result = _greedy(model, max_new_tokens=6)
    stats = result.stats
    assert stats.prompt_tokens == 5 and stats.generated_tokens == 6
    assert stats.core_steps == 24 and stats.core_steps_per_token == 4.0
    assert stats.prefill_time_s > 0 and stats.decode_time_s > 0 and stats.tokens_per_s > 0
    cfg = model.config
    assert stats.cache_bytes_per_position == 2 * (2 + 4 * 4 + 2) * cfg.n_embd * 4
    assert stats.cache_bytes == (5 + 6 - 1) * stats.cache_bytes_per_position
    shared = StaticSampler(model, params=StaticParams(num_steps=4, init_scale=0.0, cache_mode="shared"))
    s = shared.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=6)).stats
    assert s.cache_bytes_per_position == 2 * (2 + 4 + 2) * cfg.n_embd * 4
    assert result.to_dict()["stats"]["tokens_per_s"] == stats.tokens_per_s


@pytest.mark.parametrize("warm", ["normed", "raw"])
def test_continuous_compute_starts_each_token_from_the_previous_latent(model, warm: str) -> None:  # type: ignore[no-untyped-def]
    sampler = StaticSampler(
        model, params=StaticParams(num_steps=2, init_scale=0.0, continuous_compute=True, warm_start=warm)
    )  # type: ignore[arg-type]
    tokens = sampler.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=4)).token_ids
    cache = KVPool(model.config, 16, "per-step", 2)
    out = model(torch.tensor([PROMPT]), 2, 0.0, cache=cache)
    position, expected = len(PROMPT), [int(out.logits[0, -1].argmax())]
    for _ in range(3):
        latent = (out.latents if warm == "normed" else out.state)[:, -1:]
        out = model(torch.tensor([[expected[-1]]]), 2, 0.0, input_states=latent, cache=cache, start=position)
        expected.append(int(out.logits[0, -1].argmax()))
        position += 1
    assert tokens == expected


def test_context_limit_caps_generation(model) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(250))
    result = _greedy(model, prompt=prompt, max_new_tokens=50)
    assert len(result.token_ids) == 6 and result.finish_reason == "length"


def test_bad_prompts(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PromptError, match="the prompt has 256 tokens but the model's context holds 256 positions"):
        _greedy(model, prompt=[1] * 256)
    with pytest.raises(PromptError, match="the prompt is empty"):
        _greedy(model, prompt=[])
    with pytest.raises(PromptError, match=r"prompt token ids \[512, -1\] are outside the vocabulary \[0, 512\)"):
        _greedy(model, prompt=[1, 512, -1])


def test_positions_beyond_context_in_model_call(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PromptError, match="positions up to 256 exceed the model's context of 256 positions"):
        model(torch.zeros(1, 257, dtype=torch.long), num_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 0}, "num_steps must be None or an integer >= 1"),
        ({"init_scale": -1.0}, "init_scale must be >= 0"),
        ({"warm_start": "x"}, "warm_start must be 'normed' or 'raw'"),
        ({"cache_mode": "full"}, "cache_mode must be one of"),
    ],
)
def test_invalid_static_params(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidParameterError, match=message):
        StaticParams(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_cpu_fp32(model) -> None:  # type: ignore[no-untyped-def]
    # The same weights (random_model draws from the device's generator, so its CUDA weights differ from the CPU's).
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    ids = torch.tensor([PROMPT])
    expected = model(ids, num_steps=4, init_scale=0.0).logits
    got = gpu(ids.cuda(), num_steps=4, init_scale=0.0).logits.cpu()
    torch.testing.assert_close(got, expected, atol=0.15, rtol=0.05)
    result = StaticSampler(gpu, params=StaticParams(num_steps=4, init_scale=0.0)).generate(
        PROMPT, SamplingParams(temperature=0.7, seed=1, max_new_tokens=8)
    )
    assert len(result.token_ids) == 8
