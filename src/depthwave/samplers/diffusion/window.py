"""Where a request stands, and the freeze decision: a pure function from a window and what a step measured to
the next window.

Positions are absolute. The cache holds every position below `start`; the wavefront is start..end-1; tokens
below `frozen` are final; `length` tokens (the final ones and the current proposals) are known. Wavefront row j
predicts position start + j + 1, so the last frozen position stays in the wavefront: it predicts the first token
that is not final yet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from depthwave.samplers.diffusion.params import LATENT_RULES, FreezeRule


@dataclass(frozen=True)
class Window:
    start: int
    size: int
    frozen: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def offset(self) -> int:
        """Wavefront rows before the first one that predicts a not-yet-final token (their predictions are final)."""
        return max(self.frozen - 1 - self.start, 0)

    @property
    def proposing(self) -> int:
        """Wavefront rows whose predictions are re-proposed this step."""
        return self.size - self.offset


@dataclass(frozen=True)
class Measured:
    """What a step measured for one request, each as 1 + the last wavefront row where it holds (0: none):
    `latent`: the latent rule's convergence (rows compared from position `compared_from`); `stable`: proposal
    agreement (token-stability; an absolute position there); `capped`: recurrences reached max_recurrences."""

    latent: int
    stable: int
    capped: int
    compared_from: int


@dataclass(frozen=True)
class FreezeRules:
    """How a request freezes. `monotone`: the frozen count never shrinks and a freeze gains at least one token
    (the reference lets a freeze move the boundary back). `fixed_keeps_headway`: the `fixed` rule keeps `headway`
    cache positions even when the wavefront cap opened fewer (the reference's)."""

    rule: FreezeRule
    headway: int
    warmup: int
    max_recurrences: int | None
    monotone: bool = True
    fixed_keeps_headway: bool = False


@dataclass(frozen=True)
class Frozen:
    """A freeze decision: the next window, the cache length to keep, whether anything froze."""

    window: Window
    keep: int
    froze: bool


def freeze(window: Window, grown: int, opened: int, measured: Measured, step: int, rules: FreezeRules) -> Frozen:
    """The next window after a step that left `grown` positions in flight, `opened` of them new: everything
    before the freeze boundary becomes final, the cache keeps it, and the wavefront starts at the last final
    position."""
    start = window.start
    if rules.rule == "fixed" and step > rules.warmup:
        # `headway` tokens per step after a warm-up (before it, only the recurrence cap freezes).
        keep = start + (rules.headway if rules.fixed_keeps_headway else opened)
        moved = Window(start + opened, grown - opened, window.frozen + opened, window.length)
        return Frozen(moved, keep, True)
    boundary = 0
    if rules.rule in LATENT_RULES:
        boundary = measured.compared_from + measured.latent if measured.latent else 0
    elif rules.rule == "token-stability":
        boundary = measured.stable
    if rules.max_recurrences is not None and measured.capped:
        # Row i predicts position start + i + 1: once it has run the maximum, that prediction is final.
        boundary = max(boundary, start + measured.capped + 1)
    if boundary and rules.monotone:
        boundary = max(boundary, start + 1)
    if not boundary:
        return Frozen(replace(window, size=grown), start, False)
    frozen = max(boundary, window.frozen) if rules.monotone else boundary
    moved = Window(boundary - 1, start + grown - (boundary - 1), frozen, max(window.length, frozen))
    return Frozen(moved, boundary - 1, True)
