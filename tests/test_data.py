"""The arithmetic word problems (determinism, correctness, disjoint splits) and the tokenizer trained on them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from depthwave.data.arithmetic import (
    SPLITS,
    TEMPLATES,
    extract_answer,
    make_split,
    split_of,
    train_batch,
    write_test_set,
)
from depthwave.data.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    question_prompt,
    render_chat,
    save_tokenizer_files,
    special_token_ids,
    stop_token_ids,
    train_arithmetic_tokenizer,
)
from depthwave.model.tokenizer import Tokenizer as ModelTokenizer
from depthwave.model.tokenizer import default_stop_ids

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return train_arithmetic_tokenizer()


# ---- generator -------------------------------------------------------------------------------------------------
def test_splits_are_deterministic_and_depend_on_the_seed() -> None:
    first = make_split("test", 40, seed=0)
    assert first == make_split("test", 40, seed=0)
    assert [p.question for p in first] != [p.question for p in make_split("test", 40, seed=1)]
    assert train_batch(0, 7, 16) == train_batch(0, 7, 16)
    assert train_batch(0, 7, 16) != train_batch(0, 8, 16)


def test_every_step_of_every_solution_is_correct_arithmetic() -> None:
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    problems = make_split("validation", 300) + train_batch(0, 0, 300)
    for problem in problems:
        lines = problem.solution.split("\n")
        assert lines[-1] == f"The answer is {problem.answer}."
        assert len(lines) >= 3, "at least two steps before the answer"
        results = []
        for line in lines[:-1]:
            (a, op, b, c), *rest = EQUATION.findall(line)
            assert not rest
            if op == "/":
                assert int(a) % int(b) == 0
            assert ops[op](int(a), int(b)) == int(c), line
            results.append(int(c))
        assert results[-1] == problem.answer >= 0
        assert extract_answer(problem.solution) == problem.answer


def test_problems_need_carries_and_cover_every_template() -> None:
    problems = make_split("test", 500)
    assert {p.template for p in problems} == set(TEMPLATES)
    equations = [eq for p in problems for eq in EQUATION.findall(p.solution)]
    carries = sum(1 for a, op, b, _ in equations if op == "+" and int(a[-1]) + int(b[-1]) >= 10)
    borrows = sum(1 for a, op, b, _ in equations if op == "-" and int(a[-1]) < int(b[-1]))
    three_digit = sum(1 for *_, c in equations if len(c) >= 3)
    assert carries > 100
    assert borrows > 100
    assert three_digit > len(problems)


def test_splits_are_disjoint_by_question_and_by_arithmetic() -> None:
    held_out = {split: make_split(split, 500 if split == "test" else 200) for split in ("validation", "test")}
    train = [p for step in range(40) for p in train_batch(0, step, 64)]
    sets = {"train": train, **held_out}
    for split, problems in sets.items():
        assert all(split_of(p) == split for p in problems)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not {p.question for p in sets[a]} & {p.question for p in sets[b]}
                assert not {(p.template, p.skeleton) for p in sets[a]} & {(p.template, p.skeleton) for p in sets[b]}
    for split in ("validation", "test"):
        assert len({p.question for p in held_out[split]}) == len(held_out[split])


def test_the_split_of_a_problem_ignores_names_and_objects() -> None:
    problem = make_split("test", 1)[0]
    renamed = type(problem)("another story", problem.solution, problem.answer, problem.template, problem.skeleton)
    assert split_of(renamed) == "test"


def test_write_test_set(tmp_path: Path) -> None:
    path = write_test_set(tmp_path / "test.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 500
    assert all(set(r) == {"question", "answer"} for r in records)
    assert records[0]["answer"] == make_split("test", 1)[0].solution
    assert all(extract_answer(r["answer"]) is not None for r in records)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So 3 + 4 = 7.\nThe answer is 7.", 7),
        ("The answer is 1,234.", 1234),
        ("The answer is -5", -5),
        ("The answer is 12.\nThe answer is 13.", 12),
        ("7 apples", None),
        ("The answer is .", None),
    ],
)
def test_extract_answer(text: str, expected: int | None) -> None:
    assert extract_answer(text) == expected


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        make_split("dev", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        train_batch(0, 0, 0)


# ---- tokenizer -------------------------------------------------------------------------------------------------
def test_digits_are_single_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    vocab = tokenizer.get_vocab()
    digit_tokens = {t for t in vocab if any(c in "0123456789" for c in t)}
    assert digit_tokens == set("0123456789")
    encoding = tokenizer.encode("He buys 9 * 47 = 423 pens.")
    assert [t for t in encoding.tokens if t.isdigit()] == ["9", "4", "7", "4", "2", "3"]


def test_round_trip_and_compact_words(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for problem in make_split("validation", 50):
        for text in (problem.question, problem.solution, question_prompt(problem.question)):
            assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    # Every word of the templates is one token (with its leading space); digits and the spaces before numbers
    # are tokens of their own.
    assert tokenizer.encode("She has 22 + 126 = 148 shells.").tokens == [
        "She",
        "Ġhas",
        "Ġ",
        "2",
        "2",
        "Ġ+",
        "Ġ",
        "1",
        "2",
        "6",
        "Ġ=",
        "Ġ",
        "1",
        "4",
        "8",
        "Ġshells",
        ".",
    ]


def test_tokenizer_training_is_deterministic(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert train_arithmetic_tokenizer().to_str() == tokenizer.to_str()
    assert tokenizer.get_vocab_size() <= 1024


def test_special_tokens_and_chat_format(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = special_token_ids(tokenizer)
    assert list(ids) == list(SPECIAL_TOKENS)
    assert stop_token_ids(tokenizer) == [ids["<|end_text|>"], ids["<|end_turn|>"]]
    prompt = question_prompt("What is 2 + 2?")
    assert prompt == (
        "<|begin_text|><|begin_header|>user<|end_header|>\n\nWhat is 2 + 2?<|end_turn|>"
        "<|begin_header|>Huginn<|end_header|>\n\n"
    )
    assert tokenizer.encode(prompt).tokens[:2] == ["<|begin_text|>", "<|begin_header|>"]
    conversation = render_chat(
        [{"role": "system", "content": " Be brief. "}, {"role": "assistant", "content": "4"}],
        add_generation_prompt=False,
    )
    assert conversation == (
        "<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
        "<|begin_header|>Huginn<|end_header|>\n\n4<|end_turn|><|end_text|>"
    )


def test_saved_files_load_through_the_model_tokenizer(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    save_tokenizer_files(tokenizer, tmp_path, model_max_length=256)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["eos_token"] == "<|end_text|>"
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == stop_token_ids(tokenizer)

    loaded = ModelTokenizer(tmp_path)
    question = make_split("test", 1)[0].question
    rendered = loaded.apply_chat_template([{"role": "user", "content": question}])
    assert rendered == question_prompt(question)
    assert loaded.encode(rendered) == tokenizer.encode(question_prompt(question)).ids
    from depthwave.model.config import HuginnConfig

    stops = default_stop_ids(tmp_path, HuginnConfig(vocab_size=tokenizer.get_vocab_size()), loaded)
    assert set(stop_token_ids(tokenizer)) <= set(stops)
