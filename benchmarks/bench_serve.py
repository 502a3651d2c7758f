"""Serving benchmark in the manner of vLLM's: concurrent streaming clients against `depthwave serve`.

    python benchmarks/bench_serve.py                          # 64 clients for 300 s against the 1-client baseline
    python benchmarks/bench_serve.py --clients 8 --duration 20 --baseline 8
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000   # a server started elsewhere

Each client sends streaming chat requests, one at a time, for the built-in model's test problems (in turn), and
waits an exponential think time between them (Poisson arrivals at `--rate` requests/s over all clients; the default,
0, sends the next request at once). Per request it records the time to first token, the gaps between streamed
chunks (inter-token latency, per token when a chunk carries several), the time per output token after the first,
and the answer. A request fails when the server answers with an error or the connection breaks; it is lost when
the stream ends without `data: [DONE]`, without a finish reason, or with an answer cut short (finish reason `stop`
but no `The answer is N.`). The baseline sends the first `--baseline` of the same requests from a single client,
one at a time, for output tokens/s and accuracy without concurrency. The two alternate in `--rounds` parts
(150 s of clients, 100 baseline requests, and again), so that the machine's drift over the run hits both alike;
the ratio is that of the pooled rates, with the ratio of each round beside it. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
TEST_SET = Path(__file__).resolve().parents[1] / "src/depthwave/assets/arithmetic/test.jsonl"


@dataclass
class Record:
    problem: int
    ok: bool = False
    lost: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float | None = None
    latency: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    text: str = ""
    correct: bool = False

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


def problems() -> list[tuple[str, int]]:
    from depthwave.data.arithmetic import extract_answer

    rows = [json.loads(line) for line in TEST_SET.read_text().splitlines()]
    return [(row["question"], extract_answer(row["answer"])) for row in rows]


async def one_request(client: httpx.AsyncClient, url: str, index: int, question: str, answer: int) -> Record:
    from depthwave.data.arithmetic import extract_answer

    record = Record(problem=index, start=time.perf_counter())
    body = {
        "model": "builtin",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 256,
        "temperature": 0,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, last, done = "", None, False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    record.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    delta = choice["delta"].get("content") or ""
                    now = time.perf_counter()
                    if delta:
                        if record.ttft is None:
                            record.ttft = now - record.start
                        elif last is not None:
                            record.gaps.append(now - last)
                        last = now
                        text += delta
                    if choice.get("finish_reason"):
                        record.finish = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.latency = time.perf_counter() - record.start
    record.text = text
    extracted = extract_answer(text)
    record.correct = extracted == answer
    record.lost = not done or record.finish is None or (record.finish == "stop" and extracted is None)
    record.ok = not record.lost
    return record


async def client_loop(
    url: str,
    queue: Iterator[int],
    items: list[tuple[str, int]],
    stop_at: float,
    rate_each: float,
    seed: int,
    out: list[Record],
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        while time.perf_counter() < stop_at:
            index = next(queue, None)
            if index is None:
                return
            question, answer = items[index % len(items)]
            out.append(await one_request(client, url, index, question, answer))
            if rate_each > 0:
                await asyncio.sleep(rng.expovariate(rate_each))


async def load(
    url: str, clients: int, duration: float, rate: float, first: int = 0, count: int | None = None
) -> tuple[list[Record], float]:
    """`clients` concurrent clients for `duration` seconds (or until `count` requests are done), on the problems
    from number `first` on; returns the records and the wall time."""
    items = problems()
    queue = iter(range(first, first + count)) if count is not None else itertools.count(first)
    out: list[Record] = []
    began = time.perf_counter()
    stop_at = began + duration
    await asyncio.gather(
        *(client_loop(url, queue, items, stop_at, rate / clients if rate else 0.0, i, out) for i in range(clients))
    )
    return out, time.perf_counter() - began


def engine_counters(url: str) -> dict[str, float]:
    """The server's pass counters from /metrics (prefill and decode passes and their seconds, prompt tokens)."""
    from prometheus_client.parser import text_string_to_metric_families

    # depthwave:engine_pass_seconds_total{kind="prefill"} -> prefill_pass_seconds
    names = {
        "depthwave:engine_passes_total": "passes",
        "depthwave:engine_pass_seconds_total": "pass_seconds",
        "depthwave:prompt_tokens_total": "prompt_tokens",
    }
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name in names:
                kind = sample.labels.get("kind")
                out[f"{kind}_{names[sample.name]}" if kind else names[sample.name]] = sample.value
    return out


@dataclass
class Phase:
    """One kind of load (the concurrent clients, or the single client) over all rounds: its records, wall time
    and engine pass counters summed, and its output tokens/s per round."""

    records: list[Record] = field(default_factory=list)
    wall: float = 0.0
    engine: dict[str, float] = field(default_factory=dict)
    by_round: list[float] = field(default_factory=list)

    def run(self, url: str, clients: int, duration: float, rate: float, first: int, count: int | None = None) -> None:
        before = engine_counters(url)
        records, wall = asyncio.run(load(url, clients, duration, rate, first, count))
        after = engine_counters(url)
        self.records += records
        self.wall += wall
        for name, value in after.items():
            self.engine[name] = self.engine.get(name, 0.0) + value - before.get(name, 0.0)
        self.by_round.append(sum(r.tokens for r in records if r.ok) / wall)

    def summary(self) -> dict[str, Any]:
        summary = summarize(self.records, self.wall)
        summary["engine"] = self.engine
        summary["output_tokens_per_s_by_round"] = self.by_round
        # Per request, without the per-token gaps (the percentiles above hold them), to keep the JSON small.
        summary["records"] = [{k: v for k, v in asdict(r).items() if k != "gaps"} for r in self.records]
        return summary


def summarize(records: list[Record], wall: float) -> dict[str, Any]:
    done = [r for r in records if r.ok]

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]

    ttft = [r.ttft for r in done if r.ttft is not None]
    itl = [g for r in done for g in r.gaps]
    tpot = [r.tpot for r in done if r.tpot is not None]
    tokens = sum(r.tokens for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": sum(1 for r in records if r.error),
        "lost": sum(1 for r in records if r.lost),
        "wall_s": wall,
        "request_throughput": len(done) / wall,
        "output_tokens_per_s": tokens / wall,
        "accuracy": sum(r.correct for r in done) / len(done) if done else 0.0,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
        "mean_output_tokens": tokens / len(done) if done else 0.0,
    }


@contextlib.contextmanager
def local_server(flags: list[str], timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`depthwave serve FLAGS` on a free loopback port in a subprocess; yields its URL and process once healthy,
    and stops it with SIGTERM afterwards (a graceful shutdown)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "depthwave.cli", "serve", "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError(f"the server did not come up: {process.communicate()[1][-2000:]}")
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()


def table(rows: dict[str, dict[str, Any]]) -> str:
    def ms(value: float | None) -> str:
        return "–" if value is None else f"{1e3 * value:.0f}"

    lines = [
        "| run | requests | failed | lost | req/s | output tok/s | accuracy | TTFT p50/p99 ms | ITL p50/p99 ms | "
        "TPOT p50/p99 ms | prefill passes | prefill s | decode s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in rows.items():
        e = s["engine"]
        lines.append(
            f"| {name} | {s['requests']} | {s['failed']} | {s['lost']} | {s['request_throughput']:.2f} | "
            f"{s['output_tokens_per_s']:.1f} | {100 * s['accuracy']:.1f}% | "
            f"{ms(s['ttft_p50_s'])}/{ms(s['ttft_p99_s'])} | "
            f"{ms(s['itl_p50_s'])}/{ms(s['itl_p99_s'])} | {ms(s['tpot_p50_s'])}/{ms(s['tpot_p99_s'])} | "
            f"{e.get('prefill_passes', 0):.0f} | {e.get('prefill_pass_seconds', 0):.1f} | "
            f"{e.get('decode_pass_seconds', 0):.1f} |"
        )
    return "\n".join(lines)


def compare(concurrent: list[dict[str, Any]], single: list[dict[str, Any]]) -> dict[str, Any]:
    """The baseline's requests against the same requests (same problem, same seed) in the concurrent run."""
    by_problem = {r["problem"]: r for r in concurrent if r["ok"]}
    pairs = [(by_problem[r["problem"]], r) for r in single if r["ok"] and r["problem"] in by_problem]
    return {
        "requests": len(pairs),
        "identical_answers": sum(a["text"] == b["text"] for a, b in pairs),
        "accuracy_concurrent": sum(a["correct"] for a, _ in pairs) / len(pairs) if pairs else None,
        "accuracy_single": sum(b["correct"] for _, b in pairs) / len(pairs) if pairs else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `depthwave serve` on a free port)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of the concurrent run")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="Poisson arrivals per second over all clients (0: none)"
    )
    parser.add_argument("--baseline", type=int, default=200, help="requests for the one-client baseline (0: skip)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate the concurrent run and the baseline in this many parts"
    )
    parser.add_argument("--threads", type=int, default=None, help="the local server's torch threads")
    parser.add_argument("--serve-args", default="", help="more `depthwave serve` options, e.g. '--admission-delay 0'")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_serve.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if 0 < args.baseline < args.rounds:
        parser.error(f"--baseline {args.baseline} leaves a round of {args.rounds} without baseline requests")

    concurrent, single = Phase(), Phase()
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
        else:
            flags = ["--max-num-seqs", str(args.clients), "--max-waiting", "4096", *shlex.split(args.serve_args)]
            url, _ = stack.enter_context(
                local_server(flags + (["--threads", str(args.threads)] if args.threads else []))
            )
        asyncio.run(load(url, 1, 60, 0.0, count=2))  # warm-up
        for k in range(args.rounds):
            duration = args.duration / args.rounds
            concurrent.run(url, args.clients, duration, args.rate, first=len(concurrent.records))
            if args.baseline:
                lo, hi = k * args.baseline // args.rounds, (k + 1) * args.baseline // args.rounds
                single.run(url, 1, float("inf"), 0.0, first=lo, count=hi - lo)
            print(f"round {k + 1}/{args.rounds}: output tok/s {concurrent.by_round[-1]:.1f}", end="", flush=True)
            print(f" against {single.by_round[-1]:.1f}" if args.baseline else "", flush=True)
    many = concurrent.summary()
    runs = {f"{args.clients} clients": many}
    report: dict[str, Any] = {}
    if args.baseline:
        one = runs["1 client, one at a time"] = single.summary()
        report = compare(many["records"], one["records"])
        report["output_tokens_per_s_ratio"] = many["output_tokens_per_s"] / one["output_tokens_per_s"]
        report["ratio_by_round"] = [a / b for a, b in zip(concurrent.by_round, single.by_round, strict=True)]
    print()
    print(table(runs))
    if report:
        print(
            f"\noutput tokens/s, {args.clients} clients against one: {report['output_tokens_per_s_ratio']:.2f}× "
            f"(by round: {', '.join(f'{r:.2f}×' for r in report['ratio_by_round'])}); "
            f"on the {report['requests']} requests both ran: accuracy {100 * report['accuracy_concurrent']:.1f}% "
            f"against {100 * report['accuracy_single']:.1f}%, {report['identical_answers']} identical answers"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "runs": runs, "baseline": report}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
