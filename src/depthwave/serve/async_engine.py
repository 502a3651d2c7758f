"""The engine on a thread of its own, driven from asyncio.

The engine is not thread-safe and its steps block, so one thread owns it: it takes commands (add a request, abort
one, score a sequence) between steps, steps while anything is unfinished, and hands each step's outputs to the
waiting coroutines through their event loop. A request that cannot run is refused when it is added (the caller's
future gets the error) and never reaches a step, so one bad request cannot disturb the others.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from depthwave.engine import Engine, Request, StepOutput
from depthwave.serve.metrics import Metrics


class QueueFull(Exception):
    """The waiting queue holds `max_waiting` requests already."""


class EngineFailure(Exception):
    """A step raised while this request ran; it ended there, and the server went on with the others."""


class ShuttingDown(Exception):
    """The server is stopping: a request that had not started running is dropped with this (a 503)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    sink: Callable[[StepOutput | EngineFailure | ShuttingDown], None]
    arrival: float
    last_token: float | None = None
    emitted: int = 0


@dataclass
class _Command:
    kind: str
    payload: Any
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    extra: dict = field(default_factory=dict)


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int = 256) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self.draining = False
        self._thread = threading.Thread(target=self._run, name="depthwave-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop -----------------------------------------------------------------------
    async def add(self, request: Request, sink: Callable[[StepOutput], None]) -> None:
        """Queue a request; `sink` receives its outputs on this event loop. Raises what `Engine.add` raises, or
        QueueFull."""
        await self._call("add", request, sink=sink)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Command("abort", request_id))

    async def score(self, token_ids: list[int], num_steps: int | None) -> torch.Tensor:
        """log-softmax [L, V] of one full-depth forward over the tokens (zero initial state), for logprobs."""
        return await self._call("score", (token_ids, num_steps))

    def drain(self) -> None:
        """Refuse what waits (each gets ShuttingDown, a 503); running requests go on."""
        self._commands.put(_Command("drain", None))

    def abort_all(self) -> None:
        """End every request now (the shutdown grace is over)."""
        self._commands.put(_Command("abort_all", None))

    def stop(self) -> None:
        self._stopping = True
        self._commands.put(_Command("wake", None))
        self._thread.join(timeout=10)

    @property
    def busy(self) -> int:
        return len(self._streams)

    async def _call(self, kind: str, payload: Any, **extra: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(_Command(kind, payload, loop, future, extra))
        return await future

    # ---- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            # Block for a command only when there is nothing to step.
            block = not self.engine.has_unfinished
            try:
                command = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                command = None
            while command is not None:
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished:
                try:
                    self._step()
                except Exception as exc:  # a bug, or the device ran out of memory: end that batch, keep serving
                    self._fail_running(exc)

    def _handle(self, command: _Command) -> None:
        if command.kind == "abort":
            if self.engine.abort(command.payload):
                pass  # its final output (finish_reason "abort") comes with the next step's outputs
            return
        if command.kind == "wake":
            return
        if command.kind == "drain":
            self._drain()
            return
        if command.kind == "abort_all":
            for request_id in list(self._streams):
                self.engine.abort(request_id)
            return
        try:
            result = self._execute(command)
        except Exception as exc:  # handed to the caller, who turns it into a response
            self._resolve(command, exc=exc)
        else:
            self._resolve(command, value=result)

    def _execute(self, command: _Command) -> Any:
        if command.kind == "add":
            request: Request = command.payload
            if self.draining:
                raise ShuttingDown("the server is shutting down")
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.engine.scheduler.waiting)} requests are waiting already")
            self.engine.add(request)
            assert command.loop is not None
            self._streams[request.request_id] = _Stream(command.loop, command.extra["sink"], time.perf_counter())
            self.metrics.waiting.set(len(self.engine.scheduler.waiting))
            return None
        if command.kind == "score":
            token_ids, num_steps = command.payload
            model = self.engine.model
            with torch.inference_mode():
                ids = torch.tensor([token_ids], device=model.device)
                logits = model(ids, num_steps, init_scale=0.0).logits[0]
                return logits.log_softmax(dim=-1).cpu()
        raise ValueError(f"unknown command {command.kind}")

    @staticmethod
    def _resolve(command: _Command, value: Any = None, exc: BaseException | None = None) -> None:
        future, loop = command.future, command.loop
        if future is None or loop is None:
            return

        def settle() -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(value)

        loop.call_soon_threadsafe(settle)

    def _drain(self) -> None:
        self.draining = True
        for request in list(self.engine.scheduler.waiting):
            self.engine.abort(request.request_id)
            stream = self._streams.pop(request.request_id, None)
            if stream is not None:
                self.metrics.finished("abort")
                stream.loop.call_soon_threadsafe(stream.sink, ShuttingDown("the server is shutting down"))
        # Their abort outputs come with the next step, for no one: the sinks have their answer.

    def _fail_running(self, exc: Exception) -> None:
        failure = EngineFailure(f"the engine failed while running this request: {type(exc).__name__}: {exc}")
        for request in self.engine.fail_running():
            stream = self._streams.pop(request.request_id, None)
            if stream is not None:
                self.metrics.finished("error", latency=time.perf_counter() - stream.arrival)
                stream.loop.call_soon_threadsafe(stream.sink, failure)

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.perf_counter()
        scheduler = self.engine.scheduler
        self.metrics.observe_step(len(scheduler.running), len(scheduler.waiting), scheduler.reserved, self.engine.stats)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.new_token_ids:
                if stream.last_token is None:
                    self.metrics.ttft.observe(now - stream.arrival)
                else:
                    # Tokens that froze together in one step share the step's latency.
                    self.metrics.itl.observe((now - stream.last_token) / len(output.new_token_ids))
                stream.last_token = now
                self.metrics.generation_tokens.inc(len(output.new_token_ids))
            if output.finished:
                self._streams.pop(output.request_id, None)
                reason = output.result.finish_reason if output.result is not None else "abort"
                self.metrics.finished(reason, output.result, now - stream.arrival)
            stream.loop.call_soon_threadsafe(stream.sink, output)
