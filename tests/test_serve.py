"""`depthwave serve` with the real `openai` client: completions and chat, streaming or not, usage, stops, seeds, the
sampler chosen per request, echo + logprobs, every error status in OpenAI's shape, and a client that disconnects
mid-stream freeing its row."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from depthwave import SamplingParams, StaticParams  # noqa: E402
from depthwave.llm import LLM  # noqa: E402
from depthwave.serve.app import ServeSettings, create_app  # noqa: E402
from tests.helpers import running  # noqa: E402

QUESTION = "A shop gets 26 stamps on Wednesday and 68 stamps on Friday. How many stamps does it have?"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running(ServeSettings(model="builtin", device="cpu", max_num_seqs=8)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(builtin_llm: LLM) -> LLM:
    return builtin_llm


@pytest.fixture(scope="module")
def bench() -> Any:
    """benchmarks/bench_serve.py as a module: its load generator and its `depthwave serve` subprocess."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_completions_stream_and_not_agree_with_usage(client: Any, llm: LLM) -> None:
    args = dict(model="builtin", prompt=QUESTION, max_tokens=40, temperature=0, seed=3)
    full = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert full.choices[0].text == streamed and streamed
    assert chunks[-1].usage is not None and not chunks[-1].choices
    ids = llm.encode(QUESTION)
    assert full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == len(ids)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    local = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=40, seed=3))[0]
    assert full.choices[0].text == local.text and full.usage.completion_tokens == len(local.token_ids)


def test_chat_stream_and_not_agree(client: Any, llm: LLM) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model="builtin", messages=messages, max_tokens=80, temperature=0, seed=1)
    stream = client.chat.completions.create(
        model="builtin", messages=messages, max_tokens=80, temperature=0, seed=1, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content and "The answer is" in text
    assert full.choices[0].finish_reason == "stop" == chunks[-1].choices[0].finish_reason
    local = llm.generate(QUESTION, SamplingParams(temperature=0, max_new_tokens=80, seed=1), chat=True)[0]
    assert text == local.text


def test_stop_strings_and_seeds(client: Any) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    free = client.chat.completions.create(model="builtin", messages=messages, max_tokens=60, temperature=0, seed=1)
    text = free.choices[0].message.content
    assert " = " in text
    cut = client.chat.completions.create(
        model="builtin", messages=messages, max_tokens=60, temperature=0, seed=1, stop=[" = "]
    )
    assert cut.choices[0].message.content == text[: text.index(" = ")] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="builtin", messages=messages, max_tokens=60, temperature=0, seed=1, stop=[" = "], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content
    sampled = [
        client.completions.create(model="builtin", prompt=QUESTION, max_tokens=24, temperature=1.0, seed=s)
        .choices[0]
        .text
        for s in (5, 5, 6)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_sampler_from_extra_body(client: Any, llm: LLM) -> None:
    ids = llm.encode(QUESTION)
    extra = {"sampler": "static", "num_steps": 8, "init_scale": 0.0}
    served = client.completions.create(model="builtin", prompt=ids, max_tokens=20, temperature=0, extra_body=extra)
    params = StaticParams(num_steps=8, init_scale=0.0, cache_mode="shared")
    local = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=20), sampler=params)[0]
    assert served.choices[0].text == local.text
    diffusion = client.completions.create(
        model="builtin",
        prompt=ids,
        max_tokens=20,
        temperature=0,
        seed=2,
        extra_body={"sampler": "diffusion", "inner_recurrence": 8, "exit_threshold": 0.05},
    )
    assert diffusion.choices[0].text
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="builtin", prompt=ids, max_tokens=4, extra_body={"lookahead": 3})
    assert "lookahead" in str(bad.value) and "another sampler" in str(bad.value)


def test_echo_logprobs_are_the_full_forward_log_softmax(client: Any, llm: LLM) -> None:
    """lm-eval's local-completions asks echo=true, logprobs=1, max_tokens=1 to score a continuation."""
    ids = llm.encode(QUESTION)
    out = client.completions.create(model="builtin", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=3)
    choice = out.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    sequence = [*ids, llm.tokenizer.token_to_id(logprobs.tokens[-1]) or 0]
    with torch.inference_mode():
        table = llm.model(torch.tensor([sequence]), None, init_scale=0.0).logits[0].log_softmax(-1)
    for position in range(1, len(ids)):
        assert logprobs.token_logprobs[position] == pytest.approx(float(table[position - 1, ids[position]]), abs=1e-4)
        best = table[position - 1].topk(3)
        shown = sorted(logprobs.top_logprobs[position].values(), reverse=True)
        assert shown[0] == pytest.approx(float(best.values[0]), abs=1e-4) and len(shown) <= 3
    assert choice.text.startswith(llm.tokenizer.decode(ids))
    only_echo = client.completions.create(model="builtin", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert len(only_echo.choices[0].logprobs.token_logprobs) == len(ids) and only_echo.usage.completion_tokens == 0


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "stop": 5}, 400, "stop"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "x", "colour": "red"}, 400, "colour"),
        ({"prompt": "x", "sampler": "fast"}, 400, "sampler"),
        ({"prompt": "x", "sampler": "diffusion", "inner_recurrence": 0}, 400, "inner_recurrence"),
        ({"prompt": "x", "sampler": "static", "cache_mode": "per-step"}, 400, "cache_mode"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": [1, 99999]}, 400, "prompt"),
        ({"prompt": "How many? " * 200, "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "x", "model": "gpt-5"}, 404, "model"),
    ],
)
def test_invalid_requests_get_openai_errors_and_the_server_goes_on(
    url: str, body: dict, status: int, param: str
) -> None:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "What is 3 + 4?", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_malformed_and_oversized_bodies(url: str) -> None:
    broken = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    huge = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages[0].role"


def test_models_health_and_metrics(url: str) -> None:
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == "builtin" and models["data"][0]["max_model_len"] == 256
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "depthwave_requests_running",
        "depthwave_requests_waiting",
        "depthwave_batch_rows 8",
        "depthwave_generated_tokens_total",
        'depthwave_requests_finished_total{finish_reason="stop"}',
        "depthwave_time_to_first_token_seconds_bucket",
        "depthwave_inter_token_latency_seconds_count",
    ):
        assert name in text, name


def test_a_client_that_disconnects_mid_stream_frees_its_row(url: str) -> None:
    before = _aborts(url)
    body = {"prompt": QUESTION, "max_tokens": 200, "temperature": 1.0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in received)
    deadline = time.time() + 30
    while time.time() < deadline and (metric(url, "depthwave_requests_running") or _aborts(url) == before):
        time.sleep(0.1)
    assert metric(url, "depthwave_requests_running") == 0 and _aborts(url) == before + 1


def _aborts(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if 'finish_reason="abort"' in line))


def test_api_key_queue_full_and_loading() -> None:
    settings = ServeSettings(model="builtin", device="cpu", api_key="secret", max_num_seqs=1, max_waiting=1)
    with running(settings) as base:
        denied = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        headers = {"Authorization": "Bearer secret"}
        body = {"prompt": QUESTION, "max_tokens": 120, "ignore_eos": True, "temperature": 1.0}
        statuses: list[Any] = []

        def send() -> None:
            statuses.append(httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=120))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
            time.sleep(0.3)
        for thread in threads:
            thread.join()
        codes = sorted(r.status_code for r in statuses)
        assert codes.count(200) >= 2 and 429 in codes, codes
        busy = next(r for r in statuses if r.status_code == 429)
        assert busy.headers["retry-after"] and busy.json()["error"]["type"] == "rate_limit_error"

    gate = threading.Event()
    app = create_app(ServeSettings(model="builtin", device="cpu"))
    server = app.state.server
    load = server.load
    server.load = lambda: (gate.wait(60), load())  # type: ignore[method-assign]
    with running(ServeSettings(), app=app, healthy=False) as base:
        assert httpx.get(f"{base}/health").status_code == 503
        starting = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
        assert starting.status_code == 503 and "loading" in starting.json()["error"]["message"]
        gate.set()
        deadline = time.time() + 60
        while httpx.get(f"{base}/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_batch_of_prompts_in_one_request(client: Any) -> None:
    out = client.completions.create(
        model="builtin", prompt=["What is 3 + 4?", "What is 10 - 2?"], max_tokens=30, temperature=0, seed=0
    )
    assert [c.index for c in out.choices] == [0, 1] and all(c.text for c in out.choices)
    assert json.dumps(out.model_dump())


def test_cli_serve_with_sampler_flags_and_a_graceful_sigterm(bench: Any) -> None:
    """The real command: a default sampler from flags, and SIGTERM letting a running request finish."""
    import signal

    flags = ["--max-num-seqs", "4", "--sampler", "static", "--num-steps", "8", "--init-scale", "0"]
    with bench.local_server(flags) as (base, process):
        results: list[Any] = []
        body = {"prompt": QUESTION, "max_tokens": 120, "ignore_eos": True, "temperature": 0}
        sender = threading.Thread(
            target=lambda: results.append(httpx.post(f"{base}/v1/completions", json=body, timeout=120))
        )
        sender.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        sender.join()
        # uvicorn re-raises the signal once it has shut down gracefully, so the exit status is SIGTERM's.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        response = results[0]
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 120
        assert "default sampler static" in process.stderr.read()


def _listening() -> set[str]:
    import subprocess

    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if "users:" in line}


@pytest.mark.slow
def test_two_ray_serve_replicas_behind_the_proxy_on_loopback_only(bench: Any) -> None:
    """`depthwave serve --replicas 2`: both replicas answer through Ray Serve's proxy, the same way, and every
    socket the command opened listens on 127.0.0.1."""
    import shutil

    pytest.importorskip("ray.serve")
    if shutil.which("ss") is None:
        pytest.skip("needs `ss` to list listening sockets")
    before = _listening()
    flags = ["--replicas", "2", "--threads", "1", "--max-num-seqs", "4"]
    with bench.local_server(flags, timeout=180) as (base, _):
        body = {"model": "builtin", "prompt": QUESTION, "max_tokens": 12, "temperature": 0, "seed": 3}
        texts: dict[str, set[str]] = {}
        for _ in range(40):
            response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            texts.setdefault(response.headers["x-depthwave-server"], set()).add(response.json()["choices"][0]["text"])
            if len(texts) == 2:
                break
        assert len(texts) == 2, f"the proxy sent every request to one replica: {texts}"
        assert len(set.union(*texts.values())) == 1, texts  # seeded: every replica gives the same answer
        opened = _listening() - before
        port = base.rsplit(":", 1)[1]
        assert any(f":{port} " in line for line in opened), opened
        assert any("ray::" in line for line in opened), opened
        for line in opened:
            assert line.split()[3].startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line


@pytest.mark.slow
def test_bench_serve_short_run_with_64_clients_loses_nothing(bench: Any, tmp_path: Any) -> None:
    """The serving benchmark's short version (as CI runs it): 64 streaming clients for about 20 s against a fresh
    `depthwave serve`: every request completes with `[DONE]` and a whole answer."""
    out = tmp_path / "bench_serve.json"
    bench.main(["--clients", "64", "--duration", "20", "--baseline", "0", "--out", str(out)])
    run = json.loads(out.read_text())["runs"]["64 clients"]
    assert run["failed"] == 0 and run["lost"] == 0, [r for r in run["records"] if not r["ok"]][:3]
    assert run["completed"] == run["requests"] >= 64 and run["output_tokens_per_s"] > 0
    assert run["accuracy"] > 0.5  # the answers are whole and mostly right, not just well-formed streams


def test_a_failing_step_ends_its_batch_with_an_error_and_the_server_goes_on() -> None:
    """A step that raises (a bug, the device out of memory) ends the requests it ran with a 500 (an error event
    when streaming), and later requests are served as before."""
    app = create_app(ServeSettings(model="builtin", device="cpu", max_num_seqs=4, admission_delay=0))
    with running(ServeSettings(model="builtin"), app=app) as base:
        engine = app.state.server.engine.engine
        step = engine.step
        failed = []

        def failing_once() -> Any:
            outputs = step()
            if len(engine.scheduler.running) == 2 and not failed:  # both requests in the batch
                failed.append(True)
                raise RuntimeError("simulated failure")
            return outputs

        engine.step = failing_once
        body = {"model": "builtin", "prompt": QUESTION, "max_tokens": 60, "temperature": 0, "seed": 1}
        options = {"extra_body": {"ignore_eos": True}}
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        results: dict[str, Any] = {}

        def plain() -> None:
            results["plain"] = httpx.post(f"{base}/v1/completions", json=body | options["extra_body"], timeout=60)

        def streamed() -> None:
            try:
                list(client.completions.create(**body, **options, stream=True))
            except openai.APIError as exc:
                results["stream"] = exc

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert failed, results
        response = results["plain"]
        assert response.status_code == 500 and "simulated failure" in response.json()["error"]["message"]
        assert "simulated failure" in str(results["stream"])
        after = client.completions.create(**body, **options)
        assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 60
        assert metric(base, "depthwave_requests_running") == 0
