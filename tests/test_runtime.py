"""The device and thread choice of `depthwave.runtime`: the rule itself, not its timing (that is
`benchmarks/bench_contention.py`)."""

from __future__ import annotations

import pytest
import torch

from depthwave import LLM
from depthwave.errors import InvalidParameterError
from depthwave.runtime import ONE_THREAD_WIDTH, apply_threads, available_cores, choose_threads


@pytest.fixture(autouse=True)
def keep_threads():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_small_models_get_one_thread_and_large_ones_every_available_core() -> None:
    quiet: dict[str, str] = {}
    assert choose_threads(128, environ=quiet) == 1
    assert choose_threads(ONE_THREAD_WIDTH - 1, environ=quiet) == 1
    assert choose_threads(ONE_THREAD_WIDTH, environ=quiet) == available_cores()
    assert choose_threads(4096, environ=quiet) == available_cores()


def test_an_explicit_number_wins_then_omp_num_threads() -> None:
    assert choose_threads(128, 3, environ={"OMP_NUM_THREADS": "5"}) == 3
    assert choose_threads(128, environ={"OMP_NUM_THREADS": "5"}) == 5
    assert choose_threads(4096, environ={"OMP_NUM_THREADS": "2"}) == 2
    # An unusable OMP_NUM_THREADS is ignored, as OpenMP ignores it.
    assert choose_threads(128, environ={"OMP_NUM_THREADS": "0"}) == 1
    assert choose_threads(128, environ={"OMP_NUM_THREADS": "lots"}) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="threads must be an integer >= 1"):
        choose_threads(128, bad)  # type: ignore[arg-type]


def test_apply_sets_torch_threads_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert apply_threads(128, torch.device("cpu")) == 1 and torch.get_num_threads() == 1
    assert apply_threads(128, torch.device("cpu"), 2) == 2 and torch.get_num_threads() == 2


def test_llm_takes_the_default_or_the_given_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert LLM("builtin", device="cpu").threads == 1 and torch.get_num_threads() == 1
    assert LLM("builtin", device="cpu", threads=2).threads == 2 and torch.get_num_threads() == 2
