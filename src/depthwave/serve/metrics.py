"""The server's Prometheus metrics, written in the text exposition format (no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter

from depthwave.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            index = next((i for i, edge in enumerate(self.buckets) if value <= edge), len(self.buckets))
            self.counts[index] += 1
            self.total += value
            self.count += 1

    def lines(self, name: str) -> list[str]:
        with self.lock:
            out, cumulative = [], 0
            for edge, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
                cumulative += count
                label = "+Inf" if edge == float("inf") else repr(edge)
                out.append(f'{name}_bucket{{le="{label}"}} {cumulative}')
            out += [f"{name}_sum {self.total}", f"{name}_count {self.count}"]
            return out


class Metrics:
    """Written by the engine thread, read by the /metrics handler."""

    def __init__(self) -> None:
        self.requests_running = 0
        self.requests_waiting = 0
        self.generated_tokens = 0
        self.steps = 0
        self.engine = EngineStats()
        self.by_reason: Counter[str] = Counter()
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram()

    def observe_step(self, running: int, waiting: int, engine: EngineStats) -> None:
        self.steps += 1
        self.requests_running, self.requests_waiting = running, waiting
        self.engine = engine

    def finished(self, reason: str) -> None:
        self.by_reason[reason] += 1

    def render(self, rows: int) -> str:
        prefix = "depthwave"
        lines = [
            f"# HELP {prefix}_requests_running Requests in the batch (holding a row).",
            f"# TYPE {prefix}_requests_running gauge",
            f"{prefix}_requests_running {self.requests_running}",
            f"# HELP {prefix}_requests_waiting Requests waiting for a row or KV budget.",
            f"# TYPE {prefix}_requests_waiting gauge",
            f"{prefix}_requests_waiting {self.requests_waiting}",
            f"# HELP {prefix}_batch_rows Rows of the engine (max_num_seqs).",
            f"# TYPE {prefix}_batch_rows gauge",
            f"{prefix}_batch_rows {rows}",
            f"# HELP {prefix}_engine_steps_total Engine steps run.",
            f"# TYPE {prefix}_engine_steps_total counter",
            f"{prefix}_engine_steps_total {self.steps}",
            f"# HELP {prefix}_generated_tokens_total Tokens generated (final).",
            f"# TYPE {prefix}_generated_tokens_total counter",
            f"{prefix}_generated_tokens_total {self.generated_tokens}",
        ]
        engine = self.engine
        for name, kind, value, help_text in (
            ("passes_total", "prefill", engine.prefill_passes, "Engine passes by kind."),
            ("passes_total", "decode", engine.decode_passes, None),
            ("pass_seconds_total", "prefill", engine.prefill_time_s, "Wall time of engine passes by kind."),
            ("pass_seconds_total", "decode", engine.decode_time_s, None),
        ):
            if help_text:
                lines += [f"# HELP {prefix}_{name} {help_text}", f"# TYPE {prefix}_{name} counter"]
            lines.append(f'{prefix}_{name}{{kind="{kind}"}} {value}')
        lines += [
            f"# HELP {prefix}_prompt_tokens_total Prompt tokens prefilled.",
            f"# TYPE {prefix}_prompt_tokens_total counter",
            f"{prefix}_prompt_tokens_total {engine.prompt_tokens}",
            f"# HELP {prefix}_requests_finished_total Finished requests by finish reason.",
            f"# TYPE {prefix}_requests_finished_total counter",
        ]
        for reason in ("stop", "length", "abort"):
            lines.append(f'{prefix}_requests_finished_total{{finish_reason="{reason}"}} {self.by_reason[reason]}')
        for name, histogram, help_text in (
            ("time_to_first_token_seconds", self.time_to_first_token, "From arrival to the first token."),
            ("inter_token_latency_seconds", self.inter_token_latency, "Between tokens of a request."),
        ):
            lines += [f"# HELP {prefix}_{name} {help_text}", f"# TYPE {prefix}_{name} histogram"]
            lines += histogram.lines(f"{prefix}_{name}")
        return "\n".join(lines) + "\n"
