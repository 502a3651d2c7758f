"""`depthwave serve`: an OpenAI-compatible HTTP server over the batched engine (FastAPI + uvicorn).

Endpoints: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics. Every request becomes engine
requests that share the engine's steps with everyone else's (continuous batching); streamed tokens go out as they
become final (a diffusion request's tokens as they freeze). Logprobs (and echo's prompt logprobs) come from one
full-depth forward over prompt and completion with a zero initial state, at the sampler's `num_steps` (default:
the model's mean_recurrence): the same numbers whatever sampler produced the tokens.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from depthwave.serve.protocol import ApiError
from depthwave.serve.routes import router
from depthwave.serve.server import Server, ServeSettings, load_quietly

__all__ = ["ServeSettings", "Server", "create_app"]


def create_app(settings: ServeSettings, load_in_background: bool = True) -> FastAPI:
    """The app: the model loads at startup (in the background, so that /health answers 503 meanwhile), errors
    in OpenAI's shape, the key and body-size checks before any route, then the routes."""
    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_in_background:
            threading.Thread(target=load_quietly, args=(server,), daemon=True).start()
        else:
            server.load()
        yield
        if server.engine is not None:
            server.engine.stop()

    app = FastAPI(title="depthwave", lifespan=lifespan)
    app.state.server = server
    instance = f"{socket.gethostname()}:{os.getpid()}"

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def internal_error(request: HttpRequest, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next: Any) -> Any:
        refused = refusal(request, settings)
        response = error_response(refused) if refused is not None else await call_next(request)
        # Which process answered: behind a proxy of several replicas, this tells them apart.
        response.headers["x-depthwave-server"] = instance
        return response

    app.include_router(router)
    return app


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def refusal(request: HttpRequest, settings: ServeSettings) -> ApiError | None:
    """What /v1 refuses before reading a body: a missing or wrong key, a declared body over the limit."""
    if not request.url.path.startswith("/v1/"):
        return None
    if settings.api_key is not None and request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
        return ApiError(
            401,
            "missing or wrong API key (Authorization: Bearer ...)",
            kind="authentication_error",
            code="invalid_api_key",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        return ApiError(413, f"the request body is over {settings.max_body_bytes} bytes", code="request_too_large")
    return None
