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
gate               Ouro: the last position's cumulative exit probability            value >= threshold  config
none               never exits                                                      —                   —
=================  ==============================================================  ==================  ======

The gate criterion is Ouro's own exit rule: its exit gate gives each loop t an exit probability
p_t = λ_t ∏_{j<t}(1 − λ_j), and the token exits at the first loop whose cumulative probability reaches the threshold
("auto": the checkpoint's `early_exit_threshold`). With `gate_compute="all"` every loop still runs and the token is
read from the exit loop's state: the official code's threshold selection, token for token; "weighted" reads it from
the exit-probability-weighted sum of every loop's logits (the official `use_weighted_exit`). With "skip" an exited
token really stops, and later tokens see it through the cache mode above.

s are raw core outputs (Ouro: its normed loop outputs); "previous" starts at the initial state (latent criteria), the
uniform distribution (KL criteria), entropy 100 and argmax −1, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from depthwave.engine.policy import Chunk, EngineContext, ExitGroup, ExitRule, PassResult, Policy, Sizing
from depthwave.engine.request import GenerationStats, Request
from depthwave.engine.selection import Choice, SamplingParams, select_tokens
from depthwave.errors import InvalidParameterError, is_int, is_number, param, require
from depthwave.model.config import HuginnConfig
from depthwave.model.kv_cache import CACHE_MODES, CacheMode
from depthwave.model.ouro import exit_defaults
from depthwave.model.positions import Positions
from depthwave.samplers.static import StaticPolicy

Criterion = Literal["latent-diff", "kl", "minp-kl", "entropy-diff", "argmax-stability", "cosine", "gate", "none"]
AUTO_THRESHOLDS: dict[str, float] = {
    "latent-diff": 0.03,
    "kl": 1e-3,
    "minp-kl": 1e-5,
    "entropy-diff": 1e-3,
    "argmax-stability": 5,
    "cosine": 1e-3,
    "gate": 1.0,
    "none": 0.0,
}
LOGIT_CRITERIA = ("kl", "minp-kl", "entropy-diff", "argmax-stability")


@dataclass(frozen=True)
class AdaptiveParams:
    """Adaptive compute: each token recurs until its exit criterion fires. With cache_mode "per-step" (the
    reference's lookup, for parity) a token that recurs deeper than earlier positions loses them from attention,
    which can wreck the output: on the built-in model 1/20 validation problems stay right with latent-diff, against
    19/20 with "shared"."""

    criterion: Criterion = param("latent-diff", "the exit criterion (see depthwave.samplers.adaptive)")
    exit_threshold: float | Literal["auto"] = param("auto", "the criterion's threshold, or auto (the reference's)")
    num_steps: int | None = param(None, "the most recurrences per token (default: the model's mean_recurrence)")
    min_steps: int = param(0, "recurrences before the first check")
    check_every: int = param(1, "check every n-th recurrence from there")
    exit_in_prefill: bool = param(True, "let the prompt exit early too")
    continuous_compute: bool = param(False, "start each token from the previous token's final raw state")
    init_scale: float = param(1.0, "scale of the random initial state (0: zeros)")
    cache_mode: CacheMode = param("shared", "KV cache: shared or per-step (the reference's lookup)")
    trace: bool = param(False, "record every token's criterion values")
    gate_compute: Literal["skip", "all", "weighted"] = param(
        "skip",
        "criterion gate: an exited token stops (skip); or every loop runs and the token is read from the exit loop "
        "(all) or from the exit-probability-weighted sum of the loops' logits (weighted)",
    )

    name: ClassVar[str] = "adaptive"

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
        need(self.gate_compute in ("skip", "all", "weighted"), "gate_compute", "'skip', 'all' or 'weighted'")

    @property
    def threshold(self) -> float:
        return AUTO_THRESHOLDS[self.criterion] if self.exit_threshold == "auto" else float(self.exit_threshold)

    def policy_class(self) -> type[Policy]:
        return AdaptivePolicy


class ExitCriterion(ExitRule):
    """One token's running comparison, for the engine's recurrence loop. `value` computes a check's number on the
    device; `commit` turns the fetched number into the exit decision."""

    def __init__(
        self, params: AdaptiveParams, model: Any, may_exit: bool, threshold: float, loops: int, select: str | None
    ) -> None:
        self.name, self.threshold, self.vocab_size = params.criterion, threshold, model.config.vocab_size
        self.min_steps, self.check_every = params.min_steps, params.check_every
        self.may_exit = may_exit
        self.uses_logits = params.criterion in LOGIT_CRITERIA
        self.gate = model.exit_logits if params.criterion == "gate" else None
        self.head, self.loops = model.head, loops
        self.select = select
        """None: the rule exits. "all" / "weighted": every recurrence runs, and the rule marks the state the token is
        read from (`chosen`), or weighs every loop's logits (`mixture`)."""
        self.select_only = select is not None
        self.mixture: Tensor | None = None
        self.values: list[float] = []
        self.fired = False
        self.previous: Any = None
        self.stable_steps = 0
        self.latest: Tensor | None = None
        self.chosen: Tensor | None = None
        self.exit_step: int | None = None

    def checks(self, step: int) -> bool:
        if self.select_only:
            return True  # the exit loop is only known from the checks of every loop
        return self.may_exit and step >= self.min_steps and (step - self.min_steps) % self.check_every == 0

    def reset(self, initial_state: Tensor) -> None:
        """Before the token's first recurrence; `initial_state` [1, S, D]."""
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
        elif self.name == "gate":
            # (cumulative exit probability, remaining mass), in fp32 and in the reference's order of operations
            self.previous = (
                initial_state.new_zeros((), dtype=torch.float32),
                initial_state.new_ones((), dtype=torch.float32),
            )

    def value(self, state: Tensor, logits: Tensor | None) -> Tensor:
        """state: raw [1, S, D]; logits: the last position's fp32 [V] (logit criteria only). A 0-dim tensor."""
        name = self.name
        if name == "none":  # checked (its trace shows zeros) but never exits
            return state.new_zeros(())
        if name == "argmax-stability":
            assert logits is not None
            return logits.argmax()
        if name == "gate":
            assert self.gate is not None
            self.latest = state
            lam = torch.sigmoid(self.gate(state[0, -1]))
            cumulative, remaining = self.previous
            if self.select == "weighted":
                # The last loop takes the remaining mass; the head applies per loop, then the weights.
                weight = lam * remaining if len(self.values) < self.loops - 1 else remaining
                weighted = weight * self.head(state[0, -1:])
                self.mixture = weighted if self.mixture is None else self.mixture + weighted
            cumulative = cumulative + lam * remaining
            self.previous = (cumulative, remaining * (1.0 - lam))
            return cumulative
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
        return value

    def commit(self, number: float) -> bool:
        """The exit decision from the fetched value; records it for the trace."""
        if self.name == "argmax-stability":
            current = int(number)
            self.stable_steps = self.stable_steps + 1 if current == self.previous else 0
            self.previous = current
            number, done = float(self.stable_steps), self.stable_steps >= self.threshold
        elif self.name == "none":
            done = False
        elif self.name == "gate":
            done = self.may_exit and number >= self.threshold
        else:
            done = number < self.threshold
        self.values.append(number)
        if self.select_only:
            if done and self.chosen is None:
                self.chosen, self.exit_step = self.latest, len(self.values) - 1
            return False
        self.fired = done
        return done

    def output_logits(self) -> Tensor:
        """With `select`: fp32 [1, V] the token's logits: the exit loop's (the last loop's when none fired), or the
        weighted mixture."""
        if self.select == "weighted":
            assert self.mixture is not None
            return self.mixture
        state = self.chosen if self.chosen is not None else self.latest
        assert state is not None
        return self.head(state[0, -1:])

    @classmethod
    def group(cls, rules: list[ExitRule], initial: Tensor, at: Positions) -> ExitGroup:
        return CriterionGroup(rules, initial, at)  # type: ignore[arg-type]


class CriterionGroup(ExitGroup):
    """A pass's adaptive rows: after each recurrence, the rows due for a check compute their criterion, and one
    transfer brings every value back for the exit decisions."""

    def __init__(self, rules: list[ExitCriterion], initial: Tensor, at: Positions) -> None:
        self.rules = rules
        for k, rule in enumerate(rules):
            rule.reset(initial[k : k + 1, : at.sizes[k]])

    def check(self, step: int, live: Sequence[int], rows: Any) -> list[bool]:
        due = [j for j, k in enumerate(live) if self.rules[live[j]].checks(step)]
        fired = [False] * len(live)
        if not due:
            return fired
        states = rows.states(due)
        wanted = [n for n, j in enumerate(due) if self.rules[live[j]].uses_logits]
        predictions = rows.logits([due[n] for n in wanted]) if wanted else None
        row_of = {n: m for m, n in enumerate(wanted)}
        values = []
        for n, j in enumerate(due):
            rule = self.rules[live[j]]
            prediction = predictions[row_of[n]] if rule.uses_logits else None  # type: ignore[index]
            values.append(rule.value(states[n : n + 1, : rows.size(j)], prediction).float())
        # The exit decision is control flow: one transfer per checked recurrence, for all rows.
        for j, number in zip(due, torch.stack(values).tolist(), strict=True):
            fired[j] = self.rules[live[j]].commit(number)
        return fired


@dataclass
class AdaptiveStats(GenerationStats):
    recurrences_per_token: list[int] = field(default_factory=list)
    mean_recurrences_per_token: float = 0.0
    early_exits: int = 0
    exit_threshold: float = 0.0
    criterion_values: list[list[float]] | None = None

    sampler: ClassVar[str] = "adaptive"

    def details(self) -> str:
        return f"{self.early_exits} early exits"


class AdaptivePolicy(StaticPolicy):
    """Static decoding whose tokens each stop recurring when their exit criterion fires (at most `num_steps`)."""

    def __init__(self, request: Request, ctx: EngineContext) -> None:
        super().__init__(request, ctx)  # warm starts (continuous compute) from the raw state, as the reference
        self.steps_per_token: list[int] = []
        self.exits = 0
        self.trace: list[list[float]] | None = [] if request.sampler.trace else None  # type: ignore[attr-defined]
        self.shallowest = self.num_steps  # the fewest recurrences any cached position ran
        self.rule: ExitCriterion | None = None

    @staticmethod
    def size(params: AdaptiveParams, prompt_len: int, sampling: SamplingParams, config: HuginnConfig) -> Sizing:  # type: ignore[override]
        if params.criterion == "gate" and not config.looped_stack:
            raise InvalidParameterError(f"criterion 'gate' needs a model with an exit gate (Ouro), not {config.family}")
        return StaticPolicy.size(params, prompt_len, sampling, config)  # type: ignore[arg-type]

    def chunk(self) -> Chunk:
        chunk = super().chunk()
        params: AdaptiveParams = self.params  # type: ignore[assignment]
        model = self.ctx.model
        threshold = params.threshold
        if params.criterion == "gate" and params.exit_threshold == "auto":
            threshold = exit_defaults(model.config)[1] or 1.0
        select = params.gate_compute if params.criterion == "gate" and params.gate_compute != "skip" else None
        may_exit = params.exit_in_prefill or self.position > 0
        self.rule = ExitCriterion(params, model, may_exit, threshold, self.num_steps, select)
        chunk.exit = self.rule
        chunk.select = select is None  # else prepare() reads the token from the rule's logits
        # Per-step cache: a position that exited after c recurrences has no entry in the slots of steps >= c, and a
        # later token at such a step must not see it (the reference's dictionary cache returns only what it holds).
        if self.ctx.pool.mode == "per-step":
            chunk.hide_below = self.shallowest
        return chunk

    @classmethod
    def prepare(cls, members: list[tuple[Policy, int]], result: PassResult) -> list[Tensor]:
        """Rows whose token comes from their rule's logits (gate_compute "all" or "weighted") choose it here, the
        others keep the engine's choice."""
        chosen = [(p, i) for p, i in members if not result.chunks[i].select]
        if chosen:
            tokens = chosen[0][0].ctx.buffers.tokens
            logits = torch.cat([p.rule.output_logits() for p, _ in chosen])  # type: ignore[attr-defined]
            choices = [
                Choice(slice(k, k + 1), p.request.sampling, p.request.generator, tokens[p.row], [cls._end(result, i)])
                for k, (p, i) in enumerate(chosen)
            ]
            picked = select_tokens(logits, choices)
            result.own_tokens.update({i: picked[k : k + 1] for k, (_, i) in enumerate(chosen)})
        return super().prepare(members, result)

    @staticmethod
    def _end(result: PassResult, index: int) -> int:
        chunk = result.chunks[index]
        return chunk.start + chunk.size

    def update(self, tokens: list[int], result: PassResult, index: int) -> None:
        steps = result.steps[index]
        assert self.rule is not None
        self.steps_per_token.append(steps)
        self.shallowest = min(self.shallowest, steps)
        exit_step = self.rule.exit_step
        self.exits += self.rule.fired or (exit_step is not None and exit_step < steps - 1)
        if self.trace is not None:
            self.trace.append(self.rule.values)
        super().update(tokens, result, index)

    def finalize_stats(self) -> AdaptiveStats:  # type: ignore[override]
        steps = self.steps_per_token
        return AdaptiveStats(
            core_steps=sum(steps),
            recurrences_per_token=steps,
            mean_recurrences_per_token=sum(steps) / len(steps) if steps else 0.0,
            early_exits=self.exits,
            exit_threshold=self.params.threshold,  # type: ignore[attr-defined]
            criterion_values=self.trace,
        )
