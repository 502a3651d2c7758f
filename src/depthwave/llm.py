"""`LLM`: a model, its tokenizer and its stop tokens in one object, with vLLM's `generate(prompts, params)` shape."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from depthwave.errors import InvalidParameterError, PromptError
from depthwave.model.loading import load_model, resolve_model_dir
from depthwave.model.tokenizer import default_stop_ids, load_tokenizer
from depthwave.samplers.adaptive import AdaptiveParams, AdaptiveSampler
from depthwave.samplers.base import GenerationResult, Sampler, SamplingParams
from depthwave.samplers.diffusion import DiffusionParams, DiffusionSampler
from depthwave.samplers.speculative import SpeculativeParams, SpeculativeSampler
from depthwave.samplers.static import StaticParams, StaticSampler

SAMPLERS: dict[str, tuple[type[Sampler], type]] = {
    "static": (StaticSampler, StaticParams),
    "adaptive": (AdaptiveSampler, AdaptiveParams),
    "speculative": (SpeculativeSampler, SpeculativeParams),
    "diffusion": (DiffusionSampler, DiffusionParams),
}

Prompt = str | Sequence[int]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    def __init__(
        self,
        model: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
    ) -> None:
        self.folder = resolve_model_dir(model, revision)
        self.model = load_model(self.folder, device or default_device(), dtype)
        self.tokenizer = load_tokenizer(self.folder)
        self.stop_token_ids = default_stop_ids(self.folder, self.model.config, self.tokenizer)

    def sampler(self, name: str = "static", **params: Any) -> Sampler:
        """A sampler bound to this model; `params` are the fields of that sampler's parameter dataclass."""
        if name not in SAMPLERS:
            raise InvalidParameterError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
        sampler_cls, params_cls = SAMPLERS[name]
        known = {f.name for f in fields(params_cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidParameterError(f"sampler {name!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
        return sampler_cls(self.model, self.tokenizer, self.stop_token_ids, params=params_cls(**params))

    def encode(self, prompt: Prompt, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a prompt: ids pass through; text is encoded raw, or rendered with the chat template."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise PromptError(f"{self.folder} has no tokenizer.json; give the prompt as token ids")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        # A post-processor may append an end-of-text token; a continuation prompt must not end with a stop.
        while ids and ids[-1] in self.stop_token_ids:
            ids.pop()
        return ids

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a whole conversation (system, few-shot turns, question) in the model's chat template."""
        if self.tokenizer is None:
            raise PromptError(f"{self.folder} has no tokenizer.json; chat messages need one")
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(list(messages)), add_special_tokens=False)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | None = None,
        sampler: str | Sampler = "static",
        chat: bool = False,
        **sampler_params: Any,
    ) -> list[GenerationResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        engine = sampler if isinstance(sampler, Sampler) else self.sampler(sampler, **sampler_params)
        return [engine.generate(self.encode(p, chat=chat), sampling_params) for p in prompts]  # type: ignore[arg-type]
