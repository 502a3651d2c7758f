"""Self-speculative decoding: the model drafts with few recurrences and verifies at full depth.

Each round (the cache holds every token but the newest):

1. draft: `lookahead` tokens one at a time, each with `draft_steps` recurrences;
2. roll the cache back to before the drafts and verify them all in one parallel pass at `num_steps`;
3. accept the longest prefix the verifier agrees with, then add the verifier's own token at the first
   disagreement, or (default mode) the bonus token that the verification pass predicts after the last draft;
4. roll the cache back past the rejected drafts.

Acceptance. Greedy: a draft is accepted when it is the verifier's greedy choice, so the output is exactly greedy
full-depth decoding. With temperature > 0 the default mode uses the speculative sampling rule (Leviathan et al.
2023; Chen et al. 2023): accept draft x with probability min(1, q(x)/p(x)), where p is the draft distribution and
q the verifier's (both after temperature, top-k/p, min-p and repetition penalty), else draw from the normalised
max(0, q − p); the bonus token is drawn from q. The output is then distributed exactly as full-depth sampling.
`verification_threshold` < 1 relaxes greedy acceptance to "q(draft) >= threshold · max q" (lossy, the reference's
option; not combinable with exact sampling).

``reference`` mode reproduces the official `generate_speculative`: argmax agreement even when sampling (so sampled
output is not distributed as full-depth sampling), no bonus token (the last draft is verified but not fed), the
first token never stop-checked, output possibly longer than the budget and cut only after the first stop token
that follows the first token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from depthwave.engine.buffers import RandomStates
from depthwave.engine.policy import Chunk, EngineContext, PassResult, Policy, Sizing
from depthwave.engine.request import GenerationStats, Request
from depthwave.engine.selection import SamplingParams, apply_repetition_penalty, filtered_probs
from depthwave.errors import InvalidParameterError, is_int, is_number, param, require
from depthwave.model.config import HuginnConfig
from depthwave.model.kv_cache import CACHE_MODES, CacheMode
from depthwave.samplers.ops import token_budget
from depthwave.samplers.quirks import speculative_quirks


@dataclass(frozen=True)
class SpeculativeParams:
    """Self-speculative decoding: drafts at `draft_steps` recurrences, verified at full depth."""

    draft_steps: int = param(4, "recurrences per draft token")
    lookahead: int = param(4, "drafts per round (K)")
    num_steps: int | None = param(None, "verification depth (default: the model's mean_recurrence)")
    verification_threshold: float = param(
        1.0, "1: exact agreement; below 1, greedy acceptance when q(draft) >= threshold * max q"
    )
    init_scale: float = param(1.0, "scale of every random initial state (0: zeros)")
    cache_mode: CacheMode = param("per-step", "KV cache: per-step (the reference's) or shared")
    mode: Literal["default", "reference"] = param(
        "default", "default, or reference (token-identical to the official generate_speculative)"
    )

    name: ClassVar[str] = "speculative"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            require(ok, name, getattr(self, name), what)

        need(is_int(self.draft_steps) and self.draft_steps >= 1, "draft_steps", "an integer >= 1")
        need(is_int(self.lookahead) and self.lookahead >= 1, "lookahead", "an integer >= 1")
        need(self.num_steps is None or (is_int(self.num_steps) and self.num_steps >= 1), "num_steps", "None or >= 1")
        need(
            is_number(self.verification_threshold) and 0 < self.verification_threshold <= 1,
            "verification_threshold",
            "in (0, 1]",
        )
        need(is_number(self.init_scale) and self.init_scale >= 0, "init_scale", ">= 0")
        need(self.cache_mode in CACHE_MODES, "cache_mode", f"one of {CACHE_MODES}")
        need(self.mode in ("default", "reference"), "mode", "'default' or 'reference'")

    def policy_class(self) -> type[Policy]:
        return SpeculativePolicy


@dataclass
class SpeculativeStats(GenerationStats):
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    acceptance_rate: float = 0.0
    accepted_drafts_per_round: float = 0.0
    tokens_per_round: float = 0.0
    bonus_tokens: int = 0
    """Bonus tokens kept in the output (a round that accepts all its drafts adds the verifier's next token)."""
    corrections: int = 0
    """Rounds that rejected a draft and added the verifier's token instead. Every token after the first is an
    accepted draft, a bonus token or a correction."""
    sequential_core_steps: int = 0

    sampler: ClassVar[str] = "speculative"

    def details(self) -> str:
        return f"{self.rounds} rounds, {100 * self.acceptance_rate:.0f}% of drafts accepted"


def distribution(logits: Tensor, context: Tensor, sampling: SamplingParams) -> Tensor:
    """The distribution a sampled token is drawn from at one position: [V] fp32."""
    if sampling.repetition_penalty != 1.0 and context.numel():
        logits = apply_repetition_penalty(logits[None], context, sampling.repetition_penalty)[0]
    return filtered_probs(logits[None], sampling)[0]


def choose(logits: Tensor, context: Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """One token [1] from one logits row [1, V], as the engine's selection would choose it."""
    if sampling.repetition_penalty != 1.0 and context.numel():
        logits = apply_repetition_penalty(logits, context, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(filtered_probs(logits, sampling), 1, generator=generator)[:, 0]


class SpeculativePolicy(Policy):
    """Rounds of `lookahead` one-token draft passes at `draft_steps` recurrences, then one verification pass over
    the newest token and the drafts at `num_steps`. Invariant between rounds: the cache holds every token but the
    newest (`length` tokens are known)."""

    def __init__(self, request: Request, ctx: EngineContext) -> None:
        super().__init__(request, ctx)
        params: SpeculativeParams = request.sampler  # type: ignore[assignment]
        model = ctx.model
        self.params = params
        self.quirks = speculative_quirks(params.mode)
        self.num_steps = params.num_steps or model.config.mean_recurrence
        self.exact = not self.quirks.argmax_acceptance and not request.sampling.greedy
        self.random = RandomStates(model.config, params.init_scale, request.generator, model.device, model.dtype)
        sizing = self.size(params, self.prompt_len, request.sampling, model.config)
        self.capacity = sizing.cache
        self.phase = "prefill"
        self.length = self.prompt_len
        self.drafts = 0  # drafted in the current round
        self.round_size = 0
        # Row k stays zero: the "draft distribution" of the bonus position, so that the residual is the target.
        self.draft_probs = (
            torch.zeros(params.lookahead + 1, model.config.vocab_size, device=model.device) if self.exact else None
        )
        self.rounds = self.drafted = self.accepted = self.bonus = self.corrections = 0
        self.core_steps = self.num_steps
        self.returned: int | None = None

    @staticmethod
    def size(params: SpeculativeParams, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:
        quirks = speculative_quirks(params.mode)
        if not quirks.argmax_acceptance and not sampling.greedy and params.verification_threshold < 1:
            raise InvalidParameterError(
                "verification_threshold < 1 is a greedy relaxation; with temperature > 0 the default mode samples "
                "exactly (use mode='reference' for the reference's thresholded argmax rule)"
            )
        budget = sampling.max_new_tokens if quirks.overshoot_budget else token_budget(prompt_len, sampling, config)
        # A round can append lookahead + 1 tokens past the budget check, and the reference overshoots it.
        capacity = min(config.block_size, prompt_len + budget + params.lookahead + 1)
        steps = max(params.num_steps or config.mean_recurrence, params.draft_steps)
        return Sizing(budget, capacity, capacity + 1, steps)

    @property
    def tokens(self) -> Tensor:
        return self.ctx.buffers.tokens[self.row]

    def start(self) -> None:
        pass

    def chunk(self) -> Chunk:
        if self.phase == "prefill":
            n = self.prompt_len
            return Chunk(0, n, self.num_steps, n - 1, init=self.random.take(n), context=n)
        if self.phase == "draft":
            position = self.length - 1 + self.drafts
            return Chunk(
                position,
                1,
                self.params.draft_steps,
                0,
                init=self.random.take(1),
                select=not self.exact,
                context=position + 1,
            )
        # Verify: the newest accepted token and the drafts (the reference leaves out the last draft, so it gets no
        # bonus row). Row j predicts position length + j.
        fed = self.round_size if self.quirks.no_bonus_token else self.round_size + 1
        return Chunk(self.length - 1, fed, self.num_steps, 0, init=self.random.take(fed), select=False)

    @classmethod
    def prepare(cls, members: list[tuple[Policy, int]], result: PassResult) -> list[Tensor]:
        fetched: list[Tensor] = []
        for policy, index in members:
            fetched.extend(policy._device_work(index, result))  # type: ignore[attr-defined]
        return fetched

    @classmethod
    def decide(cls, members: list[tuple[Policy, int]], fetched: list[list[float]], result: PassResult) -> None:
        values = iter(fetched)
        for policy, _ in members:
            policy._host_work(values)  # type: ignore[attr-defined]

    # ---- after each pass ----------------------------------------------------------------------------------
    def _device_work(self, index: int, result: PassResult) -> list[Tensor]:
        tokens = self.tokens
        if self.phase == "prefill":
            tokens[self.prompt_len] = result.tokens_of(index)[0]
            return [result.tokens_of(index)]
        if self.phase == "draft":
            position = self.length - 1 + self.drafts
            if self.exact:
                assert self.draft_probs is not None
                self.draft_probs[self.drafts] = distribution(
                    result.logits_of(index)[0], tokens[: position + 1], self.request.sampling
                )
                draw = torch.multinomial(self.draft_probs[self.drafts], 1, generator=self.request.generator)
                tokens[position + 1] = draw[0]
            else:
                tokens[position + 1] = result.tokens_of(index)[0]
            return []
        verify = result.logits_of(index)
        k = self.round_size
        if self.exact:
            accepted, correction = self._accept_sampled(verify, k)
        else:
            accepted = self._accept_greedy(verify[:k], k)
            correction = self._correction(verify, accepted, k)
        if self.quirks.no_bonus_token:
            # A fully accepted round has no correction (and its place may lie past the buffer): rewrite the last
            # draft with itself instead.
            place = self.length + accepted.clamp_max(k - 1)
            tokens[place] = torch.where(accepted < k, correction, tokens[place])
        else:
            tokens[self.length + accepted] = correction
        return [torch.stack((accepted, correction)), tokens[self.length : self.length + k]]

    def _host_work(self, values: Iterator[list[float]]) -> None:
        output = self.request.output
        assert output is not None
        if self.phase == "prefill":
            first = int(next(values)[0])
            if self.quirks.cut_after_later_stop:
                output.extend_unchecked([first])
            elif output.emit([first]):
                self.finish("stop")
                return
            self.length = self.prompt_len + 1
            self._next_round()
            return
        if self.phase == "draft":
            self.drafts += 1
            if self.drafts == self.round_size:
                self.core_steps += self.round_size * self.params.draft_steps
                self.ctx.pool.rollback(self.row, self.length - 1)
                self.phase = "verify"
            return
        accepted, correction = (int(v) for v in next(values))
        drafts = [int(v) for v in next(values)]
        k = self.round_size
        self.core_steps += self.num_steps
        self.rounds += 1
        self.drafted += k
        self.accepted += accepted
        fresh = drafts[:accepted]
        if accepted < k:
            fresh.append(correction)
            self.corrections += 1
        elif not self.quirks.no_bonus_token:
            fresh.append(correction)
            # Counted when kept: the budget cuts the bonus of a last round that drafted up to it.
            self.bonus += self.quirks.overshoot_budget or len(output.tokens) + len(fresh) <= self.request.budget
        # Keep the K/V of every position whose input token stays, which is all but the new newest token.
        self.ctx.pool.rollback(self.row, self.length + len(fresh) - 1)
        self.length += len(fresh)
        if self.quirks.cut_after_later_stop:
            output.extend_unchecked(fresh)
            if any(t in output.stop.ids for t in fresh):
                self.finish("stop")
                return
        elif output.emit(fresh):
            self.finish("stop")
            return
        self._next_round()

    def _next_round(self) -> None:
        """Start drafting, or finish when the budget (or the room) is used up."""
        output = self.request.output
        assert output is not None
        produced = self.length - self.prompt_len if self.quirks.overshoot_budget else len(output.tokens)
        if produced >= self.request.budget:
            self.finish("length")
            return
        room = self.capacity - self.length  # positions the verification pass may still write
        k = self.params.lookahead
        if not self.quirks.overshoot_budget:
            k = min(k, self.request.budget - len(output.tokens), room)
        if k < 1 or self.length - 1 + k > self.capacity:
            self.finish("length")
            return
        self.round_size, self.drafts, self.phase = k, 0, "draft"

    # ---- acceptance ---------------------------------------------------------------------------------------
    def _accept_greedy(self, verify: Tensor, k: int) -> Tensor:
        """Number of leading drafts the verifier agrees with (rows j of `verify` judge draft j)."""
        drafts = self.tokens[self.length : self.length + k]
        threshold = self.params.verification_threshold
        sampling = self.request.sampling
        if threshold >= 1:
            if self.quirks.argmax_acceptance or sampling.repetition_penalty == 1.0:
                choices = verify.argmax(dim=-1)
            else:
                # Greedy choice with the repetition penalty of each row's own context (prefix + earlier drafts).
                choices = torch.cat(
                    [
                        apply_repetition_penalty(
                            verify[j : j + 1], self.tokens[: self.length + j], sampling.repetition_penalty
                        )
                        for j in range(k)
                    ]
                ).argmax(dim=-1)
            agree = choices == drafts
        else:
            probs = verify.softmax(dim=-1)
            agree = probs.gather(-1, drafts[:, None])[:, 0] >= threshold * probs.amax(dim=-1)
        return agree.long().cumprod(dim=0).sum()

    def _correction(self, verify: Tensor, accepted: Tensor, k: int) -> Tensor:
        """The verifier's own token at the first disagreement (or the bonus after all k drafts)."""
        sampling = self.request.sampling
        row = verify.index_select(0, accepted.clamp_max(len(verify) - 1).view(1))
        if sampling.repetition_penalty == 1.0:
            context = self.tokens[:0]
        elif self.quirks.penalty_context_before_drafts:
            context = self.tokens[: self.length]
        else:
            # The context ends after the accepted drafts, a device-side count: penalise every candidate row.
            rows = torch.cat(
                [
                    apply_repetition_penalty(
                        verify[j : j + 1], self.tokens[: self.length + j], sampling.repetition_penalty
                    )
                    for j in range(len(verify))
                ]
            )
            row = rows.index_select(0, accepted.clamp_max(len(verify) - 1).view(1))
            context = self.tokens[:0]
        return choose(row, context, sampling, self.request.generator)[0]

    def _accept_sampled(self, verify: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Speculative sampling: (accepted drafts, the token drawn after them), without a host round trip."""
        assert self.draft_probs is not None
        sampling, generator = self.request.sampling, self.request.generator
        drafts = self.tokens[self.length : self.length + k]
        target = torch.stack(
            [distribution(verify[j], self.tokens[: self.length + j], sampling) for j in range(k + 1)]
        )  # row k: the bonus distribution
        uniforms = torch.rand(k, generator=generator, device=verify.device)
        rows = torch.arange(k, device=verify.device)
        ratio = target[rows, drafts] / self.draft_probs[:k][rows, drafts].clamp_min(1e-30)
        accepted = (uniforms < ratio).long().cumprod(dim=0).sum()
        wanted = target.index_select(0, accepted.view(1))[0]
        residual = (wanted - self.draft_probs.index_select(0, accepted.view(1))[0]).clamp_min(0)
        total = residual.sum()
        # q == p exactly leaves nothing to redistribute, and then a rejection cannot happen: guard anyway.
        rejected = torch.where(total > 0, residual / total, wanted)
        final = torch.where(accepted < k, rejected, target[k])
        return accepted, torch.multinomial(final, 1, generator=generator)[0]

    # ---- results ------------------------------------------------------------------------------------------
    def final_tokens(self, emitted: list[int]) -> list[int]:
        if not self.quirks.cut_after_later_stop:
            return emitted
        # Cut after the first stop token that follows the first generated token.
        stops = self.request.output.stop.ids  # type: ignore[union-attr]
        cut = next((i + 1 for i, t in enumerate(emitted) if i >= 1 and t in stops), len(emitted))
        self.request.finish_reason = "stop" if any(t in stops for t in emitted[1:cut]) else "length"
        self.returned = cut
        return emitted[:cut]

    def finalize_stats(self) -> SpeculativeStats:
        emitted = self.returned if self.returned is not None else len(self.request.output.tokens)  # type: ignore[union-attr]
        rounds = self.rounds
        return SpeculativeStats(
            core_steps=self.core_steps,
            rounds=rounds,
            drafted_tokens=self.drafted,
            accepted_drafts=self.accepted,
            acceptance_rate=self.accepted / self.drafted if self.drafted else 0.0,
            accepted_drafts_per_round=self.accepted / rounds if rounds else 0.0,
            tokens_per_round=(emitted - 1) / rounds if rounds else 0.0,
            bonus_tokens=self.bonus,
            corrections=self.corrections,
            sequential_core_steps=self.core_steps,
        )
