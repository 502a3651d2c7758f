"""The endpoints: OpenAI's completions, chat completions and models, vLLM's tokenizer routes, health and
metrics. Each reads the server from the app's state; the responses are built in `depthwave.serve.responses`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from depthwave.errors import DepthwaveError
from depthwave.serve.protocol import ApiError, parse_chat, parse_completion
from depthwave.serve.responses import complete, stream_job
from depthwave.serve.server import Server

router = APIRouter()


def server_of(request: HttpRequest) -> Server:
    return request.app.state.server


async def read_body(request: HttpRequest) -> Any:
    server = server_of(request)
    server.require_ready()
    limit = server.settings.max_body_bytes
    raw = await request.body()
    if len(raw) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


async def run(request: HttpRequest, chat: bool) -> Any:
    server, body = server_of(request), await read_body(request)
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


@router.post("/v1/completions")
async def completions(request: HttpRequest) -> Any:
    return await run(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: HttpRequest) -> Any:
    return await run(request, chat=True)


@router.get("/v1/models")
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


@router.get("/tokenizer_info")
async def tokenizer_info(request: HttpRequest) -> Any:
    tok, server = tokenizer_of(request), server_of(request)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": None,
        "chat_template": tok.chat_template,
        "model_max_length": server.engine.engine.max_model_len if server.engine else None,
    }


@router.post("/tokenize")
async def tokenize(request: HttpRequest) -> Any:
    tok, body = tokenizer_of(request), await read_body(request)
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", param="prompt")
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise ApiError(400, "add_special_tokens must be true or false", param="add_special_tokens")
    tokens = tok.encode(prompt, add_special_tokens=special)
    engine = server_of(request).engine
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.engine.max_model_len if engine else None}


@router.post("/detokenize")
async def detokenize(request: HttpRequest) -> Any:
    tok, body = tokenizer_of(request), await read_body(request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    vocab = tok.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
        raise ApiError(400, f"tokens must be a list of token ids below {vocab}", param="tokens")
    return {"prompt": tok.decode(tokens, skip_special_tokens=False)}


@router.get("/health")
async def health(request: HttpRequest) -> Any:
    server = server_of(request)
    if server.failed:
        return JSONResponse({"status": "failed", "error": server.failed}, status_code=503)
    if not server.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: HttpRequest) -> Any:
    server = server_of(request)
    text = server.metrics.render(server.settings.max_num_seqs)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
