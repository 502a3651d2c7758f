"""The built-in model's tasks: the shipped arithmetic word problems (depthwave.data.arithmetic), asked as one
user turn in the built-in chat format and scored, as in training, on the first `The answer is N.`.

* `arithmetic`: the classic test set, unchanged since the first built-in model;
* `arithmetic-unseen`: the unseen set, whose names, items, shops, activities and wordings never occur in
  training; each sample keeps its kind (template, or `bare_add` etc. for bare arithmetic)."""

from __future__ import annotations

from pathlib import Path

from depthwave.data.arithmetic import MAX_ANSWER_TOKENS, extract_answer
from depthwave.data.tokenizer import END_TURN, question_prompt
from depthwave.eval.tasks.base import Messages, Record, Sample, Score, Task

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "arithmetic"
TEST_SET = ASSETS / "test.jsonl"
UNSEEN_SET = ASSETS / "unseen.jsonl"


class ArithmeticTask(Task):
    name = "arithmetic"
    default_max_new_tokens = MAX_ANSWER_TOKENS
    # For text decoded with its special tokens: a sampler may run on past the end of the turn.
    stop_strings = (END_TURN,)
    # The plain prompt is already the built-in chat format, which the harness encodes as is.
    prefers_chat = False
    data_files = ("test.jsonl",)

    def default_files(self) -> list[Path]:
        return [TEST_SET]

    def make_samples(self, records: list[Record]) -> list[Sample]:
        return [self._sample(index, record) for index, record in enumerate(records)]

    def _sample(self, index: int, record: Record) -> Sample:
        solution = record.get("answer")
        gold = extract_answer(solution)
        if gold is None:
            raise record.error("field 'answer' has no final 'The answer is N.' line")
        meta = {"solution": solution}
        if "kind" in record.data:
            meta["kind"] = record.get("kind")
        return Sample(f"{self.name}/{index:04d}", record.get("question"), str(gold), meta)

    def messages(self, sample: Sample) -> Messages:
        return [{"role": "user", "content": sample.question}]

    def plain_prompt(self, sample: Sample) -> str:
        return question_prompt(sample.question)

    def score_text(self, sample: Sample, text: str) -> Score:
        answer = extract_answer(text)
        extracted = None if answer is None else str(answer)
        return Score(extracted == sample.reference, extracted)


class ArithmeticUnseenTask(ArithmeticTask):
    name = "arithmetic-unseen"
    data_files = ("unseen.jsonl",)

    def default_files(self) -> list[Path]:
        return [UNSEEN_SET]
