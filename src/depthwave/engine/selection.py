"""Sampling parameters and token selection, for many requests at once.

Every logits row of an engine pass belongs to one request, and each request brings its own `SamplingParams` and
its own seeded generator. Selection is batched where that cannot change a request's tokens (argmax, softmax and
filters are row-wise) and per request where it could (each request draws from its own generator), so a request's
tokens never depend on what else is in the batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from depthwave.errors import is_int, is_number, require

TopPRule = Literal["standard", "reference"]


TINY = 1e-6
"""The smallest temperature, top_p and repetition_penalty accepted (the server refuses the same)."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen from logits, and when generation ends (the shape of vLLM's `SamplingParams`).

    temperature 0 means greedy. top_k 0, top_p 1 and min_p 0 switch those filters off. `top_p_rule`:
    "standard" keeps the smallest set of tokens whose mass reaches top_p (transformers, vLLM); "reference" is
    the Huginn reference's rule, which filters the top-k probabilities without renormalising them and also drops
    the token whose cumulative mass first exceeds top_p. Stop tokens end generation and are kept in the output;
    unless `ignore_eos`, the model's own stop tokens (generation_config / tokenizer) apply too. `stop` strings end
    generation once the decoded output contains one (the text is cut before it; the tokens keep the one that
    completed it). `seed` seeds the request's own generator (sampling and random states)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    top_p_rule: TopPRule = "standard"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        # Below TINY a value rounds to 0 in the fp32 step (a division by zero there would fail the whole batch).
        finite = is_number(self.temperature) and (self.temperature == 0 or TINY <= self.temperature < float("inf"))
        require(finite, "temperature", self.temperature, f"0 (greedy) or a finite number >= {TINY}")
        require(is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        require(is_number(self.top_p) and TINY <= self.top_p <= 1, "top_p", self.top_p, f"in [{TINY}, 1]")
        require(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        require(
            is_number(self.repetition_penalty) and self.repetition_penalty >= TINY,
            "repetition_penalty",
            self.repetition_penalty,
            f">= {TINY}",
        )
        require(
            is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            "max_new_tokens",
            self.max_new_tokens,
            "an integer >= 1",
        )
        require(
            all(is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            list(self.stop_token_ids),
            "non-negative integers",
        )
        require(all(isinstance(t, str) and t for t in self.stop), "stop", list(self.stop), "non-empty strings")
        require(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "true or false")
        require(
            self.seed is None or (is_int(self.seed) and self.seed >= 0), "seed", self.seed, "None or an integer >= 0"
        )
        require(
            self.top_p_rule in ("standard", "reference"), "top_p_rule", self.top_p_rule, "'standard' or 'reference'"
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> tuple[float, int, float, float, str]:
        """What `filtered_probs` reads: requests with equal filters share one call."""
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.top_p_rule)


def apply_repetition_penalty(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    """CTRL-style: logits of tokens already in the context are divided by the penalty (multiplied if < 0)."""
    index = context.reshape(1, -1).expand(logits.shape[0], -1)
    seen = logits.gather(-1, index)
    return logits.scatter(-1, index, torch.where(seen < 0, seen * penalty, seen / penalty))


def filtered_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a non-greedy draw uses: temperature, top-k, top-p, min-p, renormalised. fp32 [N, V]."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_k and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        if params.top_p_rule == "reference":
            cumulative = sorted_probs.cumsum(dim=-1)
            drop = cumulative > params.top_p
            drop[..., 0] = False
        else:
            renormalised = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
            drop = (renormalised.cumsum(dim=-1) - renormalised) >= params.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-10)


@dataclass(frozen=True)
class Choice:
    """The logits rows `rows` of one request, to choose a token for each. Row j's repetition-penalty context is
    `context[: context_lengths[j]]` (the request's token row)."""

    rows: slice
    params: SamplingParams
    generator: torch.Generator | None
    context: Tensor
    context_lengths: Sequence[int]


def penalised(logits: Tensor, choice: Choice) -> Tensor:
    """The choice's logits rows after its repetition penalty (a copy only when there is one)."""
    rows = logits[choice.rows]
    penalty = choice.params.repetition_penalty
    if penalty == 1.0:
        return rows
    lengths = choice.context_lengths
    if len(set(lengths)) == 1:
        return apply_repetition_penalty(rows, choice.context[: lengths[0]], penalty) if lengths[0] else rows
    return torch.cat(
        [
            apply_repetition_penalty(rows[j : j + 1], choice.context[:n], penalty) if n else rows[j : j + 1]
            for j, n in enumerate(lengths)
        ]
    )


def select_tokens(logits: Tensor, choices: Sequence[Choice]) -> Tensor:
    """Token ids [N] (long) for logits [N, V]: greedy rows by argmax over all rows at once, sampled rows filtered
    together where requests share their filters and drawn from each request's own generator."""
    if all(c.params.repetition_penalty == 1.0 for c in choices):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.cat([penalised(logits, c).argmax(dim=-1) for c in choices])
    by_filters: dict[tuple, list[Choice]] = defaultdict(list)
    for choice in choices:
        if not choice.params.greedy:
            by_filters[choice.params.filters].append(choice)
    for group in by_filters.values():
        probs = filtered_probs(torch.cat([penalised(logits, c) for c in group]), group[0].params)
        first = 0
        for choice in group:
            count = choice.rows.stop - choice.rows.start
            draw = torch.multinomial(probs[first : first + count], 1, generator=choice.generator)
            tokens[choice.rows] = draw[:, 0]
            first += count
    return tokens
