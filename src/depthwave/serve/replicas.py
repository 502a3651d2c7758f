"""`depthwave serve --replicas N`: N copies of the server, each with its own engine, behind Ray Serve's HTTP proxy.

Each replica builds the same FastAPI app as the single server (so every endpoint, error and stream behaves the
same) and loads the model before it takes traffic; the proxy spreads requests over the replicas. On CUDA each
replica holds one GPU. Without `address`, a private single-machine Ray cluster is started whose processes, the
proxy included, listen on the loopback address only (unless `host` says otherwise for the proxy).
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
from types import ModuleType
from typing import Any

from depthwave.errors import DepthwaveError
from depthwave.serve.app import ServeSettings, create_app

APP_NAME = "depthwave"


def _ray_serve() -> tuple[ModuleType, ModuleType]:
    try:
        return importlib.import_module("ray"), importlib.import_module("ray.serve")
    except ImportError as exc:
        raise DepthwaveError(f"--replicas needs Ray Serve ({exc}); pip install 'depthwave[serve-ray]'") from None


class _Replica:
    """The deployment's class; the app (built on the replica by `create_app`) does the work."""


def deploy(
    settings: ServeSettings,
    replicas: int,
    host: str,
    port: int,
    threads: int | None = None,
    loopback: bool = True,
    grace_s: float = 30.0,
) -> None:
    """Start Ray Serve's proxy on host:port and `replicas` servers behind it; returns once all are ready.
    loopback: the cluster is a private loopback one, whose replicas must not listen on other interfaces."""
    _, serve = _ray_serve()
    from depthwave.runtime import default_device

    gpus = 1 if (settings.device or default_device()).startswith("cuda") else 0
    cpus = threads or 1
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})

    def build() -> Any:  # Ray Serve calls a plain function (not a partial) on each replica to get its app
        return _build_app(settings, cpus, loopback)

    deployment = serve.deployment(
        serve.ingress(build)(_Replica),
        name="server",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        max_ongoing_requests=settings.max_num_seqs + settings.max_waiting,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=grace_s,  # running requests get this long to finish on shutdown
    )
    serve.run(deployment.bind(), name=APP_NAME, route_prefix="/", blocking=False)


def _build_app(settings: ServeSettings, threads: int, loopback: bool) -> Any:
    import torch

    torch.set_num_threads(threads)
    if loopback:
        _bind_replica_grpc_to_loopback()
    # Loaded before the replica reports ready, so the proxy never routes to a replica without a model.
    return create_app(settings, load_in_background=False)


def serve_replicas(
    settings: ServeSettings,
    replicas: int,
    host: str,
    port: int,
    threads: int | None,
    address: str | None,
    grace_s: float = 30.0,
) -> None:
    """The `depthwave serve --replicas N` command: deploy, then serve until SIGINT or SIGTERM."""
    ray, serve = _ray_serve()
    from depthwave.eval.distributed import start_local_ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray(max(replicas * (threads or 1), os.cpu_count() or 1))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings, replicas, host, port, threads, loopback=address is None, grace_s=grace_s)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def _bind_replica_grpc_to_loopback() -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on "[::]:0", every interface, with no setting to
    change it. Run in the replica before that server starts (Ray builds the app first), this binds it to the
    loopback address instead; a replica on a loopback node announces 127.0.0.1, so callers still reach it."""
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:  # a Ray without that server
        return

    def on_loopback(server: Any, address: str) -> Any:
        return original(server, address.replace("[::]", "127.0.0.1"))

    replica.add_port_to_grpc_server = on_loopback
