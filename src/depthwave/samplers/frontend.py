"""The one-prompt front end over the engine (B = 1): `Sampler(model, tokenizer, stops, params)` generates or
streams for one prompt at a time with any sampler's parameters. `LLM.generate` and the engine run many requests
together; this is the simple case, and what the parity tests drive."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from depthwave.engine.engine import Engine, EngineConfig, check_prompt
from depthwave.engine.policy import SamplerParams, sizing
from depthwave.engine.request import GenerationResult, Request
from depthwave.engine.selection import SamplingParams
from depthwave.samplers.adaptive import AdaptiveParams
from depthwave.samplers.diffusion import DiffusionParams
from depthwave.samplers.speculative import SpeculativeParams
from depthwave.samplers.static import StaticParams

if TYPE_CHECKING:
    from depthwave.model.model import RecurrentDepthModel
    from depthwave.model.tokenizer import Tokenizer


class GenerationStream:
    """Iterate to receive generated token ids as they become final; `result` is set once iteration ends."""

    def __init__(self, steps: Generator[int, None, GenerationResult]) -> None:
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[int]:
        self.result = yield from self._steps


class Sampler:
    """A sampler bound to a model, for one prompt at a time: the B = 1 case of the engine. `params` is any
    sampler's parameter object (default: `params_class()`, the diffusion sampler's for this base class)."""

    params_class: ClassVar[type] = DiffusionParams

    def __init__(
        self,
        model: RecurrentDepthModel,
        tokenizer: Tokenizer | None = None,
        default_stop_ids: Sequence[int] = (),
        params: SamplerParams | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.default_stop_ids = tuple(default_stop_ids)
        self.params: Any = params if params is not None else self.params_class()
        self.compile = compile
        self._compiled: Engine | None = None

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
        engine, request = self.engine_for(prompt_ids, params or SamplingParams())
        return GenerationStream(self._steps(engine, request))

    def engine_for(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[Engine, Request]:
        """A one-row engine sized for this request (its cache holds exactly what the request may use)."""
        request = Request(check_prompt(prompt_ids, self.model.config), params, self.params)
        bounds = sizing(self.params, len(request.prompt_token_ids), params, self.model.config)
        config = EngineConfig(
            max_num_seqs=1,
            max_model_len=bounds.cache,
            cache_mode=self.params.cache_mode,
            max_steps=bounds.max_step,
            buffer_slack=bounds.buffer - bounds.cache,
            compile=self.compile,
        )
        engine = self._reused(config) or Engine(self.model, self.tokenizer, self.default_stop_ids, config)
        if self.compile:
            self._compiled = engine  # kept for the next call: a new engine would allocate its pool again
        engine.add(request)
        return engine, request

    def _reused(self, wanted: EngineConfig) -> Engine | None:
        """The compiled engine of an earlier call, when it is large enough for this one."""
        engine = self._compiled
        if engine is None or engine.scheduler.running or engine.scheduler.waiting:  # a stream left unfinished
            return None
        have = engine.config
        fits = have.cache_mode == wanted.cache_mode and all(
            (getattr(have, name) or 0) >= (getattr(wanted, name) or 0)
            for name in ("max_model_len", "max_steps", "buffer_slack")
        )
        return engine if fits else None

    @staticmethod
    def _steps(engine: Engine, request: Request) -> Generator[int, None, GenerationResult]:
        while True:
            for output in engine.step():
                yield from output.new_token_ids
                if output.result is not None:
                    return output.result


# The front ends by sampler: their defaults are that sampler's parameters.
class StaticSampler(Sampler):
    params_class = StaticParams


class AdaptiveSampler(Sampler):
    params_class = AdaptiveParams


class SpeculativeSampler(Sampler):
    params_class = SpeculativeParams


class DiffusionSampler(Sampler):
    params_class = DiffusionParams
