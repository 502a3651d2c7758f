"""A request: its prompt, its parameters, its place in the engine, its output, its timing and statistics."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from depthwave.engine.output import Output
from depthwave.engine.selection import SamplingParams

if TYPE_CHECKING:
    import torch

    from depthwave.engine.policy import Policy, SamplerParams

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class GenerationStats:
    """What every sampler reports about one request. Sampler statistics subclass it (`DiffusionStats`, ...)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_time_s: float = 0.0
    """From the start of the request's first pass to its first generated token."""
    decode_time_s: float = 0.0
    """From the first generated token to the last. In a batch it is this request's latency, shared with others."""
    queue_time_s: float = 0.0
    """From arrival to the first pass (waiting for a free row or KV budget)."""
    core_steps: int = 0
    """Core-block recurrences run for the generated tokens (the prompt's prefill excluded)."""
    cache_bytes: int = 0
    """KV bytes this request's row occupies (the pool row's share of the engine's allocation)."""
    cache_bytes_per_position: int = 0

    sampler: ClassVar[str] = ""

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
        out.update(sampler=self.sampler, tokens_per_s=self.tokens_per_s, core_steps_per_token=self.core_steps_per_token)
        return out

    def details(self) -> str:
        """The sampler's own figures for the one-line summary (subclasses)."""
        return ""

    def summary(self) -> str:
        line = (
            f"{self.generated_tokens} tokens; prefill {self.prefill_time_s * 1e3:.1f} ms for {self.prompt_tokens} "
            f"prompt tokens; decode {self.tokens_per_s:.1f} tokens/s; {self.core_steps_per_token:.1f} recurrences/"
            f"token; KV cache {self.cache_bytes_per_position} B/position"
        )
        details = self.details()
        return f"{line}; {details}" if details else line

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens, the stop token included when one ended generation."""
    finish_reason: FinishReason
    stats: GenerationStats
    text: str | None = None
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


@dataclass
class StepOutput:
    """What one engine step did for one request: tokens that became final, and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    result: GenerationResult | None = None
    """Set once the request finished."""


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_token_ids: list[int]
    sampling: SamplingParams
    sampler: SamplerParams
    request_id: str = ""
    arrival_time: float = 0.0

    # Set by the engine.
    policy: Policy | None = None
    row: int = -1
    output: Output | None = None
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    first_pass_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    positions_needed: int = 0
    """Cache positions (and buffer positions) this request may use at most: its KV reservation."""
    buffer_needed: int = 0
    budget: int = 0
    """Tokens the request may generate (max_new_tokens, or fewer where the context ends first)."""

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
