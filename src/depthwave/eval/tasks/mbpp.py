"""MBPP, 3-shot as in the MBPP paper (Austin et al. 2021) and lm-eval's `mbpp`: exemplars task_ids 2, 3, 4, the
"You are an expert Python programmer ... [BEGIN]" prompt, code ended by [DONE]; evaluated on the test split
(task_ids 11-510) by pass@1: the code, then the task's `test_setup_code`, then its three `test_list` asserts, run
in the sandbox. The chat form puts each exemplar's prompt and code in a user and an assistant turn, as lm-eval does
with `--apply_chat_template --fewshot_as_multiturn`."""

from __future__ import annotations

from pathlib import Path

from depthwave.eval.tasks.base import CodeTask, Messages, Record, Sample, code_block, hub_file, packaged_exemplars

# Task_ids 2-4 of google-research's mbpp.jsonl (CC-BY-4.0); provenance in the file.
EXEMPLARS_FILE = "mbpp_fewshot.json"
TEST_TASK_IDS = range(11, 511)


def _turn(text: str, tests: list[str]) -> str:
    tests_text = "\n".join(tests)
    return (
        f"You are an expert Python programmer, and here is your task: {text} "
        f"Your code should pass these tests:\n\n{tests_text}\n[BEGIN]\n"
    )


def _target(code: str) -> str:
    return f"{code}\n[DONE]"


class MBPPTask(CodeTask):
    name = "mbpp"
    default_max_new_tokens = 512
    stop_strings = ("[DONE]",)
    data_files = ("mbpp.jsonl", "full/test-*.parquet", "test-*.parquet")

    def default_files(self) -> list[Path]:
        return [hub_file("google-research-datasets/mbpp", "full/test-00000-of-00001.parquet")]

    def make_samples(self, records: list[Record]) -> list[Sample]:
        # A full mbpp.jsonl holds every split; keep the test split.
        return [self._sample(record) for record in records if record.get("task_id", int) in TEST_TASK_IDS]

    def _sample(self, record: Record) -> Sample:
        task_id, tests = record.get("task_id", int), record.get_str_list("test_list")
        reference = {
            "test_list": tests,
            "test_setup_code": record.data.get("test_setup_code") or "",
            "challenge_test_list": record.data.get("challenge_test_list") or [],
        }
        meta = {"task_id": task_id, "text": record.get("text"), "code": record.data.get("code")}
        return Sample(f"mbpp/{task_id}", _turn(record.get("text"), tests), reference, meta)

    def messages(self, sample: Sample) -> Messages:
        messages = []
        for exemplar in packaged_exemplars(EXEMPLARS_FILE):
            messages.append({"role": "user", "content": _turn(exemplar["text"], exemplar["test_list"])})
            messages.append({"role": "assistant", "content": _target(exemplar["code"])})
        messages.append({"role": "user", "content": sample.question})
        return messages

    def plain_prompt(self, sample: Sample) -> str:
        # lm-eval: no delimiter between a prompt and its target, "\n\n" between exemplars.
        shots = "".join(
            f"{_turn(e['text'], e['test_list'])}{_target(e['code'])}\n\n" for e in packaged_exemplars(EXEMPLARS_FILE)
        )
        return shots + sample.question

    def program_and_tests(self, sample: Sample, text: str) -> tuple[str, str]:
        # A chat answer may repeat the prompt's [BEGIN] or put its code in a ``` block.
        code = text.rsplit("[BEGIN]", 1)[-1]
        block = code_block(code)
        program = code.split("```", 1)[0] if block is None else block
        # The setup builds test inputs from the solution's own definitions (e.g. tree nodes), so it runs after it.
        tests = "\n".join([sample.reference["test_setup_code"], *sample.reference["test_list"]])
        return program, tests
