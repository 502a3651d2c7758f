"""The diffusion forcing sampler (Geiping, Yang and Su, arXiv 2510.14961).

After a full-depth prefill of the prompt, every sampler step

1. runs the prelude on the *wavefront*: the not-yet-final positions C..C+S-1 (C = cache length), whose input
   tokens are the latest proposals, and mixes the result with the previous step's embeddings (momentum η);
2. iterates their recurrent states r' more times in parallel (each state keeps refining across steps);
3. decodes every wavefront position and re-proposes all not-yet-frozen tokens, and opens `headway` new positions
   at the front (capped at `max_wavefront` positions in flight);
4. freezes the longest prefix that has converged (by default: the last position whose normalised latent change
   ‖z_t − z_(t−1)‖/‖z_t‖ fell below ε, and everything before it), keeping its K/V in the cache and rolling the
   cache back over the rest, which the next step recomputes.

With one shared KV slot per layer (the paper's KV sharing) a position attends to the latest K/V of every earlier
position. Positions are held in buffers indexed by absolute position, so moving the wavefront is index
arithmetic: nothing is concatenated or reallocated per step.

Two modes. ``reference`` reproduces the official `generate_diffusion_style` token for token, quirks included.
``default`` fixes its defects: the latent change is compared between the same positions (the reference pairs
position p with p+g for one step after every freeze that advanced g positions); stop tokens are checked among all
newly frozen tokens from the first step (the reference only looks at tokens frozen in the current step, and only
after `num_steps` steps); the output is cut at the first stop token and at `max_new_tokens`; frozen tokens never
shrink below the prompt; the cache maps slots by layer for any layout (depthwave's shared cache always does).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

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
    is_int,
    is_number,
    require,
)

FreezeRule = Literal["latent-diff", "fixed", "token-stability", "latent-acceleration"]
FREEZE_RULES: tuple[str, ...] = ("latent-diff", "fixed", "token-stability", "latent-acceleration")
Mode = Literal["default", "reference"]


@dataclass(frozen=True)
class DiffusionParams:
    """Hyperparameters of the diffusion forcing sampler (paper defaults).

    inner_recurrence: r', core recurrences per sampler step. exit_threshold: ε of the latent freeze rules.
    momentum: η, weight of the previous step's input embeddings. noise: β, amount of fresh random state mixed into
    the wavefront states before each step (divided by 1 + recurrences so far when `dampened_noise`; `sqrt_noise`
    mixes variance-preservingly). headway: new positions opened per step. max_wavefront: cap on positions in
    flight (0 = none). freeze: latent-diff | fixed (headway tokens per step after a warm-up) | token-stability
    (proposal agreed more than num_steps // r' times) | latent-acceleration (change of the latent change).
    full_prefill: run the prompt through a normal full-depth pass first. num_steps: the prefill's recurrences
    (None = the model's mean_recurrence); also sets the warm-up of `fixed` and `token-stability`. init_scale:
    scale of every random state (initial, new positions, noise). continuous_compute: new positions start from a
    copy of the newest states instead of a random state. max_sampler_steps: safety cap on steps.
    max_recurrences: also freeze a token once the state that predicts it has run this many recurrences (None =
    never; with ε = 0 and max_wavefront = 1 the sampler is then static AR at this depth). cache_mode:
    "shared" (one slot per layer, the paper's) or "per-step" (the reference's "full": inner recurrence j of every
    step uses the prompt's recurrence-j K/V). mode: "default" or "reference" (see the module docstring). trace:
    record per-step positions, proposals, latent changes and recurrence counts in the result."""

    inner_recurrence: int = 4
    exit_threshold: float = 0.03
    momentum: float = 0.1
    noise: float = 0.0
    dampened_noise: bool = True
    sqrt_noise: bool = False
    headway: int = 1
    max_wavefront: int = 128
    freeze: FreezeRule = "latent-diff"
    full_prefill: bool = True
    num_steps: int | None = None
    init_scale: float = 1.0
    continuous_compute: bool = False
    max_sampler_steps: int = 4096
    max_recurrences: int | None = None
    cache_mode: CacheMode = "shared"
    mode: Mode = "default"
    trace: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            require(ok, name, getattr(self, name), what)

        need(is_int(self.inner_recurrence) and self.inner_recurrence >= 1, "inner_recurrence", "an integer >= 1")
        need(is_number(self.exit_threshold) and self.exit_threshold >= 0, "exit_threshold", "a number >= 0")
        need(is_number(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(is_number(self.noise) and 0 <= self.noise <= 1, "noise", "in [0, 1]")
        need(is_int(self.headway) and self.headway >= 1, "headway", "an integer >= 1")
        need(is_int(self.max_wavefront) and self.max_wavefront >= 0, "max_wavefront", "an integer >= 0 (0 = no cap)")
        need(
            self.max_wavefront != 1 or self.max_recurrences is not None,
            "max_wavefront",
            "at least 2 unless max_recurrences is set (a one-position wavefront advances only on that cap)",
        )
        need(
            self.max_recurrences is None or (is_int(self.max_recurrences) and self.max_recurrences >= 1),
            "max_recurrences",
            "None or an integer >= 1",
        )
        need(self.freeze in FREEZE_RULES, "freeze", f"one of {FREEZE_RULES}")
        need(
            self.num_steps is None or (is_int(self.num_steps) and self.num_steps >= 1),
            "num_steps",
            "None or an integer >= 1",
        )
        need(is_number(self.init_scale) and self.init_scale >= 0, "init_scale", ">= 0")
        need(is_int(self.max_sampler_steps) and self.max_sampler_steps >= 1, "max_sampler_steps", "an integer >= 1")
        need(self.cache_mode in CACHE_MODES, "cache_mode", f"one of {CACHE_MODES}")
        need(self.mode in ("default", "reference"), "mode", "'default' or 'reference'")
        for name in ("dampened_noise", "sqrt_noise", "full_prefill", "continuous_compute", "trace"):
            need(isinstance(getattr(self, name), bool), name, "true or false")


@dataclass
class _Window:
    """Where the sampler stands: the cache holds positions < start; the wavefront is start..start+size-1;
    `frozen` tokens are final; `length` tokens (frozen + proposals) are known."""

    start: int
    size: int
    frozen: int
    length: int


@dataclass
class _History:
    """What the freeze rules compare against: the previous step's (trimmed) wavefront states, copied into
    a preallocated buffer, with the position their first row belongs to and the window start of that step."""

    states: Tensor
    rows: int = 0
    first_position: int = 0
    step_start: int = 0
    deltas: Tensor | None = None
    """latent-acceleration: the previous change z_(t-1) - z_(t-2), indexed like `states`."""
    older: Tensor | None = None
    older_rows: int = 0
    older_first_position: int = 0


class DiffusionSampler(Sampler):
    name = "diffusion"

    def __init__(self, model, tokenizer=None, default_stop_ids=(), params: DiffusionParams | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, tokenizer, default_stop_ids)
        self.params = params or DiffusionParams()

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _random_states(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.model.initial_state(like, self.params.init_scale, generator)

    def _add_noise(self, wave: Tensor, recurrences: Tensor, generator: torch.Generator | None) -> Tensor:
        cfg = self.params
        amount = torch.full_like(recurrences, cfg.noise, dtype=torch.float32)
        if cfg.dampened_noise:
            amount = amount / (1 + recurrences)
        amount = amount.to(wave.dtype)[None, :, None]
        noise = self._random_states(wave, generator)
        if cfg.sqrt_noise:
            return wave * (1 - amount).clamp_min(0).sqrt() + amount.sqrt() * noise
        return wave * (1 - amount) + amount * noise

    @staticmethod
    def _last_true(mask: Tensor) -> int:
        """1 + the largest index where mask is true, or 0 if it is nowhere (one device sync)."""
        ranks = torch.arange(1, mask.shape[0] + 1, device=mask.device)
        return int((ranks * mask).max()) if mask.numel() else 0

    @staticmethod
    def _remember(history: _History, states: Tensor, first: int, rows: int, step_start: int) -> None:
        """Keep the trimmed wavefront's states for the next step's comparison (and the one before, for the
        acceleration rule: the two buffers swap roles instead of copying)."""
        if history.older is not None:
            history.older, history.states = history.states, history.older
            history.older_rows, history.older_first_position = history.rows, history.first_position
        history.states[:, :rows] = states[:, first : first + rows]
        history.rows, history.first_position, history.step_start = rows, first, step_start

    def _latent_deltas(
        self, history: _History, states: Tensor, start: int, grown: int, reference: bool
    ) -> tuple[Tensor | None, int]:
        """Normalised change of each wavefront state and the absolute position of the first compared row."""
        current_all = states[0, start : start + grown]
        if self.params.freeze == "latent-diff":
            # The reference slices the previous states by the distance between the two steps' window starts, but
            # they were stored from the trimmed window, which starts at this step's start: after a freeze that
            # advanced g positions it pairs position p with p + g. Corrected: pair equal positions.
            offset = start - (history.step_start if reference else history.first_position)
            rows = min(history.rows - offset, grown)
            if rows <= 0:
                return None, start
            current = current_all[:rows]
            return (current - history.states[0, offset : offset + rows]).norm(dim=-1) / current.norm(dim=-1), start
        # latent-acceleration: ‖(z_t − z_(t−1)) − (z_(t−1) − z_(t−2))‖ / ‖z_t‖ over positions held by all three.
        assert history.older is not None
        first = max(start, history.first_position, history.older_first_position)
        end = min(
            start + grown, history.first_position + history.rows, history.older_first_position + history.older_rows
        )
        if end <= first:
            return None, start
        current = states[0, first:end]
        previous = history.states[0, first - history.first_position : end - history.first_position]
        older = history.older[0, first - history.older_first_position : end - history.older_first_position]
        acceleration = (current - previous) - (previous - older)
        return acceleration.norm(dim=-1) / (current.norm(dim=-1) + 1e-6), first

    def _freeze(
        self,
        window: _Window,
        history: _History,
        states: Tensor,
        stability: Tensor,
        counts: Tensor,
        grown: int,
        opened: int,
        num_steps: int,
        step: int,
        reference: bool,
        cache: KVCache,
    ) -> tuple[bool, Tensor | None, int]:
        """Decide which positions become final, roll the cache back over the rest, move the window. Returns
        (whether anything froze, the latent changes compared if the rule uses them, the first compared position)."""
        cfg = self.params
        start = window.start
        deltas, boundary, first = None, 0, start
        if cfg.freeze in ("latent-diff", "latent-acceleration"):
            deltas, first = self._latent_deltas(history, states, start, grown, reference)
            if deltas is not None:
                last = self._last_true(deltas < cfg.exit_threshold)
                boundary = first + last if last else 0
        elif cfg.freeze == "token-stability":
            # Freeze up to the last position whose proposal agreed more than num_steps // r' times in all.
            boundary = self._last_true(stability[: window.length] > num_steps // cfg.inner_recurrence)
        elif step > num_steps // cfg.inner_recurrence:  # fixed: `headway` tokens per step after a warm-up
            # The reference keeps `headway` positions of the cache even when a standing wave opened fewer.
            cache.truncate(start + (cfg.headway if reference else opened))
            window.start, window.size = start + opened, grown - opened
            window.frozen += opened
            return True, None, first
        if cfg.max_recurrences is not None:
            # Row i predicts position start + i + 1: once it has run the maximum, that prediction is final.
            done = self._last_true(counts[window.start : window.start + window.size] >= cfg.max_recurrences)
            if done:
                boundary = max(boundary, start + done + 1)
        if boundary and not reference:
            boundary = max(boundary, start + 1)
        if not boundary:
            cache.truncate(start)
            window.size = grown
            return False, deltas, first
        # Freeze everything before `boundary`; the last frozen position stays in the wavefront, as it predicts the
        # first unfrozen token.
        cache.truncate(boundary - 1)
        window.start, window.size = boundary - 1, start + grown - (boundary - 1)
        window.frozen = boundary if reference else max(boundary, window.frozen)
        window.length = max(window.length, window.frozen)
        return True, deltas, first

    @torch.inference_mode()
    def _generate(self, prompt: list[int], params: SamplingParams) -> Generator[int, None, GenerationResult]:
        cfg, model = self.params, self.model
        reference = cfg.mode == "reference"
        config = model.config
        device, dtype = model.device, model.dtype
        num_steps = cfg.num_steps or config.mean_recurrence
        r_inner, headway, cap = cfg.inner_recurrence, cfg.headway, cfg.max_wavefront
        prompt_len = len(prompt)
        if not cfg.full_prefill and cap and prompt_len > cap:
            raise InvalidParameterError(
                f"without full_prefill the prompt ({prompt_len} tokens) must fit in max_wavefront={cap}"
            )
        if cfg.cache_mode == "per-step" and r_inner > num_steps:
            raise InvalidParameterError(
                f"with cache_mode 'per-step', inner_recurrence ({r_inner}) cannot exceed num_steps ({num_steps})"
            )
        budget = params.max_new_tokens if reference else self.token_budget(prompt, params)
        stops = self.stop_ids(params)
        stopping = self.stop_condition(params)
        generator = self.generator(params)
        select = TokenSelector(params, generator)

        # Every position the loop can touch: it runs while fewer than `budget` tokens are frozen, and one step
        # reaches at most one wavefront plus headway beyond the frozen ones.
        positions = min(config.block_size, prompt_len + budget + (cap or config.block_size) + headway)
        capacity = positions + headway + 2
        tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        tokens[:prompt_len] = torch.tensor(prompt, device=device)
        states = torch.zeros(1, capacity, config.n_embd, device=device, dtype=dtype)
        embeddings = torch.zeros_like(states) if cfg.momentum > 0 else None
        embedded_until = 0
        counts = torch.zeros(capacity, dtype=torch.long, device=device)
        stability = torch.zeros(capacity, dtype=torch.long, device=device)
        history = _History(torch.zeros_like(states))
        if cfg.freeze == "latent-acceleration":
            history.older = torch.zeros_like(states)
        cache = KVCache(config, positions, cfg.cache_mode, num_steps, device=device, dtype=dtype)
        stats = GenerationStats(
            prompt_tokens=prompt_len,
            cache_bytes=cache.allocated_bytes,
            cache_bytes_per_position=cache.bytes_per_position,
        )
        counters = {
            "core_forward_passes": 0,
            "token_positions_forwarded": 0,
            "cache_rollback_positions": 0,
            "standing_waves": 0,
        }
        trace: list[dict[str, Any]] | None = [] if cfg.trace else None
        watch = Stopwatch(device)

        # ---- prefill ----------------------------------------------------------------------------------------
        emitted: list[int] = []
        finish = "length"
        if cfg.full_prefill:
            out = model(
                tokens[None, :prompt_len], num_steps, cfg.init_scale, cache=cache, last_only=True, generator=generator
            )
            counters["core_forward_passes"] += 1
            counters["token_positions_forwarded"] += prompt_len
            tokens[prompt_len] = select(out.logits[:, -1], tokens[:prompt_len])[0]
            # The reference also credits the prefill's depth to the new token's position, which has not run yet
            # (it matters for the noise damping); the default mode counts what each state really ran.
            counts[: prompt_len + (1 if reference else 0)] += num_steps
            window = _Window(start=prompt_len, size=1, frozen=prompt_len + 1, length=prompt_len + 1)
            states[:, prompt_len : prompt_len + 1] = self._random_states(states[:, :1], generator)
            if embeddings is not None:
                embeddings[:, : prompt_len + 1] = model.prelude(tokens[None, : prompt_len + 1])
                embedded_until = prompt_len + 1
            stats.prefill_time_s = watch.lap()
            first = int(tokens[prompt_len])
            emitted.append(first)
            yield first
            if not reference and stopping(emitted):
                finish = "stop"
        else:
            window = _Window(start=0, size=prompt_len, frozen=prompt_len, length=prompt_len)
            states[:, :prompt_len] = self._random_states(states[:, :prompt_len], generator)
            if embeddings is not None:
                embeddings[:, :prompt_len] = model.prelude(tokens[None, :prompt_len])
                embedded_until = prompt_len
            stats.prefill_time_s = watch.lap()
        self._remember(history, states, window.start, window.size, step_start=0)
        boundary = boundary_before = 0  # the reference's freeze boundary k and its previous value

        # ---- sampler steps ------------------------------------------------------------------------------------
        step = 0
        while (len(emitted) < budget if not reference else window.frozen - prompt_len < budget) and (
            finish == "length" and window.length <= config.block_size
        ):
            start, size, known = window.start, window.size, window.length
            frozen_before = window.frozen

            embedded = model.prelude(tokens[None, start : start + size], start, cache)
            if embeddings is not None:
                embedded = embedded * (1 - cfg.momentum)
                overlap = max(0, min(embedded_until, start + size) - start)
                embedded[:, :overlap] += cfg.momentum * embeddings[:, start : start + overlap]
                embeddings[:, start : start + size] = embedded
                embedded_until = start + size
            wave = states[:, start : start + size]
            if cfg.noise > 0:
                wave = self._add_noise(wave, counts[start : start + size], generator)
            wave = model.recur(wave, embedded, r_inner, start, cache)
            states[:, start : start + size] = wave
            counts[start : start + size] += r_inner
            counters["core_forward_passes"] += r_inner
            counters["token_positions_forwarded"] += r_inner * size
            logits, _ = model.coda_logits(wave, start, cache)

            # Re-propose every not-yet-frozen position; row j of the wavefront predicts position start + j + 1.
            offset = max(window.frozen - 1 - start, 0)
            proposals = select(logits[0, offset:], tokens[: window.frozen])
            stability[: window.frozen] += 1
            stability[window.frozen : known] += tokens[window.frozen : known] == proposals[: known - window.frozen]
            fill_from = window.frozen + proposals.shape[0]
            tokens[window.frozen : fill_from] = proposals
            if headway > 1:
                tokens[fill_from : fill_from + headway - 1] = torch.randint(
                    0, 65510 if reference else config.vocab_size, (headway - 1,), generator=generator, device=device
                )
            window.length = fill_from + headway - 1

            # Open `headway` new positions at the front, within the wavefront cap.
            front = start + size
            if cfg.continuous_compute and size >= headway:
                states[:, front : front + headway] = wave[:, size - headway :]
            else:
                states[:, front : front + headway] = self._random_states(states[:, front : front + headway], generator)
            grown, opened = size + headway, headway
            if cap and grown > cap:
                opened, grown = cap - size, cap
                window.length = start + cap
                counters["standing_waves"] += 1

            froze, deltas, compared_from = self._freeze(
                window, history, states, stability, counts, grown, opened, num_steps, step, reference, cache
            )
            if window.size == 0:
                # Everything in flight froze (possible with a one-position wavefront): the next position starts
                # from a fresh state, as in static decoding.
                window.size = 1
                states[:, window.start : window.start + 1] = self._random_states(states[:, :1], generator)
            counters["cache_rollback_positions"] += start + size - cache.length
            if froze and cfg.freeze in ("latent-diff", "latent-acceleration"):
                boundary = window.frozen
            if trace is not None:
                trace.append(
                    {
                        "step": step,
                        "start": start,
                        "size": size,
                        "frozen_before": frozen_before,
                        "frozen_after": window.frozen,
                        "proposals": proposals.tolist(),
                        "compared_from": compared_from,
                        "latent_change": [] if deltas is None else deltas.float().tolist(),
                        "recurrences": counts[start : start + size].tolist(),
                    }
                )

            # Stream what froze; stop.
            fresh = tokens[prompt_len + len(emitted) : window.frozen].tolist()
            if reference:
                emitted.extend(fresh)
                yield from fresh
                if step > num_steps:
                    if cfg.freeze in ("latent-diff", "latent-acceleration"):
                        recent = tokens[boundary_before:boundary].tolist()
                    else:
                        recent = tokens[max(window.frozen - headway, 0) : window.frozen].tolist()
                    if any(t in stops for t in recent):
                        break
                if step > cfg.max_sampler_steps:
                    break
            else:
                if (yield from emit(fresh, emitted, budget, stopping)):
                    finish = "stop"
                if step + 1 >= cfg.max_sampler_steps:
                    step += 1
                    break
            self._remember(history, states, window.start, window.size, step_start=start)
            boundary_before = boundary
            step += 1

        stats.decode_time_s = watch.lap()
        if reference:
            # The reference returns every frozen token, uncut at stop tokens and possibly beyond the budget.
            generated = tokens[prompt_len : window.frozen].tolist()
            finish = "stop" if any(t in stops for t in generated) else "length"
        else:
            generated = emitted
        # Token q is predicted by the state at position q - 1.
        recurrences = counts[prompt_len - 1 : prompt_len - 1 + len(generated)].clone()
        if reference and cfg.full_prefill and recurrences.numel() > 1:
            recurrences[1] -= num_steps
        per_token = recurrences.tolist()
        stats.generated_tokens = len(generated)
        stats.core_steps = int(sum(per_token))
        stats.extra = {
            "sampler_steps": step,
            **counters,
            "recurrences_per_token": per_token,
            "mean_recurrences_per_token": sum(per_token) / len(per_token) if per_token else 0.0,
            "sequential_core_steps": (num_steps if cfg.full_prefill else 0) + r_inner * step,
            "mean_wavefront": (
                (counters["token_positions_forwarded"] - (prompt_len if cfg.full_prefill else 0)) / (r_inner * step)
                if step
                else 0.0
            ),
            "tokens_per_sampler_step": len(generated) / step if step else 0.0,
            "hit_max_sampler_steps": step >= cfg.max_sampler_steps,
        }
        if trace is not None:
            stats.extra["trace"] = trace
        return GenerationResult(prompt, generated, finish, stats, self.decode_text(generated, params))  # type: ignore[arg-type]
