"""`depthwave serve` against requests generated from its own /openapi.json (schemathesis, through
benchmarks/fuzz_serve.py): every endpoint, bodies that fit the schema and bodies that break it, a bounded seeded
run of about a minute. No 5xx, every 4xx in OpenAI's error shape, every response as its schema says, invalid
bodies refused, and the server still answers a normal request afterwards."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("uvicorn")

from depthwave.samplers import registry
from depthwave.serve.app import ServeSettings
from tests.helpers import running

EXAMPLES = 45
"""Cases per endpoint and mode: about a minute for the eight endpoints on this CPU."""


def fuzz_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_serve.py"
    spec = importlib.util.spec_from_file_location("fuzz_serve", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_serve"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_generated_requests_get_no_5xx_conform_and_leave_the_server_answering() -> None:
    fuzz = fuzz_module()
    # The static sampler at 4 recurrences keeps generated completions cheap (as the benchmark's server).
    sampler = registry.make("static", num_steps=4, cache_mode="shared")
    settings = ServeSettings(model="builtin", device="cpu", max_num_seqs=8, admission_delay=0, sampler=sampler)
    with running(settings) as url:
        report = fuzz.fuzz(url, EXAMPLES, seed=0)
    print(fuzz.table(report))
    assert not report.failures, report.failures[:5]
    assert report.alive_after
    operations = {key.rsplit(" ", 1)[0] for key in report.by_status}
    assert len(operations) == 8, operations  # every endpoint was fuzzed
    statuses = {key for key in report.by_status if "/v1/completions" in key or "/v1/chat" in key}
    # The generated requests reached generation as well as the refusals.
    assert any(key.endswith(" 200") for key in statuses) and any(key.endswith(" 400") for key in statuses)
