"""The endpoints: OpenAI's completions, chat completions and models, vLLM's tokenizer routes, health and
metrics. Each reads the server from the app's state; the responses are built in `depthwave.serve.responses`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from depthwave.errors import DepthwaveError
from depthwave.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    parse_chat,
    parse_completion,
)
from depthwave.serve.responses import complete, stream_job
from depthwave.serve.server import Server

router = APIRouter()

# Documented error statuses (each body in OpenAI's shape): what a client must be ready for.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "An invalid field (named in error.param), body or prompt.",
        401: "A missing or wrong API key.",
        404: "Another model than the one served.",
        413: "A body over --max-body-bytes.",
        429: "More than --max-waiting requests wait already; retry after Retry-After seconds.",
        500: "The engine failed while running the request.",
        503: "The model is loading, failed to load, or the server is shutting down.",
    }.items()
}
TOKENIZER_ERRORS: dict[int | str, dict[str, Any]] = {status: ERRORS[status] for status in (400, 401, 413, 503)}


# One server-sent event of a stream: `data:` holds a chunk as JSON (or an error), the last one `[DONE]`.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string", "description": "A chunk object as JSON, an error object, or [DONE]."},
        "event": {"type": "string"},
    },
    "required": ["data"],
}


def streamed(model: type) -> dict[str, Any]:
    """A 200 that is JSON, or server-sent events with `stream`."""
    return {"model": model, "content": {"text/event-stream": {"schema": SSE_EVENT}}}


def server_of(request: HttpRequest) -> Server:
    return request.app.state.server


async def run(request: HttpRequest, body: Any, chat: bool) -> Any:
    server = server_of(request)
    server.require_ready()
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


@router.post(
    "/v1/completions", response_model=CompletionResponse, responses={**ERRORS, 200: streamed(CompletionResponse)}
)
async def completions(body: CompletionRequest, request: HttpRequest) -> Any:
    """OpenAI's completions: whole, or streamed as server-sent events with `stream`."""
    return await run(request, body, chat=False)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERRORS, 200: streamed(ChatCompletionResponse)},
)
async def chat_completions(body: ChatCompletionRequest, request: HttpRequest) -> Any:
    """OpenAI's chat completions (the model's chat template): whole, or streamed with `stream`."""
    return await run(request, body, chat=True)


@router.get("/v1/models", response_model=ModelList, responses={status: ERRORS[status] for status in (401, 503)})
async def models(request: HttpRequest) -> Any:
    server = server_of(request)
    server.require_ready()
    length = server.engine.engine.max_model_len if server.engine else None
    model = {"id": server.settings.name, "object": "model", "created": server.created, "owned_by": "depthwave"}
    return {"object": "list", "data": [{**model, "max_model_len": length}]}


# The tokenizer over HTTP, as vLLM serves it: lm-eval's `local-completions` finds these and then needs no
# tokenizer of its own (`tokenizer_backend=remote`).
def tokenizer_of(request: HttpRequest) -> Any:
    server = server_of(request)
    server.require_ready()
    if server.llm.tokenizer is None:
        raise ApiError(400, f"{server.settings.model} has no tokenizer; it works on token ids only")
    return server.llm.tokenizer


def max_model_len(request: HttpRequest) -> int | None:
    engine = server_of(request).engine
    return engine.engine.max_model_len if engine else None


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=TOKENIZER_ERRORS)
async def tokenizer_info(request: HttpRequest) -> Any:
    tok = tokenizer_of(request)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": None,
        "chat_template": tok.chat_template,
        "model_max_length": max_model_len(request),
    }


@router.post("/tokenize", response_model=TokenizeResponse, responses=TOKENIZER_ERRORS)
async def tokenize(body: TokenizeRequest, request: HttpRequest) -> Any:
    tokens = tokenizer_of(request).encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len(request)}


@router.post("/detokenize", response_model=DetokenizeResponse, responses=TOKENIZER_ERRORS)
async def detokenize(body: DetokenizeRequest, request: HttpRequest) -> Any:
    tok = tokenizer_of(request)
    vocab = tok.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise ApiError(400, f"tokens must be a list of token ids below {vocab}", param="tokens")
    return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}


@router.get(
    "/health",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": Health, "description": "Loading, failed to load, or shutting down."}},
)
async def health(request: HttpRequest) -> Any:
    server = server_of(request)
    if server.failed:
        return JSONResponse({"status": "failed", "error": server.failed}, status_code=503)
    if not server.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    if server.stopping:
        return JSONResponse({"status": "stopping"}, status_code=503)
    return {"status": "ok"}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text."}},
)
async def metrics(request: HttpRequest) -> Any:
    """Prometheus metrics: vLLM's names under the `depthwave:` prefix, and the samplers' own figures."""
    body, content_type = server_of(request).metrics.render()
    return PlainTextResponse(body, media_type=content_type)
