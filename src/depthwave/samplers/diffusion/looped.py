"""The diffusion sampler for models whose whole stack is the loop (Ouro): a wavefront over loops.

Huginn's diffusion sampler keeps refining a position's state while its token changes, because the token's embedding
is injected at every recurrence. An Ouro model has no injection: the token enters only as loop 0's input. So here a
position's state restarts from its token's embedding whenever that token changes, and the wavefront pipelines the
loops instead:

* every sampler step runs `inner_recurrence` loops on every position in flight, in one pass;
* each position's prediction re-proposes the next position's token; a draft that changes restarts from loop 0;
* the leftmost position in flight is final once it has run `num_steps` loops (the model's total, by default) since
  its token was last set, or, with freeze "latent-diff", once its normalised latent change over a step is at most
  ε; its prediction is then the next position's final token;
* at most `max_wavefront` positions are in flight; a new draft opens behind the last one each step.

The cache decides what a position at loop k sees of the earlier ones:

* ``per-step`` (what Ouro was trained with): their loop-k keys. Each position of the pass reads and writes its
  own loop's slots (`Chunk.loops`), and a draft that changes restarts every later position too (they read its keys
  at each loop they ran). With freeze "fixed" every final token is then computed exactly as static decoding computes
  it, whatever the wavefront: the speed comes from running the loops of several positions in one pass. A position
  frozen early by "latent-diff" is seen through its last loop's keys at the loops it skipped.
* ``shared`` (one slot per layer): their latest loop's keys, as Huginn's diffusion sampler uses them. A trained Ouro
  model does not work this way (`benchmarks/bench_ouro.py`).

With `max_wavefront=1` a position runs all its loops before the next one opens: static decoding on either cache,
token for token (`tests/test_ouro.py`). Momentum acts on injected embeddings, so it has no effect here; noise is
refused.
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor

from depthwave.engine.policy import Chunk, EngineContext, PassResult, Policy, Sizing
from depthwave.engine.request import Request
from depthwave.engine.selection import SamplingParams
from depthwave.errors import InvalidParameterError
from depthwave.model.config import HuginnConfig
from depthwave.samplers.diffusion.params import DiffusionParams
from depthwave.samplers.ops import token_budget

Members = list[tuple["LoopWavefrontPolicy", int]]


class LoopWavefrontPolicy(Policy):
    """One request's wavefront over loops: final positions below `low`, drafts in [low, high)."""

    def __init__(self, request: Request, ctx: EngineContext) -> None:
        super().__init__(request, ctx)
        self.params = cast(DiffusionParams, request.sampler)
        self.loops = self.params.num_steps or ctx.model.config.mean_recurrence
        self.low = self.high = 0
        # The in-flight positions [low, high): their tokens (kept on the host, so a step reads no device value to
        # compare proposals) and the loops each has run since its token was set.
        self.drafts: list[int] = []
        self.counts: list[int] = []
        self.step = 0
        self.core_steps = 0
        self.per_token: list[int] = []
        self.wavefront = 0
        self.per_step = self.params.cache_mode == "per-step"
        self.depth = self.params.inner_recurrence  # the loops of the current pass

    @staticmethod
    def size(params: DiffusionParams, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:
        if params.noise > 0 or params.mode != "default" or params.freeze not in ("latent-diff", "fixed"):
            raise InvalidParameterError(
                "on an Ouro model the diffusion sampler takes freeze 'latent-diff' or 'fixed', no noise and mode "
                "'default'"
            )
        budget = token_budget(prompt_len, sampling, config)
        cap = params.max_wavefront or config.block_size
        positions = min(config.block_size, prompt_len + budget + cap + 1)
        return Sizing(budget, positions, positions + 1, params.num_steps or config.mean_recurrence)

    def start(self) -> None:
        pass

    def chunk(self) -> Chunk:
        if self.high == 0:  # the prompt, through every loop: its prediction is the first final token
            n = self.prompt_len
            init = self.ctx.buffers.states.new_zeros(n, self.ctx.buffers.width)  # the model starts it from e
            return Chunk(0, n, self.loops, n - 1, init=init, context=n)
        size = self.high - self.low
        context = [self.low + j + 1 for j in range(size)]
        if not self.per_step:
            return Chunk(self.low, size, self.depth, 0, accumulate=True, context=context)
        # Each position runs its own next loops; the leftmost is the deepest, and none runs past the last loop.
        self.depth = min(self.params.inner_recurrence, self.loops - self.counts[0])
        return Chunk(self.low, size, self.depth, 0, accumulate=True, context=context, loops=list(self.counts))

    @classmethod
    def prepare(cls, members: list[tuple[Policy, int]], result: PassResult) -> list[Tensor]:
        """Per request: its proposals, then each position's normalised latent change over the pass."""
        out: list[Tensor] = []
        for policy, index in cast(Members, members):
            size = result.chunks[index].size
            before, after = result.wave_in[index, :size], result.wave_out[index, :size]
            change = (after - before).norm(dim=-1) / after.norm(dim=-1).clamp_min(1e-12)
            out += [result.tokens_of(index), change if policy.high else change[:0]]
        return out

    @classmethod
    def decide(cls, members: list[tuple[Policy, int]], fetched: list[list[float]], result: PassResult) -> None:
        for n, (policy, index) in enumerate(cast(Members, members)):
            proposals, changes = fetched[2 * n], fetched[2 * n + 1]
            policy.advance([int(t) for t in proposals], changes, result.chunks[index].size)

    def advance(self, proposals: list[int], changes: list[float], size: int) -> None:
        """proposals[j] is the prediction of position start + j of the pass (start: `low` before this step)."""
        if self.high == 0:
            self.low = self.high = self.prompt_len
            self._open(proposals[-1])
            self._emit([proposals[-1]], [self.loops])
            return
        start, end = self.low, self.high
        self.step += 1
        self.wavefront += size
        self.core_steps += self.depth * size
        self.counts = [c + self.depth for c in self.counts]
        final, spent = self._freeze(proposals, changes)
        for position in range(self.low + 1, min(self.high, end + 1)):  # drafts follow their predecessors
            self._set(position, proposals[position - 1 - start])
        if self._emit(final, spent):
            return
        # Position p predicts token p + 1: a draft past the last one the budget needs would be thrown away (and
        # could run past the model's context).
        needed = self.high < self.prompt_len + self.request.budget - 1
        if needed and self.high == end and self.high - self.low < (self.params.max_wavefront or self.high + 1):
            self._open(proposals[end - 1 - start])
        if self.step >= self.params.max_sampler_steps:
            self.finish("length")

    def _freeze(self, proposals: list[int], changes: list[float]) -> tuple[list[int], list[int]]:
        """Freeze from the left; each frozen position's prediction makes the next token final."""
        first = self.low
        final: list[int] = []
        spent: list[int] = []
        latent = self.params.freeze == "latent-diff"
        while self.low < self.high:
            j, count = self.low - first, self.counts[0]
            if not (count >= self.loops or (latent and count > 0 and changes[j] <= self.params.exit_threshold)):
                break
            token = proposals[j]
            final.append(token)
            spent.append(count)
            if self.per_step and count < self.loops:
                # Later positions will read this one's deeper loops: they see its last loop's keys there.
                self.ctx.pool.repeat_loop(self.row, self.low, count - 1, self.loops)
            self.counts.pop(0)
            self.drafts.pop(0)
            self.low += 1
            if self.low < self.high:
                self._set(self.low, token)
            else:
                self._open(token)
        return final, spent

    def _set(self, position: int, token: int) -> None:
        """A draft's token; a change restarts it from loop 0 (its embedding). On the per-step cache every later
        position restarts with it: they read its keys at each loop they ran, and those keys change."""
        j = position - self.low
        if self.drafts[j] != token:
            buffers = self.ctx.buffers
            buffers.tokens[self.row, position] = token
            self.drafts[j] = token
            end = self.high if self.per_step else position + 1
            buffers.counts[self.row, position:end] = 0
            self.counts[j : j + end - position] = [0] * (end - position)

    def _open(self, token: int) -> None:
        buffers = self.ctx.buffers
        buffers.tokens[self.row, self.high] = token
        buffers.counts[self.row, self.high] = 0
        self.drafts.append(token)
        self.counts.append(0)
        self.high += 1

    def _emit(self, tokens: list[int], spent: list[int]) -> bool:
        output = self.request.output
        assert output is not None
        self.per_token += spent
        if output.emit(tokens):
            self.finish("stop")
        elif output.full:
            self.finish("length")
        return self.done

    def finalize_stats(self) -> Any:
        from depthwave.samplers.diffusion.policy import DiffusionStats

        steps, per_token = self.step, self.per_token
        return DiffusionStats(
            core_steps=self.core_steps,
            sampler_steps=steps,
            recurrences_per_token=per_token,
            mean_recurrences_per_token=sum(per_token) / len(per_token) if per_token else 0.0,
            sequential_core_steps=self.loops + self.params.inner_recurrence * steps,
            mean_wavefront=self.wavefront / steps if steps else 0.0,
            tokens_per_sampler_step=len(per_token) / steps if steps else 0.0,
            hit_max_sampler_steps=steps >= self.params.max_sampler_steps,
        )
