"""GSM8K, 8-shot chain of thought exactly as lm-eval's `gsm8k_cot` (task version 3.0): the same exemplars,
prompt, stop strings, answer regexes and normalisation. The chat form is what lm-eval renders with
`--apply_chat_template --fewshot_as_multiturn` and the system instruction of the official Huginn-0125 runs."""

from __future__ import annotations

import re
from pathlib import Path

from depthwave.eval.tasks.base import (
    MATH_SYSTEM_PROMPT,
    Messages,
    Record,
    Sample,
    Score,
    Task,
    hub_file,
    packaged_exemplars,
)

# The 8 exemplars of Wei et al. 2022 as lm-eval's gsm8k-cot.yaml writes them (MIT); provenance in the file.
EXEMPLARS_FILE = "gsm8k_cot_exemplars.json"

STRICT_REGEX = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE_REGEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# lm-eval's exact_match `regexes_to_ignore` for gsm8k_cot, applied in this order to prediction and gold.
_IGNORED = tuple(re.compile(pattern) for pattern in (",", r"\$", r"(?s).*#### ", r"\.$"))


def normalize(answer: str) -> str:
    """An answer as lm-eval's exact_match compares it: without commas, `$`, a `#### ` prefix, a final `.`,
    and in lower case."""
    for pattern in _IGNORED:
        answer = pattern.sub("", answer)
    return answer.lower()


def _regex_pick(regex: re.Pattern[str], text: str, group_select: int) -> str | None:
    # lm-eval's RegexFilter: the `group_select`-th match; for a match of alternatives, its non-empty group.
    matches = regex.findall(text)
    if not matches:
        return None
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), None)
    return None if match is None else match.strip()


def strict_answer(text: str) -> str | None:
    """The first `The answer is N.` (lm-eval's "strict-match" filter), normalised."""
    answer = _regex_pick(STRICT_REGEX, text, 0)
    return None if answer is None else normalize(answer)


def flexible_answer(text: str) -> str | None:
    """The last number in the text (lm-eval's "flexible-extract" filter), normalised."""
    answer = _regex_pick(FLEXIBLE_REGEX, text, -1)
    return None if answer is None else normalize(answer)


def _turn(question: str) -> str:
    return f"Q: {question}\nA:"


class GSM8KTask(Task):
    name = "gsm8k"
    # lm-eval's default generation budget (gsm8k_cot sets none); its chains of thought take about 100-200 tokens.
    default_max_new_tokens = 256
    stop_strings = ("Q:", "</s>", "<|im_end|>")
    data_files = ("test.jsonl", "main/test-*.parquet", "test-*.parquet")

    def default_files(self) -> list[Path]:
        return [hub_file("openai/gsm8k", "main/test-00000-of-00001.parquet")]

    def make_samples(self, records: list[Record]) -> list[Sample]:
        return [self._sample(index, record) for index, record in enumerate(records)]

    def _sample(self, index: int, record: Record) -> Sample:
        solution = record.get("answer")
        if "####" not in solution:
            raise record.error("field 'answer' has no final '#### N' line")
        gold = normalize(solution.split("####")[-1].strip())
        return Sample(f"gsm8k/{index:04d}", record.get("question"), gold, {"solution": solution})

    def messages(self, sample: Sample) -> Messages:
        messages = [{"role": "system", "content": MATH_SYSTEM_PROMPT}]
        for exemplar in packaged_exemplars(EXEMPLARS_FILE):
            messages.append({"role": "user", "content": _turn(exemplar["question"])})
            messages.append({"role": "assistant", "content": exemplar["target"]})
        messages.append({"role": "user", "content": _turn(sample.question)})
        return messages

    def plain_prompt(self, sample: Sample) -> str:
        # lm-eval's defaults: " " between a question turn and its target, "\n\n" between exemplars.
        shots = "".join(f"{_turn(e['question'])} {e['target']}\n\n" for e in packaged_exemplars(EXEMPLARS_FILE))
        return shots + _turn(sample.question)

    def score_text(self, sample: Sample, text: str) -> Score:
        strict, flexible = strict_answer(text), flexible_answer(text)
        details = {
            "strict": strict == sample.reference,
            "flexible": flexible == sample.reference,
            "strict_answer": strict,
            "flexible_answer": flexible,
        }
        return Score(details["strict"], strict, details)
