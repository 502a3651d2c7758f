"""The server's state: its settings, the loaded model, the engine thread and the parsing context."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from depthwave.engine import Engine, EngineConfig, GenerationResult, Request
from depthwave.errors import DepthwaveError
from depthwave.model.kv_cache import CacheMode
from depthwave.samplers import registry
from depthwave.serve.async_engine import AsyncEngine, EngineFailure, QueueFull, ShuttingDown
from depthwave.serve.metrics import Metrics
from depthwave.serve.protocol import ApiError, Context, Job


@dataclass
class ServeSettings:
    model: str = "builtin"
    served_model_name: str | None = None
    sampler: Any = None
    """Default sampler parameters (default: the diffusion sampler with the paper's settings)."""
    cache_mode: CacheMode = "shared"
    """The engine's KV cache: every request's sampler runs on it (a request asking for another is refused)."""
    device: str | None = None
    dtype: str | None = None
    api_key: str | None = None
    max_num_seqs: int = 64
    max_model_len: int | None = None
    admission_delay: float = 4.0
    """EngineConfig.admission_delay: newcomers' prefills batch together at the cost of a little first-token time."""
    max_waiting: int = 256
    max_body_bytes: int = 1 << 20
    compile: bool = False
    """Compiled decode passes, warmed up before the server reports ready."""
    threads: int | None = None
    """torch CPU threads (None: depthwave's default, `depthwave.runtime.choose_threads`)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validated now, so that a bad flag fails the command instead of the model load.
        self.engine_config = EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            cache_mode=self.cache_mode,
            admission_delay=self.admission_delay,
            compile=self.compile,
        )
        self.sampler = registry.make(
            self.sampler.name if self.sampler is not None else registry.DEFAULT_SAMPLER,
            base=self.sampler,
            engine_cache=self.cache_mode,
        )

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class Server:
    """The loaded model, the engine thread and the parsing context; `ready` once loading finished."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.max_num_seqs)
        self.ready = threading.Event()
        self.stopping = False
        """SIGTERM came: new and waiting requests get 503, running ones finish (within the shutdown grace)."""
        self.failed: str | None = None
        self.llm: Any = None
        self.engine: AsyncEngine | None = None
        self.context: Context | None = None
        self.created = int(time.time())
        self.compile_s = 0.0

    def load(self) -> None:
        from depthwave.llm import LLM

        try:
            s = self.settings
            llm = LLM(s.model, device=s.device, dtype=s.dtype, threads=s.threads)
            engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, s.engine_config)
            # Compiled graphs are built before /health says ready, not on the first requests.
            self.compile_s = engine.warmup()
        except Exception as exc:  # reported by /health and every endpoint
            self.failed = f"{type(exc).__name__}: {exc}"
            raise
        self.llm = llm
        self.engine = AsyncEngine(engine, self.metrics, s.max_waiting)
        self.context = Context(
            model_name=s.name,
            default_sampler=s.sampler,
            cache_mode=s.cache_mode,
            encode=lambda text: llm.encode(text),
            chat=llm.encode_messages,
        )
        self.ready.set()

    def require_ready(self) -> None:
        if self.failed:
            raise ApiError(503, f"the model failed to load: {self.failed}", kind="server_error")
        if not self.ready.is_set():
            raise ApiError(503, "the model is still loading", kind="server_error", headers={"Retry-After": "5"})
        if self.stopping:
            raise shutting_down()

    def begin_shutdown(self) -> None:
        """From SIGTERM: refuse new requests and drop waiting ones (503); running ones go on."""
        self.stopping = True
        if self.engine is not None:
            self.engine.drain()

    def end_running(self) -> None:
        """The shutdown grace is over: abort what still runs (streams end, whole answers end with "abort")."""
        if self.engine is not None:
            self.engine.abort_all()

    # ---- serving ------------------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        tokenizer = self.llm.tokenizer
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    async def submit(self, job: Job) -> tuple[list[Request], asyncio.Queue]:
        """Engine requests for the job's prompts; their outputs arrive on the returned queue as (index, output)."""
        assert self.engine is not None
        outputs: asyncio.Queue = asyncio.Queue()
        requests = [Request(prompt, job.sampling, job.sampler) for prompt in job.prompts]
        if job.max_tokens == 0:
            return requests, outputs
        added: list[Request] = []
        try:
            for index, request in enumerate(requests):
                self.llm.check(request)  # a 400 before any work
                await self.engine.add(request, functools.partial(_put, outputs, index))
                added.append(request)
        except QueueFull as exc:
            self.abort(added)
            self.metrics.rejected.labels("429").inc()
            raise ApiError(
                429, f"the server is busy ({exc}); retry later", kind="rate_limit_error", headers={"Retry-After": "1"}
            ) from None
        except ShuttingDown:
            self.abort(added)
            raise shutting_down() from None
        except DepthwaveError as exc:
            self.abort(added)
            raise ApiError(400, str(exc), param="prompt" if "prompt" in str(exc) else None) from None
        return requests, outputs

    def abort(self, requests: list[Request]) -> None:
        assert self.engine is not None
        for request in requests:
            self.engine.abort(request.request_id)

    async def collect(
        self, job: Job, requests: list[Request], outputs: asyncio.Queue, disconnected: Any
    ) -> list[GenerationResult | None]:
        """Wait for every request's result; a client that goes away aborts them."""
        results: list[GenerationResult | None] = [None] * len(requests)
        pending = len(requests) if job.max_tokens else 0
        try:
            while pending:
                try:
                    index, output = await asyncio.wait_for(outputs.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if isinstance(output, ShuttingDown):
                    raise shutting_down()
                if isinstance(output, EngineFailure):
                    raise ApiError(500, str(output), kind="server_error")
                if output.result is not None:
                    results[index] = output.result
                    pending -= 1
        except BaseException:
            self.abort([r for r, res in zip(requests, results, strict=True) if res is None])
            raise
        return results

    async def logprobs(self, prompt: list[int], generated: list[int], job: Job) -> dict[str, Any]:
        """Per token of prompt (if echo) and completion: its logprob and the top `job.logprobs` alternatives."""
        assert self.engine is not None
        sequence = prompt + generated
        table = await self.engine.score(sequence, job.scoring_steps)
        first = 0 if job.echo else len(prompt)
        out: dict[str, Any] = {"ids": [], "logprobs": [], "top": []}
        for position in range(first, len(sequence)):
            token = sequence[position]
            out["ids"].append(token)
            if position == 0:
                out["logprobs"].append(None)
                out["top"].append(None)
                continue
            row = table[position - 1]
            out["logprobs"].append(float(row[token]))
            if job.logprobs:
                values, ids = row.topk(job.logprobs)
                out["top"].append(list(zip(ids.tolist(), values.tolist(), strict=True)))
            else:
                out["top"].append([])
        return out


# ---- responses --------------------------------------------------------------------------------------------


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry on another", kind="server_error", code="shutting_down")


def load_quietly(server: Server) -> None:
    with contextlib.suppress(Exception):  # kept in server.failed, reported by /health
        server.load()


def _put(outputs: asyncio.Queue, index: int, output: Any) -> None:
    outputs.put_nowait((index, output))
