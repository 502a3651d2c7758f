"""The server's Prometheus metrics (`prometheus_client`), under vLLM's names with a `depthwave:` prefix where the
concept matches (so a vLLM dashboard adapts with a rename), and the samplers' own figures: recurrences per token,
sampler steps and wavefront size per request.

Each server has its own CollectorRegistry, not the process-wide one, so that several servers in one process (the
tests, Ray replicas) keep separate counts. The engine thread writes; /metrics reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from depthwave.engine import EngineStats, GenerationResult

PREFIX = "depthwave:"
FINISH_REASONS = ("stop", "length", "abort", "error")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RECURRENCE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
STEP_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)


class Metrics:
    """Written by the engine thread, read by the /metrics handler."""

    def __init__(self, max_num_seqs: int = 0) -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, text: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, text, labels, registry=self.registry)

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, text, labels, registry=self.registry)

        def histogram(name: str, text: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, text, labels, buckets=buckets, registry=self.registry)

        self.running = gauge("num_requests_running", "Requests in the batch (holding an engine row).")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for a row or KV budget.")
        gauge("max_num_seqs", "Rows of the engine (--max-num-seqs).").set(max_num_seqs)
        self.kv_positions = gauge("kv_cache_positions_reserved", "KV cache positions reserved by running requests.")
        self.success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        for reason in FINISH_REASONS:
            self.success.labels(reason)  # every reason is shown from the start, at 0
        self.rejected = counter("request_rejected", "Requests refused before running, by status.", ("status",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated (final).")
        self.steps = counter("engine_steps", "Engine steps run.")
        self.passes = counter("engine_passes", "Engine passes by kind.", ("kind",))
        self.pass_seconds = counter("engine_pass_seconds", "Wall time of engine passes by kind.", ("kind",))
        self.ttft = histogram("time_to_first_token_seconds", "From arrival to the first token.", LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Between tokens of a request.", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From arrival to the last token.", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "From arrival to the first pass.", LATENCY_BUCKETS)
        self.recurrences = histogram(
            "recurrences_per_token",
            "Core recurrences per generated token, per request.",
            RECURRENCE_BUCKETS,
            ("sampler",),
        )
        self.sampler_steps = histogram(
            "sampler_steps", "Sampler steps per request (the diffusion sampler).", STEP_BUCKETS, ("sampler",)
        )
        self.wavefront = histogram(
            "wavefront_size",
            "Mean wavefront per request: positions in flight per step (diffusion).",
            RECURRENCE_BUCKETS,
            ("sampler",),
        )
        self._engine = EngineStats()

    def observe_step(self, running: int, waiting: int, kv_positions: int, engine: EngineStats) -> None:
        self.steps.inc()
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_positions.set(kv_positions)
        previous, self._engine = self._engine, dataclasses.replace(engine)
        self.prompt_tokens.inc(engine.prompt_tokens - previous.prompt_tokens)
        for kind in ("prefill", "decode"):
            self.passes.labels(kind).inc(getattr(engine, f"{kind}_passes") - getattr(previous, f"{kind}_passes"))
            seconds = getattr(engine, f"{kind}_time_s") - getattr(previous, f"{kind}_time_s")
            self.pass_seconds.labels(kind).inc(max(seconds, 0.0))

    def finished(self, reason: str, result: GenerationResult | None = None, latency: float | None = None) -> None:
        self.success.labels(reason).inc()
        if latency is not None:
            self.e2e.observe(latency)
        if result is None:
            return
        stats: Any = result.stats
        sampler = stats.sampler or "unknown"
        self.queue.observe(stats.queue_time_s)
        if stats.generated_tokens:
            self.recurrences.labels(sampler).observe(stats.core_steps_per_token)
        if getattr(stats, "sampler_steps", 0):
            self.sampler_steps.labels(sampler).observe(stats.sampler_steps)
        if getattr(stats, "mean_wavefront", 0):
            self.wavefront.labels(sampler).observe(stats.mean_wavefront)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
