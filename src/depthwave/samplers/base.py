"""What every sampler shares: the B = 1 front end over the engine, streaming, and the small helpers of the
policies (token budget, initial states, last-true indices)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from depthwave.engine.engine import Engine, EngineConfig, check_prompt
from depthwave.engine.request import GenerationResult, Request
from depthwave.engine.selection import SamplingParams

if TYPE_CHECKING:
    from depthwave.model.config import HuginnConfig
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
    """A sampler bound to a model, for one prompt at a time: the B = 1 case of the engine. `LLM.generate` and the
    engine run many requests together; this class is the simple front end (and what parity tests drive)."""

    name: ClassVar[str]
    params_class: ClassVar[type]

    def __init__(
        self,
        model: RecurrentDepthModel,
        tokenizer: Tokenizer | None = None,
        default_stop_ids: Sequence[int] = (),
        params: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.default_stop_ids = tuple(default_stop_ids)
        self.params = params if params is not None else self.params_class()

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
        sizing = self.params.policy_class().size(self.params, len(request.prompt_token_ids), params, self.model.config)
        config = EngineConfig(
            max_num_seqs=1,
            max_model_len=sizing.cache,
            cache_mode=self.params.cache_mode,
            max_steps=sizing.max_step,
            buffer_slack=sizing.buffer - sizing.cache,
        )
        engine = Engine(self.model, self.tokenizer, self.default_stop_ids, config)
        engine.add(request)
        return engine, request

    @staticmethod
    def _steps(engine: Engine, request: Request) -> Generator[int, None, GenerationResult]:
        while True:
            for output in engine.step():
                yield from output.new_token_ids
                if output.result is not None:
                    return output.result


# ---- helpers of the policies ---------------------------------------------------------------------------------
def token_budget(prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> int:
    """Tokens to generate at most: max_new_tokens, or fewer where the model's context ends first."""
    return min(sampling.max_new_tokens, config.block_size - prompt_len)


def last_true(mask: Tensor) -> Tensor:
    """Per row of a [B, S] mask: 1 + the largest index where it is true, or 0 where it is nowhere."""
    ranks = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (ranks * mask).amax(dim=-1) if mask.shape[-1] else mask.new_zeros(mask.shape[:-1], dtype=torch.long)


def scatter_rows(buffer: Tensor, rows: list[int], positions: list[int], values: Tensor) -> None:
    """buffer[rows[i], positions[i]] = values[i] in one write (tokens, or states of a [rows, positions, D] buffer)."""
    if rows:
        device = buffer.device
        buffer[torch.tensor(rows, device=device), torch.tensor(positions, device=device)] = values


def cat(tensors: list[Tensor]) -> Tensor:
    """One tensor from several (no copy for one)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
