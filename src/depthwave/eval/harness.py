"""The evaluation harness: tasks × samplers on one model, written incrementally, resumable, summarised as the paper's
table (accuracy and generated tokens/s per sampler and task, speedup and accuracy change against static AR).

Files in the output folder:

* ``settings.json``: what the run is (model, tasks, samplers, sampling, seed); a resumed run must match it.
* ``samples.jsonl``: one line per (task, sampler, sample), appended and flushed as each finishes, so an interrupted
  run loses nothing and a rerun skips what is there.
* ``batches.jsonl``: one line per batch (a sampler on a chunk of samples): its engine's pass times and tokens.
* ``summary.json`` and ``table.md``: the aggregate, rewritten at the end.

Samples run through the batched engine in chunks of `batch_size`: each sampler runs the chunk as one batch, then
the next sampler the same chunk (the order rotates from chunk to chunk), so machine noise hits all rows alike.
Sample i of a task is generated with seed ``seed * 1_000_003 + i`` whatever the batch or worker, and a request's
tokens do not depend on its batch, so batch sizes and sharded runs (`depthwave.eval.distributed`) give the
per-sample results of a one-at-a-time run. tokens/s is the batches' aggregate: generated tokens after each
request's first (which its prefill produces) over the wall time of the decode passes (host clock after the step's
synchronisation); the prefill is reported separately (median per request).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from depthwave.engine.selection import SamplingParams
from depthwave.errors import DepthwaveError, InvalidParameterError, make_output_folder
from depthwave.eval.tasks import Sample, Task, get_task
from depthwave.samplers.registry import SamplerSpec

RECORDS_FILE = "samples.jsonl"
BATCHES_FILE = "batches.jsonl"
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation run. `data`: per-task data file/folder (default: the task's own source). `chat`: None =
    each task's preference when the model has a chat template. `max_new_tokens`: None = each task's default."""

    model: str = "builtin"
    tasks: tuple[str, ...] = ("arithmetic",)
    samplers: tuple[SamplerSpec, ...] = (SamplerSpec("static", {}),)
    limit: int | None = None
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    chat: bool | None = None
    system: str | None = None
    data: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    dtype: str = "auto"
    threads: int | None = None
    batch_size: int = 64
    compile: bool = False
    """Compiled decode passes (`EngineConfig.compile`): the same tokens to float tolerance, a speed setting."""

    def __post_init__(self) -> None:
        # Checked here, before a run writes settings.json, so that a corrected rerun is not refused.
        require_int(self.batch_size, "batch_size")
        if self.threads is not None:
            require_int(self.threads, "threads")
        if self.max_new_tokens is not None:
            require_int(self.max_new_tokens, "max_new_tokens")
        SamplingParams(temperature=self.temperature)  # SamplingParams' own check, before anything is written
        if self.device is not None:
            from depthwave.runtime import resolve_device

            resolve_device(self.device)
        if not self.tasks:
            raise InvalidParameterError("give at least one task")
        if self.limit is not None and self.limit < 1:
            raise InvalidParameterError(f"limit must be None or >= 1, got {self.limit}")
        unknown = set(self.data) - set(self.tasks)
        if unknown:
            raise InvalidParameterError(f"data given for tasks not in the run: {sorted(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["samplers"] = [asdict(s) for s in self.samplers]
        out["tasks"] = list(self.tasks)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["samplers"] = tuple(SamplerSpec(**s) for s in values.get("samplers", ()))
        values["tasks"] = tuple(values.get("tasks", ()))
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """What must match for a resumed run to continue an earlier one (not device, threads, batch size or limit:
        they change the speed, not the results)."""
        out = self.to_dict()
        for key in ("device", "threads", "limit", "batch_size", "compile"):
            out.pop(key, None)
        return out


def sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


class Evaluator:
    """A loaded model with its tasks and samplers: runs chunks of samples through the engine, a batch per sampler."""

    def __init__(self, settings: EvalSettings) -> None:
        from depthwave.llm import LLM

        self.settings = settings
        dtype = None if settings.dtype == "auto" else settings.dtype
        self.llm = LLM(
            settings.model,
            device=settings.device,
            dtype=dtype,
            max_num_seqs=settings.batch_size,
            threads=settings.threads,
            compile=settings.compile,
        )
        self.tasks: dict[str, Task] = {name: get_task(name) for name in settings.tasks}
        self.samplers = {spec.label: spec.build(family=self.llm.model.config) for spec in settings.samplers}
        self.has_template = bool(self.llm.tokenizer is not None and self.llm.tokenizer.chat_template)
        self.batches = 0

    def uses_chat(self, task: Task) -> bool:
        chat = self.settings.chat
        if chat is None:
            return task.prefers_chat and self.has_template
        return chat

    def prompt_ids(self, task: Task, sample: Sample) -> list[int]:
        if self.uses_chat(task):
            messages = task.messages(sample)
            if self.settings.system is not None:
                messages = [m for m in messages if m["role"] != "system"]
                messages.insert(0, {"role": "system", "content": self.settings.system})
            return self.llm.encode_messages(messages)
        return self.llm.encode(task.plain_prompt(sample))

    def run_chunk(self, chunk: list[Work], turn: int, emit: Callable[[list[dict]], None]) -> list[dict[str, Any]]:
        """Every sampler (but those a sample has done) on a chunk of one task's samples, a batch per sampler, the
        sampler order rotated by `turn`. Records go to `emit` as requests finish; returns one line per batch."""
        from depthwave.engine import Request
        from depthwave.samplers import SamplingParams

        s = self.settings
        task_name = chunk[0][0]
        task = self.tasks[task_name]
        chat = self.uses_chat(task)
        labels = list(self.samplers)
        labels = labels[turn % len(labels) :] + labels[: turn % len(labels)]
        prepared = []
        for _, index, sample, skip in chunk:
            base = {"task": task_name, "sample_id": sample.id, "index": index}
            try:
                ids = self.prompt_ids(task, sample)
                params = SamplingParams(
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    max_new_tokens=s.max_new_tokens or task.default_max_new_tokens,
                    stop=task.stops(chat),
                    seed=sample_seed(s.seed, index),
                )
            except DepthwaveError as exc:
                emit([failed({**base, "sampler": label}, exc) for label in labels if label not in skip])
                continue
            prepared.append((base, sample, ids, params, skip))
        lines = []
        for label in labels:
            requests, owners = [], {}
            for base, sample, ids, params, skip in prepared:
                if label in skip:
                    continue
                request = Request(ids, params, self.samplers[label])
                try:  # e.g. a prompt longer than the model's context: recorded, the run goes on
                    self.llm.check(request)
                except DepthwaveError as exc:
                    emit([failed({**base, "sampler": label, "prompt_tokens": len(ids)}, exc)])
                    continue
                requests.append(request)
                owners[request.request_id] = (base, sample)
            if requests:
                lines.append(self._batch(task_name, chat, label, requests, owners, emit))
        return lines

    def _batch(
        self, task_name: str, chat: bool, label: str, requests: list, owners: dict, emit: Callable
    ) -> dict[str, Any]:
        """One sampler on one chunk: records as requests finish, and the batch's line."""
        task = self.tasks[task_name]
        self.batches += 1
        batch_id = f"{os.getpid()}-{self.batches}"

        def record(output: Any) -> None:
            result = output.result
            if result is None:
                return
            base, sample = owners[result.request_id]
            text = result.text if result.text is not None else ""
            score = task.score(sample, text, chat=chat)
            stats = result.stats
            emit(
                [
                    {
                        **base,
                        "sampler": label,
                        "correct": bool(score.correct),
                        "extracted": score.extracted,
                        "details": score.details,
                        "completion": text,
                        "finish_reason": result.finish_reason,
                        "prompt_tokens": stats.prompt_tokens,
                        "generated_tokens": stats.generated_tokens,
                        "prefill_s": stats.prefill_time_s,
                        "decode_s": stats.decode_time_s,
                        "core_steps_per_token": stats.core_steps_per_token,
                        "token_ids": result.token_ids,
                        "batch": batch_id,
                    }
                ]
            )

        _, totals = self.llm.run_with_stats(requests, progress=False, on_output=record)
        return {
            "batch": batch_id,
            "task": task_name,
            "sampler": label,
            "requests": len(requests),
            "max_num_seqs": self.settings.batch_size,
            "decode_s": totals.decode_time_s,
            "prefill_s": totals.prefill_time_s,
            "decoded_tokens": totals.decoded_tokens,
            "generated_tokens": totals.generated_tokens,
        }


Work = tuple[str, int, Sample, set[str]]


def require_int(value: Any, name: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")


def chunks(work: list[Work], size: int) -> Iterator[list[Work]]:
    """Consecutive samples of the same task, at most `size` at a time."""
    chunk: list[Work] = []
    for item in work:
        if chunk and (len(chunk) == size or chunk[0][0] != item[0]):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def failed(record: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """The record of a sample that could not be generated: scored wrong, with the error, no timing."""
    return {
        "correct": False,
        "extracted": None,
        "details": {},
        "completion": "",
        "finish_reason": "error",
        "prompt_tokens": 0,
        "generated_tokens": 0,
        "prefill_s": 0.0,
        "decode_s": 0.0,
        "core_steps_per_token": 0.0,
        "token_ids": [],
        **record,
        "error": str(exc),
    }


def read_records(folder: Path, name: str = RECORDS_FILE) -> list[dict[str, Any]]:
    """The records (or batch lines) of an output folder; a last line cut short by an interruption is ignored."""
    path = folder / name
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RecordWriter:
    """Appends records to samples.jsonl (or batch lines to batches.jsonl), each line flushed to disk at once."""

    def __init__(self, folder: Path, name: str = RECORDS_FILE) -> None:
        path = folder / name
        # Drop a partial last line that an interruption may have left, so that appended lines start clean.
        if path.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):
                path.write_text(text[: text.rfind("\n") + 1])
        self.file = path.open("a")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def prepare_folder(folder: Path, settings: EvalSettings) -> set[tuple[str, str, str]]:
    """Create or reopen an output folder; returns the (task, sampler, sample id) triples already done."""
    make_output_folder(folder)
    settings_path = folder / SETTINGS_FILE
    if settings_path.is_file():
        earlier = EvalSettings.from_dict(json.loads(settings_path.read_text()))
        if earlier.identity() != settings.identity():
            raise InvalidParameterError(
                f"{folder} holds a run with other settings ({settings_path}); resume it with the same model, tasks, "
                "samplers, sampling and seed, or choose another --out"
            )
    settings_path.write_text(json.dumps(settings.to_dict(), indent=1))
    return {(r["task"], r["sampler"], r["sample_id"]) for r in read_records(folder)}


def pending_work(
    tasks: dict[str, list[Sample]], labels: list[str], done: set[tuple[str, str, str]]
) -> Iterator[tuple[str, int, Sample, set[str]]]:
    """(task, index, sample, samplers already done for it) for every sample with something left to run."""
    for task_name, samples in tasks.items():
        for index, sample in enumerate(samples):
            skip = {label for label in labels if (task_name, label, sample.id) in done}
            if len(skip) < len(labels):
                yield task_name, index, sample, skip


def load_samples(settings: EvalSettings, tasks: dict[str, Task]) -> dict[str, list[Sample]]:
    return {name: task.load(settings.data.get(name), settings.limit) for name, task in tasks.items()}


def run_eval(
    settings: EvalSettings,
    folder: Path,
    workers: int = 1,
    ray_address: str | None = None,
    on_records: Callable[[list[dict[str, Any]]], None] | None = None,
    on_batches: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) an evaluation into `folder`; returns the summary. `on_records` sees each sample's record
    as its request finishes, `on_batches` each finished batch's line (its aggregate decode time and tokens).
    `workers` > 1 spreads chunks of samples
    over Ray workers, each with its own model replica (see `depthwave.eval.distributed`)."""
    # The data first: a bad data path fails before the folder is claimed, so the corrected rerun is not refused.
    samples = load_samples(settings, {name: get_task(name) for name in settings.tasks})
    done = prepare_folder(folder, settings)
    labels = [s.label for s in settings.samplers]
    writer, batches = RecordWriter(folder), RecordWriter(folder, BATCHES_FILE)

    def emit(records: list[dict[str, Any]]) -> None:
        writer.write(records)
        if on_records:
            on_records(records)

    def emit_batches(lines: list[dict[str, Any]]) -> None:
        batches.write(lines)
        if on_batches:
            on_batches(lines)

    try:
        work = list(pending_work(samples, labels, done))
        if workers > 1 or ray_address:
            from depthwave.eval.distributed import run_distributed

            gpus = 1 if (settings.device or "").startswith("cuda") else 0
            make_runner = functools.partial(Evaluator, settings)
            for records, lines in run_distributed(
                make_runner, list(chunks(work, settings.batch_size)), workers, ray_address, gpus
            ):
                emit(records)
                emit_batches(lines)
        else:
            evaluator = Evaluator(settings)
            for turn, chunk in enumerate(chunks(work, settings.batch_size)):
                emit_batches(evaluator.run_chunk(chunk, turn, emit))
    finally:
        writer.close()
        batches.close()
    summary = summarize(read_records(folder), settings, read_records(folder, BATCHES_FILE))
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    (folder / TABLE_FILE).write_text(markdown_table(summary))
    return summary


def summarize(
    records: list[dict[str, Any]], settings: EvalSettings, batches: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Accuracy, generated tokens/s, prefill and recurrences per (task, sampler); speedup and accuracy change
    against the baseline: the first sampler whose name is 'static', else the first sampler. tokens/s is the
    batches' aggregate (decoded tokens over decode-pass time); records of an interrupted batch that wrote no batch
    line count for accuracy only."""
    labels = [s.label for s in settings.samplers]
    baseline = next((s.label for s in settings.samplers if s.kind == "static"), labels[0])
    rows = []
    for task in settings.tasks:
        base: dict[str, float] | None = None
        for label in [baseline, *[x for x in labels if x != baseline]]:
            mine = [r for r in records if r["task"] == task and r["sampler"] == label]
            if not mine:
                continue
            ran = [r for r in mine if "error" not in r] or [failed({}, Exception())]
            mine_batches = [b for b in batches or [] if b["task"] == task and b["sampler"] == label]
            if mine_batches:
                decoded = sum(b["decoded_tokens"] for b in mine_batches)
                decode_s = sum(b["decode_s"] for b in mine_batches)
            else:  # a run from before batching: one request at a time
                decoded = sum(max(r["generated_tokens"] - 1, 0) for r in ran)
                decode_s = sum(r["decode_s"] for r in ran)
            row = {
                "task": task,
                "sampler": label,
                "samples": len(mine),
                "errors": len(mine) - len([r for r in mine if "error" not in r]),
                "accuracy": sum(r["correct"] for r in mine) / len(mine),
                "tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0,
                "median_prefill_ms": 1e3 * statistics.median(r["prefill_s"] for r in ran),
                "mean_generated_tokens": statistics.mean(r["generated_tokens"] for r in ran),
                "recurrences_per_token": statistics.mean(r["core_steps_per_token"] for r in ran),
            }
            if label == baseline:
                base = row
            if base is not None:
                row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
                row["accuracy_delta"] = row["accuracy"] - base["accuracy"]
            rows.append(row)
    return {"settings": settings.to_dict(), "baseline": baseline, "rows": rows}


def markdown_table(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    lines = [
        f"Model `{settings['model']}`, seed {settings['seed']}, temperature {settings['temperature']}; baseline "
        f"`{summary['baseline']}`, batches of {settings.get('batch_size', 1)}. tokens/s: generated tokens after "
        "each request's first over the batches' decode time (aggregate); prefill ms: median per request, prompt "
        "time up to the first token. "
        "Samples that failed to generate count as wrong (errors column).",
        "",
        "| task | sampler | n | errors | accuracy | Δ acc (pts) | tokens/s | speedup | prefill ms | recur/token |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        speedup = f"{row['speedup']:.2f}×" if row.get("speedup") else "–"
        delta = f"{100 * row['accuracy_delta']:+.1f}" if "accuracy_delta" in row else "–"
        lines.append(
            f"| {row['task']} | `{row['sampler']}` | {row['samples']} | {row['errors']} | "
            f"{100 * row['accuracy']:.1f}% | {delta} | "
            f"{row['tokens_per_s']:.1f} | {speedup} | {row['median_prefill_ms']:.1f} | "
            f"{row['recurrences_per_token']:.1f} |"
        )
    return "\n".join(lines) + "\n"
