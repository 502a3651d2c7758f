"""Shared test helpers. Parity data lives in ../shared/fixtures beside the clone (CI has it there)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from depthwave.model import HuginnConfig

# DEPTHWAVE_SHARED points elsewhere when the shared folder cannot sit beside the clone (e.g. on a GPU machine).
SHARED = Path(os.environ.get("DEPTHWAVE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "fixtures"
REFERENCE_FIXTURES = ["reference-tiny-a", "reference-huginn-layout-a"]
RETROFIT_FIXTURES = ["retrofit-llama-a", "retrofit-olmo-a"]


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"reference fixture {name} not found at {path} (../shared beside the clone is absent)")
    return path


def fixture_json(name: str, file: str) -> Any:
    return json.loads((fixture_dir(name) / file).read_text())


@pytest.fixture(params=REFERENCE_FIXTURES)
def reference(request: pytest.FixtureRequest) -> Path:
    return fixture_dir(request.param)


@pytest.fixture(scope="session")
def builtin_llm() -> Any:
    """The built-in model, loaded once for the whole run (fp32 on the CPU). Tests must not change it."""
    from depthwave.llm import LLM

    return LLM("builtin", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest) -> Any:
    """A random micro model for a test module: `micro_config` with the module's `MICRO_MODEL_CONFIG` overrides
    (default: mean_recurrence 8), weights from its `MICRO_MODEL_SEED` (default 0)."""
    from depthwave.model.model import random_model

    overrides = getattr(request.module, "MICRO_MODEL_CONFIG", {"mean_recurrence": 8})
    return random_model(micro_config(**overrides), seed=getattr(request.module, "MICRO_MODEL_SEED", 0))


def micro_config(**overrides: Any) -> HuginnConfig:
    """A 2/4/2 model small enough for fast tests."""
    values: dict[str, Any] = dict(
        n_embd=64,
        n_heads=4,
        intermediate_size=128,
        vocab_size=512,
        block_size=256,
        n_layers_in_prelude=2,
        n_layers_in_recurrent_block=4,
        n_layers_in_coda=2,
        mean_recurrence=4,
        torch_dtype="float32",
    )
    values.update(overrides)
    return HuginnConfig(**values)


def check_stops_streaming_and_seeds(sampler: Any, prompt: list[int], budget: int, stop_at: int) -> None:
    """What every sampler owes `SamplingParams`: the budget is exact, a stop token ends generation where it first
    appears (kept), streamed tokens are the result's, and a seeded sampled run repeats."""
    from depthwave import SamplingParams

    free = sampler.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=budget, seed=3))
    assert len(free.token_ids) == budget and free.finish_reason == "length"
    stop = free.token_ids[stop_at]
    stopping = SamplingParams(temperature=0.0, max_new_tokens=budget, seed=3, stop_token_ids=(stop,))
    stopped = sampler.generate(prompt, stopping)
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop) + 1] and stopped.finish_reason == "stop"
    seeded = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    streamed: list[int] = []
    first = sampler.generate(prompt, seeded, on_token=streamed.append)
    assert streamed == first.token_ids == sampler.generate(prompt, seeded).token_ids


def static_like_diffusion(r: int, r_inner: int) -> Any:
    """The diffusion sampler reduced to static decoding at depth r: ε = 0 (no latent change is below 0, so nothing
    freezes by convergence), a one-position wavefront, a depth cap of r (r_inner dividing it), no momentum, noise
    or random initial state."""
    from depthwave.samplers import DiffusionParams

    return DiffusionParams(
        inner_recurrence=r_inner,
        exit_threshold=0.0,
        momentum=0.0,
        noise=0.0,
        max_wavefront=1,
        max_recurrences=r,
        num_steps=r,
        init_scale=0.0,
    )


def check_larger_threshold_freezes_further(traces: list[list[dict[str, Any]]]) -> None:
    """Diffusion traces of one prompt at increasing ε: identical until their freeze decisions first differ, where
    the larger ε has frozen strictly further; so the step of the first freeze never increases with ε."""
    import itertools

    first_freeze = [next(s["step"] for s in t if s["frozen_after"] > s["frozen_before"]) for t in traces]
    assert first_freeze == sorted(first_freeze, reverse=True), first_freeze
    for smaller, larger in itertools.pairwise(traces):
        for a, b in zip(smaller, larger, strict=False):
            if a["frozen_after"] != b["frozen_after"]:
                assert b["frozen_after"] > a["frozen_after"], (a, b)
                break
            assert a["proposals"] == b["proposals"] and a["latent_change"] == b["latent_change"]


@dataclass
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def depthwave_command(args: list[str]) -> CommandResult:
    """Run `depthwave ARGS` in this process through the real entry point (`depthwave.cli.main`, with its error
    contract: a user error is exit status 2 and one line on stderr)."""
    import contextlib
    import io
    import sys

    from depthwave import cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["depthwave", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return CommandResult(code, out.getvalue(), err.getvalue())
