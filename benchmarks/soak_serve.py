"""Soak `depthwave serve` with faults: streaming clients for a long time against a real server process, with the
mistakes and accidents of real traffic mixed in.

    python benchmarks/soak_serve.py                        # 64 clients for 30 minutes
    python benchmarks/soak_serve.py --duration 60 --clients 16

First a quiet server answers every prompt alone (greedy, seeded): the reference texts and the quiet output
tokens/s. Then a fresh server takes `--clients` streaming clients for `--duration` seconds, where
- 10% of requests hang up at a random point mid-stream;
- 5% are malformed, drawn from real mistakes (wrong types, a huge max_tokens, 10,000 stop strings, invalid UTF-8,
  a 2 MB body): each must get a 4xx in OpenAI's shape;
- bursts of extra requests beyond `--max-waiting` arrive at times (429 with Retry-After; the clients wait and retry);
- at half time the server gets SIGTERM (running requests finish, waiting and new ones get 503, the process exits 0)
  and a new one starts on the same port; clients retry what was refused.
A well-formed request that was not hung up is lost when it got no whole answer (a broken stream, no [DONE] or
finish reason, a 5xx); each whole answer must equal the quiet server's. Reported: requests by outcome, lost,
mismatches, RSS of each server process after warm-up and at its end, rows and KV positions in use at the end, p50
and p99 time to first token, the output tokens/s ratio to the quiet run, and the last server's /metrics counters
against the clients' own counts. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

RESULTS = Path(__file__).resolve().parent / "results"
TEST_SET = Path(__file__).resolve().parents[1] / "src/depthwave/assets/arithmetic/test.jsonl"
PROMPTS = 16
MAX_TOKENS = 48
SERVER_FLAGS = ["--threads", "1", "--max-num-seqs", "64", "--shutdown-grace", "30"]
# Real mistakes clients make, each with the statuses it may get (all 4xx in OpenAI's shape).
MALFORMED: list[tuple[str, Any, tuple[int, ...]]] = [
    ("wrong type: prompt a number", {"prompt": 5}, (400,)),
    ("wrong type: max_tokens a string", {"prompt": "What is 2 + 2?", "max_tokens": "many"}, (400,)),
    ("wrong type: temperature a string", {"prompt": "What is 2 + 2?", "temperature": "hot"}, (400,)),
    ("wrong type: stream a string", {"prompt": "What is 2 + 2?", "stream": "yes"}, (400,)),
    ("wrong type: messages a string", {"messages": "hello"}, (400,)),
    ("huge max_tokens", {"prompt": "What is 2 + 2?", "max_tokens": 10**20}, (400,)),
    ("10,000 stop strings", {"prompt": "What is 2 + 2?", "stop": [f"s{i}" for i in range(10_000)]}, (400,)),
    ("invalid UTF-8", b'{"prompt": "What is 2 + 2?\xff\xfe"}', (400,)),
    ("2 MB body", {"prompt": "x" * (2 << 20)}, (413,)),
    ("not JSON", b'{"prompt": "What is', (400,)),
]


@dataclass
class Record:
    kind: str
    """normal, hangup, malformed or burst."""
    outcome: str = ""
    """complete, hung_up, refused_4xx, rejected_429, unavailable_503, no_server, lost."""
    prompt: int = -1
    server: str = ""
    """x-depthwave-server: which process answered."""
    ttft: float | None = None
    tokens: int = 0
    finish: str | None = None
    text: str = ""
    detail: str = ""


@dataclass
class Soak:
    records: list[Record] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    restart_exit_code: int | None = None
    end_metrics: dict[str, float] = field(default_factory=dict)
    end_server: str = ""


def prompts() -> list[str]:
    rows = [json.loads(line) for line in TEST_SET.read_text().splitlines()[:PROMPTS]]
    return [row["question"] for row in rows]


def body_for(index: int, question: str) -> dict[str, Any]:
    return {
        "model": "builtin",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ---- the server process ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, flags: list[str], timeout: float = 180.0) -> subprocess.Popen:
    command = [sys.executable, "-m", "depthwave.cli", "serve", "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not come up: {process.communicate()[1][-2000:]}")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen, timeout: float = 120.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@contextlib.contextmanager
def server(port: int, flags: list[str]) -> Iterator[subprocess.Popen]:
    process = start_server(port, flags)
    try:
        yield process
    finally:
        stop_server(process)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metrics(url: str) -> dict[str, float]:
    """The /metrics samples as {"name{label=value}": value}, read with prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def settled_metrics(url: str, timeout: float = 15.0) -> dict[str, float]:
    """/metrics once nothing runs and two reads agree: the last hung-up streams' aborts have been counted."""
    previous: dict[str, float] = {}
    deadline = time.time() + timeout
    while True:
        current = metrics(url)
        running = current.get("depthwave:num_requests_running", 0) + current.get("depthwave:num_requests_waiting", 0)
        steady = {k: v for k, v in current.items() if "_total" in k or k.endswith("_count")}
        if (running == 0 and steady == previous) or time.time() > deadline:
            return current
        previous = steady
        time.sleep(0.5)


# ---- clients --------------------------------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, url: str, record: Record, body: Any, hang_up_after: int) -> None:
    """One streaming request; hangs up after `hang_up_after` content chunks (0: reads it all)."""
    start = time.perf_counter()
    text, chunks, done = "", 0, False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            record.server = response.headers.get("x-depthwave-server", "")
            if response.status_code != 200:
                record.detail = (await response.aread())[:200].decode(errors="replace")
                record.outcome = {429: "rejected_429", 503: "unavailable_503"}.get(response.status_code, "lost")
                record.finish = response.headers.get("retry-after")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:  # a waiting stream dropped by a shutdown: a 503 as an event
                    code = chunk["error"].get("code")
                    record.outcome = "unavailable_503" if code == "shutting_down" else "lost"
                    record.detail = str(chunk["error"])[:200]
                    return
                if chunk.get("usage"):
                    record.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    delta = choice["delta"].get("content") or ""
                    if delta:
                        record.ttft = record.ttft if record.ttft is not None else time.perf_counter() - start
                        text += delta
                        chunks += 1
                    record.finish = choice.get("finish_reason") or record.finish
                if hang_up_after and chunks >= hang_up_after:
                    record.outcome = "hung_up"
                    return
    except httpx.ConnectError:
        record.outcome = "no_server"  # between the two server processes: the request reached no one
        return
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        # Reset before any response header: a connection the kernel had queued when the old process exited, which
        # no server ever read (retried, like a refused connection). After the headers it is a loss.
        lost = bool(record.server)
        record.outcome, record.detail = "lost" if lost else "no_server", f"{type(exc).__name__}: {exc}"[:200]
        return
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.outcome, record.detail = "lost", f"{type(exc).__name__}: {exc}"[:200]
        return
    record.text = text
    whole = done and record.finish in ("stop", "length")
    record.outcome = "complete" if whole else "lost"
    if not whole:
        record.detail = f"done={done} finish={record.finish}"


async def malformed_one(client: httpx.AsyncClient, url: str, record: Record, rng: random.Random) -> None:
    name, body, statuses = rng.choice(MALFORMED)
    record.detail = name
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        response = await client.post(f"{url}{path}", content=content, headers={"content-type": "application/json"})
    except httpx.ConnectError:
        record.outcome = "no_server"
        return
    except httpx.HTTPError as exc:
        record.outcome, record.detail = "lost", f"{name}: {type(exc).__name__}"
        return
    record.server = response.headers.get("x-depthwave-server", "")
    error = (
        response.json().get("error", {})
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    shaped = set(error) == {"message", "type", "param", "code"}
    if response.status_code == 503:
        record.outcome = "unavailable_503"
    elif response.status_code in statuses and shaped:
        record.outcome = "refused_4xx"
    else:
        record.outcome, record.detail = "lost", f"{name}: HTTP {response.status_code} {response.text[:100]}"


async def request_with_retries(
    client: httpx.AsyncClient, url: str, kind: str, prompt: int, body: Any, hang_up: int, out: list[Record]
) -> None:
    """A well-formed request: refused ones (429, 503, no server) are recorded and sent again after Retry-After."""
    while True:
        record = Record(kind, prompt=prompt)
        await stream_one(client, url, record, body, hang_up)
        out.append(record)
        if record.outcome not in ("rejected_429", "unavailable_503", "no_server"):
            return
        await asyncio.sleep(float(record.finish or 1.0) if record.outcome == "rejected_429" else 1.0)


async def client_loop(url: str, seed: int, stop_at: float, questions: list[str], out: list[Record]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        while time.perf_counter() < stop_at:
            draw = rng.random()
            if draw < 0.05:
                record = Record("malformed")
                await malformed_one(client, url, record, rng)
                out.append(record)
                continue
            prompt = rng.randrange(len(questions))
            hang_up = rng.randint(1, 8) if draw < 0.15 else 0
            kind = "hangup" if hang_up else "normal"
            await request_with_retries(client, url, kind, prompt, body_for(prompt, questions[prompt]), hang_up, out)


async def bursts(url: str, stop_at: float, every: float, size: int, questions: list[str], out: list[Record]) -> None:
    """Every `every` seconds, `size` extra requests at once: beyond --max-waiting, some get 429 and retry."""
    rng = random.Random(1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        while time.perf_counter() + every < stop_at:
            await asyncio.sleep(every)
            prompts_ = [rng.randrange(len(questions)) for _ in range(size)]
            await asyncio.gather(
                *(request_with_retries(client, url, "burst", p, body_for(p, questions[p]), 0, out) for p in prompts_)
            )


# ---- the runs ---------------------------------------------------------------------------------------------------
def quiet_run(flags: list[str]) -> tuple[dict[int, str], float]:
    """Each prompt alone on a fresh server: its greedy seeded answer, and output tokens/s of one client."""
    port, questions = free_port(), prompts()
    url = f"http://127.0.0.1:{port}"
    answers, tokens, began = {}, 0, time.perf_counter()

    async def run() -> None:
        nonlocal tokens
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
            for index, question in enumerate(questions):
                record = Record("quiet", prompt=index)
                await stream_one(client, url, record, body_for(index, question), 0)
                assert record.outcome == "complete", record
                answers[index], tokens = record.text, tokens + record.tokens

    with server(port, flags):
        asyncio.run(run())
    return answers, tokens / (time.perf_counter() - began)


def soak(flags: list[str], clients: int, duration: float, max_waiting: int, burst_every: float) -> Soak:
    port, questions = free_port(), prompts()
    url = f"http://127.0.0.1:{port}"
    flags = [*flags, "--max-waiting", str(max_waiting)]
    result = Soak()
    processes = [start_server(port, flags)]
    began = time.perf_counter()
    stop_at = began + duration

    async def restart_at_half_time() -> None:
        await asyncio.sleep(duration / 2)
        old = processes[-1]
        result.rss_mb["first_end"] = rss_mb(old.pid)
        result.restart_exit_code = await asyncio.to_thread(stop_server, old)
        processes.append(await asyncio.to_thread(start_server, port, flags))
        await asyncio.sleep(min(120.0, duration / 8))
        result.rss_mb["second_warm"] = rss_mb(processes[-1].pid)

    async def warm_rss() -> None:
        # Warm: every row has been used and the first burst has come (the batch at its largest).
        await asyncio.sleep(max(min(120.0, duration / 4), burst_every + 2))
        result.rss_mb["first_warm"] = rss_mb(processes[0].pid)

    async def run() -> None:
        await asyncio.gather(
            *(client_loop(url, seed, stop_at, questions, result.records) for seed in range(clients)),
            bursts(url, stop_at, burst_every, max_waiting + clients, questions, result.records),
            restart_at_half_time(),
            warm_rss(),
        )

    try:
        result.rss_mb["first_start"] = rss_mb(processes[0].pid)
        asyncio.run(run())
        result.wall_s = time.perf_counter() - began
        result.rss_mb["second_end"] = rss_mb(processes[-1].pid)
        result.end_metrics = settled_metrics(url)
        result.end_server = httpx.get(f"{url}/health").headers.get("x-depthwave-server", "")
    finally:
        for process in processes:
            stop_server(process)
    return result


# ---- the report -------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(result: Soak, answers: dict[int, str], quiet_tps: float) -> dict[str, Any]:
    records = result.records
    outcomes = Counter(f"{r.kind}:{r.outcome}" for r in records)
    complete = [r for r in records if r.outcome == "complete"]
    lost = [r for r in records if r.outcome == "lost"]
    mismatched = [r for r in complete if r.text != answers[r.prompt]]
    ttfts = [r.ttft for r in complete if r.ttft is not None]
    last = [r for r in records if r.server == result.end_server]
    m = result.end_metrics
    served = {
        reason: sum(1 for r in last if r.outcome == "complete" and r.finish == reason) for reason in ("stop", "length")
    }
    counted = {
        reason: m.get(f"depthwave:request_success_total{{finished_reason={reason}}}", 0)
        for reason in ("stop", "length", "abort")
    }
    rss = result.rss_mb
    return {
        "requests": len(records),
        "outcomes": dict(sorted(outcomes.items())),
        "lost": len(lost),
        "lost_examples": [asdict(r) for r in lost[:5]],
        "complete": len(complete),
        "mismatched": len(mismatched),
        "mismatch_examples": [{"prompt": r.prompt, "got": r.text, "quiet": answers[r.prompt]} for r in mismatched[:3]],
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "output_tokens_per_s": sum(r.tokens for r in complete) / result.wall_s if result.wall_s else 0.0,
        "quiet_output_tokens_per_s": quiet_tps,
        "rss_mb": rss,
        "rss_growth_first": (rss["first_end"] / rss["first_warm"] - 1) if rss.get("first_warm") else None,
        "rss_growth_second": (rss["second_end"] / rss["second_warm"] - 1) if rss.get("second_warm") else None,
        "restart_exit_code": result.restart_exit_code,
        "end_rows_in_use": m.get("depthwave:num_requests_running"),
        "end_waiting": m.get("depthwave:num_requests_waiting"),
        "end_kv_positions_in_use": m.get("depthwave:kv_cache_positions_reserved"),
        "last_server": {
            "clients_complete_by_reason": served,
            "clients_hung_up": sum(1 for r in last if r.outcome == "hung_up"),
            "clients_completion_tokens": sum(r.tokens for r in last if r.outcome == "complete"),
            "metrics_success_by_reason": counted,
            "metrics_generation_tokens": m.get("depthwave:generation_tokens_total"),
            "metrics_rejected_429": m.get("depthwave:request_rejected_total{status=429}", 0),
            "clients_rejected_429": sum(1 for r in last if r.outcome == "rejected_429"),
        },
    }


def table(summary: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "–" if value is None else f"{1e3 * value:.0f}"

    rss = summary["rss_mb"]
    ratio = summary["output_tokens_per_s"] / summary["quiet_output_tokens_per_s"]
    last = summary["last_server"]
    lines = [
        "| outcome | requests |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in summary["outcomes"].items()),
        "",
        f"lost {summary['lost']} (well-formed, not hung up); complete {summary['complete']}, "
        f"{summary['mismatched']} differ from the quiet server's answers",
        f"TTFT p50 {ms(summary['ttft_p50_s'])} ms, p99 {ms(summary['ttft_p99_s'])} ms; output "
        f"{summary['output_tokens_per_s']:.1f} tok/s = {ratio:.2f}x the quiet run's "
        f"{summary['quiet_output_tokens_per_s']:.1f}",
        "RSS MB: first server "
        + " -> ".join(f"{rss.get(k, 0):.0f}" for k in ("first_start", "first_warm", "first_end"))
        + f" (exit {summary['restart_exit_code']} on SIGTERM), second "
        + " -> ".join(f"{rss.get(k, 0):.0f}" for k in ("second_warm", "second_end")),
        f"at the end: rows in use {summary['end_rows_in_use']}, waiting {summary['end_waiting']}, KV positions "
        f"reserved {summary['end_kv_positions_in_use']}",
        f"last server, clients vs /metrics: complete {last['clients_complete_by_reason']} vs "
        f"{last['metrics_success_by_reason']}; completion tokens {last['clients_completion_tokens']} vs generated "
        f"{last['metrics_generation_tokens']}; 429s {last['clients_rejected_429']} vs {last['metrics_rejected_429']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="Seconds of load (default 30 minutes).")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-waiting", type=int, default=32)
    parser.add_argument("--burst-every", type=float, default=0.0, help="Seconds between bursts (default duration/5).")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak_serve.json")
    args = parser.parse_args(argv)
    answers, quiet_tps = quiet_run(SERVER_FLAGS)
    result = soak(SERVER_FLAGS, args.clients, args.duration, args.max_waiting, args.burst_every or args.duration / 5)
    summary = summarize(result, answers, quiet_tps)
    print(table(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "duration_s": args.duration,
        "clients": args.clients,
        "max_waiting": args.max_waiting,
        "cpus": os.cpu_count(),
    }
    # Only the lost requests' records are kept (all of them would be megabytes): the summary counts the rest.
    lost = [asdict(r) for r in result.records if r.outcome == "lost"]
    args.out.write_text(json.dumps({**meta, **summary, "lost_records": lost}, indent=1))
    return summary


if __name__ == "__main__":
    main()
