"""Every way the official samplers behave that depthwave's default modes correct, named in one place.

`mode="reference"` switches all of a sampler's quirks on, so that its output is token-identical to the official
code (`recpre/raven_modeling_minimal.py`); `mode="default"` switches them off. The policies read these flags, never
the mode itself, so each deviation is visible by name where it acts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DiffusionQuirks:
    """`generate_diffusion_style`."""

    shifted_latent_pairs: bool
    """After a freeze that advanced g positions, the latent change of position p is measured against the previous
    state of position p + g (the previous states are sliced by the distance between window starts, but were stored
    from the trimmed window). So it can freeze at most every other step."""
    late_stop_check: bool
    """Stop tokens are looked for only after `num_steps` sampler steps, and only among the tokens frozen in the
    current step; the first token is never checked."""
    uncut_output: bool
    """The result holds every frozen token, not cut at the first stop token nor at `max_new_tokens`."""
    budget_ignores_context: bool
    """The token budget is `max_new_tokens`, not capped where the model's context ends."""
    stops_at_context_end: bool
    """The loop ends as soon as the window would reach past the context, leaving the positions still in flight
    unfrozen, instead of refining them until the context is full."""
    frozen_may_shrink: bool
    """A freeze sets the frozen count to the new boundary even when that is below the previous one, and a boundary
    at the window's start freezes nothing new."""
    prefill_depth_on_new_position: bool
    """The prefill's recurrences are credited to the first new position too (which has not run yet): its noise
    damping starts as if it had."""
    fixed_rule_keeps_headway: bool
    """The `fixed` rule keeps `headway` cache positions even when the wavefront cap opened fewer."""
    random_tokens_below_65510: bool
    """Proposals beyond the first of a `headway` > 1 step are random ids below 65510, whatever the vocabulary."""
    steps_cap_after: bool
    """`max_sampler_steps` is checked after the step counter passed it (two more steps than asked)."""


@dataclass(frozen=True)
class SpeculativeQuirks:
    """`generate_speculative`."""

    argmax_acceptance: bool
    """A draft is accepted when it is the verifier's argmax, even when sampling (so sampled output is not
    distributed as full-depth sampling)."""
    no_bonus_token: bool
    """The last draft is verified but not fed, so no bonus token follows a fully accepted round."""
    penalty_context_before_drafts: bool
    """The correction token's repetition penalty sees the sequence before the round's drafts."""
    overshoot_budget: bool
    """Every round drafts `lookahead` tokens, so the output may pass `max_new_tokens`; the budget is not capped by
    the context either."""
    cut_after_later_stop: bool
    """The first token is never stop-checked; the output is cut after the first stop token that follows it."""


def all_quirks(cls: type, on: bool) -> object:
    return cls(**{f.name: on for f in fields(cls)})


def diffusion_quirks(mode: str) -> DiffusionQuirks:
    return all_quirks(DiffusionQuirks, mode == "reference")  # type: ignore[return-value]


def speculative_quirks(mode: str) -> SpeculativeQuirks:
    return all_quirks(SpeculativeQuirks, mode == "reference")  # type: ignore[return-value]
