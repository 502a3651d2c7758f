from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from depthwave import InvalidParameterError, SamplingParams
from depthwave.engine.selection import Choice, apply_repetition_penalty, filtered_probs, select_tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be 0 .greedy. or a finite number >= 1e-06, got -0.1"),
        ({"temperature": math.nan}, "temperature must be 0 .greedy. or a finite number >= 1e-06"),
        ({"temperature": math.inf}, "temperature must be 0 .greedy. or a finite number >= 1e-06, got inf"),
        # 5e-324 is 0 in fp32: the division in the step would fail the whole batch.
        ({"temperature": 5e-324}, "temperature must be 0 .greedy. or a finite number >= 1e-06, got 5e-324"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \[1e-06, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \[1e-06, 1\]"),
        ({"min_p": 1.2}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be >= 1e-06"),
        ({"repetition_penalty": 5e-324}, "repetition_penalty must be >= 1e-06"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1"),
        ({"stop_token_ids": (3, -1)}, "stop_token_ids must be non-negative integers"),
        ({"seed": -5}, "seed must be None or an integer >= 0"),
        ({"top_p_rule": "hf"}, "top_p_rule must be 'standard' or 'reference'"),
    ],
)
def test_invalid_sampling_params(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        SamplingParams(**kwargs)


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_top_p_standard_keeps_smallest_set_reaching_p_and_reference_drops_boundary() -> None:
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    standard = filtered_probs(logits, SamplingParams(top_p=0.6))
    reference = filtered_probs(logits, SamplingParams(top_p=0.6, top_p_rule="reference"))
    torch.testing.assert_close(standard, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(reference, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_top_p_after_top_k_renormalises_only_in_standard_rule() -> None:
    logits = _logits([0.4, 0.3, 0.2, 0.1])
    # After top-2: {0.4, 0.3}. Standard renormalises to {4/7, 3/7}: 4/7 < 0.6 so both stay.
    # Reference: unnormalised cumulative 0.4, 0.7 > 0.6, so only the first stays.
    standard = filtered_probs(logits, SamplingParams(top_k=2, top_p=0.6))
    reference = filtered_probs(logits, SamplingParams(top_k=2, top_p=0.6, top_p_rule="reference"))
    torch.testing.assert_close(standard, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))
    torch.testing.assert_close(reference, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_top_k_min_p_temperature() -> None:
    logits = _logits([0.5, 0.25, 0.15, 0.1])
    torch.testing.assert_close(
        filtered_probs(logits, SamplingParams(top_k=2)), torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]])
    )
    torch.testing.assert_close(
        filtered_probs(logits, SamplingParams(min_p=0.3)), torch.tensor([[0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0]])
    )
    sharp = filtered_probs(logits, SamplingParams(temperature=0.5))
    expected = torch.tensor([0.5, 0.25, 0.15, 0.1]) ** 2
    torch.testing.assert_close(sharp, (expected / expected.sum())[None])


def _choose(params: SamplingParams, generator: Any, logits: torch.Tensor, context: list[int] = ()) -> torch.Tensor:  # type: ignore[assignment]
    """Tokens for logits rows that all belong to one request."""
    rows = logits.shape[0]
    choice = Choice(slice(0, rows), params, generator, torch.tensor(context, dtype=torch.long), [len(context)] * rows)
    return select_tokens(logits, [choice])


def test_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    assert logits[0, 0] == 2.0, "the input must not be modified"
    greedy = _choose(SamplingParams(temperature=0, repetition_penalty=4.0), None, torch.tensor([[2.0, 1.0]]), [0])
    assert greedy.tolist() == [1]


def test_greedy_takes_first_maximum_per_row() -> None:
    chosen = _choose(SamplingParams(temperature=0), None, torch.tensor([[0.0, 3.0, 3.0], [5.0, 1.0, 0.0]]))
    assert chosen.tolist() == [1, 0]


def test_seeded_draws_repeat_and_follow_the_distribution() -> None:
    logits = _logits([0.6, 0.3, 0.1]).expand(20000, -1)
    params = SamplingParams(temperature=1.0)
    a = _choose(params, torch.Generator().manual_seed(7), logits)
    b = _choose(params, torch.Generator().manual_seed(7), logits)
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / a.numel()
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.02, rtol=0)


@pytest.mark.parametrize("name", ["static", "adaptive", "speculative", "diffusion"])
def test_stop_strings_end_generation_and_cut_the_text(name: str, builtin_llm: Any) -> None:
    llm = builtin_llm
    sampler = llm.sampler(name, init_scale=0.0)
    prompt = llm.encode("A shop gets 26 stamps on Wednesday and 68 stamps on Friday. How many stamps?", chat=True)
    free = sampler.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=64))
    assert free.text is not None and " = " in free.text
    stopped = sampler.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=64, stop=(" = ",)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(" = ")]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    decode = llm.tokenizer.decode
    assert " = " in decode(stopped.token_ids) and " = " not in decode(stopped.token_ids[:-1])
    with pytest.raises(InvalidParameterError, match="stop must be non-empty strings"):
        SamplingParams(stop=("",))
