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

from collections.abc import Generator
from dataclasses import dataclass
from typing import Literal

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
    apply_repetition_penalty,
    emit,
    filtered_probs,
    is_int,
    is_number,
    require,
)


@dataclass(frozen=True)
class SpeculativeParams:
    """draft_steps: recurrences per draft token. lookahead: drafts per round (K). num_steps: verification depth
    (None = the model's mean_recurrence). verification_threshold: 1 = exact agreement; below 1, greedy acceptance
    when q(draft) >= threshold · max q. init_scale: scale of every random initial state (0 = zeros). cache_mode:
    "per-step" (the reference's) or "shared". mode: "default" or "reference" (see the module docstring)."""

    draft_steps: int = 4
    lookahead: int = 4
    num_steps: int | None = None
    verification_threshold: float = 1.0
    init_scale: float = 1.0
    cache_mode: CacheMode = "per-step"
    mode: Literal["default", "reference"] = "default"

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


class SpeculativeSampler(Sampler):
    name = "speculative"

    def __init__(self, model, tokenizer=None, default_stop_ids=(), params: SpeculativeParams | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, tokenizer, default_stop_ids)
        self.params = params or SpeculativeParams()

    def _distribution(self, logits: Tensor, context: Tensor, params: SamplingParams) -> Tensor:
        """The distribution a sampled token is drawn from at one position: [V] fp32."""
        if params.repetition_penalty != 1.0 and context.numel():
            logits = apply_repetition_penalty(logits[None], context, params.repetition_penalty)[0]
        return filtered_probs(logits[None], params)[0]

    @torch.inference_mode()
    def _generate(self, prompt: list[int], params: SamplingParams) -> Generator[int, None, GenerationResult]:
        model, cfg = self.model, self.params
        config = model.config
        reference = cfg.mode == "reference"
        exact_sampling = not reference and not params.greedy
        if exact_sampling and cfg.verification_threshold < 1:
            raise InvalidParameterError(
                "verification_threshold < 1 is a greedy relaxation; with temperature > 0 the default mode samples "
                "exactly (use mode='reference' for the reference's thresholded argmax rule)"
            )
        num_steps = cfg.num_steps or config.mean_recurrence
        lookahead = cfg.lookahead
        budget = params.max_new_tokens if reference else self.token_budget(prompt, params)
        stops = self.stop_ids(params)
        stopping = self.stop_condition(params)
        generator = self.generator(params)
        select = TokenSelector(params, generator)
        device = model.device
        prompt_len = len(prompt)

        # A round can append lookahead + 1 tokens past the budget check, and the reference overshoots it.
        capacity = min(config.block_size, prompt_len + budget + lookahead + 1)
        cache = KVCache(
            config, capacity, cfg.cache_mode, max(num_steps, cfg.draft_steps), device=device, dtype=model.dtype
        )
        tokens = torch.empty(capacity + 1, dtype=torch.long, device=device)
        tokens[:prompt_len] = torch.tensor(prompt, device=device)
        draft_probs = torch.empty(lookahead, config.vocab_size, device=device) if exact_sampling else None
        stats = GenerationStats(
            prompt_tokens=prompt_len,
            cache_bytes=cache.allocated_bytes,
            cache_bytes_per_position=cache.bytes_per_position,
        )
        watch = Stopwatch(device)

        prompt_ids = tokens[None, :prompt_len]
        out = model(prompt_ids, num_steps, cfg.init_scale, cache=cache, last_only=True, generator=generator)
        tokens[prompt_len] = select(out.logits[:, -1], tokens[:prompt_len])[0]
        length = prompt_len + 1
        emitted = [int(tokens[prompt_len])]
        stats.prefill_time_s = watch.lap()
        yield emitted[0]
        finish = "stop" if not reference and stopping(emitted) else "length"
        drafted = accepted = rounds = bonus = 0
        core_steps = num_steps
        while finish == "length" and (length - prompt_len if reference else len(emitted)) < budget:
            # Invariant: the cache holds positions < length - 1; the newest token is not cached yet.
            room = capacity - length  # positions the verification pass may still write
            k = lookahead if reference else min(lookahead, budget - len(emitted), room)
            if k < 1 or length - 1 + k > capacity:
                break
            for i in range(k):
                position = length - 1 + i
                out = model(
                    tokens[None, position : position + 1],
                    cfg.draft_steps,
                    cfg.init_scale,
                    cache=cache,
                    start=position,
                    generator=generator,
                )
                logits = out.logits[0, -1]
                if draft_probs is not None:
                    draft_probs[i] = self._distribution(logits, tokens[: position + 1], params)
                    tokens[position + 1] = torch.multinomial(draft_probs[i], 1, generator=generator)[0]
                else:
                    tokens[position + 1] = select(logits[None], tokens[: position + 1])[0]
            core_steps += k * cfg.draft_steps
            cache.truncate(length - 1)

            # Verify: feed the newest accepted token and the drafts (the reference leaves out the last draft, so it
            # gets no bonus row). Row j predicts position length + j.
            fed = k if reference else k + 1
            out = model(
                tokens[None, length - 1 : length - 1 + fed],
                num_steps,
                cfg.init_scale,
                cache=cache,
                start=length - 1,
                generator=generator,
            )
            verify = out.logits[0]
            core_steps += num_steps
            drafts = tokens[length : length + k]
            if exact_sampling:
                assert draft_probs is not None
                n_ok, correction = self._accept_sampled(verify, drafts, draft_probs, tokens, length, params, generator)
            else:
                n_ok = self._accept_greedy(verify[:k], drafts, tokens, length, params, reference)
                if n_ok < k or not reference:
                    # The verifier's own choice at the first disagreement (or the bonus after all k drafts); the
                    # reference penalises repetitions against the sequence before the drafts.
                    context = tokens[:length] if reference else tokens[: length + n_ok]
                    correction = select(verify[n_ok][None], context)[0]
                else:
                    correction = None
            rounds += 1
            drafted += k
            accepted += n_ok
            new = n_ok + (correction is not None)
            if correction is not None:
                tokens[length + n_ok] = correction
                bonus += n_ok == k
            # Keep the K/V of every position whose input token stays, which is all but the new newest token.
            cache.truncate(length + new - 1)
            fresh = tokens[length : length + new].tolist()
            length += new
            if reference:
                emitted.extend(fresh)
                yield from fresh
                if any(t in stops for t in fresh):
                    break
            elif (yield from emit(fresh, emitted, budget, stopping)):
                finish = "stop"
        stats.decode_time_s = watch.lap()
        if reference:
            # Cut after the first stop token that follows the first generated token.
            cut = next((i + 1 for i, t in enumerate(emitted) if i >= 1 and t in stops), len(emitted))
            emitted = emitted[:cut]
            finish = "stop" if any(t in stops for t in emitted[1:]) else "length"
        stats.generated_tokens = len(emitted)
        stats.core_steps = core_steps
        stats.extra = {
            "rounds": rounds,
            "drafted_tokens": drafted,
            "accepted_drafts": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "accepted_drafts_per_round": accepted / rounds if rounds else 0.0,
            "tokens_per_round": (len(emitted) - 1) / rounds if rounds else 0.0,
            "bonus_tokens": bonus,
            "sequential_core_steps": core_steps,
        }
        return GenerationResult(prompt, emitted, finish, stats, self.decode_text(emitted, params))

    def _accept_greedy(
        self, verify: Tensor, drafts: Tensor, tokens: Tensor, length: int, params: SamplingParams, reference: bool
    ) -> int:
        """Number of leading drafts the verifier agrees with (rows j of `verify` judge drafts[j])."""
        threshold = self.params.verification_threshold
        if threshold >= 1:
            if reference:
                choices = verify.argmax(dim=-1)
            else:
                # Greedy choice with the repetition penalty of each row's own context (prefix + earlier drafts).
                choices = torch.stack(
                    [
                        apply_repetition_penalty(verify[j][None], tokens[: length + j], params.repetition_penalty)[0]
                        if params.repetition_penalty != 1.0
                        else verify[j]
                        for j in range(drafts.shape[0])
                    ]
                ).argmax(dim=-1)
            agree = choices == drafts
        else:
            probs = verify.softmax(dim=-1)
            agree = probs.gather(-1, drafts[:, None])[:, 0] >= threshold * probs.amax(dim=-1)
        # Leading run of agreements: one sync for the whole round.
        return int(agree.long().cumprod(dim=0).sum())

    def _accept_sampled(
        self,
        verify: Tensor,
        drafts: Tensor,
        draft_probs: Tensor,
        tokens: Tensor,
        length: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[int, Tensor]:
        """Speculative sampling: returns (accepted drafts, the token drawn after them)."""
        k = drafts.shape[0]
        target = torch.stack(
            [self._distribution(verify[j], tokens[: length + j], params) for j in range(k + 1)]
        )  # row k: the bonus distribution
        uniforms = torch.rand(k, generator=generator, device=verify.device)
        rows = torch.arange(k, device=verify.device)
        ratio = target[rows, drafts] / draft_probs[:k][rows, drafts].clamp_min(1e-30)
        n_ok = int((uniforms < ratio).long().cumprod(dim=0).sum())
        if n_ok < k:
            residual = (target[n_ok] - draft_probs[n_ok]).clamp_min(0)
            total = residual.sum()
            # q == p exactly leaves nothing to redistribute, and then a rejection cannot happen: guard anyway.
            distribution = residual / total if float(total) > 0 else target[n_ok]
        else:
            distribution = target[k]
        return n_ok, torch.multinomial(distribution, 1, generator=generator)[0]
