"""`depthwave serve`: the OpenAI-compatible server, one engine or Ray Serve replicas."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from depthwave.cli.common import (
    COMPILE_HELP,
    THREADS_HELP,
    CommandError,
    app,
    check_listen_address,
    with_sampler_flags,
)


@app.command()
@with_sampler_flags
def serve(
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a hub id.")] = "builtin",
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DEPTHWAVE_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1. Prefer the environment variable: `ps` shows flags.",
        ),
    ] = None,
    served_model_name: Annotated[str | None, typer.Option(help="The model id clients use (default: --model).")] = None,
    sampler: Annotated[
        str, typer.Option(help="The default sampler; the sampler flags set its parameters (--inner-recurrence 8).")
    ] = "diffusion",
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    max_num_seqs: Annotated[int, typer.Option(help="Requests in the batch at once (engine rows).")] = 64,
    max_model_len: Annotated[int | None, typer.Option(help="Cached positions per request (default: context).")] = None,
    admission_delay: Annotated[
        float,
        typer.Option(
            help="Hold newcomers until the oldest waited this many prefill-pass times, so prefills batch (0: at once)."
        ),
    ] = 4.0,
    max_waiting: Annotated[int, typer.Option(help="Waiting requests before new ones get 429 with Retry-After.")] = 256,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 1 << 20,
    shutdown_grace: Annotated[
        float,
        typer.Option(help="Seconds running requests get to finish on SIGTERM (new and waiting ones get 503)."),
    ] = 30.0,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP + " Per replica with --replicas.")] = None,
    compile: Annotated[bool, typer.Option(help=COMPILE_HELP + " /health answers 200 after it.")] = False,
    replicas: Annotated[
        int, typer.Option(help="Engine replicas behind Ray Serve's HTTP proxy (one GPU each on CUDA); 0: no Ray.")
    ] = 0,
    ray_address: Annotated[
        str | None, typer.Option(help="With --replicas: join this Ray cluster instead of a private loopback one.")
    ] = None,
    *,
    sampler_flags: dict[str, Any],
) -> None:
    """Serve the model over the OpenAI HTTP API (completions, chat completions, streaming) with continuous
    batching. The sampler flags set the default sampler's parameters, and --cache-mode the engine's KV cache
    (default shared); a request may choose its own sampler with the body field `sampler` and the parameters'
    names (`extra_body` in the openai client)."""
    try:
        from depthwave.samplers import registry
        from depthwave.serve.app import ServeSettings, is_loopback, serve_http
    except ImportError as exc:
        raise CommandError(f"the server needs the serve extra (pip install 'depthwave[serve]'): {exc}") from None
    if threads is not None and threads < 1:
        raise CommandError(f"--threads must be >= 1, got {threads}")
    if replicas < 0:
        raise CommandError(f"--replicas must be >= 0, got {replicas}")
    if shutdown_grace < 0:
        raise CommandError(f"--shutdown-grace must be >= 0, got {shutdown_grace}")
    check_listen_address(host, port)
    if api_key is None and not is_loopback(host):
        typer.echo(
            f"depthwave: warning: serving on {host} without an API key: anyone who can reach it may use it", err=True
        )
    cache_mode = sampler_flags.pop("cache_mode", "shared")
    settings = ServeSettings(
        model=model,
        served_model_name=served_model_name,
        sampler=registry.make(sampler, engine_cache=cache_mode, **sampler_flags),
        cache_mode=cache_mode,
        device=device,
        dtype=None if dtype == "auto" else dtype,
        api_key=api_key,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        admission_delay=admission_delay,
        max_waiting=max_waiting,
        max_body_bytes=max_body_bytes,
        threads=threads,
        compile=compile,
    )
    typer.echo(f"depthwave: serving {settings.name} on http://{host}:{port}/v1 (default sampler {sampler})", err=True)
    if replicas:
        from depthwave.serve.replicas import serve_replicas

        serve_replicas(settings, replicas, host, port, threads, ray_address, shutdown_grace)
        return
    serve_http(settings, host, port, shutdown_grace)
