"""Train a recurrent-depth model from scratch with the Huginn recipe, on the arithmetic word problems.

Per optimizer step (the recipe of Huginn-0125's training code):

* a number of recurrences p is drawn from a Poisson-lognormal distribution around `mean_recurrence`; the first
  n = max(p - s, 0) core steps run without gradient and only the last k = min(p, s) are backpropagated through
  (s = `mean_backprop_depth`), so memory is bounded while the model learns to improve any state it reaches;
* the recurrence starts from a random state (`initial_state` with init_scale 1), and the prelude output is
  injected at every step through the adapter;
* the loss is next-token cross entropy on the answer only (the solution and the closing `<|end_turn|>`); the
  chat-formatted question is context. Its numbers are random, so predicting them would only add noise;
* AdamW, linear warmup then cosine decay, gradient-norm clipping.

Everything random in a step is a function of (seed, step): the problems, the recurrence count, the initial state.
A checkpoint therefore only needs the weights, the optimizer state and the step, and a resumed run continues
exactly as an uninterrupted one would have.

Output folder layout:
    checkpoint/   config.json, model.safetensors, tokenizer files, training_state.pt   (latest, resumable)
    model/        config.json, model.safetensors, tokenizer files                       (the final export)
    log.jsonl     one JSON object per logged step, validation and (re)start
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from depthwave.data.arithmetic import (
    DISTRIBUTIONS,
    MAX_ANSWER_TOKENS,
    Distribution,
    Problem,
    extract_answer,
    make_split,
    train_batch,
)
from depthwave.data.tokenizer import (
    BEGIN_TEXT,
    END_TURN,
    PAD,
    question_prompt,
    save_tokenizer_files,
    special_token_ids,
    stop_token_ids,
    train_arithmetic_tokenizer,
)
from depthwave.engine.selection import SamplingParams
from depthwave.errors import (
    DepthwaveError,
    InvalidParameterError,
    OneLineArgumentParser,
    make_output_folder,
    one_line,
)
from depthwave.model.config import HuginnConfig
from depthwave.model.loading import load_model, save_model
from depthwave.model.model import RecurrentDepthModel
from depthwave.model.ouro import config_from_ouro, exit_pdf
from depthwave.runtime import apply_threads, resolve_device
from depthwave.samplers.frontend import StaticSampler
from depthwave.samplers.static import StaticParams

# Positions the built-in model supports: the longest prompt plus solution is about 130 tokens.
CONTEXT_LENGTH = 256
IGNORE_INDEX = -100
CHECKPOINT_DIR = "checkpoint"
EXPORT_DIR = "model"
SNAPSHOT_DIR = "snapshots"
TRAINING_STATE = "training_state.pt"

# Fields that only change how a run is executed or watched, not what it computes: a resumed run may change them.
# Precision is one of them: it changes the rounding of the forward, not the recipe, and what a machine runs fastest
# differs (bf16 autocast is twice as fast as fp32 on a CPU with AVX512-BF16 and 5-7x slower on one without).
# init_from is one too: a resumed run takes its weights and tokenizer from its checkpoint, so the starting model
# only has to exist under some path (a committed run resumes from a fresh clone with the packaged one).
RUNTIME_FIELDS = frozenset(
    {
        "out_dir",
        "init_from",
        "device",
        "threads",
        "precision",
        "eval_every",
        "eval_problems",
        "checkpoint_every",
        "snapshot_every",
        "log_every",
        "stop_at",
    }
)
PRECISIONS = ("auto", "bf16", "fp32")
FAMILIES = ("huginn", "ouro")


class TrainingError(DepthwaveError, ValueError):
    """A training setting is invalid, or a run cannot be started or resumed as asked."""


@dataclass(frozen=True)
class TrainConfig:
    """The defaults are the built-in model's recipe (the `builtin` preset): the released 2/4/2 layout at width 128
    (1.8M parameters, 7.3 MB in fp32), mean_recurrence 32, from scratch on the classic problems. Backprop depth 4
    instead of Huginn's 8 makes a CPU step about 28% cheaper and learned this task as well in trial runs. The
    `wide` preset continues a model on the wide problems."""

    out_dir: str
    family: str = "huginn"
    """"huginn": prelude, core and coda, the core iterated a sampled number of times with the embedding injected
    (truncated backprop). "ouro": the whole stack looped `mean_recurrence` times, every loop backpropagated, trained
    with Ouro's objective: the expected next-token loss over the loops under the exit gate's distribution, minus
    `entropy_weight` times that distribution's entropy (see `looped_loss`)."""
    entropy_weight: float = 0.05
    distribution: Distribution = "classic"
    """The problems trained and validated on: "classic" (six templates, small word lists) or "wide" (many
    wordings, wide word pools, reordered two-step problems and bare arithmetic)."""
    init_from: str | None = None
    """A model folder to start from (its weights and tokenizer) instead of a fresh initialisation; its
    architecture must match this config's. It keeps its own mean_recurrence, the depth it is meant to run at (and
    is validated at): `mean_recurrence` here is only the training depth."""
    n_embd: int = 128
    n_heads: int = 4
    intermediate_size: int = 384
    prelude_layers: int = 2
    core_layers: int = 4
    coda_layers: int = 2
    mean_recurrence: int = 32
    """The mean of the sampled training depth, and a fresh model's default depth."""
    mean_backprop_depth: int = 4
    vocab_size: int = 1024
    """Upper bound of the BPE vocabulary; the model's vocabulary is what the tokenizer ends up with."""
    # optimisation
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    length_buckets: int = 1
    """A step's problems are sorted by length and run as this many micro-batches, each padded to its own longest
    problem; the loss is still the mean over all the step's answer tokens. Mixing bare sums (about 50 tokens) with
    word problems (up to 195) otherwise pads a third of every batch."""
    precision: str = "bf16"
    """"bf16": bf16 autocast around the forward (weights and optimizer stay fp32), "fp32": none, "auto": bf16 on a
    GPU that supports it and on a CPU with native bf16 (AVX512-BF16 or AMX), where it makes a step about 1.5x
    faster, fp32 elsewhere."""
    seed: int = 0
    """Weight init, recurrence counts and initial states."""
    data_seed: int = 0
    """The problems, the splits and the tokenizer's corpus."""
    # monitoring and runtime
    eval_every: int = 500
    """Validation accuracy every this many steps and at the end (0: never)."""
    eval_problems: int = 32
    checkpoint_every: int = 250
    snapshot_every: int = 0
    """Also export the model to snapshots/step-N every this many steps (0: never), for accuracy curves later."""
    log_every: int = 10
    stop_at: int | None = None
    """Save a checkpoint and return after this step (continue later with resume)."""
    device: str = "auto"
    threads: int = 0
    """CPU threads for torch (0: depthwave's default, see `depthwave.runtime.choose_threads`)."""

    def __post_init__(self) -> None:
        positive = (
            "n_embd",
            "n_heads",
            "intermediate_size",
            "core_layers",
            "mean_recurrence",
            "mean_backprop_depth",
            "vocab_size",
            "steps",
            "batch_size",
            "length_buckets",
            "log_every",
        )
        non_negative = (
            "prelude_layers",
            "coda_layers",
            "warmup_steps",
            "eval_every",
            "eval_problems",
            "checkpoint_every",
            "snapshot_every",
            "threads",
            "seed",
            "data_seed",
        )
        for name in positive + non_negative:
            value = getattr(self, name)
            minimum = 1 if name in positive else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TrainingError(f"training setting '{name}' must be an integer >= {minimum}, got {value!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "entropy_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise TrainingError(f"training setting '{name}' must be a number >= 0, got {value!r}")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise TrainingError(f"need 0 < min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainingError(f"training setting '{name}' must be in [0, 1), got {getattr(self, name)!r}")
        if self.n_embd % self.n_heads or (self.n_embd // self.n_heads) % 2:
            raise TrainingError(f"n_heads={self.n_heads} must divide n_embd={self.n_embd} into an even head size")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise TrainingError(f"stop_at must be in [1, steps={self.steps}], got {self.stop_at}")
        if self.family not in FAMILIES:
            raise TrainingError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "ouro" and (self.prelude_layers or self.coda_layers):
            raise TrainingError("an Ouro model loops its whole stack: prelude_layers and coda_layers must be 0")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.length_buckets > self.batch_size:
            raise TrainingError(f"length_buckets={self.length_buckets} must not exceed batch_size={self.batch_size}")
        if self.distribution not in DISTRIBUTIONS:
            raise TrainingError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise TrainingError(f"init_from must be a model folder with a config.json, got {self.init_from!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise TrainingError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def model_config(self, tokenizer: Tokenizer) -> HuginnConfig:
        ids = special_token_ids(tokenizer)
        if self.family == "ouro":
            return config_from_ouro(
                {
                    "model_type": "ouro",
                    "hidden_size": self.n_embd,
                    "num_attention_heads": self.n_heads,
                    "intermediate_size": self.intermediate_size,
                    "vocab_size": tokenizer.get_vocab_size(),
                    "num_hidden_layers": self.core_layers,
                    "total_ut_steps": self.mean_recurrence,
                    "max_position_embeddings": CONTEXT_LENGTH,
                    "torch_dtype": "float32",
                    "bos_token_id": ids[BEGIN_TEXT],
                    "eos_token_id": stop_token_ids(tokenizer),
                    "pad_token_id": ids[PAD],
                }
            )
        return HuginnConfig(
            n_embd=self.n_embd,
            n_heads=self.n_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=tokenizer.get_vocab_size(),
            block_size=CONTEXT_LENGTH,
            n_layers_in_prelude=self.prelude_layers,
            n_layers_in_recurrent_block=self.core_layers,
            n_layers_in_coda=self.coda_layers,
            mean_recurrence=self.mean_recurrence,
            mean_backprop_depth=self.mean_backprop_depth,
            # Stored and run in fp32: exact on any CPU, and only a few MB at this size.
            torch_dtype="float32",
            bos_token_id=ids[BEGIN_TEXT],
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=ids[PAD],
        )


# Hours on one CPU thread: two length buckets, bf16 where it is native, and frequent checkpoints and snapshots.
_LONG_RUN: dict[str, Any] = dict(
    length_buckets=2,
    precision="auto",
    eval_every=500,
    eval_problems=64,
    checkpoint_every=100,
    snapshot_every=500,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The shipped built-in model: from scratch on the classic problems (3000 steps).
    "builtin": {},
    # Continued training on the wide problems (pass --init-from a model folder, e.g. the built-in model's), sized
    # for one CPU thread: the sampled depth around 8 instead of 32 (the task's accuracy plateaus from r = 2, and
    # the model keeps its own mean_recurrence to run at), two length buckets per step, bf16 where it is native.
    "wide": dict(
        distribution="wide",
        mean_recurrence=8,
        steps=6000,
        batch_size=32,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=100,
        **_LONG_RUN,
    ),
    # A small Ouro-architecture model (1.5M parameters: 6 layers looped 4 times, untied head) from scratch on the
    # classic problems with Ouro's objective: a test and benchmark model for the Ouro samplers, not a second
    # default. Batch 16 keeps a step near 1 s on one CPU thread, so the run fits an hour.
    "ouro": dict(
        family="ouro",
        prelude_layers=0,
        core_layers=6,
        coda_layers=0,
        mean_recurrence=4,
        steps=3000,
        batch_size=16,
        **_LONG_RUN,
    ),
    # A few seconds on a CPU: for tests and for checking an installation.
    "smoke": dict(
        n_embd=32,
        n_heads=2,
        intermediate_size=64,
        mean_recurrence=4,
        mean_backprop_depth=2,
        steps=30,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_every=0,
        eval_problems=4,
        checkpoint_every=10,
        log_every=5,
    ),
}


@dataclass
class TrainSummary:
    start_step: int
    """The step this run started from (0, or the resumed checkpoint's)."""
    end_step: int
    losses: list[float] = field(default_factory=list)
    """Training loss of every step this run made."""
    val_accuracy: float | None = None
    """The last validation accuracy measured by this run."""
    model_dir: Path | None = None
    """The final export, once training reached its last step."""


# ---- the recipe ---------------------------------------------------------------------------------------------
def sample_recurrence(mean_recurrence: int, mean_backprop_depth: int, generator: torch.Generator) -> tuple[int, int]:
    """Huginn's training-time depth: (steps without gradient, steps with gradient).

    t = max(r̄ - s, 0), mu = ln(t + s) - 1/8, rate ~ LogNormal(mu, 1/2), p = Poisson(rate) + 1,
    n = max(p - s, 0), k = min(p, s). The -1/8 = -sigma²/2 makes the lognormal's mean exactly t + s."""
    s = mean_backprop_depth
    t = max(mean_recurrence - s, 0)
    mu = math.log(t + s) - 0.125
    rate = torch.exp(mu + 0.5 * torch.randn(1, generator=generator))
    p = int(torch.poisson(rate, generator=generator).item()) + 1
    return max(p - s, 0), min(p, s)


def recurrent_loss(
    model: RecurrentDepthModel,
    inputs: Tensor,
    targets: Tensor,
    no_grad_steps: int,
    grad_steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean next-token loss over the non-ignored targets after `no_grad_steps + grad_steps` recurrences from a
    random state, with gradients through the last `grad_steps` only (truncated backprop through depth)."""
    embedded = model.prelude(inputs)
    with torch.no_grad():
        state = model.initial_state(embedded, 1.0, generator)
        state = model.recur(state, embedded, no_grad_steps)
    state = model.recur(state, embedded, grad_steps)
    logits, _ = model.coda_logits(state)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def looped_loss(model: RecurrentDepthModel, inputs: Tensor, targets: Tensor, entropy_weight: float) -> Tensor:
    """Ouro's objective over the non-ignored targets: per token, sum_t p_t * CE_t - entropy_weight * H(p), with
    p the exit distribution of the gate over the model's loops and CE_t the next-token loss at loop t; mean over
    tokens. Every loop is backpropagated."""
    mask = targets.flatten() != IGNORE_INDEX
    state = model.initial_state(model.prelude(inputs))
    losses, gates = [], []
    for step in range(model.config.mean_recurrence):
        state = model.core_step(state, state, step=step)
        logits = model.head(state).flatten(0, 1)
        losses.append(F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"))
        gates.append(model.exit_logits(state).flatten())
    pdf = exit_pdf(torch.stack(gates))
    entropy = -(pdf * pdf.clamp_min(1e-12).log()).sum(0)
    objective = (pdf * torch.stack(losses)).sum(0) - entropy_weight * entropy
    return objective[mask].mean()


def length_buckets(examples: Sequence[Example], buckets: int) -> list[list[Example]]:
    """The examples sorted by length (prompt + answer) and cut into `buckets` runs of near-equal size. One bucket
    keeps the order, so a run without buckets draws each row's initial state as it always has."""
    if buckets == 1:
        return [list(examples)]
    ordered = sorted(examples, key=lambda example: len(example[0]) + len(example[1]))
    return [ordered[len(ordered) * i // buckets : len(ordered) * (i + 1) // buckets] for i in range(buckets)]


def accumulate_gradients(
    batches: Sequence[tuple[Tensor, Tensor]], loss_of: Callable[[Tensor, Tensor], Tensor], bf16: bool
) -> float:
    """Backpropagate the mean loss `loss_of(inputs, targets)` over all answer tokens of `batches` (micro-batches of
    one step, each weighted by its share of the tokens) and return that loss."""
    device = batches[0][0].device
    counts = [int((targets != IGNORE_INDEX).sum()) for _, targets in batches]
    total = sum(counts)
    value = 0.0
    for (inputs, targets), count in zip(batches, counts, strict=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(inputs, targets)
        share = count / total
        (loss * share).backward()
        value += loss.item() * share
    return value


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto": bf16 where the hardware computes it natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_native_bf16() else "fp32"


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume not, fp32 is never the slow choice by much
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(config.steps - config.warmup_steps - 1, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: RecurrentDepthModel, config: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: norms' gains and the q/k biases are not pulled towards zero.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


# ---- data -----------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    """The question as a user turn plus the assistant header, encoded as at inference."""
    return tokenizer.encode(question_prompt(question)).ids


def encode_problem(tokenizer: Tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids ending with <|end_turn|>). The two are encoded separately, exactly as a prompt is
    encoded at inference, so the token boundary between them is the one the model meets when it answers."""
    end_turn = special_token_ids(tokenizer)[END_TURN]
    return prompt_ids(tokenizer, problem.question), [*tokenizer.encode(problem.solution).ids, end_turn]


Example = tuple[list[int], list[int]]
"""(prompt ids, answer ids) of one problem."""


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded inputs [B, L] and targets [B, L] (the next token on answer positions, else ignored).

    Padding sits after every real token, so with causal attention it changes nothing the loss sees."""
    length = max(len(p) + len(a) for p, a in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        sequence = torch.tensor(prompt + answer)
        inputs[row, : len(sequence) - 1] = sequence[:-1]
        targets[row, len(prompt) - 1 : len(sequence) - 1] = sequence[len(prompt) :]
    return inputs, targets


# ---- evaluation -------------------------------------------------------------------------------------------------
def greedy_accuracy(
    model: RecurrentDepthModel,
    tokenizer: Tokenizer,
    problems: Sequence[Problem],
    num_steps: int | None = None,
    seed: int = 0,
) -> float:
    """Fraction of problems whose greedy static-depth answer (`num_steps` recurrences per token, default
    mean_recurrence, random initial state seeded per problem) ends in the right `The answer is N.`."""
    if not problems:
        raise ValueError("greedy_accuracy needs at least one problem")
    sampler = StaticSampler(model, None, stop_token_ids(tokenizer), StaticParams(num_steps=num_steps))
    correct = 0
    for index, problem in enumerate(problems):
        params = SamplingParams(temperature=0.0, max_new_tokens=MAX_ANSWER_TOKENS, seed=seed + index)
        result = sampler.generate(prompt_ids(tokenizer, problem.question), params)
        correct += extract_answer(tokenizer.decode(result.token_ids)) == problem.answer
    return correct / len(problems)


# ---- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(
    folder: Path,
    model: RecurrentDepthModel,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    step: int,
) -> None:
    """Write the checkpoint next to the old one and swap it in, so an interrupted save leaves a usable one."""
    staging = folder.with_name(folder.name + ".tmp")
    previous = folder.with_name(folder.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    export_model(staging, model, tokenizer)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": asdict(config)}, staging / TRAINING_STATE)
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def export_model(folder: Path, model: RecurrentDepthModel, tokenizer: Tokenizer) -> Path:
    """A model folder loadable like Huginn-0125: config.json, model.safetensors and the tokenizer files."""
    save_model(model, folder)
    save_tokenizer_files(tokenizer, folder, CONTEXT_LENGTH)
    return folder


def find_checkpoint(out_dir: Path) -> Path | None:
    """The latest complete checkpoint, also when a save was interrupted between its two renames."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        if (out_dir / name / TRAINING_STATE).is_file():
            return out_dir / name
    return None


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    current = asdict(config)
    # A field newer than the checkpoint had its default then.
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    differing = [
        f"{name}: checkpoint {saved.get(name, defaults[name])!r}, now {current[name]!r}"
        for name in current
        if name not in RUNTIME_FIELDS and saved.get(name, defaults[name]) != current[name]
    ]
    if differing:
        raise TrainingError(
            "cannot resume: the checkpoint was trained with other settings (pass the same flags as "
            "the original run): " + "; ".join(differing)
        )


# ---- the loop -------------------------------------------------------------------------------------------------
def _step_generator(seed: int, step: int, salt: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 4 + salt)


class _Progress:
    """A plain-text progress bar: one line per report, readable in a terminal and in a CI log alike."""

    def __init__(self, total: int, start: int, write: Callable[[str], None]) -> None:
        self.total, self.start, self.write = total, start, write
        self.began = time.perf_counter()

    def report(self, step: int, text: str) -> None:
        done = step + 1
        elapsed = time.perf_counter() - self.began
        per_step = elapsed / max(done - self.start, 1)
        eta = per_step * (self.total - done)
        filled = int(20 * done / self.total)
        bar = "#" * filled + "." * (20 - filled)
        self.write(
            f"[{bar}] {done:>{len(str(self.total))}}/{self.total} {text} {per_step:.2f} s/step eta {_clock(eta)}"
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


# Architecture fields a model given by init_from must share with the config. The depths are not among them: they
# are how deep it is trained and run, and a continuation may train at another depth than the model runs at.
_ARCHITECTURE = (
    "block_type",
    "n_embd",
    "n_heads",
    "intermediate_size",
    "n_layers_in_prelude",
    "n_layers_in_recurrent_block",
    "n_layers_in_coda",
    "vocab_size",
)


def _initial_model(config: TrainConfig, device: torch.device) -> tuple[Tokenizer, RecurrentDepthModel]:
    """A fresh model with a tokenizer trained on the config's problems, or the init_from model and its
    tokenizer."""
    if config.init_from is None:
        tokenizer = train_arithmetic_tokenizer(config.vocab_size, config.data_seed, distribution=config.distribution)
        with torch.device(device):
            model = RecurrentDepthModel(config.model_config(tokenizer))
        model.init_weights(_step_generator(config.seed, 0, 0, device))
        return tokenizer, model
    folder = Path(config.init_from)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = load_model(folder, device, torch.float32).train().requires_grad_(True)
    wanted = config.model_config(tokenizer)
    differing = [
        f"{name}: model {getattr(model.config, name)!r}, config {getattr(wanted, name)!r}"
        for name in _ARCHITECTURE
        if getattr(model.config, name) != getattr(wanted, name)
    ]
    if differing:
        raise TrainingError(f"init_from {folder} has another architecture: " + "; ".join(differing))
    return tokenizer, model


def train(config: TrainConfig, resume: bool = False, write: Callable[[str], None] = print) -> TrainSummary:
    """Run (or continue, with `resume`) the training described by `config`; see the module docstring."""
    try:
        device = resolve_device(None if config.device == "auto" else config.device)
    except InvalidParameterError as exc:
        raise TrainingError(str(exc)) from None
    apply_threads(config.n_embd, device, config.threads or None)
    run = _Run(config, device, resume, write)
    try:
        for step in range(run.summary.start_step, run.end):
            run.step(step)
    finally:
        run.log_file.close()
    return run.finish()


class _Run:
    """A training run's state between steps: the model, its optimizer, the log, what it has done."""

    def __init__(self, config: TrainConfig, device: torch.device, resume: bool, write: Callable[[str], None]):
        self.config, self.device, self.write = config, device, write
        self.out_dir = Path(config.out_dir)
        self.tokenizer, self.model, self.optimizer, start = _restore(config, device, resume)
        self.precision = resolve_precision(config.precision, device)
        make_output_folder(self.out_dir, "the training folder")
        self.log_file = (self.out_dir / "log.jsonl").open("a", encoding="utf-8")
        self.pad_id = special_token_ids(self.tokenizer)[PAD]
        self.validation = (
            make_split("validation", config.eval_problems, config.data_seed, config.distribution)
            if config.eval_every
            else []
        )
        self.end = config.stop_at or config.steps
        self.summary = TrainSummary(start_step=start, end_step=start)
        self._announce(start)
        self.progress = _Progress(self.end, start, write)
        self.last_log = time.perf_counter()

    def _announce(self, start: int) -> None:
        parameters = sum(p.numel() for p in self.model.parameters())
        self.write(
            f"training {parameters / 1e6:.2f}M parameters on {self.device} ({torch.get_num_threads()} threads, "
            f"{self.precision}), steps {start}..{self.end} of {self.config.steps}"
        )
        self.log(
            {
                "event": "start",
                "step": start,
                "config": asdict(self.config),
                "parameters": parameters,
                "device": str(self.device),
                "threads": torch.get_num_threads(),
                "precision": self.precision,
            }
        )

    def log(self, record: dict[str, Any]) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def step(self, step: int) -> None:
        """One optimizer step, then what is due after it: a log line, a validation, a snapshot, a checkpoint."""
        config = self.config
        lr = learning_rate(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        examples = [
            encode_problem(self.tokenizer, p)
            for p in train_batch(config.data_seed, step, config.batch_size, config.distribution)
        ]
        batches = [
            (inputs.to(self.device), targets.to(self.device))
            for inputs, targets in (collate(b, self.pad_id) for b in length_buckets(examples, config.length_buckets))
        ]
        depths, loss_of = self._objective(step)
        loss = accumulate_gradients(batches, loss_of, self.precision == "bf16")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.summary.losses.append(loss)
        self.summary.end_step = done = step + 1
        if done % config.log_every == 0 or done == self.end:
            self._log_step(step, lr, float(grad_norm), depths)
        if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            self._validate(done)
        if config.snapshot_every and done % config.snapshot_every == 0:
            export_model(self.out_dir / SNAPSHOT_DIR / f"step-{done}", self.model, self.tokenizer)
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == self.end:
            save_checkpoint(self.out_dir / CHECKPOINT_DIR, self.model, self.tokenizer, self.optimizer, config, done)

    def _objective(self, step: int) -> tuple[tuple[int, int], Callable[[Tensor, Tensor], Tensor]]:
        """This step's (steps without, with gradient) and its loss function."""
        config, model = self.config, self.model
        if config.family == "ouro":
            return (0, model.config.mean_recurrence), partial(looped_loss, model, entropy_weight=config.entropy_weight)
        # Drawn on the CPU so that a run samples the same depths on any device.
        depth_generator = _step_generator(config.seed, step, 1, torch.device("cpu"))
        depths = sample_recurrence(config.mean_recurrence, config.mean_backprop_depth, depth_generator)
        generator = _step_generator(config.seed, step, 2, self.device)
        return depths, partial(
            recurrent_loss, model, no_grad_steps=depths[0], grad_steps=depths[1], generator=generator
        )

    def _log_step(self, step: int, lr: float, grad_norm: float, depths: tuple[int, int]) -> None:
        now, loss = time.perf_counter(), self.summary.losses[-1]
        record = {"event": "train", "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        self.log({**record, "recurrence": list(depths), "seconds": now - self.last_log})
        self.last_log = now
        no_grad, grad = depths
        self.progress.report(step, f"loss {loss:.3f} lr {lr:.1e} r {no_grad + grad:>3} ({no_grad}+{grad})")

    def _validate(self, done: int) -> None:
        began = time.perf_counter()
        accuracy = greedy_accuracy(self.model, self.tokenizer, self.validation, seed=self.config.seed)
        seconds = time.perf_counter() - began
        depth = self.model.config.mean_recurrence
        self.summary.val_accuracy = accuracy
        record = {"event": "validation", "step": done, "accuracy": accuracy, "problems": len(self.validation)}
        self.log({**record, "num_steps": depth, "seconds": seconds})
        self.write(
            f"validation at step {done}: {accuracy:.1%} of {len(self.validation)} problems greedy at r={depth} "
            f"({seconds:.0f} s)"
        )

    def finish(self) -> TrainSummary:
        summary = self.summary
        if summary.end_step == self.config.steps:
            summary.model_dir = export_model(self.out_dir / EXPORT_DIR, self.model, self.tokenizer)
            self.write(f"done: model written to {summary.model_dir}")
        else:
            self.write(f"stopped at step {summary.end_step}; continue with --resume")
        return summary


def _restore(
    config: TrainConfig, device: torch.device, resume: bool
) -> tuple[Tokenizer, RecurrentDepthModel, torch.optim.AdamW, int]:
    """(tokenizer, model, optimizer, first step): from the run's checkpoint with `resume`, else a new start."""
    out_dir = Path(config.out_dir)
    checkpoint = find_checkpoint(out_dir)
    if checkpoint is not None and not resume:
        raise TrainingError(
            f"{out_dir} already holds a checkpoint; pass resume (--resume) to continue it, or "
            "choose another output folder"
        )
    if resume and checkpoint is None:
        raise TrainingError(f"nothing to resume: no checkpoint in {out_dir}")
    if checkpoint is None:
        tokenizer, model = _initial_model(config, device)
        return tokenizer, model, make_optimizer(model, config), 0
    state = torch.load(checkpoint / TRAINING_STATE, map_location=device, weights_only=True)
    _check_resumable(state["config"], config)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    model = load_model(checkpoint, device, torch.float32).train().requires_grad_(True)
    optimizer = make_optimizer(model, config)
    optimizer.load_state_dict(state["optimizer"])
    return tokenizer, model, optimizer, int(state["step"])


# ---- command line -----------------------------------------------------------------------------------------------
_FLAG_HELP = {
    "n_embd": "hidden size D",
    "n_heads": "attention heads",
    "intermediate_size": "MLP inner size",
    "prelude_layers": "P",
    "core_layers": "R (layers in the recurrent block)",
    "coda_layers": "C",
    "mean_recurrence": "mean recurrences in training, and r for validation",
    "mean_backprop_depth": "recurrences backpropagated through",
    "vocab_size": "upper bound of the BPE vocabulary",
    "steps": "optimizer steps of the whole run",
    "batch_size": "problems per step",
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the cosine",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay of the matrices",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "gradient-norm clip",
    "precision": "bf16 (autocast), fp32, or auto (bf16 where the hardware has it)",
    "family": "huginn (prelude, injected core, coda) or ouro (the whole stack looped, exit gate)",
    "entropy_weight": "ouro: weight of the exit distribution's entropy in the objective",
    "length_buckets": "micro-batches of similar length per step (less padding)",
    "snapshot_every": "export the model to snapshots/step-N every N steps (0: never)",
    "seed": "seed of init, recurrence counts and initial states",
    "data_seed": "seed of the problems, splits and tokenizer",
    "eval_every": "validate every N steps (0: never)",
    "eval_problems": "validation problems",
    "checkpoint_every": "checkpoint every N steps",
    "log_every": "progress line every N steps",
    "stop_at": "checkpoint and stop after this step",
    "device": "auto, cpu, cuda or cuda:N",
    "distribution": "problems to train on: classic or wide",
    "init_from": "model folder to start from instead of a fresh model",
    "threads": "torch CPU threads (0: one below 512 wide, else every core; OMP_NUM_THREADS wins)",
}


def build_parser(prog: str = "python -m depthwave.train") -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=prog,
        description="Train a recurrent-depth model on arithmetic word problems with the Huginn recipe.",
    )
    parser.add_argument("--out", required=True, help="output folder (checkpoint/, model/, log.jsonl)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="builtin", help="defaults to start from; flags override them"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    for f in fields(TrainConfig):
        if f.name == "out_dir":
            continue
        kind = {"str": str, "str | None": str, "Distribution": str, "float": float}.get(str(f.type), int)
        choices = {"precision": PRECISIONS, "distribution": DISTRIBUTIONS, "family": FAMILIES}.get(f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=kind, choices=choices, default=None, help=_FLAG_HELP[f.name]
        )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = dict(PRESETS[args.preset])
    values.update(
        {
            f.name: getattr(args, f.name)
            for f in fields(TrainConfig)
            if f.name != "out_dir" and getattr(args, f.name) is not None
        }
    )
    return TrainConfig(out_dir=args.out, **values)


def main(argv: Sequence[str] | None = None, prog: str = "python -m depthwave.train") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        config = config_from_args(args)
        train(config, resume=args.resume)
    except DepthwaveError as exc:
        # One line on stderr, as every depthwave command reports a user error.
        print(f"depthwave: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
