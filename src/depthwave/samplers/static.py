"""Static-depth autoregressive decoding: every token runs prelude, `num_steps` core recurrences, coda."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Literal

import torch

from depthwave.errors import InvalidParameterError
from depthwave.model.cache import CACHE_MODES, CacheMode, KVCache
from depthwave.samplers.base import (
    GenerationResult,
    GenerationStats,
    Sampler,
    SamplingParams,
    Stopwatch,
    TokenSelector,
    emit,
)


@dataclass(frozen=True)
class StaticParams:
    """num_steps: recurrences per token (None = the model's mean_recurrence). init_scale: scale of the random
    initial state (0 = zeros, deterministic). continuous_compute: start each token's recurrence from the previous
    token's final latent instead of a fresh initial state; `warm_start` picks which latent: "normed" (ln_f of it,
    what the reference's generate_minimal passes) or "raw". cache_mode: see `depthwave.model.cache`;
    "per-step" reproduces the reference's default cache exactly, "shared" uses (P+R+C) slots per position."""

    num_steps: int | None = None
    init_scale: float = 1.0
    continuous_compute: bool = False
    warm_start: Literal["normed", "raw"] = "normed"
    cache_mode: CacheMode = "per-step"

    def __post_init__(self) -> None:
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise InvalidParameterError(f"num_steps must be None or an integer >= 1, got {self.num_steps!r}")
        if not isinstance(self.init_scale, (int, float)) or not self.init_scale >= 0:
            raise InvalidParameterError(f"init_scale must be >= 0, got {self.init_scale!r}")
        if self.warm_start not in ("normed", "raw"):
            raise InvalidParameterError(f"warm_start must be 'normed' or 'raw', got {self.warm_start!r}")
        if self.cache_mode not in CACHE_MODES:
            raise InvalidParameterError(f"cache_mode must be one of {CACHE_MODES}, got {self.cache_mode!r}")


class StaticSampler(Sampler):
    name = "static"

    def __init__(self, model, tokenizer=None, default_stop_ids=(), params: StaticParams | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, tokenizer, default_stop_ids)
        self.params = params or StaticParams()

    @torch.inference_mode()
    def _generate(self, prompt: list[int], params: SamplingParams) -> Generator[int, None, GenerationResult]:
        model, cfg = self.model, self.params
        num_steps = cfg.num_steps or model.config.mean_recurrence
        budget = self.token_budget(prompt, params)
        stopping = self.stop_condition(params)
        generator = self.generator(params)
        select = TokenSelector(params, generator)
        device = model.device

        # Every generated token but the last is fed back, so the cache never needs more than this.
        cache = KVCache(
            model.config,
            len(prompt) + budget - 1 if budget > 1 else len(prompt),
            cfg.cache_mode,
            num_steps,
            device=device,
            dtype=model.dtype,
        )
        tokens = torch.empty(len(prompt) + budget, dtype=torch.long, device=device)
        tokens[: len(prompt)] = torch.tensor(prompt, device=device)
        generated: list[int] = []
        stats = GenerationStats(
            prompt_tokens=len(prompt),
            cache_bytes=cache.allocated_bytes,
            cache_bytes_per_position=cache.bytes_per_position,
        )
        watch = Stopwatch(device)

        position, warm = 0, None
        chunk = tokens[None, : len(prompt)]
        if cfg.continuous_compute:
            warm = model.initial_state(model.prelude(chunk), cfg.init_scale, generator)
        finish = "length"
        while True:
            out = model(chunk, num_steps, cfg.init_scale, warm, cache, position, last_only=True, generator=generator)
            end = position + chunk.shape[1]
            tokens[end] = select(out.logits[:, -1], tokens[:end])[0]
            token = int(tokens[end])
            if not generated:
                stats.prefill_time_s = watch.lap()
            if (yield from emit([token], generated, budget, stopping)):
                finish = "stop"
                break
            if len(generated) == budget:
                break
            if cfg.continuous_compute:
                warm = (out.latents if cfg.warm_start == "normed" else out.state)[:, -1:]
            position, chunk = end, tokens[None, end : end + 1]
        stats.decode_time_s = watch.lap()
        stats.core_steps = num_steps * len(generated)
        stats.generated_tokens = len(generated)
        return GenerationResult(prompt, generated, finish, stats, self.decode_text(generated, params))
