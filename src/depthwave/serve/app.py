"""`depthwave serve`: an OpenAI-compatible HTTP server over the batched engine (FastAPI + uvicorn).

Endpoints: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics. Every request becomes engine
requests that share the engine's steps with everyone else's (continuous batching); streamed tokens go out as they
become final (a diffusion request's tokens as they freeze). Logprobs (and echo's prompt logprobs) come from one
full-depth forward over prompt and completion with a zero initial state, at the sampler's `num_steps` (default:
the model's mean_recurrence): the same numbers whatever sampler produced the tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from depthwave.engine import Engine, EngineConfig, GenerationResult, Request
from depthwave.engine.output import TextStream
from depthwave.errors import DepthwaveError
from depthwave.model.kv_cache import CacheMode
from depthwave.samplers import registry
from depthwave.serve.async_engine import AsyncEngine, EngineFailure, QueueFull
from depthwave.serve.metrics import Metrics
from depthwave.serve.protocol import ApiError, Context, Job, parse_chat, parse_completion


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
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.failed: str | None = None
        self.llm: Any = None
        self.engine: AsyncEngine | None = None
        self.context: Context | None = None
        self.created = int(time.time())

    def load(self) -> None:
        from depthwave.llm import LLM

        try:
            s = self.settings
            llm = LLM(s.model, device=s.device, dtype=s.dtype, threads=s.threads)
            engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, s.engine_config)
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
                await self.engine.add(request, lambda output, i=index: outputs.put_nowait((i, output)))
                added.append(request)
        except QueueFull as exc:
            self.abort(added)
            raise ApiError(
                429, f"the server is busy ({exc}); retry later", kind="rate_limit_error", headers={"Retry-After": "1"}
            ) from None
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
def completion_logprobs(server: Server, scored: dict[str, Any], start_offset: int = 0) -> dict[str, Any]:
    tokens = [server.decode([t]) for t in scored["ids"]]
    offsets, position = [], start_offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    top = [None if t is None else {server.decode([i]): v for i, v in t} for t in scored["top"]]
    return {"tokens": tokens, "token_logprobs": scored["logprobs"], "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(server: Server, scored: dict[str, Any]) -> dict[str, Any]:
    def entry(token: int, value: float) -> dict[str, Any]:
        text = server.decode([token])
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = []
    for token, value, top in zip(scored["ids"], scored["logprobs"], scored["top"], strict=True):
        item = entry(token, value)
        item["top_logprobs"] = [entry(i, v) for i, v in top or []]
        content.append(item)
    return {"content": content}


def usage(job: Job, results: list[GenerationResult | None]) -> dict[str, int]:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(len(r.token_ids) for r in results if r is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_job(
    server: Server, job: Job, requests: list[Request], outputs: asyncio.Queue, chat: bool, echo_texts: list[str]
) -> AsyncIterator[str]:
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    name = server.settings.name
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": ident, "object": kind, "created": created, "model": name, "choices": [choice]}

    tokenizer = server.llm.tokenizer
    streams = [
        TextStream(tokenizer, job.sampling.stop, echo_texts[i] if job.echo else "") for i in range(len(requests))
    ]
    results: list[GenerationResult | None] = [None] * len(requests)
    finished = 0
    try:
        if chat:
            yield sse(chunk(0, None, None, role=True))
        while finished < len(requests):
            index, output = await outputs.get()
            if isinstance(output, EngineFailure):  # OpenAI's clients raise on an error event
                yield sse(ApiError(500, str(output), kind="server_error").body())
                yield sse("[DONE]")
                return
            stream = streams[index]
            if output.result is None:
                delta = stream.add(output.new_token_ids)
                if delta:
                    yield sse(chunk(index, delta, None))
                continue
            result: GenerationResult = output.result
            results[index] = result
            finished += 1
            stream.add(output.new_token_ids)
            tail = stream.finish(result.text if result.text is not None else server.decode(result.token_ids))
            yield sse(chunk(index, tail, result.finish_reason))
        if job.include_usage:
            yield sse(
                {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": name,
                    "choices": [],
                    "usage": usage(job, results),
                }
            )
        yield sse("[DONE]")
    finally:
        # A client that goes away (the generator is closed or cancelled) frees its rows at once.
        server.abort([r for r, res in zip(requests, results, strict=True) if res is None])


async def complete(
    server: Server, job: Job, requests: list[Request], outputs: asyncio.Queue, disconnected: Any, chat: bool
) -> dict[str, Any]:
    results = await server.collect(job, requests, outputs, disconnected)
    choices = []
    for index, (prompt, result) in enumerate(zip(job.prompts, results, strict=True)):
        generated = result.token_ids if result is not None else []
        text = result.text if result is not None and result.text is not None else server.decode(generated)
        finish = result.finish_reason if result is not None else "length"
        scored = await server.logprobs(prompt, generated, job) if job.logprobs is not None else None
        if chat:
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": chat_logprobs(server, scored) if scored is not None else None,
                    "finish_reason": finish,
                }
            )
            continue
        prompt_text = server.decode(prompt) if job.echo else ""
        choices.append(
            {
                "index": index,
                "text": prompt_text + text,
                "logprobs": completion_logprobs(server, scored) if scored is not None else None,
                "finish_reason": finish,
            }
        )
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": server.settings.name,
        "choices": choices,
        "usage": usage(job, results),
    }


# ---- the application --------------------------------------------------------------------------------------
def create_app(settings: ServeSettings, load_in_background: bool = True) -> FastAPI:
    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_in_background:
            threading.Thread(target=_load_quietly, args=(server,), daemon=True).start()
        else:
            server.load()
        yield
        if server.engine is not None:
            server.engine.stop()

    app = FastAPI(title="depthwave", lifespan=lifespan)
    app.state.server = server
    instance = f"{socket.gethostname()}:{os.getpid()}"

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(Exception)
    async def internal_error(request: HttpRequest, exc: Exception) -> JSONResponse:
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next: Any) -> Any:
        response = check_access(request)
        if response is None:
            response = await call_next(request)
        # Which process answered: behind a proxy of several replicas, this tells them apart.
        response.headers["x-depthwave-server"] = instance
        return response

    def check_access(request: HttpRequest) -> JSONResponse | None:
        if request.url.path.startswith("/v1/"):
            if settings.api_key is not None:
                given = request.headers.get("authorization", "")
                if given != f"Bearer {settings.api_key}":
                    return error(
                        ApiError(
                            401,
                            "missing or wrong API key (Authorization: Bearer ...)",
                            kind="authentication_error",
                            code="invalid_api_key",
                        )
                    )
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
                return error(
                    ApiError(413, f"the request body is over {settings.max_body_bytes} bytes", code="request_too_large")
                )
        return None

    async def read_body(request: HttpRequest) -> Any:
        server.require_ready()
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise ApiError(413, f"the request body is over {settings.max_body_bytes} bytes", code="request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    async def run(request: HttpRequest, chat: bool) -> Any:
        body = await read_body(request)
        assert server.context is not None
        try:
            job = parse_chat(body, server.context) if chat else parse_completion(body, server.context)
        except DepthwaveError as exc:  # the tokenizer or template refused the input
            raise ApiError(400, str(exc)) from None
        if job.stream and job.logprobs is not None:
            raise ApiError(400, "logprobs are not streamed; ask without stream", param="logprobs")
        if job.stream and job.max_tokens == 0:
            raise ApiError(400, "max_tokens must be at least 1 when streaming", param="max_tokens")
        requests, outputs = await server.submit(job)
        if job.stream:
            echoes = [server.decode(p) for p in job.prompts]
            return StreamingResponse(
                stream_job(server, job, requests, outputs, chat, echoes), media_type="text/event-stream"
            )
        return await complete(server, job, requests, outputs, request.is_disconnected, chat)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        return await run(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Any:
        server.require_ready()
        length = server.engine.engine.max_model_len if server.engine else None
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "depthwave",
                    "max_model_len": length,
                }
            ],
        }

    # The tokenizer over HTTP, as vLLM serves it: lm-eval's `local-completions` finds these and then needs no
    # tokenizer of its own (`tokenizer_backend=remote`).
    def tokenizer() -> Any:
        server.require_ready()
        if server.llm.tokenizer is None:
            raise ApiError(400, f"{settings.model} has no tokenizer; it works on token ids only")
        return server.llm.tokenizer

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Any:
        tok = tokenizer()
        length = server.engine.engine.max_model_len if server.engine else None
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": None,
            "chat_template": tok.chat_template,
            "model_max_length": length,
        }

    @app.post("/tokenize")
    async def tokenize(request: HttpRequest) -> Any:
        tok, body = tokenizer(), await read_body(request)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise ApiError(400, "add_special_tokens must be true or false", param="add_special_tokens")
        tokens = tok.encode(prompt, add_special_tokens=special)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: HttpRequest) -> Any:
        tok, body = tokenizer(), await read_body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = tok.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ApiError(400, f"tokens must be a list of token ids below {vocab}", param="tokens")
        return {"prompt": tok.decode(tokens, skip_special_tokens=False)}

    @app.get("/health")
    async def health() -> Any:
        if server.failed:
            return JSONResponse({"status": "failed", "error": server.failed}, status_code=503)
        if not server.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(server.metrics.render(settings.max_num_seqs), media_type="text/plain; version=0.0.4")

    return app


def _load_quietly(server: Server) -> None:
    with contextlib.suppress(Exception):  # kept in server.failed, reported by /health
        server.load()
