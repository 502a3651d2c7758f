"""The contract between the engine and a sampler.

The engine owns the model work: it runs the prelude, the recurrences, the coda and the head once per pass for all
rows of the pass, and chooses tokens. A sampler is a *policy* per request: before a pass it says what its request
computes (a `Chunk`: which positions, how many recurrences, from which initial states), and after the pass it reads
the results and decides what became final. Decisions that need device values are split in two: `prepare` (class
level, batched over all requests of that sampler in the pass) queues device tensors, the engine fetches every
sampler's tensors in one transfer, and `decide` (class level again) hands each request its values. That keeps to
one host synchronisation per pass, whatever the mix of samplers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from depthwave.engine.request import GenerationStats, Request

if TYPE_CHECKING:
    from depthwave.engine.buffers import RowBuffers
    from depthwave.engine.selection import SamplingParams
    from depthwave.model.config import HuginnConfig
    from depthwave.model.kv_cache import CacheMode, KVPool
    from depthwave.model.model import RecurrentDepthModel
    from depthwave.model.positions import Positions


class SamplerParams(Protocol):
    """A sampler's parameter dataclass (`StaticParams`, `DiffusionParams`, ...): it names its policy."""

    name: ClassVar[str]

    @property
    def cache_mode(self) -> CacheMode: ...

    def policy_class(self) -> type[Policy]: ...


def sizing(params: SamplerParams, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:
    """What a request may use at most (its policy's `size`); raises InvalidParameterError for a combination that
    cannot run. The one place a request is sized: the engine at admission, `LLM` for its engines, the front end."""
    return params.policy_class().for_model(config).size(params, prompt_len, sampling, config)


@dataclass
class Chunk:
    """What a request computes in one pass: positions start..start+size-1 (the cache holds every position < start),
    `depth` recurrences each (at most, with an exit rule), logits for chunk rows logits_from..size-1."""

    start: int
    size: int
    depth: int
    logits_from: int
    init: Tensor | None = None
    """[size, D] initial states to write before the pass (None: the state buffer already holds them)."""
    accumulate: bool = False
    """The recurrence count of these positions grows (the diffusion sampler refines states across steps) rather
    than being this pass's depth."""
    select: bool = True
    """The engine chooses tokens for the logits rows with the request's SamplingParams."""
    context: Sequence[int] | int = 0
    """Repetition-penalty context length for each logits row (an int: the same for all)."""
    exit: ExitRule | None = None
    hide_below: int | None = None
    """Per-step cache: from this recurrence on, cached positions that ran fewer recurrences are hidden."""
    loops: Sequence[int] | None = None
    """Per-step cache: the loop each position's first recurrence of this pass runs (its keys are that loop's, as
    are the keys it reads); None: recurrence i of the pass runs loop i for every position."""

    @property
    def logits_rows(self) -> int:
        return self.size - self.logits_from


class ExitRule(ABC):
    """A per-row early exit inside a pass (adaptive compute). The engine groups a pass's rules by class."""

    @classmethod
    @abstractmethod
    def group(cls, rules: list[ExitRule], initial: Tensor, at: Positions) -> ExitGroup: ...


class LiveRows(Protocol):
    """An exit group's rows that are still recurring, j indexing them: computed only when a check asks."""

    def size(self, j: int) -> int:
        """The number of real positions of row j."""
        ...

    def states(self, js: Sequence[int]) -> Tensor:
        """[n, S, D] the current states of rows js."""
        ...

    def logits(self, js: Sequence[int]) -> Tensor:
        """[n, V] next-token logits at the last real position of rows js (coda and head on their states)."""
        ...


class ExitGroup(ABC):
    @abstractmethod
    def check(self, step: int, live: Sequence[int], rows: LiveRows) -> list[bool]:
        """After recurrence `step` (0-based), which of the group's rows `live` (indices into the group) exit now."""


@dataclass
class PassResult:
    """The outputs of one pass, for the samplers to read."""

    requests: list[Request]
    at: Positions
    chunks: list[Chunk]
    wave_in: Tensor
    """[B, S, D] the chunks' initial states (before noise)."""
    wave_out: Tensor
    """[B, S, D] their states after the pass's recurrences."""
    latents: Tensor
    """[B, S, D] the coda's view of wave_out (ln_f of it for Huginn, wave_out itself for the retrofits)."""
    logits: Tensor | None
    """[N, V] fp32, the chunks' logits rows one after another."""
    logit_rows: list[slice]
    tokens: Tensor | None
    """[N] the tokens the engine chose (rows whose chunk asked for selection)."""
    steps: list[int]
    """Recurrences each row ran."""
    prefill: bool
    own_tokens: dict[int, Tensor] = field(default_factory=dict)
    """Tokens a sampler chose itself in `prepare` (its chunks with `select` off), by request index in the pass."""

    def tokens_of(self, index: int) -> Tensor:
        if index in self.own_tokens:
            return self.own_tokens[index]
        assert self.tokens is not None
        return self.tokens[self.logit_rows[index]]

    def logits_of(self, index: int) -> Tensor:
        assert self.logits is not None
        return self.logits[self.logit_rows[index]]


@dataclass(frozen=True)
class Sizing:
    """A request's bounds: tokens it may generate, cache and buffer positions it may touch, the highest per-step
    cache slot (recurrence index + 1) it may use."""

    budget: int
    cache: int
    buffer: int
    max_step: int


@dataclass
class EngineContext:
    """What policies may touch: the model, the pool, the row buffers, and the model's stop tokens and tokenizer."""

    model: RecurrentDepthModel
    pool: KVPool
    buffers: RowBuffers
    tokenizer: Any
    stop_token_ids: tuple[int, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.model.device


class Policy(ABC):
    """One request's sampler state. Subclasses implement `start`, `chunk`, `update` and `finalize_stats`; batched
    device work after a pass goes in `prepare` (class level)."""

    stats: GenerationStats

    def __init__(self, request: Request, ctx: EngineContext) -> None:
        self.request = request
        self.ctx = ctx
        self.done = False

    @classmethod
    def for_model(cls, config: HuginnConfig) -> type[Policy]:
        """The policy that runs this sampler on a model of `config`'s family: this one, unless a family needs its
        own (the diffusion sampler on a looped stack)."""
        return cls

    # ---- sizing (before admission) -----------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def size(params: Any, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:
        """What a request may use at most; raises InvalidParameterError for a combination that cannot run."""

    # ---- lifecycle ----------------------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """The request got its row: the prompt tokens are in the token buffer; set up the rest."""

    @abstractmethod
    def chunk(self) -> Chunk:
        """What the request computes in the coming pass."""

    @classmethod
    def mix_inputs(
        cls, members: list[tuple[Policy, int]], embedded: Tensor, states: Tensor, at: Positions
    ) -> tuple[Tensor, Tensor]:
        """Between the prelude and the recurrences: this class's rows' injected embeddings [B, S, D] and initial
        states [B, S, D] of the pass (rows of other samplers pass through). By default unchanged; the diffusion
        sampler mixes in its momentum and noise here."""
        return embedded, states

    @classmethod
    def prepare(cls, members: list[tuple[Policy, int]], result: PassResult) -> list[Tensor]:
        """Device work after a pass for every request of this class in it ((policy, batch index) pairs); returns
        the tensors whose values `decide` needs. By default: the tokens the engine chose."""
        return [result.tokens_of(index) for _, index in members]

    @classmethod
    def decide(cls, members: list[tuple[Policy, int]], fetched: list[list[float]], result: PassResult) -> None:
        """Host decisions from the fetched values (one list per tensor `prepare` returned, in order)."""
        for (policy, index), values in zip(members, fetched, strict=True):
            policy.update([int(v) for v in values], result, index)

    def update(self, tokens: list[int], result: PassResult, index: int) -> None:
        """Host decisions of the default `decide`: the tokens chosen for this request's logits rows."""
        raise NotImplementedError

    @abstractmethod
    def finalize_stats(self) -> GenerationStats:
        """The request's statistics once it finished (common fields are filled in by the engine)."""

    def final_tokens(self, emitted: list[int]) -> list[int]:
        """The result's tokens (a reference mode may return what the official code returns instead)."""
        return emitted

    # ---- helpers ------------------------------------------------------------------------------------------
    @property
    def row(self) -> int:
        return self.request.row

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    def finish(self, reason: str) -> None:
        self.done = True
        if self.request.finish_reason is None:
            self.request.finish_reason = reason  # type: ignore[assignment]
