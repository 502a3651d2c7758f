"""depthwave inside lm-evaluation-harness, offline: lm-eval's own `simple_evaluate` on the shipped arithmetic tasks
(local data files) through the native `depthwave` model and through `depthwave serve` with `local-completions`
and `local-chat-completions`; per-sample agreement with `depthwave eval`; log-likelihoods against a direct
forward pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="needs the lm-eval extra")

from lm_eval.tasks import TaskManager  # noqa: E402

from depthwave.errors import InvalidParameterError  # noqa: E402
from depthwave.eval.harness import EvalSettings, read_records, run_eval  # noqa: E402
from depthwave.eval.lm_harness import DepthwaveLM, write_tasks  # noqa: E402
from depthwave.samplers.diffusion import DiffusionParams  # noqa: E402
from depthwave.samplers.registry import parse_specs  # noqa: E402
from depthwave.serve.app import ServeSettings  # noqa: E402
from tests.helpers import running  # noqa: E402

# Minutes of subprocesses and servers: outside the fast subset (`pytest -m "not slow"`).
pytestmark = pytest.mark.slow

LIMIT = 16


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> TaskManager:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(folder)
    return TaskManager(include_path=str(folder))


@pytest.fixture(scope="module")
def native() -> DepthwaveLM:
    return DepthwaveLM(pretrained="builtin", device="cpu", dtype="float32", batch_size=16)


def evaluate(model: Any, tasks: TaskManager, names: list[str], limit: int = LIMIT, **kwargs: Any) -> dict[str, Any]:
    return lm_eval.simple_evaluate(
        model=model, tasks=names, task_manager=tasks, limit=limit, log_samples=True, **kwargs
    )  # type: ignore[no-any-return]


def per_sample(out: dict[str, Any], task: str, metric: str) -> dict[int, float]:
    return {s["doc_id"]: s[metric] for s in out["samples"][task]}


def direct_loglikelihood(lm: DepthwaveLM, context: str, continuation: str) -> float:
    """One sequence, one forward, no batching: the reference for every log-likelihood path."""
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.inference_mode():
        logprobs = lm.llm.model(ids[:, :-1], None, init_scale=0.0).logits.float().log_softmax(-1)[0]
    n = len(continuation_ids)
    rows = logprobs[-n:]
    return float(rows.gather(1, torch.tensor(continuation_ids)[:, None]).sum())


@pytest.mark.parametrize("sampler", ["static", "diffusion"])
def test_native_generation_matches_depthwave_eval_per_sample(
    sampler: str, native: DepthwaveLM, tasks: TaskManager, tmp_path: Path
) -> None:
    """Greedy, the same problems and sampler: lm-eval's per-sample correctness equals `depthwave eval`'s."""
    native.sampler_name, native.sampler_defaults = sampler, {}
    out = evaluate(native, tasks, ["depthwave_arithmetic"])
    ours = per_sample(out, "depthwave_arithmetic", "exact_match")
    run_eval(EvalSettings(samplers=tuple(parse_specs(sampler)), limit=LIMIT), tmp_path)
    theirs = {r["index"]: float(r["correct"]) for r in read_records(tmp_path)}
    assert len(ours) == LIMIT and ours == theirs
    texts = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["depthwave_arithmetic"]}
    assert texts == {r["index"]: r["completion"] for r in read_records(tmp_path)}
    stats = native.task_stats["depthwave_arithmetic"]
    assert stats.requests == LIMIT and stats.tokens_per_s > 0 and stats.recurrences_per_token > 0


def test_chat_template_gives_the_same_prompts(native: DepthwaveLM, tasks: TaskManager) -> None:
    """The bare-question task through `--apply_chat_template` renders the built-in chat format: same answers."""
    native.sampler_name, native.sampler_defaults = "static", {}
    raw = evaluate(native, tasks, ["depthwave_arithmetic"], limit=6)
    chat = evaluate(native, tasks, ["depthwave_arithmetic_chat"], limit=6, apply_chat_template=True)
    assert [s["resps"] for s in raw["samples"]["depthwave_arithmetic"]] == [
        s["resps"] for s in chat["samples"]["depthwave_arithmetic_chat"]
    ]


def test_multiple_choice_loglikelihoods_are_exact(native: DepthwaveLM, tasks: TaskManager) -> None:
    out = evaluate(native, tasks, ["depthwave_arithmetic_mc"])
    assert out["results"]["depthwave_arithmetic_mc"]["acc,none"] > 0.5
    for sample in out["samples"]["depthwave_arithmetic_mc"][:4]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            assert abs(float(response[0][0]) - direct_loglikelihood(native, context, continuation)) < 1e-4


def test_rolling_loglikelihood_is_the_sum_over_the_text(native: DepthwaveLM) -> None:
    from lm_eval.api.instance import Instance

    text = "Mia has 69 stamps. She buys 8 bags with 17 stamps in each."
    instance = Instance("loglikelihood_rolling", {}, (text,), 0)
    (total,) = native.loglikelihood_rolling([instance])
    ids = native.tok_encode(text)
    with torch.inference_mode():
        full = torch.tensor([[native.prefix_token_id, *ids]])
        logprobs = native.llm.model(full[:, :-1], None, init_scale=0.0).logits.float().log_softmax(-1)[0]
    expected = float(logprobs.gather(1, torch.tensor(ids)[:, None]).sum())
    assert abs(total - expected) < 1e-4


def test_gen_kwargs_reach_the_sampler_and_unknown_keys_fail(native: DepthwaveLM) -> None:
    native.sampler_name, native.sampler_defaults = "diffusion", {}
    gen = {"until": ["<|end_turn|>"], "max_gen_toks": 7, "do_sample": False, "inner_recurrence": 8}
    sampling, sampler = native.parse_gen_kwargs({**gen, "exit_threshold": 0.05}, seed=5)
    assert sampler == DiffusionParams(inner_recurrence=8, exit_threshold=0.05)
    assert sampling.temperature == 0 and sampling.max_new_tokens == 7 and sampling.stop == ("<|end_turn|>",)
    sampling, sampler = native.parse_gen_kwargs({"sampler": "static", "num_steps": 8, "temperature": 0.5}, seed=5)
    assert sampler.num_steps == 8 and sampling.temperature == 0.5 and sampling.seed == 5
    with pytest.raises(InvalidParameterError, match=r"unknown generation key\(s\) \['bogus'\]"):
        native.parse_gen_kwargs({"bogus": 1}, seed=0)
    with pytest.raises(InvalidParameterError, match="has no parameter"):
        DepthwaveLM(pretrained="builtin", device="cpu", sampler="static", inner_recurrence=4)


def test_the_server_path_local_completions_and_chat(native: DepthwaveLM, tasks: TaskManager) -> None:
    """`local-completions` (its tokenizer from the server's /tokenize) runs the generation and the
    multiple-choice task; its log-likelihoods equal the direct forward; `local-chat-completions` runs the chat
    form."""
    settings = ServeSettings(model="builtin", device="cpu", dtype="float32", max_num_seqs=16)
    with running(settings) as base:
        args = f"model=builtin,num_concurrent=8,max_retries=1,base_url={base}/v1"
        out = evaluate(
            "local-completions",
            tasks,
            ["depthwave_arithmetic", "depthwave_arithmetic_mc"],
            limit=8,
            model_args=f"{args}/completions",
        )
        assert out["results"]["depthwave_arithmetic"]["exact_match,strict-match"] > 0.5
        assert out["results"]["depthwave_arithmetic_mc"]["acc,none"] > 0.5
        for sample in out["samples"]["depthwave_arithmetic_mc"][:4]:
            for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
                assert abs(float(response[0][0]) - direct_loglikelihood(native, context, continuation)) < 1e-4
        chat = evaluate(
            "local-chat-completions",
            tasks,
            ["depthwave_arithmetic_chat"],
            limit=8,
            model_args=f"{args}/chat/completions",
            apply_chat_template=True,
        )
        assert chat["results"]["depthwave_arithmetic_chat"]["exact_match,strict-match"] > 0.5


def test_lm_eval_command_finds_the_depthwave_model(tmp_path: Path) -> None:
    """Installed depthwave registers `--model depthwave` with lm-eval: the real command, in a fresh process."""
    write_tasks(tmp_path / "tasks")
    command = [
        sys.executable, "-m", "lm_eval", "--model", "depthwave",
        "--model_args", "pretrained=builtin,device=cpu,batch_size=4",
        "--include_path", str(tmp_path / "tasks"), "--tasks", "depthwave_arithmetic", "--limit", "4",
        "--gen_kwargs", "sampler=diffusion,inner_recurrence=4,exit_threshold=0.03",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "depthwave_arithmetic" in done.stdout and "exact_match" in done.stdout
    assert "recurrences per token" in done.stderr


def test_without_cuda_lm_evals_default_device_is_not_taken_and_a_bad_device_is_one_line(tmp_path: Path) -> None:
    """lm-eval passes its own default device (cuda:0) when --device is not given; on a machine without CUDA
    (hidden here) the model runs on the CPU. A device the user gives that the machine lacks ends the run with one
    line, not a traceback."""
    write_tasks(tmp_path / "tasks")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    base = [sys.executable, "-m", "lm_eval", "--model", "depthwave", "--include_path", str(tmp_path / "tasks")]
    base += ["--tasks", "depthwave_arithmetic", "--limit", "2"]
    done = subprocess.run([*base, "--model_args", "pretrained=builtin"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exact_match" in done.stdout
    bad = subprocess.run(
        [*base, "--model_args", "pretrained=builtin,device=cuda"], capture_output=True, text=True, env=env
    )
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "depthwave: error: device 'cuda': this machine (or this torch build) has no CUDA device" in bad.stderr
