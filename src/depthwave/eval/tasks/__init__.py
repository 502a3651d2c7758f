"""The benchmarks of the evaluation harness, by name: data loading, prompts (chat and plain) and scorers."""

from __future__ import annotations

import inspect
from typing import Any

from depthwave.errors import InvalidParameterError
from depthwave.eval.tasks.arithmetic import ArithmeticTask, ArithmeticUnseenTask
from depthwave.eval.tasks.base import (
    Messages,
    MissingDependencyError,
    Sample,
    Score,
    Task,
    TaskDataError,
)
from depthwave.eval.tasks.gsm8k import GSM8KTask
from depthwave.eval.tasks.humaneval import HumanEvalTask
from depthwave.eval.tasks.math500 import Math500Task
from depthwave.eval.tasks.mbpp import MBPPTask

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (GSM8KTask, Math500Task, HumanEvalTask, MBPPTask, ArithmeticTask, ArithmeticUnseenTask)
}


def get_task(name: str, **options: Any) -> Task:
    """The task `name` (a key of TASKS), built with its constructor options (e.g. `limits` for code tasks)."""
    if name not in TASKS:
        raise InvalidParameterError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise InvalidParameterError(f"bad options for task {name!r}: {exc}") from None
    return cls(**options)


__all__ = [
    "TASKS",
    "ArithmeticTask",
    "ArithmeticUnseenTask",
    "GSM8KTask",
    "HumanEvalTask",
    "MBPPTask",
    "Math500Task",
    "Messages",
    "MissingDependencyError",
    "Sample",
    "Score",
    "Task",
    "TaskDataError",
    "get_task",
]
