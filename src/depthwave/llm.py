"""`LLM`: a model, its tokenizer and its stop tokens in one object, with vLLM's `generate(prompts, params)` shape.
All prompts of a call run through the batched engine together."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from depthwave.engine.engine import Engine, EngineConfig, EngineStats, as_token_ids, check_prompt, check_text
from depthwave.engine.policy import sizing
from depthwave.engine.request import GenerationResult, Request, StepOutput
from depthwave.engine.selection import SamplingParams
from depthwave.errors import InvalidParameterError, PromptError
from depthwave.model.loading import load_model, resolve_model_dir
from depthwave.model.model import RecurrentDepthModel
from depthwave.model.tokenizer import default_stop_ids, load_tokenizer
from depthwave.runtime import apply_threads, resolve_device
from depthwave.samplers import registry
from depthwave.samplers.frontend import Sampler

Prompt = str | Sequence[int]


class LLM:
    def __init__(
        self,
        model: str | Path | RecurrentDepthModel,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        max_num_seqs: int = 64,
        threads: int | None = None,
        compile: bool = False,
    ) -> None:
        """`threads`: torch's CPU threads, set for the whole process (default: one for models under 512 wide,
        where a second thread does not pay and collapses when another process holds a core; else every available
        core; OMP_NUM_THREADS, when set, wins over the default). See `depthwave.runtime`. `compile`: every engine
        runs its decode passes as compiled graphs (`depthwave.model.compiled`).

        `model`: a folder, a hub id or "builtin"; or a model in memory (benchmarks of random models), which has no
        tokenizer and no stop tokens, and stays on its own device and dtype."""
        if isinstance(model, RecurrentDepthModel):
            self.folder: Path | None = None
            self.model = model
            self.threads = apply_threads(model.config.n_embd, model.device, threads)
            self.tokenizer = None
            self.stop_token_ids: list[int] = []
        else:
            self.folder = resolve_model_dir(model, revision)
            resolved = resolve_device(device)
            self.model = load_model(self.folder, resolved, dtype)
            self.threads = apply_threads(self.model.config.n_embd, resolved, threads)
            self.tokenizer = load_tokenizer(self.folder)
            self.stop_token_ids = default_stop_ids(self.folder, self.model.config, self.tokenizer)
        self.max_num_seqs = max_num_seqs
        self.compile = compile
        self._compiled: dict[tuple[str, int], Engine] = {}

    # ---- samplers -----------------------------------------------------------------------------------------
    def sampler(self, name: str | None = None, **params: Any) -> Sampler:
        """A one-prompt sampler bound to this model (default: `registry.default_for` the model); `params` are the
        fields of that sampler's parameter dataclass."""
        name = name or registry.default_for(self.model.config)
        return Sampler(
            self.model,
            self.tokenizer,
            self.stop_token_ids,
            params=registry.make(name, family=self.model.config, **params),
            compile=self.compile,
        )

    # ---- prompts ------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a prompt: ids pass through; text is encoded raw, or rendered with the chat template."""
        if not isinstance(prompt, str):
            return as_token_ids(prompt)
        check_text(prompt)
        if self.tokenizer is None:
            raise PromptError(f"{self.folder or 'this model'} has no tokenizer.json; give the prompt as token ids")
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
            raise PromptError(f"{self.folder or 'this model'} has no tokenizer.json; chat messages need one")
        for message in messages:
            check_text(str(message.get("content", "")), "a message")
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(list(messages)), add_special_tokens=False)

    # ---- generation ---------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        sampler: str | Any | Sequence[Any] | None = None,
        chat: bool = False,
        system: str | None = None,
        progress: bool | None = None,
        on_output: Callable[[StepOutput], None] | None = None,
        **sampler_params: Any,
    ) -> list[GenerationResult]:
        """Generate for every prompt, all batched through the engine; results in input order.

        `sampling_params`: one for all prompts or one per prompt. `sampler`: a name (with `sampler_params` as its
        fields), a parameter object (`DiffusionParams(...)`), or one parameter object per prompt: requests of
        different samplers share the engine's steps; None: the model's default (`registry.default_for`).
        `progress`: a progress bar (default: for 8 prompts or more)."""
        if getattr(prompts, "ndim", None) is not None:  # a tensor or an array: one prompt per row
            single = prompts.ndim == 1  # type: ignore[union-attr]
        else:
            single = isinstance(prompts, str) or (bool(prompts) and not isinstance(prompts[0], (str, list, tuple)))
        items: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item, arg-type]
        params = self._per_prompt(sampling_params, len(items), "sampling_params", SamplingParams())
        if isinstance(sampler, Sampler):
            sampler = sampler.params
        if sampler is None:
            sampler = registry.default_for(self.model.config)
        if isinstance(sampler, str):
            sampler = registry.make(sampler, family=self.model.config, **sampler_params)
        elif sampler_params:
            raise InvalidParameterError("sampler parameters go into the sampler object when one is given")
        samplers = self._per_prompt(sampler, len(items), "sampler", None)
        requests = [
            Request(self.encode(p, chat=chat, system=system), sp, s)
            for p, sp, s in zip(items, params, samplers, strict=True)
        ]
        return self.run(requests, progress=progress, on_output=on_output)

    def check(self, request: Request) -> None:
        """Raise the DepthwaveError that running this request would raise (bad prompt, impossible settings)."""
        request.prompt_token_ids = check_prompt(request.prompt_token_ids, self.model.config)
        sizing(request.sampler, len(request.prompt_token_ids), request.sampling, self.model.config)

    def run(
        self,
        requests: Sequence[Request],
        progress: bool | None = None,
        on_output: Callable[[StepOutput], None] | None = None,
    ) -> list[GenerationResult]:
        """Run requests through engines sized for them; results in the order given."""
        return self.run_with_stats(requests, progress, on_output)[0]

    def run_with_stats(
        self,
        requests: Sequence[Request],
        progress: bool | None = None,
        on_output: Callable[[StepOutput], None] | None = None,
    ) -> tuple[list[GenerationResult], EngineStats]:
        """`run`, and the engines' totals (pass times and tokens). Requests whose samplers need different KV
        caches (per-step against shared) run as separate batches, one after the other."""
        groups: dict[str, list[Request]] = defaultdict(list)
        for request in requests:
            self.check(request)
            groups[request.sampler.cache_mode].append(request)
        show = len(requests) >= 8 if progress is None else progress
        results: dict[str, GenerationResult] = {}
        with _Progress(len(requests), show) as bar:

            def report(output: StepOutput) -> None:
                if output.result is not None:
                    bar.advance()
                if on_output is not None:
                    on_output(output)

            totals = EngineStats()
            for mode, group in groups.items():
                engine = self.engine(group, mode)
                for result in engine.run(group, on_output=report):
                    results[result.request_id] = result
                totals = totals.plus(engine.stats)
        return [results[r.request_id] for r in requests], totals

    def engine(self, requests: Sequence[Request], cache_mode: str = "shared", **config: Any) -> Engine:
        """An engine whose rows hold the largest of `requests` (or `config`'s EngineConfig fields)."""
        sizes = [sizing(r.sampler, len(r.prompt_token_ids), r.sampling, self.model.config) for r in requests]
        defaults: dict[str, Any] = {
            "max_num_seqs": max(1, min(self.max_num_seqs, len(requests))),
            "max_model_len": max((s.cache for s in sizes), default=None),
            "cache_mode": cache_mode,
            "max_steps": max((s.max_step for s in sizes), default=None),
            "buffer_slack": max((s.buffer - s.cache for s in sizes), default=64),
            "compile": self.compile,
        }
        if defaults["compile"] and "max_num_seqs" not in config:
            defaults["max_num_seqs"] = self.max_num_seqs  # one compiled engine for calls of any size
        defaults.update(config)
        # Everything waits from the start: refilling rows in groups makes the prefills batched passes (64
        # problems at 16 rows: 36 prefill passes and 11.0 s become 7 passes and 8.5 s, benchmarks/bench_lm_eval.py).
        defaults.setdefault("prefill_batch", max(1, defaults["max_num_seqs"] // 2))
        if defaults["compile"]:
            return self._compiled_engine(defaults)
        return Engine(self.model, self.tokenizer, self.stop_token_ids, EngineConfig(**defaults))

    def _compiled_engine(self, wanted: dict[str, Any]) -> Engine:
        """A compiled engine's graphs are specialised to its KV pool, so compiling for every call would cost more
        than it saves: one engine per (cache mode, rows) is kept and reused while it is large enough, and replaced
        by one sized for both the old and the new needs when it is not."""
        key = (wanted["cache_mode"], wanted["max_num_seqs"])
        engine = self._compiled.get(key)
        if engine is not None:
            have = engine.config
            grown = {
                name: max(v for v in (getattr(have, name), wanted[name]) if v is not None)
                for name in ("max_model_len", "max_steps", "buffer_slack")
                if wanted.get(name) is not None or getattr(have, name) is not None
            }
            if all(getattr(have, name) == value for name, value in grown.items()):
                engine.stats = EngineStats()  # the caller reads this call's totals
                return engine
            wanted = {**wanted, **grown}
        engine = Engine(self.model, self.tokenizer, self.stop_token_ids, EngineConfig(**wanted))
        self._compiled[key] = engine
        return engine

    @staticmethod
    def _per_prompt(value: Any, count: int, name: str, default: Any) -> list[Any]:
        if value is None:
            return [default] * count
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise InvalidParameterError(f"{name}: {len(value)} given for {count} prompts; give one or one each")
            return list(value)
        return [value] * count


class _Progress:
    """A rich progress bar over finished requests, or nothing."""

    def __init__(self, total: int, show: bool) -> None:
        self.show = show
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
            )
            self.task = self.progress.add_task("generate", total=total)

    def __enter__(self) -> _Progress:
        if self.show:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.show:
            self.progress.stop()

    def advance(self) -> None:
        if self.show:
            self.progress.advance(self.task)
