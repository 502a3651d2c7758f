"""The official `generate_diffusion_style`, token for token: the default policy with the official code's
deviations (`depthwave.samplers.quirks.DiffusionQuirks`), each read in the hook where it acts."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from depthwave.engine.policy import EngineContext, Sizing
from depthwave.engine.request import Request
from depthwave.engine.selection import SamplingParams
from depthwave.errors import InvalidParameterError
from depthwave.model.config import HuginnConfig
from depthwave.samplers.diffusion.params import LATENT_RULES, DiffusionParams
from depthwave.samplers.diffusion.policy import DiffusionPolicy
from depthwave.samplers.diffusion.window import FreezeRules, Frozen, Window
from depthwave.samplers.ops import token_budget
from depthwave.samplers.quirks import DiffusionQuirks, diffusion_quirks

QUIRKS = diffusion_quirks("reference")


class ReferenceDiffusionPolicy(DiffusionPolicy):
    quirks: ClassVar[DiffusionQuirks] = QUIRKS

    def __init__(self, request: Request, ctx: EngineContext) -> None:
        super().__init__(request, ctx)
        # The official loop reads its own token list; frozen tokens may be proposed again (a freeze may move the
        # boundary back), and the result is that list, not what was streamed.
        self.tokens = list(request.prompt_token_ids) + [0] * (ctx.buffers.length - self.prompt_len)
        self.boundary = self.boundary_before = 0  # its freeze boundary k and the previous one

    @classmethod
    def size(cls, params: DiffusionParams, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:
        headway = params.headway
        if config.family != "huginn":
            raise InvalidParameterError(
                "mode='reference' reproduces Huginn's official generate_diffusion_style; the retrofitted "
                f"{config.block_type} models have no official diffusion sampler to match: use mode='default'"
            )
        if cls.quirks.stops_at_context_end and prompt_len + 1 + headway > config.block_size:
            raise InvalidParameterError(
                f"with mode='reference' the loop ends once its window passes the context: headway={headway} after "
                f"a {prompt_len}-token prompt does not fit in the {config.block_size}-position context, so it "
                "could never freeze a token; lower headway or use mode='default'"
            )
        if cls.quirks.random_tokens_below_65510 and headway > 1 and config.vocab_size < 65510:
            raise InvalidParameterError(
                f"with mode='reference' and headway > 1 new positions get random token ids below 65510, as in the "
                f"official code, which this model's vocabulary ({config.vocab_size}) does not hold; use "
                "mode='default'"
            )
        return super().size(params, prompt_len, sampling, config)

    @classmethod
    def budget(cls, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> int:
        if cls.quirks.budget_ignores_context:
            return sampling.max_new_tokens
        return token_budget(prompt_len, sampling, config)

    @classmethod
    def freeze_rules(cls, params: DiffusionParams, warmup: int) -> FreezeRules:
        return FreezeRules(
            params.freeze,
            params.headway,
            warmup,
            params.max_recurrences,
            monotone=not cls.quirks.frozen_may_shrink,
            fixed_keeps_headway=cls.quirks.fixed_rule_keeps_headway,
        )

    def latent_shift(self, w: Window) -> int:
        return w.start - self.previous[0] if self.quirks.shifted_latent_pairs else 0

    def random_token_vocab(self) -> int:
        return 65510 if self.quirks.random_tokens_below_65510 else super().random_token_vocab()

    def credit_prefill(self, counts: Tensor) -> None:
        if self.quirks.prefill_depth_on_new_position:
            counts += self.num_steps

    def at_context_end(self, w: Window, grown: int, opened: int) -> tuple[Window, int, int]:
        if self.quirks.stops_at_context_end:
            return w, grown, opened
        return super().at_context_end(w, grown, opened)

    def context_full(self) -> bool:
        if self.quirks.stops_at_context_end:
            return self.window.length > self.ctx.model.config.block_size
        return super().context_full()

    def produced(self) -> int:
        return self.window.frozen - self.prompt_len if self.quirks.uncut_output else super().produced()

    def propose(self, proposals: list[int], randoms: list[int]) -> Window:
        w = self.window
        known = proposals + randoms
        self.tokens[w.frozen : w.frozen + len(known)] = known
        return super().propose(proposals, randoms)

    def prefilled(self, token: int) -> None:
        self.tokens[self.prompt_len] = token
        super().prefilled(token)

    def emit_first(self, token: int) -> bool:
        if self.quirks.late_stop_check:
            self.request.output.extend_unchecked([token])  # type: ignore[union-attr]
            return False
        return super().emit_first(token)

    def finish_step(self, before: Window, frozen: Frozen) -> None:
        if frozen.froze and self.params.freeze in LATENT_RULES:
            self.boundary = self.window.frozen
        if not self.quirks.late_stop_check:
            super().finish_step(before, frozen)
            return
        ended = self.stream_unchecked()
        if ended == "cap":
            return
        if ended == "stop":
            self.finish("stop")  # the official loop leaves before counting the step
            return
        self.previous = (before.start, before.size)
        self.boundary_before = self.boundary
        self.step += 1
        self.continue_or_finish()

    def stream_unchecked(self) -> str | None:
        """Everything that froze goes out unchecked; stop tokens are looked for only after `num_steps` sampler
        steps, among the tokens frozen in this step. Returns "stop", "cap" (the request finished) or None."""
        output = self.request.output
        assert output is not None
        w, stops = self.window, output.stop.ids
        output.extend_unchecked(self.tokens[self.prompt_len + len(output.tokens) : w.frozen])
        self.pending = []
        if self.step > self.num_steps:
            if self.params.freeze in LATENT_RULES:
                recent = self.tokens[self.boundary_before : self.boundary]
            else:
                recent = self.tokens[max(w.frozen - self.params.headway, 0) : w.frozen]
            if any(t in stops for t in recent):
                return "stop"
        cap = self.params.max_sampler_steps
        if (self.step > cap) if self.quirks.steps_cap_after else (self.step + 1 >= cap):
            self.finish("length")
            return "cap"
        return None

    def final_tokens(self, emitted: list[int]) -> list[int]:
        generated = self.tokens[self.prompt_len : self.window.frozen] if self.quirks.uncut_output else emitted
        super().final_tokens(generated)
        if self.quirks.prefill_depth_on_new_position and self.params.full_prefill and len(self.recurrences) > 1:
            self.recurrences[1] -= self.num_steps
        if self.quirks.uncut_output:
            stops = self.request.output.stop.ids  # type: ignore[union-attr]
            self.request.finish_reason = "stop" if any(t in stops for t in generated) else "length"
        return generated
