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

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

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


def metric(url: str, name: str, **labels: str) -> float:
    """A sample of /metrics, read with prometheus_client's parser (which also checks the format)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError(f"{name}{labels} is not in /metrics")


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
        # Found by the fuzzing: a float32 division by these is by 0, and the step failed the whole batch.
        ({"prompt": "x", "temperature": 1e-300}, 400, "temperature"),
        ({"prompt": "x", "repetition_penalty": 5e-324}, 400, "repetition_penalty"),
        ({"prompt": "x", "top_p": 5e-324}, 400, "top_p"),
        ({"prompt": "x", "max_tokens": 2**64}, 400, "max_tokens"),
        ({"prompt": "x", "stop": ["a"] * 10_000}, 400, "stop"),
        ({"prompt": "x", "Colour ": "red"}, 400, "Colour "),
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
    # ignore_eos: the model may end a raw (non-chat) prompt at once; this checks that the server still generates.
    again = {"prompt": "What is 3 + 4?", "max_tokens": 4, "ignore_eos": True}
    ok = httpx.post(f"{url}/v1/completions", json=again, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_malformed_and_oversized_bodies(url: str) -> None:
    broken = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    huge = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"

    def chunked(data: bytes) -> Iterator[bytes]:  # no Content-Length: the size is only known once read
        yield from (data[i : i + 4096] for i in range(0, len(data), 4096))

    json_type = {"content-type": "application/json"}
    huge = httpx.post(f"{url}/v1/completions", content=chunked(b"x" * (2 << 20)), headers=json_type)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    small = json.dumps({"prompt": "What is 3 + 4?", "max_tokens": 2}).encode()
    assert httpx.post(f"{url}/v1/completions", content=chunked(small), headers=json_type).status_code == 200
    not_utf8 = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x\xff"}', headers=json_type)
    assert not_utf8.status_code == 400 and "UTF-8" in not_utf8.json()["error"]["message"]
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages[0].role"


def test_null_fields_mean_their_defaults_and_strings_are_not_numbers(url: str) -> None:
    body = {"prompt": "What is 3 + 4?", "max_tokens": None, "temperature": None, "stop": None, "seed": None}
    ok = httpx.post(f"{url}/v1/completions", json={**body, "stream": None, "num_steps": None}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 16, ok.text
    for field, value in (("max_tokens", "8"), ("stream", 1), ("temperature", "0"), ("seed", 1.5)):
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", field: value}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
    missing = httpx.post(f"{url}/v1/completions", json={"prompt": None}, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


def test_models_health_and_metrics(url: str) -> None:
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == "builtin" and models["data"][0]["max_model_len"] == 256
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    for name, kind in {
        "depthwave:num_requests_running": "gauge",
        "depthwave:num_requests_waiting": "gauge",
        "depthwave:max_num_seqs": "gauge",
        "depthwave:kv_cache_positions_reserved": "gauge",
        "depthwave:request_success": "counter",
        "depthwave:generation_tokens": "counter",
        "depthwave:prompt_tokens": "counter",
        "depthwave:time_to_first_token_seconds": "histogram",
        "depthwave:inter_token_latency_seconds": "histogram",
        "depthwave:e2e_request_latency_seconds": "histogram",
        "depthwave:recurrences_per_token": "histogram",
        "depthwave:sampler_steps": "histogram",
        "depthwave:wavefront_size": "histogram",
    }.items():
        assert families[name].type == kind, name
    assert metric(url, "depthwave:max_num_seqs") == 8
    assert metric(url, "depthwave:request_success_total", finished_reason="stop") >= 1
    assert metric(url, "depthwave:generation_tokens_total") > 0 and metric(url, "depthwave:prompt_tokens_total") > 0
    # The default sampler is diffusion: its recurrences, steps and wavefront are observed per finished request.
    finished = sum(metric(url, "depthwave:request_success_total", finished_reason=r) for r in ("stop", "length"))
    assert metric(url, "depthwave:sampler_steps_count", sampler="diffusion") >= 1
    assert metric(url, "depthwave:recurrences_per_token_count", sampler="diffusion") <= finished
    assert metric(url, "depthwave:e2e_request_latency_seconds_count") >= finished


def test_openapi_documents_every_endpoint_with_its_bodies_and_docs_show_it(url: str) -> None:
    spec = httpx.get(f"{url}/openapi.json").json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert routes == {
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/tokenizer_info"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/health"),
        ("GET", "/metrics"),
    }
    schemas = spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "200" in op["responses"] and "422" not in op["responses"], (method, path)
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                assert schemas[body].get("additionalProperties") is False, body  # unknown fields refused
                assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
                    "/ErrorResponse"
                )
    completion = schemas["CompletionRequest"]["properties"]
    # The sampler parameters are documented fields, with the samplers' own help.
    assert "inner_recurrence" in completion and "draft_steps" in completion and "num_steps" in completion
    assert completion["inner_recurrence"]["description"].startswith("diffusion:")
    assert "text/event-stream" in spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text


def test_a_client_that_disconnects_mid_stream_frees_its_row(url: str) -> None:
    before = _aborts(url)
    body = {"prompt": QUESTION, "max_tokens": 200, "temperature": 1.0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in received)
    deadline = time.time() + 30
    while time.time() < deadline and (metric(url, "depthwave:num_requests_running") or _aborts(url) == before):
        time.sleep(0.1)
    assert metric(url, "depthwave:num_requests_running") == 0 and _aborts(url) == before + 1


def _aborts(url: str) -> float:
    return metric(url, "depthwave:request_success_total", finished_reason="abort")


def test_api_key_queue_full_and_loading() -> None:
    settings = ServeSettings(model="builtin", device="cpu", api_key="secret", max_num_seqs=1, max_waiting=1)
    with running(settings) as base:
        denied = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        for wrong in ("Bearer secreT", "Bearer secret2", "secret", "Bearer"):
            assert httpx.post(f"{base}/v1/completions", json={}, headers={"Authorization": wrong}).status_code == 401
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
        model="builtin",
        prompt=["What is 3 + 4?", "What is 10 - 2?"],
        max_tokens=30,
        temperature=0,
        seed=0,
        extra_body={"ignore_eos": True},  # raw prompts: the chat-trained model may stop at once
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
        assert process.wait(timeout=60) == 0  # a graceful stop is a clean exit
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
        assert metric(base, "depthwave:num_requests_running") == 0


def _wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_overload_gets_429_with_a_retry_after_that_works(bench: Any) -> None:
    """The real command with one row and one waiting place: a burst of six requests gets 429s with Retry-After
    in OpenAI's shape; clients that wait that long and retry are all served, and /metrics counts the refusals."""
    flags = ["--max-num-seqs", "1", "--max-waiting", "1", "--admission-delay", "0", "--sampler", "static"]
    with bench.local_server(flags) as (base, _):
        body = {"prompt": QUESTION, "max_tokens": 40, "ignore_eos": True, "temperature": 0, "seed": 1}
        first: dict[int, httpx.Response] = {}
        tries = [0] * 6

        def client(i: int) -> None:
            with httpx.Client(timeout=120) as http:
                while True:
                    response = http.post(f"{base}/v1/completions", json=body)
                    first.setdefault(i, response)
                    tries[i] += 1
                    if response.status_code != 429:
                        assert response.status_code == 200, response.text
                        assert response.json()["usage"]["completion_tokens"] == 40
                        return
                    error = response.json()["error"]
                    assert error["type"] == "rate_limit_error" and error["message"], error
                    time.sleep(float(response.headers["retry-after"]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        refused = sum(tries) - 6
        assert sum(r.status_code == 429 for r in first.values()) >= 3, [r.status_code for r in first.values()]
        assert metric(base, "depthwave:request_rejected_total", status="429") == refused
        assert metric(base, "depthwave:request_success_total", finished_reason="length") == 6


def test_sigterm_finishes_running_requests_refuses_the_rest_and_exits_0(bench: Any) -> None:
    """SIGTERM to the real command: the two running requests finish whole, the two waiting ones and a new one get
    503 in OpenAI's shape, /health says stopping, and the process exits 0 soon after the last answer."""
    import signal

    flags = ["--max-num-seqs", "2", "--admission-delay", "0", "--sampler", "static", "--shutdown-grace", "60"]
    with bench.local_server(flags) as (base, process):
        body = {"prompt": QUESTION, "max_tokens": 150, "ignore_eos": True, "temperature": 0}
        results: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            results[i] = httpx.post(f"{base}/v1/completions", json=body, timeout=120)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for i, thread in enumerate(threads):
            thread.start()
            if i == 1:  # the first two hold the rows before the others arrive
                _wait_for(lambda: metric(base, "depthwave:num_requests_running") == 2)
        _wait_for(lambda: metric(base, "depthwave:num_requests_waiting") == 2)
        process.send_signal(signal.SIGTERM)
        for thread in threads[2:]:
            thread.join(timeout=30)
        new = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
        health = httpx.get(f"{base}/health", timeout=30)
        for thread in threads[:2]:
            thread.join(timeout=120)
        stopped = time.time()
        assert process.wait(timeout=30) == 0
        assert time.time() - stopped < 10, "the process lingered after its last request"
        for i in (0, 1):
            assert results[i].status_code == 200 and results[i].json()["usage"]["completion_tokens"] == 150
        for refused in (results[2], results[3], new):
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "shutting_down"
        assert health.status_code == 503 and health.json()["status"] == "stopping"


def test_sigterm_grace_over_aborts_what_runs_and_exits_0(bench: Any) -> None:
    """With a short --shutdown-grace, requests still running when it ends are aborted (a stream ends with
    finish_reason "abort" and [DONE]) and the process still exits 0: nothing hangs."""
    import signal

    flags = ["--max-num-seqs", "2", "--sampler", "static", "--shutdown-grace", "1"]
    with bench.local_server(flags) as (base, process):
        body = {"prompt": QUESTION, "max_tokens": 250, "ignore_eos": True, "temperature": 0, "stream": True}
        lines: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)

        thread = threading.Thread(target=stream)
        thread.start()
        _wait_for(lambda: len(lines) > 3)
        began = time.time()
        process.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert process.wait(timeout=30) == 0 and time.time() - began < 15
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "abort" and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("host", "env", "warned", "key"),
    [
        ("10.1.2.3", {}, True, None),
        ("10.1.2.3", {"DEPTHWAVE_API_KEY": "from-env"}, False, "from-env"),
        ("127.0.0.1", {}, False, None),
        ("localhost", {}, False, None),
    ],
)
def test_the_key_comes_from_the_environment_and_an_open_host_without_one_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, host: str, env: dict[str, str], warned: bool, key: str | None
) -> None:
    """`depthwave serve` reads DEPTHWAVE_API_KEY, and binding beyond loopback without a key prints one warning
    line. Nothing listens here: the address check and the server are replaced."""
    from depthwave.cli import serve as serve_command
    from depthwave.serve import app as app_module
    from tests.conftest import depthwave_command

    started: list[Any] = []
    monkeypatch.setattr(serve_command, "check_listen_address", lambda host, port: None)
    monkeypatch.setattr(app_module, "serve_http", lambda settings, *args: started.append(settings))
    monkeypatch.delenv("DEPTHWAVE_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = depthwave_command(["serve", "--host", host])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == int(warned), result.stderr
    if warned:
        assert host in warnings[0] and "without an API key" in warnings[0]
    assert started[0].api_key == key


def test_is_loopback() -> None:
    from depthwave.serve.app import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.8.9.10")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("::")


@pytest.mark.slow
def test_soak_with_faults_for_a_minute_loses_nothing(tmp_path: Any) -> None:
    """benchmarks/soak_serve.py's short version: 64 streaming clients for 60 s against the real command with
    hang-ups, malformed bodies, bursts beyond --max-waiting and a SIGTERM + restart at half time. No well-formed
    request is lost, every whole answer equals the quiet server's, nothing is left running, and /metrics agrees
    with the clients' counts."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_serve.py"
    spec = importlib.util.spec_from_file_location("soak_serve", path)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak_serve"] = soak  # its dataclasses look their module up there
    spec.loader.exec_module(soak)
    summary = soak.main(["--duration", "60", "--clients", "64", "--out", str(tmp_path / "soak.json")])
    shown = {k: v for k, v in summary.items() if k != "outcomes"}
    assert summary["lost"] == 0, summary["lost_examples"]
    assert summary["mismatched"] == 0, summary["mismatch_examples"]
    outcomes = summary["outcomes"]
    for seen in ("normal:complete", "hangup:hung_up", "malformed:refused_4xx", "burst:rejected_429"):
        assert outcomes.get(seen, 0) > 0, (seen, outcomes)
    assert summary["restart_exit_code"] == 0, shown
    assert summary["end_rows_in_use"] == summary["end_waiting"] == summary["end_kv_positions_in_use"] == 0, shown
    assert summary["rss_growth_first"] < 0.05, shown
    last = summary["last_server"]
    for reason in ("stop", "length"):  # a hang-up can come after the server finished, never the other way round
        assert last["metrics_success_by_reason"][reason] >= last["clients_complete_by_reason"][reason], last
    finished = sum(last["metrics_success_by_reason"].values())
    assert finished == sum(last["clients_complete_by_reason"].values()) + last["clients_hung_up"], last
    assert last["metrics_rejected_429"] == last["clients_rejected_429"], last
    assert last["metrics_generation_tokens"] >= last["clients_completion_tokens"], last
