"""The evaluation harness: sampler specs, incremental and resumable runs, the summary table, the sweep's plots and
the Ray scale-out (same per-sample results as one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from depthwave.errors import InvalidParameterError
from depthwave.eval import harness
from depthwave.eval.harness import BATCHES_FILE, EvalSettings, read_records, run_eval
from depthwave.samplers.registry import SamplerSpec
from depthwave.samplers.registry import parse_specs as parse_samplers
from tests.conftest import depthwave_command

FAST = "static(num_steps=4),quick=diffusion(num_steps=4,inner_recurrence=2)"


def _settings(**overrides) -> EvalSettings:  # type: ignore[no-untyped-def]
    values = dict(model="builtin", tasks=("arithmetic",), samplers=tuple(parse_samplers(FAST)), limit=3, threads=1)
    values.update(overrides)
    return EvalSettings(**values)  # type: ignore[arg-type]


def test_sampler_specs() -> None:
    specs = parse_samplers("static, diffusion(inner_recurrence=8,exit_threshold=0.05,mode=reference),s=speculative")
    assert [s.kind for s in specs] == ["static", "diffusion", "speculative"]
    assert specs[1].params == {"inner_recurrence": 8, "exit_threshold": 0.05, "mode": "reference"}
    assert specs[1].label == "diffusion(inner_recurrence=8,exit_threshold=0.05,mode=reference)"
    assert specs[2].label == "s" and SamplerSpec.parse("adaptive(continuous_compute=true)").params == {
        "continuous_compute": True
    }
    with pytest.raises(InvalidParameterError, match="missing '\\)'"):
        SamplerSpec.parse("diffusion(inner_recurrence=8")
    with pytest.raises(InvalidParameterError, match="expected key=value"):
        SamplerSpec.parse("diffusion(8)")
    with pytest.raises(InvalidParameterError, match="labels must be unique"):
        parse_samplers("static,static")


def test_run_writes_records_summary_and_table(tmp_path: Path) -> None:
    summary = run_eval(_settings(), tmp_path)
    records = read_records(tmp_path)
    assert len(records) == 6 and {r["sampler"] for r in records} == {"static(num_steps=4)", "quick"}
    assert all(r["generated_tokens"] > 1 and isinstance(r["correct"], bool) for r in records)
    # A request's decode time is the wall time from its first decode pass to its end; every decode pass of a batch
    # runs while some request of it is decoding, so the requests' times together cover the batch's.
    batches = {b["batch"]: b for b in read_records(tmp_path, BATCHES_FILE)}
    assert all(r["decode_s"] > 0 and r["prefill_s"] > 0 for r in records)
    for batch, line in batches.items():
        assert sum(r["decode_s"] for r in records if r["batch"] == batch) >= line["decode_s"] > 0
    rows = {r["sampler"]: r for r in summary["rows"]}
    assert summary["baseline"] == "static(num_steps=4)" and rows["static(num_steps=4)"]["speedup"] == 1.0
    static = [r for r in records if r["sampler"] == "static(num_steps=4)"]
    assert rows["static(num_steps=4)"]["accuracy"] == sum(r["correct"] for r in static) / 3
    table = (tmp_path / "table.md").read_text()
    assert "| arithmetic | `quick` | 3 |" in table and "tokens/s" in table
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]


def test_an_interrupted_run_resumes_without_recomputing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[tuple[int, frozenset[str]]] = []
    original = harness.Evaluator.run_chunk

    def counting(self, chunk, turn, emit):  # type: ignore[no-untyped-def]
        calls.extend((index, frozenset(skip)) for _, index, _, skip in chunk)
        return original(self, chunk, turn, emit)

    monkeypatch.setattr(harness.Evaluator, "run_chunk", counting)
    written: list[dict] = []

    def interrupt(records: list[dict]) -> None:
        written.extend(records)
        if len(written) == 3:  # mid-chunk: the first sampler has both samples, the second one of them
            raise KeyboardInterrupt

    settings = _settings(batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        run_eval(settings, tmp_path, on_records=interrupt)
    first = read_records(tmp_path)
    assert len(first) == 3  # flushed before the interruption
    # A cut-off last line (killed mid-write) is ignored and repaired.
    with (tmp_path / "samples.jsonl").open("a") as f:
        f.write('{"task": "arithmetic", "sampler": "quick", "sample_')
    calls.clear()
    run_eval(settings, tmp_path)
    half_done = {r["index"] for r in first if r["sampler"] == "quick"}
    assert calls == [(({0, 1} - half_done).pop(), frozenset({"static(num_steps=4)"})), (2, frozenset())]
    records = read_records(tmp_path)
    assert records[:3] == first and len(records) == 6
    assert len({(r["sampler"], r["sample_id"]) for r in records}) == 6
    # Another sampler list on the same folder is refused rather than mixed in; another batch size is not.
    with pytest.raises(InvalidParameterError, match="holds a run with other settings"):
        run_eval(_settings(samplers=tuple(parse_samplers("static"))), tmp_path)
    assert len(run_eval(_settings(batch_size=3), tmp_path)["rows"]) == 2


@pytest.mark.slow
def test_ray_with_two_workers_gives_the_single_process_results(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    settings = _settings(limit=4)
    run_eval(settings, tmp_path / "single")
    run_eval(settings, tmp_path / "ray", workers=2)

    def keyed(folder: Path) -> dict:
        return {
            (r["sampler"], r["sample_id"]): (r["token_ids"], r["correct"], r["completion"])
            for r in read_records(folder)
        }

    single, sharded = keyed(tmp_path / "single"), keyed(tmp_path / "ray")
    assert len(single) == 8 and single == sharded


def test_cli_eval_and_sweep_plots(tmp_path: Path) -> None:

    out = tmp_path / "eval"
    args = ["eval", "--tasks", "arithmetic", "--samplers", FAST, "--limit", "2", "--out", str(out), "--threads", "1"]
    result = depthwave_command(args)
    assert result.exit_code == 0, result.output
    assert len(read_records(out)) == 4 and (out / "table.md").is_file()
    bad = depthwave_command(["eval", "--tasks", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown task 'nope'" in bad.stderr

    sweep_out = tmp_path / "sweep"
    sweep = [
        "sweep",
        "--param",
        "inner_recurrence=1,2",
        "--param",
        "exit_threshold=0.1",
        "--base",
        "diffusion(num_steps=4)",
        "--limit",
        "2",
        "--out",
        str(sweep_out),
        "--threads",
        "1",
    ]
    result = depthwave_command(sweep)
    assert result.exit_code == 0, result.output
    assert (sweep_out / "pareto-arithmetic.png").stat().st_size > 10_000
    assert (sweep_out / "arithmetic-inner_recurrence.png").stat().st_size > 10_000
    assert (sweep_out / "arithmetic-exit_threshold.png").stat().st_size > 10_000
    labels = {r["sampler"] for r in read_records(sweep_out)}
    assert labels == {
        "static",
        "diffusion (paper defaults)",
        "diffusion inner_recurrence=1",
        "diffusion inner_recurrence=2",
        "diffusion exit_threshold=0.1",
    }
    unknown = depthwave_command(["sweep", "--param", "speed=1,2", "--out", str(tmp_path / "y")])
    assert unknown.exit_code == 2 and "no parameter(s) ['speed']" in unknown.stderr


def test_a_sample_that_cannot_be_generated_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    data = tmp_path / "problems.jsonl"
    rows = [
        {
            "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "answer": "3 + 4 = 7.\nThe answer is 7.",
        },
        {
            "question": "How many? " * 200,
            "answer": "The answer is 1.",
        },  # longer than the built-in model's 256-token context
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = _settings(limit=None, data={"arithmetic": str(data)})
    summary = run_eval(settings, tmp_path / "out")
    records = read_records(tmp_path / "out")
    assert len(records) == 4
    failed = [r for r in records if "error" in r]
    assert len(failed) == 2 and all("context" in r["error"] and not r["correct"] for r in failed)
    assert all(row["errors"] == 1 and row["samples"] == 2 for row in summary["rows"])
    assert "| errors |" in (tmp_path / "out" / "table.md").read_text()


def test_the_local_ray_cluster_listens_on_loopback_only() -> None:
    import shutil
    import subprocess

    ray = pytest.importorskip("ray")
    if shutil.which("ss") is None:
        pytest.skip("needs `ss` to list listening sockets")
    from depthwave.eval.distributed import start_local_ray

    start_local_ray(1)
    try:
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    finally:
        ray.shutdown()
    names = ("gcs_server", "raylet", "ray::")
    ours = [line for line in listening if any(f'(("{name}' in line for name in names)]
    assert ours, "the Ray processes were not found among the listening sockets"
    for line in ours:
        local = line.split()[3]
        assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line


def test_batch_size_changes_the_speed_not_the_results(tmp_path: Path) -> None:
    one = run_eval(_settings(limit=4, batch_size=1), tmp_path / "one")
    batched = run_eval(_settings(limit=4, batch_size=3), tmp_path / "batched")

    def keyed(folder: Path) -> dict:
        return {(r["sampler"], r["sample_id"]): r["token_ids"] for r in read_records(folder)}

    assert keyed(tmp_path / "one") == keyed(tmp_path / "batched") and len(keyed(tmp_path / "one")) == 8
    assert [r["accuracy"] for r in one["rows"]] == [r["accuracy"] for r in batched["rows"]]
    lines = read_records(tmp_path / "batched", harness.BATCHES_FILE)
    assert sorted(line["requests"] for line in lines) == [1, 1, 3, 3]
    assert all(line["decode_s"] > 0 and line["decoded_tokens"] > 0 for line in lines)


def test_module_layout_has_no_cycles_nor_training_imports() -> None:
    """The Ray scale-out does not import the harness (which imports it), and the arithmetic task does not import
    the training script; checked in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import depthwave.eval.distributed\n"
        "assert 'depthwave.eval.harness' not in sys.modules, 'distributed imports the harness'\n"
        "import depthwave.eval.tasks.arithmetic\n"
        "assert 'depthwave.train' not in sys.modules, 'the arithmetic task imports the training script'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
