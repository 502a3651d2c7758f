"""The diffusion forcing sampler's parameters (the paper's defaults) and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from depthwave.errors import is_int, is_number, param, require
from depthwave.model.kv_cache import CACHE_MODES, CacheMode

if TYPE_CHECKING:
    from depthwave.engine.policy import Policy

FreezeRule = Literal["latent-diff", "fixed", "token-stability", "latent-acceleration"]
FREEZE_RULES: tuple[str, ...] = ("latent-diff", "fixed", "token-stability", "latent-acceleration")
LATENT_RULES = ("latent-diff", "latent-acceleration")
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
        "shared",
        "KV cache: shared (one slot per layer, the paper's) or per-step (the reference's 'full'; the default on Ouro, "
        "where each position of the loop wavefront reads its own loop's keys)",
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
        # The reference mode is a policy of its own: the official code's deviations override named hooks.
        from depthwave.samplers.diffusion.policy import DiffusionPolicy
        from depthwave.samplers.diffusion.reference import ReferenceDiffusionPolicy

        return ReferenceDiffusionPolicy if self.mode == "reference" else DiffusionPolicy
