"""Static-depth autoregressive decoding: every token runs prelude, `num_steps` core recurrences, coda."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from depthwave.engine.buffers import RandomStates
from depthwave.engine.policy import Chunk, EngineContext, PassResult, Policy, Sizing
from depthwave.engine.request import GenerationStats, Request
from depthwave.engine.selection import SamplingParams
from depthwave.errors import InvalidParameterError, is_int, is_number, param, require
from depthwave.model.config import HuginnConfig
from depthwave.model.kv_cache import CACHE_MODES, CacheMode
from depthwave.samplers.ops import cat, scatter_rows, token_budget


@dataclass(frozen=True)
class StaticParams:
    """Static-depth decoding: every token runs `num_steps` recurrences."""

    num_steps: int | None = param(None, "recurrences per token (default: the model's mean_recurrence)")
    init_scale: float = param(1.0, "scale of the random initial state (0: zeros, deterministic)")
    continuous_compute: bool = param(
        False, "start each token's recurrence from the previous token's final latent, not a fresh state"
    )
    warm_start: Literal["normed", "raw"] = param(
        "normed", "with continuous_compute, the latent: normed (ln_f of it, the reference's generate_minimal) or raw"
    )
    cache_mode: CacheMode = param(
        "per-step", "KV cache: per-step (the reference's default lookup, exact parity) or shared (P+R+C slots)"
    )

    name: ClassVar[str] = "static"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            require(ok, name, getattr(self, name), what)

        need(
            self.num_steps is None or (is_int(self.num_steps) and self.num_steps >= 1),
            "num_steps",
            "None or an integer >= 1",
        )
        need(is_number(self.init_scale) and self.init_scale >= 0, "init_scale", ">= 0")
        need(isinstance(self.continuous_compute, bool), "continuous_compute", "true or false")
        need(self.warm_start in ("normed", "raw"), "warm_start", "'normed' or 'raw'")
        need(self.cache_mode in CACHE_MODES, "cache_mode", f"one of {CACHE_MODES}")

    def policy_class(self) -> type[Policy]:
        return StaticPolicy


@dataclass
class StaticStats(GenerationStats):
    num_steps: int = 0

    sampler: ClassVar[str] = "static"


class StaticPolicy(Policy):
    """One token per pass: the prompt (prefill) or the newest token, `num_steps` recurrences, the last logits."""

    def __init__(self, request: Request, ctx: EngineContext) -> None:
        super().__init__(request, ctx)
        params: StaticParams = request.sampler  # type: ignore[assignment]
        model = ctx.model
        self.params = params
        self.num_steps = params.num_steps or model.config.mean_recurrence
        self.random = RandomStates(model.config, params.init_scale, request.generator, model.device, model.dtype)
        self.position = 0
        self.warm: Tensor | None = None
        self.warm_start = getattr(params, "warm_start", "raw")

    @staticmethod
    def size(params: StaticParams, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:
        if params.continuous_compute and config.looped_stack:
            raise InvalidParameterError(
                "continuous_compute: an Ouro model's recurrence starts from the token's embedding, not from a latent"
            )
        budget = token_budget(prompt_len, sampling, config)
        # Every generated token but the last is fed back, so the cache never needs more than this.
        cache = prompt_len + budget - 1 if budget > 1 else prompt_len
        return Sizing(budget, cache, prompt_len + budget, params.num_steps or config.mean_recurrence)

    def start(self) -> None:
        pass

    def chunk(self) -> Chunk:
        size = self.prompt_len if self.position == 0 else 1
        init = self.warm if self.warm is not None else self.random.take(size)
        end = self.position + size
        return Chunk(self.position, size, self.num_steps, size - 1, init=init, context=end)

    @classmethod
    def prepare(cls, members: list[tuple[Policy, int]], result: PassResult) -> list[Tensor]:
        tokens = [result.tokens_of(index) for _, index in members]
        rows = [policy.row for policy, _ in members]
        ends = [result.chunks[index].start + result.chunks[index].size for _, index in members]
        scatter_rows(members[0][0].ctx.buffers.tokens, rows, ends, cat(tokens))
        return tokens

    def update(self, tokens: list[int], result: PassResult, index: int) -> None:
        chunk = result.chunks[index]
        output = self.request.output
        assert output is not None
        if output.emit(tokens):
            self.finish("stop")
        elif output.full:
            self.finish("length")
        if self.params.continuous_compute:
            # The next token starts from this one's final latent (ln_f of it, or the raw state).
            latents = result.latents if self.warm_start == "normed" else result.wave_out
            self.warm = latents[index, chunk.size - 1 : chunk.size]
        self.position = chunk.start + chunk.size

    def finalize_stats(self) -> StaticStats:
        generated = len(self.request.output.tokens) if self.request.output else 0
        return StaticStats(core_steps=self.num_steps * generated, num_steps=self.num_steps)
