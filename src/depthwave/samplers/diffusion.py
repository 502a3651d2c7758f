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

Two modes. ``reference`` reproduces the official `generate_diffusion_style` token for token, quirks included
(`depthwave.samplers.quirks.DiffusionQuirks` names each); ``default`` corrects them. The cache maps slots by layer
for any layout in both (depthwave's shared cache always does).

Batched: the engine runs every request's wavefront in one pass, each row with its own window; this module's
`prepare` does the per-step bookkeeping for all diffusion rows at once (proposals, newly opened positions, latent
changes, recurrence caps) and fetches what the freeze decisions need in the pass's one transfer; `freeze` is the
decision itself, a pure function of the window and those numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor

from depthwave.engine.buffers import RandomStates
from depthwave.engine.policy import Chunk, EngineContext, Noise, PassResult, Policy, Sizing
from depthwave.engine.request import GenerationStats, Request
from depthwave.engine.selection import SamplingParams
from depthwave.errors import InvalidParameterError, is_int, is_number, param, require
from depthwave.model.config import HuginnConfig
from depthwave.model.kv_cache import CACHE_MODES, CacheMode
from depthwave.samplers.ops import cat, last_true, scatter_rows, token_budget
from depthwave.samplers.quirks import DiffusionQuirks, diffusion_quirks

FreezeRule = Literal["latent-diff", "fixed", "token-stability", "latent-acceleration"]
FREEZE_RULES: tuple[str, ...] = ("latent-diff", "fixed", "token-stability", "latent-acceleration")
Mode = Literal["default", "reference"]


@dataclass(frozen=True)
class DiffusionParams:
    """Hyperparameters of the diffusion forcing sampler (the paper's defaults)."""

    inner_recurrence: int = param(4, "r', core recurrences per sampler step")
    exit_threshold: float = param(0.03, "ε of the latent freeze rules")
    momentum: float = param(0.1, "η, weight of the previous step's input embeddings")
    noise: float = param(0.0, "β, fresh random state mixed into the wavefront states before each step")
    dampened_noise: bool = param(True, "divide the noise by 1 + the recurrences so far")
    sqrt_noise: bool = param(False, "mix the noise in variance-preservingly")
    headway: int = param(1, "new positions opened per step")
    max_wavefront: int = param(128, "cap on positions in flight (0: none)")
    freeze: FreezeRule = param(
        "latent-diff",
        "latent-diff, fixed (headway tokens a step after a warm-up), token-stability (the proposal agreed more "
        "than num_steps // r' times) or latent-acceleration (the change of the latent change)",
    )
    full_prefill: bool = param(True, "run the prompt through a full-depth pass first")
    num_steps: int | None = param(
        None, "the prefill's recurrences (default: the model's mean_recurrence); the warm-up of fixed, token-stability"
    )
    init_scale: float = param(1.0, "scale of every random state (initial, new positions, noise)")
    continuous_compute: bool = param(False, "new positions start from a copy of the newest states")
    max_sampler_steps: int = param(4096, "safety cap on sampler steps")
    max_recurrences: int | None = param(
        None, "also freeze a token once the state predicting it ran this many recurrences (default: never)"
    )
    cache_mode: CacheMode = param(
        "shared", "KV cache: shared (one slot per layer, the paper's) or per-step (the reference's 'full')"
    )
    mode: Mode = param("default", "default, or reference (token-identical to the official generate_diffusion_style)")
    trace: bool = param(False, "record per-step positions, proposals, latent changes and recurrence counts")

    name: ClassVar[str] = "diffusion"

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
            self.mode == "reference"
            or self.exit_threshold > 0
            or self.freeze not in LATENT_RULES
            or self.max_recurrences is not None,
            "exit_threshold",
            f"> 0 with freeze={self.freeze!r} unless max_recurrences is set (no latent change is below 0, so "
            "nothing would ever freeze)",
        )
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

    def policy_class(self) -> type[Policy]:
        return DiffusionPolicy


LATENT_RULES = ("latent-diff", "latent-acceleration")
NEVER = 1 << 62


@dataclass
class Window:
    """Where a request stands: the cache holds positions < start; the wavefront is start..start+size-1;
    `frozen` tokens are final; `length` tokens (frozen + proposals) are known."""

    start: int
    size: int
    frozen: int
    length: int


def freeze(
    window: Window,
    params: DiffusionParams,
    quirks: DiffusionQuirks,
    grown: int,
    opened: int,
    step: int,
    warmup: int,
    compared_from: int,
    latent_last: int,
    stable_last: int,
    capped_last: int,
) -> tuple[bool, int]:
    """Decide which positions become final and move the window. `grown` positions are in flight after `opened` new
    ones; the *_last numbers are 1 + the last wavefront row whose latent change is below ε (rows compared from
    position `compared_from`), whose proposal is stable, whose recurrences reached the cap (0 = none). Returns
    (whether anything froze, the cache length to keep)."""
    start = window.start
    boundary = 0
    if params.freeze in LATENT_RULES:
        boundary = compared_from + latent_last if latent_last else 0
    elif params.freeze == "token-stability":
        boundary = stable_last
    elif step > warmup:  # fixed: `headway` tokens per step after a warm-up
        keep = start + (params.headway if quirks.fixed_rule_keeps_headway else opened)
        window.start, window.size = start + opened, grown - opened
        window.frozen += opened
        return True, keep
    if params.max_recurrences is not None and capped_last:
        # Row i predicts position start + i + 1: once it has run the maximum, that prediction is final.
        boundary = max(boundary, start + capped_last + 1)
    if boundary and not quirks.frozen_may_shrink:
        boundary = max(boundary, start + 1)
    if not boundary:
        window.size = grown
        return False, start
    # Freeze everything before `boundary`; the last frozen position stays in the wavefront, as it predicts the
    # first unfrozen token.
    window.start, window.size = boundary - 1, start + grown - (boundary - 1)
    window.frozen = boundary if quirks.frozen_may_shrink else max(boundary, window.frozen)
    window.length = max(window.length, window.frozen)
    return True, boundary - 1


@dataclass
class DiffusionStats(GenerationStats):
    sampler_steps: int = 0
    core_forward_passes: int = 0
    token_positions_forwarded: int = 0
    cache_rollback_positions: int = 0
    standing_waves: int = 0
    recurrences_per_token: list[int] = field(default_factory=list)
    mean_recurrences_per_token: float = 0.0
    sequential_core_steps: int = 0
    mean_wavefront: float = 0.0
    tokens_per_sampler_step: float = 0.0
    hit_max_sampler_steps: bool = False
    trace: list[dict[str, Any]] | None = None

    sampler: ClassVar[str] = "diffusion"

    def details(self) -> str:
        return f"{self.sampler_steps} sampler steps, {self.tokens_per_sampler_step:.2f} tokens/step"


class DiffusionPolicy(Policy):
    def __init__(self, request: Request, ctx: EngineContext) -> None:
        super().__init__(request, ctx)
        params: DiffusionParams = request.sampler  # type: ignore[assignment]
        model = ctx.model
        self.params = params
        self.quirks = diffusion_quirks(params.mode)
        self.num_steps = params.num_steps or model.config.mean_recurrence
        self.warmup = self.num_steps // params.inner_recurrence
        self.random = RandomStates(model.config, params.init_scale, request.generator, model.device, model.dtype)
        prompt = request.prompt_token_ids
        # A host copy of the row's tokens: what froze is streamed from it without another device read.
        self.tokens = list(prompt) + [0] * (ctx.buffers.length - len(prompt))
        self.phase = "prefill" if params.full_prefill else "step"
        self.window = Window(0, len(prompt), len(prompt), len(prompt))
        self.step = 0
        self.step_start = 0  # the window start of the previous step (what the reference pairs latents by)
        self.older = (0, 0)  # latent-acceleration: the window whose states the `older` buffer holds
        self.embedded_until = 0
        self.boundary = self.boundary_before = 0  # the reference's freeze boundary k and its previous value
        self.forward_passes = self.positions_forwarded = self.rollback_positions = self.standing_waves = 0
        self.trace: list[dict[str, Any]] | None = [] if params.trace else None
        self.recurrences: list[int] = []

    @staticmethod
    def size(params: DiffusionParams, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:
        cap, headway = params.max_wavefront, params.headway
        num_steps = params.num_steps or config.mean_recurrence
        if not params.full_prefill and cap and prompt_len > cap:
            raise InvalidParameterError(
                f"without full_prefill the prompt ({prompt_len} tokens) must fit in max_wavefront={cap}"
            )
        if params.cache_mode == "per-step" and params.inner_recurrence > num_steps:
            raise InvalidParameterError(
                f"with cache_mode 'per-step', inner_recurrence ({params.inner_recurrence}) cannot exceed num_steps "
                f"({num_steps})"
            )
        if params.mode == "reference" and config.family != "huginn":
            raise InvalidParameterError(
                "mode='reference' reproduces Huginn's official generate_diffusion_style; the retrofitted "
                f"{config.block_type} models have no official diffusion sampler to match: use mode='default'"
            )
        quirks = diffusion_quirks(params.mode)
        if quirks.stops_at_context_end and prompt_len + 1 + headway > config.block_size:
            raise InvalidParameterError(
                f"with mode='reference' the loop ends once its window passes the context: headway={headway} after "
                f"a {prompt_len}-token prompt does not fit in the {config.block_size}-position context, so it "
                "could never freeze a token; lower headway or use mode='default'"
            )
        if quirks.random_tokens_below_65510 and headway > 1 and config.vocab_size < 65510:
            raise InvalidParameterError(
                f"with mode='reference' and headway > 1 new positions get random token ids below 65510, as in the "
                f"official code, which this model's vocabulary ({config.vocab_size}) does not hold; use "
                "mode='default'"
            )
        budget = (
            sampling.max_new_tokens if quirks.budget_ignores_context else token_budget(prompt_len, sampling, config)
        )
        # Every position the loop can touch: it runs while fewer than `budget` tokens are frozen, and one step
        # reaches at most one wavefront plus headway beyond the frozen ones.
        positions = min(config.block_size, prompt_len + budget + (cap or config.block_size) + headway)
        return Sizing(budget, positions, positions + headway + 2, num_steps)

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.phase == "prefill":
            return
        n = self.prompt_len
        self.ctx.buffers.states[self.row, :n] = self.random.take(n)
        if self.params.momentum > 0:
            self._embed(n)

    def _embed(self, count: int) -> None:
        """The prelude over the first `count` tokens without the cache: the embeddings momentum starts from."""
        model, buffers = self.ctx.model, self.ctx.buffers
        ids = buffers.tokens[self.row : self.row + 1, :count]
        at = model.positions([0], [count], cached=False)
        buffers.optional("embeddings")[self.row, :count] = model.prelude(ids, at)[0]
        self.embedded_until = count

    def chunk(self) -> Chunk:
        params = self.params
        if self.phase == "prefill":
            n = self.prompt_len
            return Chunk(0, n, self.num_steps, n - 1, init=self.random.take(n), accumulate=True, context=n)
        w = self.window
        noise = None
        if params.noise > 0:
            noise = Noise(params.noise, params.dampened_noise, params.sqrt_noise, self.random.take(w.size))
        # Re-propose every not-yet-frozen position; row j of the wavefront predicts position start + j + 1.
        offset = max(w.frozen - 1 - w.start, 0)
        return Chunk(
            w.start,
            w.size,
            params.inner_recurrence,
            offset,
            accumulate=True,
            context=w.frozen,
            momentum=params.momentum,
            embedded_until=self.embedded_until,
            noise=noise,
        )

    # ---- after a pass: device work for all diffusion rows, then each row's decision ---------------------------
    @classmethod
    def prepare(cls, members: list[tuple[Policy, int]], result: PassResult) -> list[Tensor]:
        prefill, steps = _by_phase(members)
        fetched = [policy._after_prefill(index, result) for policy, index in prefill]
        if steps:
            fetched.extend(_after_steps(steps, result))
        return fetched

    @classmethod
    def decide(cls, members: list[tuple[Policy, int]], fetched: list[list[float]], result: PassResult) -> None:
        prefill, steps = _by_phase(members)
        for (policy, _), values in zip(prefill, fetched, strict=False):
            policy._prefilled(int(values[0]))
        if steps:
            proposals, decisions, *rest = fetched[len(prefill) :]
            opened = sum(p.params.headway > 1 for p, _ in steps)
            randoms, traced = iter(rest[:opened]), iter(rest[opened:])
            first = 0
            for n, (policy, index) in enumerate(steps):
                chunk = result.chunks[index]
                count = chunk.logits_rows
                policy._stepped(
                    chunk,
                    [int(v) for v in proposals[first : first + count]],
                    [int(v) for v in decisions[3 * n : 3 * n + 3]],
                    randoms,
                    traced,
                )
                first += count

    def _after_prefill(self, index: int, result: PassResult) -> Tensor:
        buffers, n = self.ctx.buffers, self.prompt_len
        token = result.tokens_of(index)
        buffers.tokens[self.row, n] = token[0]
        buffers.states[self.row, n] = self.random.take(1)[0]
        if self.quirks.prefill_depth_on_new_position:
            buffers.counts[self.row, n] += self.num_steps
        if self.params.momentum > 0:
            self._embed(n + 1)
        return token

    def _prefilled(self, token: int) -> None:
        n = self.prompt_len
        self.forward_passes += 1
        self.positions_forwarded += n
        self.tokens[n] = token
        self.window = Window(n, 1, n + 1, n + 1)
        self.phase = "step"
        output = self.request.output
        assert output is not None
        if self.quirks.late_stop_check:
            output.extend_unchecked([token])
        elif output.emit([token]):
            self.finish("stop")
            return
        self._continue_or_finish()

    def _stepped(
        self, chunk: Chunk, proposals: list[int], decision: list[int], randoms: Iterator, traced: Iterator
    ) -> None:
        params, quirks, w = self.params, self.quirks, self.window
        start, size = w.start, w.size
        frozen_before = w.frozen
        headway, cap = params.headway, params.max_wavefront
        self.forward_passes += params.inner_recurrence
        self.positions_forwarded += params.inner_recurrence * size
        self.embedded_until = start + size
        fill_from = w.frozen + len(proposals)
        self.tokens[w.frozen : fill_from] = proposals
        if headway > 1:
            self.tokens[fill_from : fill_from + headway - 1] = [int(v) for v in next(randoms)]
        w.length = fill_from + headway - 1
        grown, opened = size + headway, headway
        if cap and grown > cap:
            opened, grown = cap - size, cap
            w.length = start + cap
            self.standing_waves += 1
        end = self.ctx.model.config.block_size
        if start + grown > end and not quirks.stops_at_context_end:
            # The context ends here: open only the positions it still has, and keep refining the ones in flight
            # until they freeze, so that the output fills the context as static decoding does.
            opened, grown = max(end - start - size, 0), min(grown, end - start)
            w.length = start + grown
        latent_last, stable_last, capped_last = decision
        compared_from = self._compared_from(start, size)
        froze, keep = freeze(
            w,
            params,
            quirks,
            grown,
            opened,
            self.step,
            self.warmup,
            compared_from[0],
            latent_last,
            stable_last,
            capped_last,
        )
        pool = self.ctx.pool
        pool.rollback(self.row, keep)
        self.rollback_positions += start + size - keep
        if w.size == 0:
            # Everything in flight froze (possible with a one-position wavefront): the next position starts
            # from a fresh state, as in static decoding.
            w.size = 1
            self.ctx.buffers.states[self.row, w.start] = self.random.take(1)[0]
        if froze and params.freeze in LATENT_RULES:
            self.boundary = w.frozen
        if self.trace is not None:
            deltas, recurrences = next(traced), next(traced)
            self.trace.append(
                {
                    "step": self.step,
                    "start": start,
                    "size": size,
                    "frozen_before": frozen_before,
                    "frozen_after": w.frozen,
                    "proposals": proposals,
                    "compared_from": compared_from[0],
                    "latent_change": deltas[: compared_from[1]],
                    "recurrences": [int(v) for v in recurrences],
                }
            )
        ended = self._stream(headway)
        if ended == "cap":
            return
        if ended == "stop" and self.quirks.late_stop_check:
            self.finish("stop")  # the reference leaves its loop before counting the step
            return
        self.step_start = start
        self.older = (start, size)
        self.boundary_before = self.boundary
        self.step += 1
        if ended == "stop":
            self.finish("stop")
        else:
            self._continue_or_finish()

    def _compared_from(self, start: int, size: int) -> tuple[int, int]:
        """(first position, number of rows) whose latent change this step's freeze rule compares."""
        if self.params.freeze == "latent-acceleration":
            older_start, older_size = self.older
            first = max(start, older_start)
            return first, max(0, min(start + size, older_start + older_size) - first)
        shift = start - self.step_start if self.quirks.shifted_latent_pairs else 0
        return start, max(0, size - shift)

    def _stream(self, headway: int) -> str | None:
        """Hand over what froze. Returns "stop" when a stop token ended generation, "cap" when the step cap did
        (and the request finished), else None."""
        output = self.request.output
        assert output is not None
        w, stops = self.window, output.stop.ids
        fresh = self.tokens[self.prompt_len + len(output.tokens) : w.frozen]
        if self.quirks.late_stop_check:
            output.extend_unchecked(fresh)
            if self.step > self.num_steps:
                if self.params.freeze in LATENT_RULES:
                    recent = self.tokens[self.boundary_before : self.boundary]
                else:
                    recent = self.tokens[max(w.frozen - headway, 0) : w.frozen]
                if any(t in stops for t in recent):
                    return "stop"
            if self.step > self.params.max_sampler_steps:
                self.finish("length")
                return "cap"
            return None
        stopped = output.emit(fresh)
        if self.step + 1 >= self.params.max_sampler_steps:
            self.step += 1
            self.finish("stop" if stopped else "length")
            return "cap"
        return "stop" if stopped else None

    def _continue_or_finish(self) -> None:
        output = self.request.output
        assert output is not None
        w = self.window
        produced = w.frozen - self.prompt_len if self.quirks.uncut_output else len(output.tokens)
        end = self.ctx.model.config.block_size
        full = w.length > end if self.quirks.stops_at_context_end else w.frozen >= end
        if produced >= self.request.budget or full:
            self.finish("length")

    # ---- per-row helpers: opening positions, the rarer freeze rules ------------------------------------
    def _open_positions(self, wave_out: Tensor) -> tuple[list[Tensor], Tensor]:
        """Open `headway` new positions at the front: random tokens beyond the first proposal (headway > 1), and
        the new positions' states (fresh, or copies of the newest states with continuous compute), which the caller
        writes for all rows at once. Returns (the random tokens, if any; the states [headway, D])."""
        params, w, buffers = self.params, self.window, self.ctx.buffers
        headway, extras = params.headway, []
        if headway > 1:
            fill_from = w.frozen + w.size - max(w.frozen - 1 - w.start, 0)
            vocab = 65510 if self.quirks.random_tokens_below_65510 else self.ctx.model.config.vocab_size
            random = torch.randint(0, vocab, (headway - 1,), generator=self.request.generator, device=buffers.device)
            buffers.tokens[self.row, fill_from : fill_from + headway - 1] = random
            extras.append(random)
        if params.continuous_compute and w.size >= headway:
            return extras, wave_out[w.size - headway : w.size]
        return extras, self.random.take(headway)

    def _count_agreement(self, proposals: Tensor) -> None:
        """token-stability: every frozen position gains one, every proposal that repeats the token it replaces too."""
        w = self.window
        stability = self.ctx.buffers.optional("stability")[self.row]
        stability[: w.frozen] += 1
        known = w.length - w.frozen
        if known > 0:
            tokens = self.ctx.buffers.tokens[self.row, w.frozen : w.length]
            stability[w.frozen : w.length] += tokens == proposals[:known]

    def _stable_last(self) -> Tensor:
        """token-stability: 1 + the last position whose proposal agreed more than num_steps // r' times."""
        w = self.window
        count = w.size - max(w.frozen - 1 - w.start, 0)
        length = w.frozen + count + self.params.headway - 1
        if self.params.max_wavefront and w.size + self.params.headway > self.params.max_wavefront:
            length = w.start + self.params.max_wavefront
        stability = self.ctx.buffers.optional("stability")[self.row, :length]
        return last_true((stability > self.warmup)[None])[0]

    def _acceleration(self, wave_in: Tensor, wave_out: Tensor) -> tuple[Tensor, int]:
        """latent-acceleration: ‖(z_t − z_(t−1)) − (z_(t−1) − z_(t−2))‖ / ‖z_t‖ over the positions held by all three
        (z_(t−2) from the `older` buffer), and the first of them."""
        w = self.window
        first, rows = self._compared_from(w.start, w.size)
        older = self.ctx.buffers.optional("older")[self.row, first : first + rows]
        current = wave_out[first - w.start : first - w.start + rows]
        previous = wave_in[first - w.start : first - w.start + rows]
        acceleration = (current - previous) - (previous - older)
        return acceleration.norm(dim=-1) / (current.norm(dim=-1) + 1e-6), first

    def _acceleration_last(self, wave_in: Tensor, wave_out: Tensor) -> Tensor:
        deltas, _ = self._acceleration(wave_in, wave_out)
        w = self.window
        # The states of this step's window become z_(t−2) of the step after next.
        self.ctx.buffers.optional("older")[self.row, w.start : w.start + w.size] = wave_in[: w.size]
        return last_true((deltas < self.params.exit_threshold)[None])[0]

    # ---- results ------------------------------------------------------------------------------------------
    def final_tokens(self, emitted: list[int]) -> list[int]:
        # Token q is predicted by the state at position q - 1 (read now: the row is freed after this).
        generated = self.tokens[self.prompt_len : self.window.frozen] if self.quirks.uncut_output else emitted
        first = self.prompt_len - 1
        self.recurrences = self.ctx.buffers.counts[self.row, first : first + len(generated)].tolist()
        if self.quirks.prefill_depth_on_new_position and self.params.full_prefill and len(self.recurrences) > 1:
            self.recurrences[1] -= self.num_steps
        if self.quirks.uncut_output:
            stops = self.request.output.stop.ids  # type: ignore[union-attr]
            self.request.finish_reason = "stop" if any(t in stops for t in generated) else "length"
        return generated

    def finalize_stats(self) -> DiffusionStats:
        params, steps = self.params, self.step
        per_token = self.recurrences
        prefill = self.prompt_len if params.full_prefill else 0
        return DiffusionStats(
            core_steps=sum(per_token),
            sampler_steps=steps,
            core_forward_passes=self.forward_passes,
            token_positions_forwarded=self.positions_forwarded,
            cache_rollback_positions=self.rollback_positions,
            standing_waves=self.standing_waves,
            recurrences_per_token=per_token,
            mean_recurrences_per_token=sum(per_token) / len(per_token) if per_token else 0.0,
            sequential_core_steps=(self.num_steps if params.full_prefill else 0) + params.inner_recurrence * steps,
            mean_wavefront=((self.positions_forwarded - prefill) / (params.inner_recurrence * steps) if steps else 0.0),
            tokens_per_sampler_step=len(per_token) / steps if steps else 0.0,
            hit_max_sampler_steps=steps >= params.max_sampler_steps,
            trace=self.trace,
        )


Members = list[tuple[DiffusionPolicy, int]]


def _by_phase(members: list[tuple[Policy, int]]) -> tuple[Members, Members]:
    """A pass's diffusion rows that ran their prefill, and those that ran a sampler step."""
    rows = cast(Members, members)
    return [m for m in rows if m[0].phase == "prefill"], [m for m in rows if m[0].phase == "step"]


def _after_steps(members: list[tuple[DiffusionPolicy, int]], result: PassResult) -> list[Tensor]:
    """A sampler step's device work for every diffusion row of a pass: store the proposals, open the new positions,
    and compute what the freeze rules compare. Returns [proposals, decisions [B, 3], then per row: headway
    tokens (if any), trace values (if traced)]."""
    ctx = members[0][0].ctx
    buffers = ctx.buffers
    device = buffers.tokens.device
    index = torch.tensor([i for _, i in members], device=device)
    whole = len(members) == len(result.chunks)
    wave_in = result.wave_in if whole else result.wave_in[index]
    wave_out = result.wave_out if whole else result.wave_out[index]
    chunks = [result.chunks[i] for _, i in members]
    proposals = result.tokens if whole and result.tokens is not None else cat([result.tokens_of(i) for _, i in members])
    for policy, i in members:
        if policy.params.freeze == "token-stability":
            policy._count_agreement(result.tokens_of(i))
    # Proposals replace the not-yet-frozen tokens.
    rows, places = [], []
    for policy, _ in members:
        w = policy.window
        count = w.size - max(w.frozen - 1 - w.start, 0)
        rows.extend([policy.row] * count)
        places.extend(range(w.frozen, w.frozen + count))
    scatter_rows(buffers.tokens, rows, places, proposals)
    extras: list[Tensor] = []
    opened, rows, places = [], [], []
    for n, (policy, _) in enumerate(members):
        tokens, states = policy._open_positions(wave_out[n])
        extras.extend(tokens)
        opened.append(states)
        front = policy.window.start + policy.window.size
        rows.extend([policy.row] * len(states))
        places.extend(range(front, front + len(states)))
    scatter_rows(buffers.states, rows, places, cat(opened))
    width = wave_out.shape[1]
    decisions = torch.zeros(len(members), 3, dtype=torch.long, device=device)
    if any(p.params.freeze == "latent-diff" for p, _ in members):
        decisions[:, 0] = _latent_diff_last(members, wave_in, wave_out)
    caps = [p.params.max_recurrences for p, _ in members]
    if any(c is not None for c in caps):
        counts = buffers.gather(buffers.counts, result.at)
        counts = counts if whole else counts[index]
        sizes = torch.tensor([c.size for c in chunks], device=device)
        limit = torch.tensor([NEVER if c is None else c for c in caps], device=device)
        inside = torch.arange(width, device=device)[None, :] < sizes[:, None]
        decisions[:, 2] = last_true(inside & (counts >= limit[:, None]))
    if any(p.trace is not None for p, _ in members):
        # Before the acceleration rule moves its `older` states on.
        extras.extend(_trace_values(members, wave_in, wave_out, result))
    for n, (policy, _) in enumerate(members):
        if policy.params.freeze == "latent-acceleration":
            decisions[n, 0] = policy._acceleration_last(wave_in[n], wave_out[n])
        elif policy.params.freeze == "token-stability":
            decisions[n, 1] = policy._stable_last()
    return [proposals, decisions, *extras]


def _latent_diff_last(members: list[tuple[DiffusionPolicy, int]], wave_in: Tensor, wave_out: Tensor) -> Tensor:
    """Per row: 1 + the last compared wavefront row whose normalised latent change ‖z_t − z_(t−1)‖/‖z_t‖ is below
    ε, or 0. The previous state of a position is the pass's input state there (the reference's shifted pairing
    reads it g rows further on)."""
    device = wave_out.device
    width = wave_out.shape[1]
    shifts = [p.window.start - p.step_start if p.quirks.shifted_latent_pairs else 0 for p, _ in members]
    previous = wave_in
    if any(shifts):
        rows = torch.arange(width, device=device)[None, :] + torch.tensor(shifts, device=device)[:, None]
        previous = wave_in.gather(1, rows.clamp_max(width - 1)[:, :, None].expand(-1, -1, wave_in.shape[-1]))
    deltas = (wave_out - previous).norm(dim=-1) / wave_out.norm(dim=-1)
    compared = torch.tensor([p._compared_from(p.window.start, p.window.size)[1] for p, _ in members], device=device)
    threshold = torch.tensor([p.params.exit_threshold for p, _ in members], dtype=deltas.dtype, device=device)
    inside = torch.arange(width, device=device)[None, :] < compared[:, None]
    return last_true(inside & (deltas < threshold[:, None]))


def _trace_values(
    members: list[tuple[DiffusionPolicy, int]], wave_in: Tensor, wave_out: Tensor, result
) -> list[Tensor]:
    """Per traced row: its latent changes (as compared) and its positions' recurrence counts."""
    out = []
    for n, (policy, _) in enumerate(members):
        if policy.trace is None:
            continue
        w = policy.window
        rows = policy._compared_from(w.start, w.size)[1]
        if policy.params.freeze == "latent-acceleration":
            out.append(policy._acceleration(wave_in[n], wave_out[n])[0])
        elif rows:
            shift = w.start - policy.step_start if policy.quirks.shifted_latent_pairs else 0
            current = wave_out[n, :rows]
            out.append((current - wave_in[n, shift : shift + rows]).norm(dim=-1) / current.norm(dim=-1))
        else:
            out.append(wave_out.new_zeros(0))
        out.append(policy.ctx.buffers.counts[policy.row, w.start : w.start + w.size])
    return out
