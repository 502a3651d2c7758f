"""`depthwave serve`: an OpenAI-compatible HTTP server over the batched engine (FastAPI + uvicorn).

Endpoints: /v1/models, /v1/completions, /v1/chat/completions, vLLM's /tokenize, /detokenize and /tokenizer_info,
/health, /metrics; /openapi.json documents every body, /docs shows it. Every request becomes engine
requests that share the engine's steps with everyone else's (continuous batching); streamed tokens go out as they
become final (a diffusion request's tokens as they freeze). Logprobs (and echo's prompt logprobs) come from one
full-depth forward over prompt and completion with a zero initial state, at the sampler's `num_steps` (default:
the model's mean_recurrence): the same numbers whatever sampler produced the tokens.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from depthwave.serve.protocol import ApiError, api_error
from depthwave.serve.routes import router
from depthwave.serve.server import Server, ServeSettings, load_quietly

__all__ = ["ServeSettings", "Server", "create_app", "serve_http"]


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

    app = FastAPI(title="depthwave", summary="OpenAI-compatible server of recurrent-depth models", lifespan=lifespan)
    app.state.server = server
    instance = f"{socket.gethostname()}:{os.getpid()}"

    @app.exception_handler(ApiError)
    async def known_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return error_response(api_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
        # Starlette's own refusals (no such route, wrong method, an unreadable body) in the same shape.
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body", made specific
            exc = HTTPException(400, f"the request body is not valid JSON: not UTF-8 ({exc.__cause__.reason})")
        return error_response(ApiError(exc.status_code, str(exc.detail), kind=kind, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: HttpRequest, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next: Any) -> Any:
        refused = refusal(request, settings) or await oversized(request, settings)
        response = error_response(refused) if refused is not None else await call_next(request)
        # Which process answered: behind a proxy of several replicas, this tells them apart.
        response.headers["x-depthwave-server"] = instance
        return response

    app.include_router(router)
    app.openapi = functools.partial(openapi, app)  # type: ignore[method-assign]
    return app


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its 422 responses: a validation error here is a 400 in OpenAI's shape (each
    route documents it)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def refusal(request: HttpRequest, settings: ServeSettings) -> ApiError | None:
    """What /v1 refuses before reading a body: a missing or wrong key, a declared body over the limit."""
    if not request.url.path.startswith("/v1/"):
        return None
    if settings.api_key is not None and not key_matches(request.headers.get("authorization", ""), settings.api_key):
        return ApiError(
            401,
            "missing or wrong API key (Authorization: Bearer ...)",
            kind="authentication_error",
            code="invalid_api_key",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        return too_large(settings)
    return None


def key_matches(header: str, key: str) -> bool:
    # Constant time: how long a wrong key took to refuse tells nothing about how much of it was right.
    return hmac.compare_digest(header.encode(), f"Bearer {key}".encode())


def too_large(settings: ServeSettings) -> ApiError:
    return ApiError(413, f"the request body is over {settings.max_body_bytes} bytes", code="request_too_large")


async def oversized(request: HttpRequest, settings: ServeSettings) -> ApiError | None:
    """A body sent without a length (chunked) is read here and measured: the routes see it whole or not at all."""
    if request.method != "POST" or request.headers.get("content-length") is not None:
        return None
    body = await request.body()  # Starlette keeps it for the route
    return too_large(settings) if len(body) > settings.max_body_bytes else None


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


class GracefulServer(uvicorn.Server):
    """uvicorn with depthwave's shutdown. On SIGTERM (or SIGINT) new and waiting requests get 503 while running
    ones finish, for at most `grace` seconds (then they are aborted); uvicorn then stops as usual and the process
    exits 0 (uvicorn would re-raise the signal, an exit status that says "killed" for a clean stop). A second
    signal stops at once."""

    def __init__(self, config: uvicorn.Config, server: Server, grace: float) -> None:
        super().__init__(config)
        self.server, self.grace = server, grace
        self.draining_since: float | None = None
        self.aborted = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining_since is not None:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self.draining_since = time.monotonic()
        self.server.begin_shutdown()

    async def on_tick(self, counter: int) -> bool:
        if self.draining_since is not None and not self.should_exit:
            elapsed = time.monotonic() - self.draining_since
            busy = self.server.engine.busy if self.server.engine is not None else 0
            if elapsed > self.grace and not self.aborted:
                self.aborted = True
                self.server.end_running()
            # Aborted streams get a moment to send their last event before uvicorn closes connections.
            self.should_exit = busy == 0 or elapsed > self.grace + 2.0
        return await super().on_tick(counter)


def serve_http(settings: ServeSettings, host: str, port: int, shutdown_grace: float) -> None:
    """`depthwave serve` without replicas: the app on host:port until SIGTERM, then the graceful shutdown."""
    app = create_app(settings)
    # Connections still open once no request runs are only finishing their last bytes: a few seconds is plenty.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    GracefulServer(config, app.state.server, shutdown_grace).run()
