"""The diffusion forcing sampler (Geiping, Yang and Su, arXiv 2510.14961).

After a full-depth prefill of the prompt, every sampler step embeds the *wavefront* (the not-yet-final positions)
with momentum on the previous step's embeddings, refines all their latent states r' more recurrences in parallel,
re-proposes every not-yet-final token and opens `headway` new positions, and freezes the longest prefix whose
latent state has converged, keeping its K/V in the cache and rolling the cache back over the rest. With one shared
KV slot per layer (the paper's KV sharing) a position attends to the latest K/V of every earlier position.
Positions live in buffers indexed by absolute position, so moving the wavefront is index arithmetic.

* `params`: `DiffusionParams`, the paper's defaults;
* `window`: where a request stands, and `freeze`, the decision, a pure function;
* `policy`: the batched step (`DiffusionPolicy`, the default mode);
* `reference`: the official `generate_diffusion_style` token for token (`mode="reference"`), its deviations as
  overridden hooks.
"""

from depthwave.samplers.diffusion.params import FREEZE_RULES, LATENT_RULES, DiffusionParams
from depthwave.samplers.diffusion.policy import DiffusionPolicy, DiffusionStats
from depthwave.samplers.diffusion.reference import ReferenceDiffusionPolicy
from depthwave.samplers.diffusion.window import FreezeRules, Frozen, Measured, Window, freeze

__all__ = [
    "FREEZE_RULES",
    "LATENT_RULES",
    "DiffusionParams",
    "DiffusionPolicy",
    "DiffusionStats",
    "FreezeRules",
    "Frozen",
    "Measured",
    "ReferenceDiffusionPolicy",
    "Window",
    "freeze",
]
