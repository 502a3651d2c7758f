"""How fast a recurrent-depth model's latent state settles: the quantity the diffusion sampler's freeze rule (and
adaptive compute's latent-diff exit) thresholds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from depthwave.model.model import RecurrentDepthModel


def latent_change_per_step(
    model: RecurrentDepthModel, prompts: Sequence[Sequence[int]], max_steps: int, init_scale: float = 1.0
) -> list[float]:
    """Mean over prompts and positions of ‖s_t - s_(t-1)‖ / ‖s_t‖ for t = 1..max_steps, from the model's initial
    state (random at `init_scale`, seeded by the prompt's index; zeros at 0), without a cache."""
    changes = torch.zeros(max_steps)
    with torch.inference_mode():
        for index, prompt in enumerate(prompts):
            embedded = model.prelude(torch.tensor([list(prompt)], device=model.device))
            generator = torch.Generator(device=model.device).manual_seed(index)
            state = model.initial_state(embedded, init_scale, generator)
            for t in range(max_steps):
                new = model.core_step(state, embedded, step=t)
                changes[t] += ((new - state).float().norm(dim=-1) / new.float().norm(dim=-1)).mean().cpu()
                state = new
    return (changes / max(len(prompts), 1)).tolist()
