"""Adaptive-compute autoregressive decoding: each token recurs until an exit criterion fires (or a maximum).

Per token: prelude on the new position, then core recurrences one at a time; after each (from `min_steps` on,
every `check_every` steps) the criterion compares the state, or the coda's prediction from it, with the previous
step's, and the token exits as soon as the change is small. An exited token really stops: its remaining
recurrences never run. The prompt is one chunk and exits as a whole (its first generated token is predicted
from it), unless `exit_in_prefill` is off.

How a later token sees a position that exited early, by cache mode:

* ``per-step`` (the reference's ``full`` lookup): the cache has one slot per recurrence step, and a position
  that exited after c steps has entries in slots 0..c-1 only. A later token at recurrence t >= c attends to the
  positions that do have a slot-t entry and skips that one (masked out of attention), exactly as the reference's
  dictionary cache returns only the entries it holds. Prelude and coda slots are always complete.
* ``shared`` (one slot per layer): a position's core slot holds the K/V of its last recurrence, so a later,
  deeper token sees every earlier position through its final state (the paper's KV sharing, "latest" lookup).

Criteria (values after each checked step; B = 1, so "mean over positions" only matters for the prompt chunk):

=================  ==============================================================  ==================  ======
criterion          value                                                           exits when          auto
=================  ==============================================================  ==================  ======
latent-diff        mean over positions of ‖s − s_prev‖ / ‖s‖                        value < threshold   0.03
kl                 KL(p_prev ‖ p) of the last position's next-token distribution    value < threshold   1e-3
minp-kl            the same after setting p < 0.1·max p to 1/V and renormalising    value < threshold   1e-5
entropy-diff       |H(p) − H(p_prev)|                                               value < threshold   1e-3
argmax-stability   steps for which the argmax has not changed                       value >= threshold  5
cosine             1 − mean over positions of cos(s, s_prev)                        value < threshold   1e-3
none               never exits                                                      —                   —
=================  ==============================================================  ==================  ======

s are raw core outputs; "previous" starts at the initial state (latent criteria), the uniform distribution (KL
criteria), entropy 100 and argmax −1, as in the reference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from depthwave.model.cache import CACHE_MODES, CacheMode, KVCache
from depthwave.model.model import RecurrentDepthModel
from depthwave.samplers.base import (
    GenerationResult,
    GenerationStats,
    Sampler,
    SamplingParams,
    Stopwatch,
    TokenSelector,
    emit,
    is_int,
    is_number,
    require,
)

Criterion = Literal["latent-diff", "kl", "minp-kl", "entropy-diff", "argmax-stability", "cosine", "none"]
AUTO_THRESHOLDS: dict[str, float] = {
    "latent-diff": 0.03,
    "kl": 1e-3,
    "minp-kl": 1e-5,
    "entropy-diff": 1e-3,
    "argmax-stability": 5,
    "cosine": 1e-3,
    "none": 0.0,
}
LOGIT_CRITERIA = ("kl", "minp-kl", "entropy-diff", "argmax-stability")


@dataclass(frozen=True)
class AdaptiveParams:
    """criterion: see the module docstring. exit_threshold: a number, or "auto" for the reference's value.
    num_steps: the most recurrences per token (None = the model's mean_recurrence). min_steps: recurrences before
    the first check. check_every: check every n-th step from there. exit_in_prefill: let the prompt chunk exit
    early too. continuous_compute: start each token from the previous token's final raw state (as the reference's
    adaptive sampler does). init_scale: scale of the random initial state (0 = zeros). cache_mode: "shared"
    (default) or "per-step" (the reference's default lookup, for parity: a token that recurs deeper than earlier
    positions loses them from attention, which can wreck the output; on the built-in model 1/20 validation problems
    stay right with latent-diff, against 19/20 with "shared"). trace: record every token's criterion values."""

    criterion: Criterion = "latent-diff"
    exit_threshold: float | Literal["auto"] = "auto"
    num_steps: int | None = None
    min_steps: int = 0
    check_every: int = 1
    exit_in_prefill: bool = True
    continuous_compute: bool = False
    init_scale: float = 1.0
    cache_mode: CacheMode = "shared"
    trace: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            require(ok, name, getattr(self, name), what)

        need(self.criterion in AUTO_THRESHOLDS, "criterion", f"one of {tuple(AUTO_THRESHOLDS)}")
        need(
            self.exit_threshold == "auto" or (is_number(self.exit_threshold) and self.exit_threshold >= 0),
            "exit_threshold",
            "'auto' or a number >= 0",
        )
        need(
            self.criterion != "argmax-stability" or self.exit_threshold == "auto" or is_int(self.exit_threshold),
            "exit_threshold",
            "an integer number of stable steps for argmax-stability",
        )
        need(self.num_steps is None or (is_int(self.num_steps) and self.num_steps >= 1), "num_steps", "None or >= 1")
        need(is_int(self.min_steps) and self.min_steps >= 0, "min_steps", "an integer >= 0")
        need(is_int(self.check_every) and self.check_every >= 1, "check_every", "an integer >= 1")
        need(is_number(self.init_scale) and self.init_scale >= 0, "init_scale", ">= 0")
        need(self.cache_mode in CACHE_MODES, "cache_mode", f"one of {CACHE_MODES}")
        for name in ("exit_in_prefill", "continuous_compute", "trace"):
            need(isinstance(getattr(self, name), bool), name, "true or false")

    @property
    def threshold(self) -> float:
        return AUTO_THRESHOLDS[self.criterion] if self.exit_threshold == "auto" else float(self.exit_threshold)


class ExitCriterion:
    """One token's running comparison. `reset` before its first step; `check` after a step returns the value."""

    def __init__(self, name: str, threshold: float, vocab_size: int) -> None:
        self.name, self.threshold, self.vocab_size = name, threshold, vocab_size
        self.uses_logits = name in LOGIT_CRITERIA
        self.previous: Any = None
        self.stable_steps = 0

    def reset(self, initial_state: Tensor) -> None:
        if self.name in ("latent-diff", "cosine"):
            # States are never modified in place (each recurrence returns a new tensor), so keeping a reference
            # is enough: no copy per step.
            self.previous = initial_state
        elif self.name in ("kl", "minp-kl"):
            self.previous = torch.full((self.vocab_size,), -math.log(self.vocab_size), device=initial_state.device)
        elif self.name == "entropy-diff":
            self.previous = torch.tensor(100.0, device=initial_state.device)
        elif self.name == "argmax-stability":
            self.previous, self.stable_steps = -1, 0

    def check(self, state: Tensor, logits: Tensor | None) -> tuple[bool, float]:
        """state: raw [1, S, D]; logits: the last position's fp32 [V] (logit criteria only)."""
        name = self.name
        if name == "none":
            return False, 0.0
        if name == "argmax-stability":
            assert logits is not None
            current = int(logits.argmax())
            self.stable_steps = self.stable_steps + 1 if current == self.previous else 0
            self.previous = current
            return self.stable_steps >= self.threshold, float(self.stable_steps)
        if name == "latent-diff":
            value = ((state - self.previous).norm(dim=-1) / state.norm(dim=-1)).mean()
            self.previous = state
        elif name == "cosine":
            cosine = (state * self.previous).sum(dim=-1) / state.norm(dim=-1) / self.previous.norm(dim=-1)
            value = 1 - cosine.mean()
            self.previous = state
        elif name == "entropy-diff":
            assert logits is not None
            probs = logits.softmax(dim=-1)
            entropy = -(probs * (probs + 1e-10).log()).sum()
            value, self.previous = (entropy - self.previous).abs(), entropy
        else:  # kl, minp-kl: KL(previous ‖ current)
            assert logits is not None
            if name == "minp-kl":
                probs = logits.softmax(dim=-1)
                probs = probs.masked_fill(probs < 0.1 * probs.max(), 1 / self.vocab_size)
                log_probs = (probs / probs.sum()).log()
            else:
                log_probs = logits.log_softmax(dim=-1)
            value = F.kl_div(log_probs, self.previous, reduction="none", log_target=True).sum()
            self.previous = log_probs
        number = float(value)  # the exit decision is control flow: one sync per check
        return number < self.threshold, number


class AdaptiveSampler(Sampler):
    name = "adaptive"

    def __init__(self, model, tokenizer=None, default_stop_ids=(), params: AdaptiveParams | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, tokenizer, default_stop_ids)
        self.params = params or AdaptiveParams()

    def _recur_until_exit(
        self,
        model: RecurrentDepthModel,
        state: Tensor,
        embedded: Tensor,
        start: int,
        cache: KVCache,
        depth: Tensor,
        visible: Tensor,
        shallowest: int,
        criterion: ExitCriterion,
        may_exit: bool,
        values: list[float] | None,
    ) -> tuple[Tensor, Tensor | None, int, bool]:
        """Recur one chunk until it exits. Returns (final state, last-position logits if already computed from it,
        steps run, whether the criterion fired)."""
        cfg = self.params
        max_steps = cfg.num_steps or model.config.mean_recurrence
        span = model.span(start, state.shape[1])
        hides_positions = cache.mode == "per-step"
        criterion.reset(state)
        logits = None
        for step in range(max_steps):
            step_span = span
            if hides_positions and step >= shallowest:
                # Some cached positions exited before this step and have no entry in its slot (see the docstring).
                # Only single-token chunks follow cached positions, so one mask row suffices.
                torch.gt(depth[:start], step, out=visible[0, :start])
                step_span = dataclasses.replace(span, mask=visible[:, : start + 1], is_causal=False)
            state = model.core_step(state, embedded, start, cache, step, span=step_span)
            logits = None
            checked = may_exit and step >= cfg.min_steps and (step - cfg.min_steps) % cfg.check_every == 0
            if not checked:
                continue
            if criterion.uses_logits:
                logits = model.coda_logits(state, start, cache, last_only=True)[0][0, -1]
            done, value = criterion.check(state, logits)
            if values is not None:
                values.append(value)
            if done:
                return state, logits, step + 1, True
        return state, logits, max_steps, False

    @torch.inference_mode()
    def _generate(self, prompt: list[int], params: SamplingParams) -> Generator[int, None, GenerationResult]:
        model, cfg = self.model, self.params
        config = model.config
        max_steps = cfg.num_steps or config.mean_recurrence
        budget = self.token_budget(prompt, params)
        stopping = self.stop_condition(params)
        generator = self.generator(params)
        select = TokenSelector(params, generator)
        device = model.device

        capacity = len(prompt) + budget - 1 if budget > 1 else len(prompt)
        cache = KVCache(config, capacity, cfg.cache_mode, max_steps, device=device, dtype=model.dtype)
        tokens = torch.empty(len(prompt) + budget, dtype=torch.long, device=device)
        tokens[: len(prompt)] = torch.tensor(prompt, device=device)
        depth = torch.zeros(capacity, dtype=torch.long, device=device)
        visible = torch.ones(1, capacity + 1, dtype=torch.bool, device=device)
        criterion = ExitCriterion(cfg.criterion, cfg.threshold, config.vocab_size)
        trace: list[list[float]] | None = [] if cfg.trace else None
        stats = GenerationStats(
            prompt_tokens=len(prompt),
            cache_bytes=cache.allocated_bytes,
            cache_bytes_per_position=cache.bytes_per_position,
        )
        watch = Stopwatch(device)

        generated: list[int] = []
        steps_per_token: list[int] = []
        exits = 0
        shallowest = max_steps  # the fewest recurrences any cached position ran
        start, chunk = 0, tokens[None, : len(prompt)]
        warm = None
        if cfg.continuous_compute:
            warm = model.initial_state(model.prelude(chunk), cfg.init_scale, generator)
        finish = "length"
        while True:
            embedded = model.prelude(chunk, start, cache)
            state = warm if warm is not None else model.initial_state(embedded, cfg.init_scale, generator)
            values: list[float] | None = [] if trace is not None else None
            may_exit = cfg.exit_in_prefill or start > 0
            state, logits, steps, exited = self._recur_until_exit(
                model, state, embedded, start, cache, depth, visible, shallowest, criterion, may_exit, values
            )
            if logits is None:
                logits = model.coda_logits(state, start, cache, last_only=True)[0][0, -1]
            end = start + chunk.shape[1]
            depth[start:end] = steps
            shallowest = min(shallowest, steps)
            steps_per_token.append(steps)
            exits += exited
            if trace is not None and values is not None:
                trace.append(values)
            tokens[end] = select(logits[None], tokens[:end])[0]
            token = int(tokens[end])
            if not generated:
                stats.prefill_time_s = watch.lap()
            if (yield from emit([token], generated, budget, stopping)):
                finish = "stop"
                break
            if len(generated) == budget:
                break
            if cfg.continuous_compute:
                warm = state[:, -1:]
            start, chunk = end, tokens[None, end : end + 1]
        stats.decode_time_s = watch.lap()
        stats.generated_tokens = len(generated)
        stats.core_steps = sum(steps_per_token)
        stats.extra = {
            "recurrences_per_token": steps_per_token,
            "mean_recurrences_per_token": stats.core_steps / len(steps_per_token),
            "early_exits": exits,
            "exit_threshold": cfg.threshold,
        }
        if trace is not None:
            stats.extra["criterion_values"] = trace
        return GenerationResult(prompt, generated, finish, stats, self.decode_text(generated, params))
