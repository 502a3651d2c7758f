"""What every sampler shares: sampling parameters, token selection, results and statistics, streaming, timing."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from depthwave.errors import InvalidParameterError, PromptError, is_int, is_number, require

if TYPE_CHECKING:
    from depthwave.model.model import RecurrentDepthModel
    from depthwave.model.tokenizer import Tokenizer

TopPRule = Literal["standard", "reference"]


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen from logits, and when generation ends (the shape of vLLM's `SamplingParams`).

    temperature 0 means greedy. top_k 0, top_p 1 and min_p 0 switch those filters off. `top_p_rule`:
    "standard" keeps the smallest set of tokens whose mass reaches top_p (transformers, vLLM); "reference" is
    the Huginn reference's rule, which filters the top-k probabilities without renormalising them and also drops
    the token whose cumulative mass first exceeds top_p. Stop tokens end generation and are kept in the output;
    unless `ignore_eos`, the model's own stop tokens (generation_config / tokenizer) apply too. `stop` strings end
    generation once the decoded output contains one (the text is cut before it; the tokens keep the one that
    completed it)."""

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
        require(is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature, ">= 0")
        require(is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        require(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        require(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        require(
            is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            self.repetition_penalty,
            "> 0",
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
        require(
            self.seed is None or (is_int(self.seed) and self.seed >= 0), "seed", self.seed, "None or an integer >= 0"
        )
        require(
            self.top_p_rule in ("standard", "reference"), "top_p_rule", self.top_p_rule, "'standard' or 'reference'"
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenSelector:
    """Chooses one token per logits row. Every sampler selects through this class."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        self.params = params
        self.generator = generator

    def __call__(self, logits: Tensor, context: Tensor | None = None) -> Tensor:
        """logits [N, V] (fp32, each row its own distribution); context: token ids [n] for the repetition
        penalty. Returns token ids [N] (long). `logits` is not modified."""
        p = self.params
        if p.repetition_penalty != 1.0 and context is not None and context.numel():
            logits = apply_repetition_penalty(logits, context, p.repetition_penalty)
        if p.greedy:
            return logits.argmax(dim=-1)
        probs = filtered_probs(logits, p)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


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


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_time_s: float = 0.0
    """Prompt processing up to and including the choice of the first generated token."""
    decode_time_s: float = 0.0
    """Everything after the first generated token."""
    core_steps: int = 0
    """Core-block recurrences run for the generated tokens (the prompt's prefill excluded)."""
    cache_bytes: int = 0
    cache_bytes_per_position: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens after the first one (which the prefill produces) per second of decode time."""
        decoded = self.generated_tokens - 1
        return decoded / self.decode_time_s if decoded > 0 and self.decode_time_s > 0 else 0.0

    @property
    def core_steps_per_token(self) -> float:
        return self.core_steps / self.generated_tokens if self.generated_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(tokens_per_s=self.tokens_per_s, core_steps_per_token=self.core_steps_per_token)
        return out


FinishReason = Literal["stop", "length"]


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens, the stop token included when one ended generation."""
    finish_reason: FinishReason
    stats: GenerationStats
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


class GenerationStream:
    """Iterate to receive generated token ids as they are decided; `result` is set once iteration ends."""

    def __init__(self, steps: Generator[int, None, GenerationResult]) -> None:
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[int]:
        self.result = yield from self._steps


class StopCondition:
    """Whether the output so far ends generation: its last token is a stop token, or its decoded tail contains a
    stop string (checked after every token, so the tail only needs to span the longest stop string)."""

    def __init__(self, ids: frozenset[int], strings: tuple[str, ...], tokenizer: Tokenizer | None) -> None:
        if strings and tokenizer is None:
            raise InvalidParameterError("stop strings need the model's tokenizer (tokenizer.json)")
        self.ids, self.strings, self.tokenizer = ids, strings, tokenizer
        # A token decodes to at least one character, but a multi-byte character may take several tokens.
        self.window = 4 * max(map(len, strings), default=0) + 4

    def __call__(self, emitted: list[int]) -> bool:
        if emitted[-1] in self.ids:
            return True
        if not self.strings:
            return False
        assert self.tokenizer is not None
        tail = self.tokenizer.decode(emitted[-self.window :])
        return any(stop in tail for stop in self.strings)


def emit(fresh: list[int], emitted: list[int], budget: int, stop: StopCondition) -> Generator[int, None, bool]:
    """Yield the tokens that just became final, up to the token budget, appending them to `emitted`; returns
    whether a stop token or string ended generation (nothing after the token that did is emitted)."""
    for token in fresh[: budget - len(emitted)]:
        emitted.append(token)
        yield token
        if stop(emitted):
            return True
    return False


class Stopwatch:
    """Wall-clock phases: CUDA events on a CUDA device (the GPU's own clock, read once a phase's work is done),
    perf counters elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.last: Any = self._mark()

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or the start)."""
        now = self._mark()
        if self.cuda:
            now.synchronize()
            elapsed = self.last.elapsed_time(now) / 1e3
        else:
            elapsed = now - self.last
        self.last = now
        return elapsed


class Sampler(ABC):
    """A generation algorithm bound to a model. Subclasses implement `_generate` as a generator that yields
    each token as it becomes final and returns the `GenerationResult`."""

    name: str

    def __init__(
        self, model: RecurrentDepthModel, tokenizer: Tokenizer | None = None, default_stop_ids: Sequence[int] = ()
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.default_stop_ids = tuple(default_stop_ids)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        stream = self.stream(prompt_ids, params)
        for token in stream:
            if on_token is not None:
                on_token(token)
        assert stream.result is not None
        return stream.result

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> GenerationStream:
        params = params or SamplingParams()
        prompt = self._check_prompt(prompt_ids)
        return GenerationStream(self._generate(prompt, params))

    @abstractmethod
    def _generate(self, prompt: list[int], params: SamplingParams) -> Generator[int, None, GenerationResult]: ...

    # ---- helpers for subclasses -----------------------------------------------------------------------------
    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        config = self.model.config
        if not prompt:
            raise PromptError("the prompt is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise PromptError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {config.vocab_size})")
        if len(prompt) >= config.block_size:
            raise PromptError(
                f"the prompt has {len(prompt)} tokens but the model's context holds {config.block_size} "
                "positions (block_size), leaving no room to generate"
            )
        return prompt

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        return frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.default_stop_ids)
        )

    def token_budget(self, prompt: list[int], params: SamplingParams) -> int:
        """Tokens to generate at most: max_new_tokens, or fewer where the model's context ends first."""
        return min(params.max_new_tokens, self.model.config.block_size - len(prompt))

    def generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(device=self.model.device).manual_seed(params.seed)

    def stop_condition(self, params: SamplingParams) -> StopCondition:
        return StopCondition(self.stop_ids(params), params.stop, self.tokenizer)

    def decode_text(self, token_ids: list[int], params: SamplingParams | None = None) -> str | None:
        """The output text, cut before the first stop string when `params` has any."""
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(token_ids)
        found = [i for i in (text.find(stop) for stop in (params.stop if params else ())) if i >= 0]
        return text[: min(found)] if found else text
