"""depthwave inside lm-evaluation-harness: the `depthwave` model (`lm_eval --model depthwave`).

    lm_eval --model depthwave --model_args pretrained=builtin,sampler=diffusion,inner_recurrence=4,batch_size=16 ...

`generate_until` runs every request of a call through the engine at once (`batch_size` rows, continuous batching),
each with its own sampling parameters and sampler; `--gen_kwargs` may carry `sampler` and any of that sampler's
parameters besides lm-eval's own keys. `loglikelihood` and `loglikelihood_rolling` score with full-depth forward
passes (`num_steps` recurrences, default the model's mean; zero initial state, so scores are deterministic), a
batch of sequences per pass. Request i of a task is seeded `seed * 1_000_003 + doc_id`, as `depthwave eval` seeds
sample i, so both give the same tokens for the same problem and sampler.

lm-eval has no plugin registry: installing depthwave puts a startup file in site-packages (`_depthwave_lm_eval.pth`,
see `_depthwave_lm_eval.py`) that adds the name `depthwave` to lm-eval's model registry when lm-eval loads its
models, and imports nothing else.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM

from depthwave.engine import Request
from depthwave.errors import DepthwaveError, InvalidParameterError, make_output_folder, one_line
from depthwave.eval.harness import sample_seed
from depthwave.llm import LLM
from depthwave.samplers import SamplingParams, registry

log = logging.getLogger("lm_eval")

# lm-eval's generation keys and the SamplingParams fields they set; `sampler` and the sampler's own fields are the
# other keys a request may carry.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# What lm-eval's command line passes as the device when --device is not given. It cannot be told apart from a user
# who typed it, so on a machine without CUDA it stands for "no device asked for"; a device in --model_args is
# always taken as asked.
LM_EVAL_DEFAULT_DEVICE = "cuda:0"


def _running_lm_eval_cli() -> bool:
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return program.name in ("lm_eval", "lm-eval") or program.parts[-2:] == ("lm_eval", "__main__.py")


def _one_line_errors(previous: Any) -> Any:
    """An excepthook for lm-eval's command line: a depthwave error (a bad device, sampler or parameter) ends the
    run with one line on stderr, as it does in the `depthwave` command, instead of a traceback."""

    def hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        if isinstance(error, DepthwaveError):
            print(f"depthwave: error: {one_line(str(error))}", file=sys.stderr)
            return
        previous(kind, error, traceback)

    return hook


if _running_lm_eval_cli():
    sys.excepthook = _one_line_errors(sys.excepthook)


@dataclass
class TaskStats:
    """What the sampler did for one task's generation requests, logged next to lm-eval's accuracy."""

    requests: int = 0
    generated_tokens: int = 0
    core_steps: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def recurrences_per_token(self) -> float:
        return self.core_steps / self.generated_tokens if self.generated_tokens else 0.0


class DepthwaveLM(TemplateLM):
    def __init__(
        self,
        pretrained: str = "builtin",
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 16,
        sampler: str | None = None,
        num_steps: int | None = None,
        seed: int = 0,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
        threads: int | None = None,
        compile: bool | str = False,
        **sampler_params: Any,
    ) -> None:
        super().__init__()
        self.batch_size = _batch_size(batch_size, max_batch_size)
        dtype = None if dtype in (None, "auto") else dtype
        compiled = compile if isinstance(compile, bool) else str(compile).lower() in ("1", "true", "yes")
        self.llm = LLM(
            str(pretrained),
            device=device,
            dtype=dtype,
            threads=None if threads is None else int(threads),
            compile=compiled,
        )
        self.llm.max_num_seqs = self.batch_size
        if self.llm.tokenizer is None:
            raise InvalidParameterError(f"{pretrained} has no tokenizer.json; lm-eval works on text")
        self.pretrained = str(pretrained)
        self.sampler_name = sampler or registry.default_for(self.llm.model.config)  # diffusion; Ouro: static
        self.sampler_defaults = dict(sampler_params)
        # Checked now, so that a typo fails before any task runs.
        registry.make(self.sampler_name, family=self.llm.model.config, **sampler_params)
        self.num_steps = num_steps
        self.seed = seed
        self.max_gen_toks = max_gen_toks
        self.task_stats: dict[str, TaskStats] = defaultdict(TaskStats)
        self.tokenizer = self.llm.tokenizer

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> Any:
        # lm-eval adds its own batch_size (1 unless --batch_size is given) and device; --model_args wins.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if extra.get("device") == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available():
            del extra["device"]
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- tokens -------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.llm.stop_token_ids[0] if self.llm.stop_token_ids else 0

    @property
    def prefix_token_id(self) -> int:
        bos = self.llm.tokenizer.bos_token if self.llm.tokenizer else None
        bos_id = self.llm.tokenizer.token_to_id(bos) if bos and self.llm.tokenizer else None
        return bos_id if bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.llm.model.config.block_size

    @property
    def device(self) -> torch.device:
        return self.llm.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        assert self.llm.tokenizer is not None
        return self.llm.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        assert self.llm.tokenizer is not None
        return self.llm.tokenizer.decode(tokens)

    # ---- chat ---------------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llm.tokenizer.chat_template if chat_template and self.llm.tokenizer else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        assert self.llm.tokenizer is not None
        return self.llm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- generation ---------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        engine_requests = [self._request(instance) for instance in requests]
        started = time.perf_counter()
        results = self.llm.run(engine_requests, progress=not disable_tqdm)
        wall = time.perf_counter() - started
        outputs = []
        tasks: dict[str, TaskStats] = defaultdict(TaskStats)
        for instance, result in zip(requests, results, strict=True):
            text = result.text if result.text is not None else self.tok_decode(result.token_ids)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", instance.args, text)
            stats = tasks[instance.task_name or "?"]
            stats.requests += 1
            stats.generated_tokens += result.stats.generated_tokens
            stats.core_steps += result.stats.core_steps
        total = sum(s.generated_tokens for s in tasks.values()) or 1
        for name, stats in tasks.items():
            # Requests of several tasks share the passes: each gets the wall time in proportion to its tokens.
            stats.wall_s = wall * stats.generated_tokens / total
            self._log(name, stats)
        return outputs

    def _request(self, instance: Any) -> Request:
        context, gen_kwargs = instance.args
        sampling, sampler = self.parse_gen_kwargs(gen_kwargs, sample_seed(self.seed, instance.doc_id or 0))
        return Request(self.llm.encode(context), sampling, sampler)

    def parse_gen_kwargs(self, gen_kwargs: dict[str, Any], seed: int) -> tuple[SamplingParams, Any]:
        """SamplingParams and sampler parameters from lm-eval's generation kwargs (unknown keys are an error)."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        stops = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
        do_sample = kwargs.pop("do_sample", None)
        temperature = kwargs.pop("temperature", None)
        if do_sample is False or (temperature is None and not do_sample):
            temperature = 0.0
        elif temperature is None:
            temperature = 1.0
        sampling = {key: kwargs.pop(key) for key in SAMPLING_KEYS[1:] if key in kwargs}
        params = SamplingParams(
            temperature=float(temperature), max_new_tokens=max_new, stop=stops, seed=seed, **sampling
        )
        name = kwargs.pop("sampler", self.sampler_name)
        known = set(registry.field_names(name))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidParameterError(
                f"unknown generation key(s) {unknown}: lm-eval's are until, max_gen_toks, do_sample, "
                f"{', '.join(SAMPLING_KEYS)}; sampler {name!r} takes {sorted(known)}"
            )
        defaults = self.sampler_defaults if name == self.sampler_name else {}
        return params, registry.make(name, family=self.llm.model.config, **{**defaults, **kwargs})

    def _log(self, task: str, stats: TaskStats) -> None:
        self.task_stats[task] = stats
        log.info(
            "depthwave %s on %s: %d requests, %d tokens, %.1f tokens/s, %.2f recurrences per token",
            self.sampler_name,
            task,
            stats.requests,
            stats.generated_tokens,
            stats.tokens_per_s,
            stats.recurrences_per_token,
        )

    # ---- scoring ------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first, so that a batch pads little; results go back in request order.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            scored = self.score([(requests[i][1], requests[i][2]) for i in batch])
            for i, result in zip(batch, scored, strict=True):
                out[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return [r for r in out if r is not None]

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax) per pair, from
        one full-depth forward over the batch (right-padded: a causal model's scores ignore what follows)."""
        if not pairs:
            return []
        limit = self.max_length + 1
        seqs = [(context + continuation)[-limit:] for context, continuation in pairs]
        width = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        model = self.llm.model
        logits = model(ids.to(model.device), self.num_steps, init_scale=0.0).logits.float()
        logprobs = logits.log_softmax(dim=-1).cpu()
        out = []
        for row, ((_, continuation), seq) in enumerate(zip(pairs, seqs, strict=True)):
            n = len(continuation)
            positions = torch.arange(len(seq) - 1 - n, len(seq) - 1)
            targets = torch.tensor(seq[-n:])
            rows = logprobs[row, positions]
            total = float(rows.gather(1, targets[:, None]).sum())
            out.append((total, bool((rows.argmax(dim=-1) == targets).all())))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for instance in requests:
            (string,) = instance.args
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = []
            for start in range(0, len(windows), self.batch_size):
                scores += self.score(windows[start : start + self.batch_size])
            total = sum(score for score, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out


def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """lm-eval passes an int, a numeric string or "auto" (the engine then takes max_batch_size, default 64)."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or 64)
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}") from None
    if value < 1:
        raise InvalidParameterError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return value


# ---- task files -------------------------------------------------------------------------------------------
ARITHMETIC_TEST = Path(__file__).resolve().parents[1] / "assets" / "arithmetic" / "test.jsonl"


def write_tasks(folder: str | Path, data: str | Path | None = None) -> list[Path]:
    """Write lm-eval task YAMLs for the built-in model's arithmetic problems into `folder` (for `--include_path`):
    `depthwave_arithmetic` (generation, exact match on `The answer is N.`) and `depthwave_arithmetic_mc` (multiple
    choice by log-likelihood of the final line, after the worked solution). Both read a local JSON-lines file
    (`data`, default the shipped test set) through `dataset_path: json` and `data_files`, so they run offline."""
    from depthwave.eval.lm_eval_tasks import TASKS

    folder = Path(folder)
    make_output_folder(folder, "the task folder")
    source = Path(data or ARITHMETIC_TEST).resolve()
    if not source.is_file():
        raise InvalidParameterError(f"no data file {source}")
    written = []
    for name, text in TASKS.items():
        path = folder / f"{name}.yaml"
        path.write_text(text.replace("DATA_FILE", str(source)))
        written.append(path)
    return written
