"""The task interface shared by every benchmark (samples, scores, prompts) and the helpers the tasks share:
reading JSONL/parquet data files, fetching a data file from the Hugging Face hub, cutting completions at stop
strings, pulling code out of a completion and running it in the sandbox."""

from __future__ import annotations

import gzip
import importlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from depthwave.errors import DepthwaveError, InvalidParameterError

if TYPE_CHECKING:
    from depthwave.eval.sandbox import SandboxLimits

Messages = list[dict[str, str]]
"""Chat messages {"role": "system" | "user" | "assistant", "content": ...}."""

# The system prompt of the official Huginn-0125 math evaluations (lm-eval with the chat template).
MATH_SYSTEM_PROMPT = "You are a helpful assistant that can assist users with mathematical reasoning."

EVAL_EXTRA_HINT = "install the evaluation extra: pip install 'depthwave[eval]'"


class TaskDataError(DepthwaveError, ValueError):
    """A task's data file cannot be found, read, downloaded or parsed."""


class MissingDependencyError(DepthwaveError, ImportError):
    """An optional package that a task needs is not installed."""


@dataclass(frozen=True)
class Sample:
    id: str
    """Stable id, e.g. "gsm8k/0017" or "HumanEval/3"."""
    question: str
    """The problem as shown to the model, without few-shot exemplars."""
    reference: Any
    """The gold answer (str) or, for code, a dict with what the scorer needs (tests, entry point...)."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    correct: bool
    extracted: str | None
    """The answer the scorer read from the completion; None if it found none."""
    details: dict[str, Any] = field(default_factory=dict)


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or fail with an error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{purpose} needs the package {module!r} ({exc}); {EVAL_EXTRA_HINT}") from None


@dataclass(frozen=True)
class Record:
    """One row of a data file and where it came from, so that a bad row is reported by file and line."""

    data: dict[str, Any]
    where: str

    def get(self, name: str, kind: type = str) -> Any:
        if name not in self.data or self.data[name] is None:
            raise TaskDataError(f"{self.where}: missing field {name!r}")
        value = self.data[name]
        if not isinstance(value, kind):
            raise TaskDataError(f"{self.where}: field {name!r} should be {kind.__name__}, not {type(value).__name__}")
        return value

    def get_str_list(self, name: str) -> list[str]:
        value = self.get(name, list)
        if not all(isinstance(item, str) for item in value):
            raise TaskDataError(f"{self.where}: field {name!r} should be a list of strings")
        return value

    def error(self, message: str) -> TaskDataError:
        return TaskDataError(f"{self.where}: {message}")


def read_records(path: Path) -> list[Record]:
    """The rows of a .jsonl, .jsonl.gz or .parquet file."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _read_parquet(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path)
    raise TaskDataError(f"{path}: unsupported file type; expected .jsonl, .jsonl.gz or .parquet")


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskDataError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(data, dict):
                    raise TaskDataError(f"{where}: expected a JSON object, got {type(data).__name__}")
                records.append(Record(data, where))
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"cannot read {path}: {exc}") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    parquet = require("pyarrow.parquet", f"reading {path}")
    try:
        rows = parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise TaskDataError(f"cannot read {path} as parquet: {exc}") from None
    return [Record(row, f"{path}, row {number}") for number, row in enumerate(rows, start=1)]


def hub_file(repo_id: str, filename: str) -> Path:
    """A data file of a Hugging Face hub dataset repo, downloaded or found in the local hub cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from depthwave.hub import quiet_hub

    source = f"{filename} of the dataset {repo_id}"
    try:
        with quiet_hub():
            return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except LocalEntryNotFoundError:
        raise TaskDataError(
            f"could not fetch {source} from the Hugging Face hub: the hub is unreachable (offline) and the file is "
            "not in the local hub cache; pass a local data file or folder instead (path=...)"
        ) from None
    except Exception as exc:  # unknown repo or file, gated repo, HTTP errors, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TaskDataError(
            f"could not fetch {source} from the Hugging Face hub: {reason}; pass a local data file or folder instead"
        ) from None


@cache
def packaged_exemplars(filename: str) -> tuple[dict[str, Any], ...]:
    """The few-shot exemplars of a JSON file shipped beside this module (its "exemplars" list)."""
    return tuple(json.loads(Path(__file__).with_name(filename).read_text(encoding="utf-8"))["exemplars"])


def truncate(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((index for stop in stops if stop and (index := text.find(stop)) >= 0), default=len(text))
    return text[:cut]


class Task(ABC):
    """A benchmark: its data, its prompts in chat and plain (completion) form, and its scorer."""

    name: ClassVar[str]
    default_max_new_tokens: ClassVar[int]
    stop_strings: ClassVar[tuple[str, ...]]
    """Text at which a completion of the plain prompt is cut, in addition to the model's stop tokens."""
    chat_stop_strings: ClassVar[tuple[str, ...] | None] = None
    """The same for a completion of the chat messages, where it differs (None: `stop_strings`)."""
    prefers_chat: ClassVar[bool] = True
    """Whether to prompt with `messages` when the model has a chat template; False where `plain_prompt` is
    already in the model's chat format."""
    data_files: ClassVar[tuple[str, ...]]
    """Glob patterns, in order of preference, for the task's data file(s) inside a folder given to `load`."""

    def load(self, path: str | Path | None = None, limit: int | None = None) -> list[Sample]:
        """The samples of a local .jsonl/.jsonl.gz/.parquet file, of the usual file(s) in a folder, or (None) of
        the task's default source; the first `limit` of them when given."""
        if limit is not None and limit < 0:
            raise InvalidParameterError(f"limit must be >= 0, got {limit}")
        files = self.default_files() if path is None else self._files_in(Path(path).expanduser())
        samples = self.make_samples([record for file in files for record in read_records(file)])
        if not samples:
            raise TaskDataError(f"no {self.name} samples in {', '.join(map(str, files))}")
        return samples if limit is None else samples[:limit]

    def _files_in(self, path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise TaskDataError(f"{path} does not exist")
        for pattern in self.data_files:
            found = sorted(file for file in path.glob(pattern) if file.is_file())
            if found:
                return found
        raise TaskDataError(f"no {self.name} data file in {path}: looked for {', '.join(self.data_files)}")

    @abstractmethod
    def default_files(self) -> list[Path]:
        """The data file(s) `load` reads when given no path."""

    @abstractmethod
    def make_samples(self, records: list[Record]) -> list[Sample]:
        """Samples from the rows of the data file(s), in order."""

    @abstractmethod
    def messages(self, sample: Sample) -> Messages:
        """The chat form: a system prompt where the convention has one, few-shot exemplars as alternating user
        and assistant turns, then the question as the last user turn."""

    @abstractmethod
    def plain_prompt(self, sample: Sample) -> str:
        """The plain (completion) form, as lm-eval renders it without a chat template."""

    def stops(self, chat: bool) -> tuple[str, ...]:
        """The stop strings of a completion of the chat (`chat=True`) or the plain prompt."""
        return self.stop_strings if not chat or self.chat_stop_strings is None else self.chat_stop_strings

    def score(self, sample: Sample, completion: str, *, chat: bool = False) -> Score:
        """Score the generated text (without the prompt) of the chat (`chat=True`) or the plain prompt. The text
        is first cut at its first stop string: a sampler may run past where generation should have ended."""
        return self.score_text(sample, truncate(completion, self.stops(chat)))

    @abstractmethod
    def score_text(self, sample: Sample, text: str) -> Score:
        """Score a completion already cut at its first stop string."""


_FENCED = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def code_block(text: str) -> str | None:
    """The body of the first ``` fenced block (a block left open, as by the token budget, runs to the end), or
    None when there is none."""
    match = _FENCED.search(text)
    return match.group(1) if match else None


class CodeTask(Task):
    """A task scored by running the extracted program against its tests in the sandbox (pass@1)."""

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits

    @abstractmethod
    def program_and_tests(self, sample: Sample, text: str) -> tuple[str, str]:
        """The program to run (the model's code and what it needs) and the test code to run after it."""

    def score_text(self, sample: Sample, text: str) -> Score:
        # Imported here: the sandbox is only needed once scoring starts.
        from depthwave.eval.sandbox import SandboxLimits, run_tests

        program, tests = self.program_and_tests(sample, text)
        result = run_tests(program, tests, self.limits if self.limits is not None else SandboxLimits())
        return Score(result.status == "pass", program, {"status": result.status, "reason": result.reason})
