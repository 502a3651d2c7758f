"""MATH-500, zero-shot: the model is asked to reason step by step and to put its final answer in \\boxed{}
(the instruction of the Qwen/DeepSeek math evaluations); the chat form adds the system prompt of the official
Huginn-0125 math runs. The answer is the last \\boxed{...} of the completion, else the last "final answer is X" or
"the answer is X", and it is compared with the gold `answer` by math-verify, which decides equivalence
symbolically (fractions and decimals, \\dfrac, `x=3` against `3`, intervals, \\text{} units, ...)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import ModuleType

from depthwave.eval.tasks.base import (
    MATH_SYSTEM_PROMPT,
    Messages,
    Record,
    Sample,
    Score,
    Task,
    hub_file,
    require,
)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_BOXED = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_IS = re.compile(r"(?:final answer|the answer) is:?\s*(.+?)\s*(?:\.(?:\s|$)|\n|$)", re.IGNORECASE)


def _braced(text: str, start: int) -> str | None:
    """The content of the balanced {...} group opening at `start`, or None when it never closes."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (or \\fbox{...}, or `\\boxed 5`), braces balanced."""
    for match in reversed(list(_BOXED.finditer(text))):
        rest = match.end()
        if text.startswith("{", rest):
            content = _braced(text, rest)
            if content is not None:
                return content
        elif text.startswith(" ", rest):
            # `\boxed 5`: the argument runs to the end of the math.
            content = re.split(r"[$\n]", text[rest + 1 :], maxsplit=1)[0].strip()
            if content:
                return content
    return None


def answer_is(text: str) -> str | None:
    """The X of the last "final answer is X" or "the answer is X", without surrounding `$`."""
    matches = _ANSWER_IS.findall(text)
    if not matches:
        return None
    return matches[-1].strip().strip("$").strip() or None


def _timeout() -> int | None:
    # math-verify bounds each parse and comparison with signal.alarm, which only works in the main thread;
    # elsewhere math-verify raises unless the bound is switched off.
    return 5 if threading.current_thread() is threading.main_thread() else None


class Math500Task(Task):
    name = "math500"
    default_max_new_tokens = 1024
    # The minerva_math stop; a chat model ends with its end-of-turn token.
    stop_strings = ("Problem:", "</s>", "<|im_end|>")
    data_files = ("test.jsonl", "test-*.parquet", "*/test-*.parquet")

    def __init__(self) -> None:
        # Checked here rather than when scoring, so that a missing checker fails before any generation.
        self._math_verify: ModuleType = require("math_verify", "scoring MATH-500")

    def default_files(self) -> list[Path]:
        return [hub_file("HuggingFaceH4/MATH-500", "test.jsonl")]

    def make_samples(self, records: list[Record]) -> list[Sample]:
        return [self._sample(index, record) for index, record in enumerate(records)]

    def _sample(self, index: int, record: Record) -> Sample:
        keys: tuple[str, ...] = ("unique_id", "subject", "level", "solution")
        meta = {key: record.data[key] for key in keys if key in record.data}
        return Sample(f"math500/{index:04d}", record.get("problem"), record.get("answer"), meta)

    def messages(self, sample: Sample) -> Messages:
        return [
            {"role": "system", "content": MATH_SYSTEM_PROMPT},
            {"role": "user", "content": f"{sample.question}\n{INSTRUCTION}"},
        ]

    def plain_prompt(self, sample: Sample) -> str:
        return f"Problem:\n{sample.question}\n{INSTRUCTION}\n\nSolution:"

    def equivalent(self, gold: str, answer: str) -> bool:
        """Whether math-verify finds the two LaTeX answers equal."""
        parse, verify, timeout = self._math_verify.parse, self._math_verify.verify, _timeout()
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        answer_parsed = parse(f"${answer}$", parsing_timeout=timeout)
        return bool(gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=timeout))

    def score_text(self, sample: Sample, text: str) -> Score:
        boxed = last_boxed(text)
        answer = boxed.strip() if boxed is not None else answer_is(text)
        correct = answer is not None and self.equivalent(sample.reference, answer)
        source = "boxed" if boxed is not None else "answer is" if answer is not None else None
        return Score(correct, answer, {"source": source})
