"""The diffusion forcing sampler as a policy of the batched engine (default mode).

A sampler step, for every diffusion request of a pass at once:

1. **embed with momentum** (`mix_inputs`, between the engine's prelude and its recurrences): the wavefront's
   embeddings become (1 − η)·e + η·e_previous where the position had one last step, and noise β mixes fresh
   random state into the wavefront states;
2. **refine**: the engine runs r' recurrences on every wavefront state (each keeps refining across steps), then
   the coda and the head, and chooses a token at every row whose prediction is not final;
3. **re-propose** (`after_step`): those tokens replace the not-yet-final ones, and `headway` new positions open
   at the front with fresh states;
4. **measure convergence** (`after_step`): per request, the last wavefront row whose normalised latent change
   ‖z_t − z_(t−1)‖/‖z_t‖ is below ε (or what another freeze rule reads), fetched in the pass's one transfer;
5. **freeze** (`advance`, per request on the host): `freeze` maps the window and those numbers to the next window;
   the cache keeps what froze and rolls back over the rest, and the newly final tokens stream out.

The official code's deviations live in `depthwave.samplers.diffusion.reference`, which overrides the hooks marked
"(reference hook)" below; nothing here reads a quirk flag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from depthwave.engine.buffers import RandomStates
from depthwave.engine.policy import Chunk, EngineContext, PassResult, Policy, Sizing
from depthwave.engine.request import GenerationStats, Request
from depthwave.engine.selection import SamplingParams
from depthwave.errors import InvalidParameterError
from depthwave.model.config import HuginnConfig
from depthwave.model.positions import Positions
from depthwave.samplers.diffusion.params import LATENT_RULES, DiffusionParams
from depthwave.samplers.diffusion.window import FreezeRules, Frozen, Measured, Window, freeze
from depthwave.samplers.ops import cat, last_true, scatter_rows, token_budget

NEVER = 1 << 62
Members = list[tuple["DiffusionPolicy", int]]


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


@dataclass
class Counters:
    """What a request's steps did, for its statistics."""

    forward_passes: int = 0
    positions_forwarded: int = 0
    rollback_positions: int = 0
    standing_waves: int = 0


class DiffusionPolicy(Policy):
    def __init__(self, request: Request, ctx: EngineContext) -> None:
        super().__init__(request, ctx)
        self.params = params = cast(DiffusionParams, request.sampler)
        model = ctx.model
        self.num_steps = params.num_steps or model.config.mean_recurrence
        self.rules = self.freeze_rules(params, self.num_steps // params.inner_recurrence)
        self.random = RandomStates(model.config, params.init_scale, request.generator, model.device, model.dtype)
        n = len(request.prompt_token_ids)
        self.prefilling = params.full_prefill
        self.window = Window(0, n, n, n)
        self.pending: list[int] = []
        """Host copies of the proposals for positions frozen..length-1: streamed from here once they freeze."""
        self.step = 0
        self.previous: tuple[int, int] = (0, 0)
        """The window (start, size) of the previous step: latent-acceleration's z_(t−2) lives there."""
        self.embedded_until = 0
        """Positions below this hold an embedding from the previous step (momentum mixes it in)."""
        self.noise: Tensor | None = None
        """This step's noise states (drawn before the pass), or None."""
        self.counters = Counters()
        self.trace: list[dict[str, Any]] | None = [] if params.trace else None
        self.recurrences: list[int] = []

    # ---- sizing and rules ---------------------------------------------------------------------------------------
    @classmethod
    def size(cls, params: DiffusionParams, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:
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
        budget = cls.budget(prompt_len, sampling, config)
        # Every position the loop can touch: it runs while fewer than `budget` tokens are frozen, and one step
        # reaches at most one wavefront plus headway beyond the frozen ones.
        positions = min(config.block_size, prompt_len + budget + (cap or config.block_size) + headway)
        return Sizing(budget, positions, positions + headway + 2, num_steps)

    @classmethod
    def for_model(cls, config: HuginnConfig) -> type[Policy]:
        """A looped stack (Ouro) has no injection to refine states under: it gets the wavefront over loops."""
        if config.looped_stack:
            from depthwave.samplers.diffusion.looped import LoopWavefrontPolicy

            return LoopWavefrontPolicy
        return cls

    @staticmethod
    def budget(prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> int:
        """(reference hook) Tokens to generate at most."""
        return token_budget(prompt_len, sampling, config)

    @staticmethod
    def freeze_rules(params: DiffusionParams, warmup: int) -> FreezeRules:
        """(reference hook)"""
        return FreezeRules(params.freeze, params.headway, warmup, params.max_recurrences)

    # ---- before a pass --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.prefilling:
            return
        n = self.prompt_len
        self.ctx.buffers.states[self.row, :n] = self.random.take(n)
        if self.params.momentum > 0:
            embed_prefixes([self], [n])

    def chunk(self) -> Chunk:
        if self.prefilling:
            n = self.prompt_len
            return Chunk(0, n, self.num_steps, n - 1, init=self.random.take(n), accumulate=True, context=n)
        w = self.window
        # Noise is drawn now, before the pass, from this request's own generator.
        self.noise = self.random.take(w.size) if self.params.noise > 0 else None
        # Row j of the wavefront predicts position start + j + 1: every not-yet-final one is re-proposed.
        return Chunk(w.start, w.size, self.params.inner_recurrence, w.offset, accumulate=True, context=w.frozen)

    # ---- 1. embed with momentum (and noise), between the prelude and the recurrences --------------------------
    @classmethod
    def mix_inputs(
        cls, members: list[tuple[Policy, int]], embedded: Tensor, states: Tensor, result_at: Positions
    ) -> tuple[Tensor, Tensor]:
        rows = [(p, b) for p, b in cast(Members, members) if not p.prefilling]
        if any(p.params.momentum > 0 for p, _ in rows):
            embedded = momentum(rows, embedded, result_at)
        if any(p.params.noise > 0 for p, _ in rows):
            states = add_noise(rows, states)
        return embedded, states

    # ---- 3. re-propose and 4. measure: device work for every diffusion row of the pass --------------------------
    @classmethod
    def prepare(cls, members: list[tuple[Policy, int]], result: PassResult) -> list[Tensor]:
        rows = cast(Members, members)
        prefill, steps = [m for m in rows if m[0].prefilling], [m for m in rows if not m[0].prefilling]
        fetched = [after_prefill(prefill, result)] if prefill else []
        return fetched + (after_step(steps, result) if steps else [])

    @classmethod
    def decide(cls, members: list[tuple[Policy, int]], fetched: list[list[float]], result: PassResult) -> None:
        rows = cast(Members, members)
        prefill, steps = [m for m in rows if m[0].prefilling], [m for m in rows if not m[0].prefilling]
        if prefill:
            for (policy, _), token in zip(prefill, fetched[0], strict=True):
                policy.prefilled(int(token))
            fetched = fetched[1:]
        if not steps:
            return
        proposals, measured, *rest = fetched
        opened = sum(p.params.headway > 1 for p, _ in steps)
        randoms, traced = iter(rest[:opened]), iter(rest[opened:])
        first = 0
        for n, (policy, index) in enumerate(steps):
            count = result.chunks[index].logits_rows
            latent, stable, capped = (int(v) for v in measured[3 * n : 3 * n + 3])
            mine = [int(v) for v in proposals[first : first + count]]
            policy.advance(mine, latent, stable, capped, randoms, traced)
            first += count

    # ---- 5. freeze: one request's step on the host ------------------------------------------------------------
    def advance(
        self, proposals: list[int], latent: int, stable: int, capped: int, randoms: Iterator, traced: Iterator
    ) -> None:
        """One sampler step's host side, in order: the proposals become known, the wavefront grows, the freeze
        rule moves the window, the cache follows, the newly final tokens stream out, and the request goes on or
        finishes."""
        before = self.window
        self.counters.forward_passes += self.params.inner_recurrence
        self.counters.positions_forwarded += self.params.inner_recurrence * before.size
        self.embedded_until = before.end
        proposed = self.propose(proposals, [int(v) for v in next(randoms)] if self.params.headway > 1 else [])
        grown_window, grown, opened = self.grow(proposed)
        compared = self.compared(before)
        measured = Measured(latent, stable, capped, compared[0])
        frozen = freeze(grown_window, grown, opened, measured, self.step, self.rules)
        self.move(frozen)
        if self.trace is not None:
            self.record(before, frozen.window, proposals, compared, traced)
        self.finish_step(before, frozen)

    def propose(self, proposals: list[int], randoms: list[int]) -> Window:
        """The window with this step's proposals (and the random tokens of extra new positions) known."""
        w = self.window
        self.pending = proposals + randoms
        return replace(w, length=w.frozen + len(proposals) + self.params.headway - 1)

    def grow(self, w: Window) -> tuple[Window, int, int]:
        """(the window, positions in flight after opening, positions opened): `headway` new ones, fewer at the
        wavefront cap (a standing wave) or where the context ends."""
        grown, opened = w.size + self.params.headway, self.params.headway
        cap = self.params.max_wavefront
        if cap and grown > cap:
            opened, grown = cap - w.size, cap
            w = replace(w, length=w.start + cap)
            self.counters.standing_waves += 1
        return self.at_context_end(w, grown, opened)

    def at_context_end(self, w: Window, grown: int, opened: int) -> tuple[Window, int, int]:
        """(reference hook) Where the context ends, open only the positions it still has and keep refining the
        ones in flight until they freeze, so that the output fills the context as static decoding does."""
        end = self.ctx.model.config.block_size
        if w.start + grown > end:
            opened, grown = max(end - w.start - w.size, 0), min(grown, end - w.start)
            w = replace(w, length=w.start + grown)
        return w, grown, opened

    def compared(self, w: Window) -> tuple[int, int]:
        """(first position, number of rows) whose latent change the freeze rule compares this step."""
        if self.params.freeze == "latent-acceleration":
            older_start, older_size = self.previous
            first = max(w.start, older_start)
            return first, max(0, min(w.end, older_start + older_size) - first)
        return w.start, max(0, w.size - self.latent_shift(w))

    def latent_shift(self, w: Window) -> int:
        """(reference hook) How many rows further on a position's previous state is read."""
        return 0

    def move(self, frozen: Frozen) -> None:
        """The window moves; the cache keeps what froze and rolls back over the rest."""
        self.counters.rollback_positions += self.window.end - frozen.keep
        self.window = frozen.window
        self.ctx.pool.rollback(self.row, frozen.keep)
        if frozen.window.size == 0:
            # Everything in flight froze (possible with a one-position wavefront): the next position starts
            # from a fresh state, as in static decoding.
            self.window = replace(frozen.window, size=1)
            self.ctx.buffers.states[self.row, frozen.window.start] = self.random.take(1)[0]

    def finish_step(self, before: Window, frozen: Frozen) -> None:
        """(reference hook) Stream what froze, count the step, go on or finish."""
        self.previous = (before.start, before.size)
        stopped = self.stream()
        self.step += 1
        if self.step >= self.params.max_sampler_steps:
            self.finish("stop" if stopped else "length")
        elif stopped:
            self.finish("stop")
        else:
            self.continue_or_finish()

    def stream(self) -> bool:
        """Hand over the newly final tokens (up to the budget and the first stop); whether a stop ended it."""
        output = self.request.output
        assert output is not None
        fresh = self.window.frozen - self.prompt_len - len(output.tokens)
        tokens, self.pending = self.pending[:fresh], self.pending[fresh:]
        return output.emit(tokens)

    def continue_or_finish(self) -> None:
        if self.produced() >= self.request.budget or self.context_full():
            self.finish("length")

    def produced(self) -> int:
        """(reference hook)"""
        return len(self.request.output.tokens)  # type: ignore[union-attr]

    def context_full(self) -> bool:
        """(reference hook)"""
        return self.window.frozen >= self.ctx.model.config.block_size

    # ---- the prefill --------------------------------------------------------------------------------------
    def prefilled(self, token: int) -> None:
        n = self.prompt_len
        self.counters.forward_passes += 1
        self.counters.positions_forwarded += n
        self.window = Window(n, 1, n + 1, n + 1)
        self.prefilling = False
        if self.emit_first(token):
            self.finish("stop")
            return
        self.continue_or_finish()

    def emit_first(self, token: int) -> bool:
        """(reference hook) The prefill's token is final at once; whether it is a stop."""
        return self.request.output.emit([token])  # type: ignore[union-attr]

    def credit_prefill(self, counts: Tensor) -> None:
        """(reference hook) The new position's recurrence count after the prefill (none has run there)."""

    # ---- trace and results --------------------------------------------------------------------------------
    def record(
        self, before: Window, after: Window, proposals: list[int], compared: tuple[int, int], traced: Iterator
    ) -> None:
        deltas, recurrences = next(traced), next(traced)
        assert self.trace is not None
        self.trace.append(
            {
                "step": self.step,
                "start": before.start,
                "size": before.size,
                "frozen_before": before.frozen,
                "frozen_after": after.frozen,
                "proposals": proposals,
                "compared_from": compared[0],
                "latent_change": deltas[: compared[1]],
                "recurrences": [int(v) for v in recurrences],
            }
        )

    def final_tokens(self, emitted: list[int]) -> list[int]:
        # Token q is predicted by the state at position q - 1 (read now: the row is freed after this).
        first = self.prompt_len - 1
        self.recurrences = self.ctx.buffers.counts[self.row, first : first + len(emitted)].tolist()
        return emitted

    def finalize_stats(self) -> DiffusionStats:
        params, steps, c = self.params, self.step, self.counters
        per_token = self.recurrences
        prefill = self.prompt_len if params.full_prefill else 0
        return DiffusionStats(
            core_steps=sum(per_token),
            sampler_steps=steps,
            core_forward_passes=c.forward_passes,
            token_positions_forwarded=c.positions_forwarded,
            cache_rollback_positions=c.rollback_positions,
            standing_waves=c.standing_waves,
            recurrences_per_token=per_token,
            mean_recurrences_per_token=sum(per_token) / len(per_token) if per_token else 0.0,
            sequential_core_steps=(self.num_steps if params.full_prefill else 0) + params.inner_recurrence * steps,
            mean_wavefront=((c.positions_forwarded - prefill) / (params.inner_recurrence * steps) if steps else 0.0),
            tokens_per_sampler_step=len(per_token) / steps if steps else 0.0,
            hit_max_sampler_steps=steps >= params.max_sampler_steps,
            trace=self.trace,
        )

    # ---- per-request device helpers -----------------------------------------------------------------------------
    def random_token_vocab(self) -> int:
        """(reference hook) Random tokens of extra new positions are drawn below this id."""
        return self.ctx.model.config.vocab_size

    def open_positions(self, wave_out: Tensor) -> tuple[list[Tensor], Tensor]:
        """Open `headway` new positions at the front: random tokens beyond the first proposal (headway > 1), and
        their states (fresh, or copies of the newest states with continuous compute), which the caller writes for
        all rows at once. Returns (the random tokens, if any; the states [headway, D])."""
        params, w, buffers = self.params, self.window, self.ctx.buffers
        headway, extras = params.headway, []
        if headway > 1:
            fill_from = w.frozen + w.proposing
            random = torch.randint(
                0, self.random_token_vocab(), (headway - 1,), generator=self.request.generator, device=buffers.device
            )
            buffers.tokens[self.row, fill_from : fill_from + headway - 1] = random
            extras.append(random)
        if params.continuous_compute and w.size >= headway:
            return extras, wave_out[w.size - headway : w.size]
        return extras, self.random.take(headway)


# ---- batched device work -----------------------------------------------------------------------------------------
def embed_prefixes(policies: Sequence[DiffusionPolicy], counts: Sequence[int]) -> None:
    """The prelude over each request's first `count` tokens, without the cache, in one call: the embeddings that
    momentum starts from. Rows are right-padded; causal attention keeps padding out of the real positions."""
    ctx = policies[0].ctx
    model, buffers = ctx.model, ctx.buffers
    length = max(counts)
    rows = torch.tensor([p.row for p in policies], device=buffers.device)
    ids = buffers.tokens[rows, :length]
    at = model.positions([0] * len(policies), [length] * len(policies), cached=False)
    embedded = model.prelude(ids, at)
    store = buffers.optional("embeddings")
    for b, (policy, count) in enumerate(zip(policies, counts, strict=True)):
        store[policy.row, :count] = embedded[b, :count]
        policy.embedded_until = count


def momentum(rows: Members, embedded: Tensor, at: Positions) -> Tensor:
    """e ← (1 − η)·e + η·e_previous at the rows' positions that had an embedding last step; the mixed embeddings
    are stored for the next step."""
    buffers = rows[0][0].ctx.buffers
    store = buffers.optional("embeddings")
    index = torch.tensor([b for _, b in rows], device=embedded.device)
    whole = len(rows) == embedded.shape[0]
    mine = embedded if whole else embedded[index]
    sub = at if whole else at.subset(index, _pool_rows(at, index))
    previous = buffers.gather(store, sub)
    dtype, device = embedded.dtype, embedded.device
    eta = torch.tensor([p.params.momentum for p, _ in rows], dtype=dtype, device=device)[:, None, None]
    until = torch.tensor([p.embedded_until for p, _ in rows], device=device)
    overlap = (sub.pos < until[:, None]).to(dtype)[:, :, None]
    mixed = mine * (1 - eta) + (eta * previous) * overlap
    buffers.scatter(store, sub, mixed)
    return mixed if whole else embedded.index_copy(0, index, mixed)


def add_noise(rows: Members, states: Tensor) -> Tensor:
    """State noise β, per row with its own draws: mixed in by β/(1 + recurrences so far) when dampened,
    variance-preservingly when `sqrt`."""
    states = states.clone()
    for policy, b in rows:
        params, w, noise = policy.params, policy.window, policy.noise
        if noise is None:
            continue
        row = states[b, : w.size]
        recurrences = policy.ctx.buffers.counts[policy.row, w.start : w.end]
        amount = torch.full_like(recurrences, params.noise, dtype=torch.float32)
        if params.dampened_noise:
            amount = amount / (1 + recurrences)
        amount = amount.to(states.dtype)[:, None]
        if params.sqrt_noise:
            states[b, : w.size] = row * (1 - amount).clamp_min(0).sqrt() + amount.sqrt() * noise
        else:
            states[b, : w.size] = row * (1 - amount) + amount * noise
    return states


def _pool_rows(at: Positions, index: Tensor) -> Tensor:
    return index + at.rows.start if isinstance(at.rows, slice) else at.rows[index]


def after_prefill(members: Members, result: PassResult) -> Tensor:
    """The prefill's first token goes into the next position, which gets a fresh state (and its embedding)."""
    buffers = members[0][0].ctx.buffers
    tokens = cat([result.tokens_of(index) for _, index in members])
    rows = [p.row for p, _ in members]
    places = [p.prompt_len for p, _ in members]
    scatter_rows(buffers.tokens, rows, places, tokens)
    scatter_rows(buffers.states, rows, places, cat([p.random.take(1) for p, _ in members]))
    for policy, _ in members:
        policy.credit_prefill(buffers.counts[policy.row, policy.prompt_len : policy.prompt_len + 1])
    embedding = [p for p, _ in members if p.params.momentum > 0]
    if embedding:
        embed_prefixes(embedding, [p.prompt_len + 1 for p in embedding])
    return tokens


def after_step(members: Members, result: PassResult) -> list[Tensor]:
    """3. re-propose and 4. measure, for every diffusion row of a pass that ran a sampler step. Returns
    [proposals, measured [B, 3] (latent, stable, capped), then per row: random tokens (headway > 1), trace values
    (if traced)]."""
    buffers = members[0][0].ctx.buffers
    device = buffers.tokens.device
    index = torch.tensor([i for _, i in members], device=device)
    whole = len(members) == len(result.chunks)
    wave_in = result.wave_in if whole else result.wave_in[index]
    wave_out = result.wave_out if whole else result.wave_out[index]
    proposals = result.tokens if whole and result.tokens is not None else cat([result.tokens_of(i) for _, i in members])
    for policy, i in members:
        if policy.params.freeze == "token-stability":
            count_agreement(policy, result.tokens_of(i))
    randoms = re_propose(members, proposals, wave_out)
    measured = torch.zeros(len(members), 3, dtype=torch.long, device=device)
    if any(p.params.freeze == "latent-diff" for p, _ in members):
        measured[:, 0] = latent_diff_last(members, wave_in, wave_out)
    if any(p.params.max_recurrences is not None for p, _ in members):
        measured[:, 2] = capped_last(members, result, index if not whole else None)
    traced = trace_values(members, wave_in, wave_out) if any(p.trace is not None for p, _ in members) else []
    # After the trace read them: the acceleration rule moves its `older` states on.
    for n, (policy, _) in enumerate(members):
        if policy.params.freeze == "latent-acceleration":
            measured[n, 0] = acceleration_last(policy, wave_in[n], wave_out[n])
        elif policy.params.freeze == "token-stability":
            measured[n, 1] = stable_last(policy)
    return [proposals, measured, *randoms, *traced]


def re_propose(members: Members, proposals: Tensor, wave_out: Tensor) -> list[Tensor]:
    """The proposals replace the not-yet-final tokens; new positions open at the front. Returns the random tokens
    of requests with headway > 1."""
    buffers = members[0][0].ctx.buffers
    rows: list[int] = []
    places: list[int] = []
    for policy, _ in members:
        w = policy.window
        rows.extend([policy.row] * w.proposing)
        places.extend(range(w.frozen, w.frozen + w.proposing))
    scatter_rows(buffers.tokens, rows, places, proposals)
    randoms: list[Tensor] = []
    opened: list[Tensor] = []
    rows, places = [], []
    for n, (policy, _) in enumerate(members):
        tokens, states = policy.open_positions(wave_out[n])
        randoms.extend(tokens)
        opened.append(states)
        rows.extend([policy.row] * len(states))
        places.extend(range(policy.window.end, policy.window.end + len(states)))
    scatter_rows(buffers.states, rows, places, cat(opened))
    return randoms


def latent_diff_last(members: Members, wave_in: Tensor, wave_out: Tensor) -> Tensor:
    """Per row: 1 + the last compared wavefront row whose normalised latent change ‖z_t − z_(t−1)‖/‖z_t‖ is below
    ε, or 0. The previous state of a position is the pass's input state there (`latent_shift` rows on)."""
    device = wave_out.device
    width = wave_out.shape[1]
    shifts = [p.latent_shift(p.window) for p, _ in members]
    previous = wave_in
    if any(shifts):
        rows = torch.arange(width, device=device)[None, :] + torch.tensor(shifts, device=device)[:, None]
        previous = wave_in.gather(1, rows.clamp_max(width - 1)[:, :, None].expand(-1, -1, wave_in.shape[-1]))
    deltas = (wave_out - previous).norm(dim=-1) / wave_out.norm(dim=-1)
    compared = torch.tensor([p.compared(p.window)[1] for p, _ in members], device=device)
    threshold = torch.tensor([p.params.exit_threshold for p, _ in members], dtype=deltas.dtype, device=device)
    inside = torch.arange(width, device=device)[None, :] < compared[:, None]
    return last_true(inside & (deltas < threshold[:, None]))


def capped_last(members: Members, result: PassResult, index: Tensor | None) -> Tensor:
    """Per row: 1 + the last wavefront row whose state has run max_recurrences, or 0."""
    buffers = members[0][0].ctx.buffers
    device = buffers.tokens.device
    counts = buffers.gather(buffers.counts, result.at)
    counts = counts if index is None else counts[index]
    sizes = torch.tensor([p.window.size for p, _ in members], device=device)
    caps = [p.params.max_recurrences for p, _ in members]
    limit = torch.tensor([NEVER if c is None else c for c in caps], device=device)
    inside = torch.arange(counts.shape[1], device=device)[None, :] < sizes[:, None]
    return last_true(inside & (counts >= limit[:, None]))


def count_agreement(policy: DiffusionPolicy, proposals: Tensor) -> None:
    """token-stability: every frozen position gains one, every proposal that repeats the token it replaces too."""
    w = policy.window
    stability = policy.ctx.buffers.optional("stability")[policy.row]
    stability[: w.frozen] += 1
    known = w.length - w.frozen
    if known > 0:
        tokens = policy.ctx.buffers.tokens[policy.row, w.frozen : w.length]
        stability[w.frozen : w.length] += tokens == proposals[:known]


def stable_last(policy: DiffusionPolicy) -> Tensor:
    """token-stability: 1 + the last position whose proposal agreed more than num_steps // r' times."""
    w, params = policy.window, policy.params
    length = w.frozen + w.proposing + params.headway - 1
    if params.max_wavefront and w.size + params.headway > params.max_wavefront:
        length = w.start + params.max_wavefront
    stability = policy.ctx.buffers.optional("stability")[policy.row, :length]
    return last_true((stability > policy.rules.warmup)[None])[0]


def acceleration(policy: DiffusionPolicy, wave_in: Tensor, wave_out: Tensor) -> Tensor:
    """latent-acceleration: ‖(z_t − z_(t−1)) − (z_(t−1) − z_(t−2))‖ / ‖z_t‖ over the positions held by all three
    (z_(t−2) from the `older` buffer)."""
    w = policy.window
    first, rows = policy.compared(w)
    older = policy.ctx.buffers.optional("older")[policy.row, first : first + rows]
    current = wave_out[first - w.start : first - w.start + rows]
    previous = wave_in[first - w.start : first - w.start + rows]
    change = (current - previous) - (previous - older)
    return change.norm(dim=-1) / (current.norm(dim=-1) + 1e-6)


def acceleration_last(policy: DiffusionPolicy, wave_in: Tensor, wave_out: Tensor) -> Tensor:
    deltas = acceleration(policy, wave_in, wave_out)
    w = policy.window
    # The states of this step's window become z_(t−2) of the step after next.
    policy.ctx.buffers.optional("older")[policy.row, w.start : w.end] = wave_in[: w.size]
    return last_true((deltas < policy.params.exit_threshold)[None])[0]


def trace_values(members: Members, wave_in: Tensor, wave_out: Tensor) -> list[Tensor]:
    """Per traced row: its latent changes (as compared) and its positions' recurrence counts."""
    out = []
    for n, (policy, _) in enumerate(members):
        if policy.trace is None:
            continue
        w = policy.window
        rows = policy.compared(w)[1]
        if policy.params.freeze == "latent-acceleration":
            out.append(acceleration(policy, wave_in[n], wave_out[n]))
        elif rows:
            shift = policy.latent_shift(w)
            current = wave_out[n, :rows]
            out.append((current - wave_in[n, shift : shift + rows]).norm(dim=-1) / current.norm(dim=-1))
        else:
            out.append(wave_out.new_zeros(0))
        out.append(policy.ctx.buffers.counts[policy.row, w.start : w.end])
    return out


__all__ = ["LATENT_RULES", "DiffusionPolicy", "DiffusionStats"]
