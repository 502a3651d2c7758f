"""The engine: many requests, one model call per stage per pass, requests joining and leaving between steps.

Each `step()`:

1. admits waiting requests into free rows (first come, first served, within the KV budget) and runs their first
   chunk (their prefill, whatever the sampler) in a pass of their own, so that a long prompt never pads the rows
   that are decoding;
2. runs one pass over every request that was already running: each advances by one sampler step (a static token,
   an adaptive token, a diffusion step, a speculative draft or verification);
3. lets finished requests leave; their rows are free for the next step.

A pass builds the rows' positions once (RoPE rows, one attention mask, the cache writes), gathers each row's input
tokens and initial states from the row buffers, and runs the prelude, the recurrences, the coda and the head once
for all rows together. Rows run different numbers of recurrences (a diffusion step of r' = 4 beside a static
token of r = 32, an adaptive token that exits): a row that has run its recurrences drops out of the later ones
instead of being computed and discarded. Tokens are chosen per request (its own parameters and generator), then
each sampler decides what became final, with one host synchronisation per pass.
"""

from __future__ import annotations

import numbers
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from depthwave.engine.buffers import RowBuffers
from depthwave.engine.output import Output, StopCondition, cut_at_stop_strings
from depthwave.engine.policy import (
    Chunk,
    EngineContext,
    ExitGroup,
    ExitRule,
    PassResult,
    Policy,
    SamplerParams,
    sizing,
)
from depthwave.engine.request import GenerationResult, Request, StepOutput
from depthwave.engine.scheduler import Scheduler
from depthwave.engine.selection import Choice, SamplingParams, select_tokens
from depthwave.errors import InvalidParameterError, PromptError, is_int, require
from depthwave.model.compiled import CompiledModel
from depthwave.model.config import HuginnConfig
from depthwave.model.kv_cache import CACHE_MODES, CacheMode, KVPool
from depthwave.model.model import RecurrentDepthModel
from depthwave.model.positions import Positions

if TYPE_CHECKING:
    from depthwave.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    """max_num_seqs: rows (requests running at once). max_model_len: cached positions per row (default: the model's
    context). max_cached_positions: KV budget over all running requests, each reserving what it may use at most
    (default: rows × max_model_len). cache_mode: "shared" (P + R + C slots per position) or "per-step"
    (P + R·max_steps + C, the reference's lookup). max_steps: recurrence slots of a per-step cache (default: the
    model's mean_recurrence). buffer_slack: token/state positions per row beyond max_model_len (the diffusion
    sampler proposes `headway` tokens past its cache). admission_delay: while requests run, new ones wait until the
    oldest has waited this many times the last prefill pass's time (or they would fill every free row), so that
    their prefills share one pass (vLLM's scheduler delay factor). A prefill runs the prompt at full depth, so
    under a steady stream of arrivals one pass per newcomer costs more than the decoding; 0 admits at once.
    prefill_batch: while requests run, newcomers also wait until this many of them (or all that wait, if fewer)
    have free rows, so that a departure does not cost a prefill pass for one prompt (offline runs, where
    everything waits from the start, use half the rows: `LLM.engine`)."""

    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_cached_positions: int | None = None
    cache_mode: CacheMode = "shared"
    max_steps: int | None = None
    buffer_slack: int = 64
    admission_delay: float = 0.0
    prefill_batch: int = 1
    compile: bool = False
    """Run the decode passes' prelude, recurrences and coda as compiled graphs (`depthwave.model.compiled`):
    faster where per-op overhead dominates (small batches), the same tokens to float tolerance."""

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = True) -> None:
            value = getattr(self, name)
            ok = (allow_none and value is None) or (is_int(value) and value >= 1)
            require(ok, name, value, "an integer >= 1" + (" or None" if allow_none else ""))

        positive("max_num_seqs", allow_none=False)
        positive("max_model_len")
        positive("max_cached_positions")
        positive("max_steps")
        require(is_int(self.buffer_slack) and self.buffer_slack >= 0, "buffer_slack", self.buffer_slack, ">= 0")
        ok = isinstance(self.admission_delay, int | float) and 0 <= self.admission_delay < float("inf")
        require(ok, "admission_delay", self.admission_delay, "a finite number >= 0")
        positive("prefill_batch", allow_none=False)
        require(isinstance(self.compile, bool), "compile", self.compile, "true or false")
        require(self.cache_mode in CACHE_MODES, "cache_mode", self.cache_mode, f"one of {CACHE_MODES}")


@dataclass
class Plan:
    """What a pass computes, decided before any model work: each request's chunk, the rows' positions, and the
    requests grouped by sampler policy."""

    requests: list[Request]
    chunks: list[Chunk]
    at: Positions
    groups: list[tuple[type[Policy], list[tuple[Policy, int]]]]


@dataclass
class EngineStats:
    """Totals since the engine started: passes and their wall time, tokens."""

    steps: int = 0
    prefill_passes: int = 0
    decode_passes: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    decode_rows: int = 0
    """Requests summed over decode passes (divided by the passes: the mean batch occupancy)."""
    full_pass_time_s: float = 0.0
    full_pass_tokens: int = 0
    """Decode passes with every row busy, and the tokens they made final: the steady state of a loaded engine."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decoded_tokens: int = 0
    """Generated tokens after each request's first (which its prefill pass produces)."""
    finished_requests: int = 0
    max_running: int = 0

    def plus(self, other: EngineStats) -> EngineStats:
        """Totals of two engines (maxima for the high-water marks)."""
        values = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        values["max_running"] = max(self.max_running, other.max_running)
        return EngineStats(**values)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second of decode passes (each request's first token comes from its prefill)."""
        return self.decoded_tokens / self.decode_time_s if self.decode_time_s > 0 else 0.0

    @property
    def full_pass_tokens_per_s(self) -> float:
        return self.full_pass_tokens / self.full_pass_time_s if self.full_pass_time_s > 0 else 0.0


class GroupRows:
    """`LiveRows` of a pass: the rows of an exit group that are still recurring, for its check (their states,
    sizes and predictions, gathered only for the rows that are due)."""

    def __init__(self, engine: Engine, state: Tensor, at: Positions, local: list[int]) -> None:
        self.engine, self.state, self.at, self.local = engine, state, at, local

    def size(self, j: int) -> int:
        return self.at.sizes[self.local[j]]

    def _index(self, js: Sequence[int]) -> Tensor:
        return torch.tensor([self.local[j] for j in js], device=self.state.device)

    def states(self, js: Sequence[int]) -> Tensor:
        """[n, S, D] states of rows js (indices into the group's live rows)."""
        if [self.local[j] for j in js] == list(range(self.state.shape[0])):
            return self.state
        return self.state[self._index(js)]

    def logits(self, js: Sequence[int]) -> Tensor:
        """[n, V] next-token logits at the last real position of rows js (coda and head on their states)."""
        index = self._index(js)
        at = self.at.subset(index, self.engine._pool_rows(self.at, index))
        coda_out, _ = self.engine.model.coda(self.state[index], at, self.engine.pool)
        last = torch.tensor([size - 1 for size in at.sizes], device=coda_out.device)
        return self.engine.model.head(coda_out[torch.arange(len(js), device=coda_out.device), last])


def fetch(tensors: list[Tensor]) -> list[list[float]]:
    """The values of several device tensors in one transfer (the pass's one host synchronisation)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    out, first = [], 0
    for t in tensors:
        out.append(flat[first : first + t.numel()])
        first += t.numel()
    return out


def as_token_ids(values: Any) -> list[int]:
    """Token ids as a list of ints: a sequence of integers (Python or numpy) or a 1-D integer tensor. Anything
    else (floats, booleans, text, a 2-D tensor) is a PromptError, never silently truncated."""
    if isinstance(values, (str, bytes)):
        raise PromptError("the prompt must be token ids here; encode text with the tokenizer first")
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise PromptError(f"prompt token ids must be integers, got a {values.dtype} tensor")
        if values.dim() != 1:
            raise PromptError(f"prompt token ids must be one sequence (a 1-D tensor), got shape {list(values.shape)}")
        return [int(t) for t in values.tolist()]
    ids = list(values)
    for position, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise PromptError(
                f"prompt token ids must be integers, got {value!r} ({type(value).__name__}) at position {position}"
            )
    return [int(t) for t in ids]


def check_text(text: str, what: str = "the prompt") -> None:
    """Refuse text that is not valid Unicode: a command-line argument with invalid UTF-8 bytes arrives with them
    as lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        detail = f"the byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"U+{ord(char):04X}"
        raise PromptError(f"{what} is not valid UTF-8 text: {detail} at character {exc.start}") from None


def check_prompt(prompt_ids: Sequence[int], config: HuginnConfig) -> list[int]:
    """The prompt as a list of ints, or a PromptError naming what is wrong with it."""
    prompt = as_token_ids(prompt_ids)
    if not prompt:
        raise PromptError("the prompt is empty; give at least one token")
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise PromptError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {config.vocab_size})")
    if len(prompt) >= config.block_size:
        raise PromptError(
            f"the prompt has {len(prompt)} tokens but the model's context holds {config.block_size} "
            "positions (block_size), leaving no room to generate"
        )
    return prompt


class Engine:
    def __init__(
        self,
        model: RecurrentDepthModel,
        tokenizer: Tokenizer | None = None,
        stop_token_ids: Sequence[int] = (),
        config: EngineConfig | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        mc = model.config
        self.max_model_len = min(config.max_model_len or mc.block_size, mc.block_size)
        steps = config.max_steps or mc.mean_recurrence
        self.pool = KVPool(
            mc, self.max_model_len, config.cache_mode, steps, config.max_num_seqs, model.device, model.dtype
        )
        buffer_len = self.max_model_len + config.buffer_slack
        self.buffers = RowBuffers(mc, config.max_num_seqs, buffer_len, model.device, model.dtype)
        self.ctx = EngineContext(model, self.pool, self.buffers, tokenizer, tuple(stop_token_ids))
        self.stages: RecurrentDepthModel | CompiledModel = model
        if config.compile:
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self.stages = CompiledModel(model, self.pool, mode)
        budget = config.max_cached_positions or config.max_num_seqs * self.max_model_len
        self.scheduler = Scheduler(config.max_num_seqs, self.max_model_len, buffer_len, budget)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._last_prefill_s = 0.0
        self._aborted: list[StepOutput] = []

    def warmup(self, progress: bool = False) -> float:
        """With `compile`, compile every graph this engine's passes can reach before any request runs (one row,
        and from two on); returns the seconds it took (0 without `compile`)."""
        if not isinstance(self.stages, CompiledModel):
            return 0.0
        return self.stages.warmup(rows=(1, 2) if self.config.max_num_seqs > 1 else (1,), progress=progress)

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams | None,
        sampler: SamplerParams,
        request_id: str | None = None,
    ) -> Request:
        """Queue a request with its sampler's parameters (`DiffusionParams()`, ...); it joins the batch at the next
        step that has room."""
        request = Request(list(prompt_token_ids), sampling or SamplingParams(), sampler, request_id or "")
        self.add(request)
        return request

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidParameterError(f"request id {request.request_id!r} is already in this engine")
        request.prompt_token_ids = check_prompt(request.prompt_token_ids, self.model.config)
        if request.sampler.cache_mode != self.pool.mode:
            raise InvalidParameterError(
                f"this engine runs a {self.pool.mode!r} KV cache; {request.sampler.name} with "
                f"cache_mode={request.sampler.cache_mode!r} needs an engine of its own"
            )
        bounds = sizing(request.sampler, len(request.prompt_token_ids), request.sampling, self.model.config)
        if self.pool.max_steps is not None and bounds.max_step > self.pool.max_steps:
            raise InvalidParameterError(
                f"{request.sampler.name} runs recurrence slot {bounds.max_step} but this engine's per-step cache has "
                f"{self.pool.max_steps} (EngineConfig.max_steps)"
            )
        request.positions_needed, request.buffer_needed, request.budget = bounds.cache, bounds.buffer, bounds.budget
        sampling = request.sampling
        vocab = self.model.config.vocab_size
        outside = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
        if outside:
            raise InvalidParameterError(f"stop_token_ids {outside[:5]} are outside the vocabulary [0, {vocab})")
        stops = frozenset(sampling.stop_token_ids) | (
            frozenset() if sampling.ignore_eos else frozenset(self.ctx.stop_token_ids)
        )
        # Everything that can refuse a request does so here, before it shares a step with others.
        request.output = Output(request.budget, StopCondition(stops, sampling.stop, self.tokenizer))
        self.scheduler.add(request)
        request.arrival_time = time.perf_counter()
        self.requests[request.request_id] = request

    @torch.inference_mode()
    def abort(self, request_id: str) -> bool:
        """Stop a request now; its row is free at once. Returns whether it was still unfinished."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return False
        request.finish_reason = "abort"
        self._aborted.append(self._finished_output(request, []))
        if request.row < 0:
            self.scheduler.remove_waiting(request)
        else:
            self._leave(request)
        return True

    def fail_running(self) -> list[Request]:
        """After a step raised, the running rows' state is unknown: every running request leaves (last row first,
        so no row moves) and is returned, marked aborted. Waiting and new requests then run as before."""
        failed = list(reversed(self.scheduler.running))
        for request in failed:
            self.scheduler.leave(request)
            request.finish_reason = "abort"
            self.requests.pop(request.request_id, None)
        return failed

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self._aborted)

    # ---- stepping -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every running request by one sampler step; returns what changed, per request."""
        self.stats.steps += 1
        scheduler = self.scheduler
        before = len(scheduler.running)
        now = time.perf_counter()
        config = self.config
        admitted = scheduler.admit(now, config.admission_delay * self._last_prefill_s, config.prefill_batch)
        for request in admitted:
            request.first_pass_time = now
            self._start(request)
        if admitted:
            self._pass(admitted, slice(before, before + len(admitted)), prefill=True)
        if before:
            self._pass(scheduler.running[:before], slice(0, before), prefill=False)
        self.stats.max_running = max(self.stats.max_running, len(scheduler.running))
        full = before == self.config.max_num_seqs
        outputs, self._aborted = self._aborted, []
        for row, request in enumerate(list(scheduler.running)):
            assert request.output is not None and request.policy is not None
            fresh = request.output.take_fresh()
            if full and row < before:
                self.stats.full_pass_tokens += len(fresh)
            if request.policy.done:
                # The result reads the row (recurrence counts), so it is built before the row is freed.
                outputs.append(self._finished_output(request, fresh))
                self._leave(request)
            elif fresh:
                outputs.append(StepOutput(request.request_id, fresh, False))
        return outputs

    def run(
        self,
        requests: Iterable[Request],
        on_output: Callable[[StepOutput], None] | None = None,
    ) -> list[GenerationResult]:
        """Offline use: add every request, step until all have finished; results in the order given."""
        requests = list(requests)
        for request in requests:
            self.add(request)
        results: dict[str, GenerationResult] = {}
        while self.has_unfinished:
            for output in self.step():
                if on_output is not None:
                    on_output(output)
                if output.result is not None:
                    results[output.request_id] = output.result
        return [results[r.request_id] for r in requests]

    # ---- internals ----------------------------------------------------------------------------------------
    def _start(self, request: Request) -> None:
        seed = request.sampling.seed
        request.generator = None if seed is None else torch.Generator(self.model.device).manual_seed(seed)
        self.buffers.reset(request.row, request.prompt_token_ids)
        request.policy = request.sampler.policy_class().for_model(self.model.config)(request, self.ctx)
        request.policy.start()

    def _leave(self, request: Request) -> None:
        freed = request.row
        move = self.scheduler.leave(request)
        if move is not None:
            source, target = move
            self.pool.move_row(source, target)
            self.buffers.move(source, target)
            freed = source  # the last live row moved into the leaver's
        self.pool.set_length(freed, 0)

    def _finished_output(self, request: Request, fresh: list[int]) -> StepOutput:
        request.finish_time = time.perf_counter()
        result = self._result(request)
        self.requests.pop(request.request_id, None)
        self.stats.finished_requests += 1
        self.stats.generated_tokens += len(result.token_ids)
        self.stats.decoded_tokens += max(len(result.token_ids) - 1, 0)
        self.stats.prompt_tokens += len(request.prompt_token_ids)
        return StepOutput(request.request_id, fresh, True, result)

    def _result(self, request: Request) -> GenerationResult:
        policy = request.policy
        tokens = list(request.output.tokens) if request.output is not None else []
        if policy is None:  # aborted while waiting
            from depthwave.engine.request import GenerationStats

            stats = GenerationStats(prompt_tokens=len(request.prompt_token_ids))
        else:
            tokens = policy.final_tokens(tokens)
            stats = policy.finalize_stats()
            stats.prompt_tokens = len(request.prompt_token_ids)
            stats.generated_tokens = len(tokens)
            first = request.first_token_time or request.finish_time
            stats.prefill_time_s = (first or 0.0) - (request.first_pass_time or 0.0)
            stats.decode_time_s = (request.finish_time or 0.0) - (first or 0.0)
            stats.queue_time_s = (request.first_pass_time or 0.0) - request.arrival_time
            stats.cache_bytes_per_position = self.pool.bytes_per_position
            stats.cache_bytes = request.positions_needed * self.pool.bytes_per_position
        text = None
        if self.tokenizer is not None:
            text = cut_at_stop_strings(self.tokenizer.decode(tokens), request.sampling.stop)
        return GenerationResult(
            list(request.prompt_token_ids), tokens, request.finish_reason or "length", stats, text, request.request_id
        )

    def _pass(self, requests: list[Request], rows: slice, prefill: bool) -> None:
        """One pass: plan (what each request computes; data only), run (all the model work, one result), update
        (each sampler decides, with one host synchronisation), then the pass's statistics."""
        started = time.perf_counter()
        plan = self._plan(requests, rows)
        result = self._run(plan, prefill)
        self._update(plan, result)
        self._account(requests, prefill, started)

    def _plan(self, requests: list[Request], rows: slice) -> Plan:
        chunks = [r.policy.chunk() for r in requests]  # type: ignore[union-attr]
        at = self.model.positions([c.start for c in chunks], [c.size for c in chunks], rows)
        if self.pool.mode == "per-step" and any(c.loops is not None for c in chunks):
            at = at.at_loops([list(c.loops) if c.loops is not None else [0] * c.size for c in chunks])
        groups: dict[type[Policy], list[tuple[Policy, int]]] = defaultdict(list)
        for index, request in enumerate(requests):
            assert request.policy is not None
            groups[type(request.policy)].append((request.policy, index))
        return Plan(requests, chunks, at, list(groups.items()))

    def _run(self, plan: Plan, prefill: bool) -> PassResult:
        """Prelude, the samplers' input mixing, the recurrences, coda, head and token choice, for all rows."""
        buffers, pool, at, chunks = self.buffers, self.pool, plan.at, plan.chunks
        self._write_initial_states(plan.requests, chunks)
        ids = buffers.gather(buffers.tokens, at)
        wave_in = buffers.gather(buffers.states, at)
        embedded = self.stages.prelude(ids, at, pool)
        wave_in = self.model.start_states(wave_in, embedded, lambda: self._fresh(at, chunks))
        wave = wave_in
        for cls, members in plan.groups:
            embedded, wave = cls.mix_inputs(members, embedded, wave, at)
        wave_out, steps, coda = self._recur(wave, embedded, at, chunks)
        buffers.scatter(buffers.states, at, wave_out)
        self._count(at, chunks, steps)
        coda_out, latents = coda if coda is not None else self.stages.coda(wave_out, at, pool)
        logits, logit_rows = self._logits(coda_out, at, chunks)
        tokens = None
        if logits is not None and any(c.select for c in chunks):
            tokens = select_tokens(logits, self._choices(plan.requests, chunks, logit_rows))
        for request, chunk in zip(plan.requests, chunks, strict=True):
            pool.set_length(request.row, chunk.start + chunk.size)
        return PassResult(
            plan.requests, at, chunks, wave_in, wave_out, latents, logits, logit_rows, tokens, steps, prefill
        )

    def _update(self, plan: Plan, result: PassResult) -> None:
        """Each sampler's batched device work, one transfer of what its decisions need, then its decisions."""
        queued = [(cls, members, cls.prepare(members, result)) for cls, members in plan.groups]
        values = fetch([t for _, _, tensors in queued for t in tensors])
        first = 0
        for cls, members, tensors in queued:
            cls.decide(members, values[first : first + len(tensors)], result)
            first += len(tensors)

    def _account(self, requests: list[Request], prefill: bool, started: float) -> None:
        now = time.perf_counter()
        elapsed = now - started
        if prefill:
            self._last_prefill_s = elapsed
            self.stats.prefill_passes += 1
            self.stats.prefill_time_s += elapsed
        else:
            self.stats.decode_passes += 1
            self.stats.decode_time_s += elapsed
            self.stats.decode_rows += len(requests)
            if len(requests) == self.config.max_num_seqs:
                self.stats.full_pass_time_s += elapsed
        for request in requests:
            if request.first_token_time is None and request.output is not None and request.output.tokens:
                request.first_token_time = now

    def _fresh(self, at: Positions, chunks: list[Chunk]) -> Tensor:
        """[B, S] the pass's positions that start fresh: a chunk's given initial states, or no recurrence yet."""
        counts = self.buffers.gather(self.buffers.counts, at)
        given = torch.tensor([c.init is not None for c in chunks], device=counts.device)[:, None]
        return given | (counts == 0)

    def _write_initial_states(self, requests: list[Request], chunks: list[Chunk]) -> None:
        states = self.buffers.states
        for request, chunk in zip(requests, chunks, strict=True):
            if chunk.init is not None:
                states[request.row, chunk.start : chunk.start + chunk.size] = chunk.init

    def _recur(
        self, wave: Tensor, embedded: Tensor, at: Positions, chunks: list[Chunk]
    ) -> tuple[Tensor, list[int], tuple[Tensor, Tensor] | None]:
        """Each row's recurrences; a row leaves the batch after its depth or when its exit rule fires. Returns the
        states, each row's recurrences, and the coda's (output, input) when it ran with the last recurrences."""
        pool = self.pool
        coda: tuple[Tensor, Tensor] | None = None
        batch = len(chunks)
        depth = [c.depth for c in chunks]
        steps = [0] * batch
        exits = self._exit_groups(wave, at, chunks)
        hiding = [c.hide_below for c in chunks]
        live = [b for b in range(batch) if depth[b] > 0]
        computed = list(range(batch))  # the rows `state` holds, in order
        full, state, e, step_at = wave, wave, embedded, at
        index: Tensor | None = None
        i, deepest = 0, max(depth, default=0)
        while i < deepest:
            live = [b for b in live if depth[b] > i]
            if not live:
                break
            if live != computed:
                if index is not None:
                    full = full.index_copy(0, index, state)
                elif state is not full:
                    full = state
                computed = live
                index = torch.tensor(live, device=wave.device)
                state, e = full[index], embedded[index]
                step_at = at.subset(index, self._pool_rows(at, index))
            current = step_at
            if any((h := hiding[b]) is not None and i >= h for b in computed):
                current = self._hidden(step_at, computed, chunks, i)
            # Without exit checks, the recurrences every row still runs go in one call (a compiled stage runs them
            # as one graph); an exit rule or hidden keys need a check after each.
            checked = exits or any(h is not None for h in hiding)
            run = 1 if checked else min(depth[b] for b in computed) - i
            if not checked and i + run == deepest and len(computed) == batch:
                # Every row's last recurrences: the coda follows at once (a compiled stage runs both as one graph).
                state, coda_out, latents = self.stages.recur_then_coda(state, e, run, current, pool, i)
                coda = coda_out, latents
            else:
                state = self.stages.recur(state, e, run, current, pool, i)
            for b in computed:
                steps[b] += run
            for group, members in exits:
                here = [(k, members[b]) for k, b in enumerate(computed) if b in members]
                if here:
                    rows = GroupRows(self, state, step_at, [k for k, _ in here])
                    fired = group.check(i, [m for _, m in here], rows)
                    gone = {computed[k] for (k, _), exit_now in zip(here, fired, strict=True) if exit_now}
                    live = [b for b in live if b not in gone]
            i += run
        if index is not None:
            full = full.index_copy(0, index, state)
        elif state is not full:
            full = state
        return full, steps, coda

    @staticmethod
    def _pool_rows(at: Positions, index: Tensor) -> Tensor:
        rows = at.rows
        if isinstance(rows, slice):
            return index + rows.start
        return rows[index]

    def _exit_groups(self, wave: Tensor, at: Positions, chunks: list[Chunk]) -> list[tuple[ExitGroup, dict[int, int]]]:
        by_class: dict[type[ExitRule], list[int]] = defaultdict(list)
        for b, chunk in enumerate(chunks):
            if chunk.exit is not None:
                by_class[type(chunk.exit)].append(b)
        groups = []
        for cls, members in by_class.items():
            index = torch.tensor(members, device=wave.device)
            sub = at.subset(index, self._pool_rows(at, index))
            rules = [rule for b in members if (rule := chunks[b].exit) is not None]
            group = cls.group(rules, wave[index], sub)
            groups.append((group, {b: k for k, b in enumerate(members)}))
        return groups

    def _hidden(self, at: Positions, computed: list[int], chunks: list[Chunk], step: int) -> Positions:
        """Per-step cache: hide cached positions that never ran recurrence `step` (adaptive compute's exits)."""
        counts = self.buffers.counts[at.rows][:, : at.length]
        device = counts.device
        starts = torch.tensor([chunks[b].start for b in computed], device=device)
        hide = torch.tensor([(h := chunks[b].hide_below) is not None and step >= h for b in computed], device=device)
        keys = torch.arange(at.length, device=device)
        visible = (counts > step) | (keys[None, :] >= starts[:, None]) | ~hide[:, None]
        return at.hiding(visible)

    def _count(self, at: Positions, chunks: list[Chunk], steps: list[int]) -> None:
        """Recurrences each position's state has run: this pass's, or added to before (diffusion)."""
        buffers = self.buffers
        device = at.pos.device
        ran = torch.tensor(steps, device=device)[:, None].expand(-1, at.width)
        if any(c.accumulate for c in chunks):
            grow = torch.tensor([c.accumulate for c in chunks], device=device)[:, None]
            ran = torch.where(grow, buffers.gather(buffers.counts, at) + ran, ran)
        buffers.scatter(buffers.counts, at, ran)

    def _logits(self, coda_out: Tensor, at: Positions, chunks: list[Chunk]) -> tuple[Tensor | None, list[slice]]:
        """The head on the rows the samplers read, one chunk after another."""
        width = at.width
        rows: list[slice] = []
        flat: list[int] = []
        first = 0
        for b, chunk in enumerate(chunks):
            count = chunk.logits_rows
            rows.append(slice(first, first + count))
            flat.extend(range(b * width + chunk.logits_from, b * width + chunk.size))
            first += count
        if not flat:
            return None, rows
        x = coda_out.flatten(0, 1)
        if len(flat) != x.shape[0]:
            x = x[torch.tensor(flat, device=x.device)]
        return self.model.head(x), rows

    def _choices(self, requests: list[Request], chunks: list[Chunk], rows: list[slice]) -> list[Choice]:
        tokens = self.buffers.tokens
        choices = []
        for request, chunk, span in zip(requests, chunks, rows, strict=True):
            if not chunk.select or span.stop == span.start:
                continue
            lengths = [chunk.context] * chunk.logits_rows if isinstance(chunk.context, int) else chunk.context
            choices.append(Choice(span, request.sampling, request.generator, tokens[request.row], lengths))
        return choices
