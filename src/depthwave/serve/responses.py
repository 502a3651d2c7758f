"""Response building: OpenAI's completion and chat objects, streamed as server-sent events or whole."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from depthwave.engine import GenerationResult, Request
from depthwave.engine.output import TextStream
from depthwave.serve.async_engine import EngineFailure, ShuttingDown
from depthwave.serve.protocol import ApiError, Job
from depthwave.serve.server import Server, shutting_down


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
            if isinstance(output, (EngineFailure, ShuttingDown)):  # OpenAI's clients raise on an error event
                error = (
                    shutting_down()
                    if isinstance(output, ShuttingDown)
                    else ApiError(500, str(output), kind="server_error")
                )
                yield sse(error.body())
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
