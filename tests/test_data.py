"""The arithmetic word problems (determinism, correctness, disjoint splits) and the tokenizer trained on them."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from depthwave.data import arithmetic, pools
from depthwave.data.arithmetic import (
    SPLITS,
    TEMPLATES,
    TRAIN_SURFACE,
    UNSEEN_SURFACE,
    WIDE_TEMPLATES,
    Wordings,
    extract_answer,
    iter_train,
    make_split,
    make_unseen,
    split_of,
    train_batch,
    write_test_set,
    write_unseen_set,
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
    problems += train_batch(0, 0, 600, "wide") + make_unseen(300)
    for problem in problems:
        lines = problem.solution.split("\n")
        assert lines[-1] == f"The answer is {problem.answer}."
        bare = problem.template.startswith("bare_")
        assert len(lines) >= (2 if bare else 3), "two steps before the answer, one for bare arithmetic"
        results = []
        for line in lines[:-1]:
            if " + " in line and " * " in line:  # "17 * 24 = 17 * 20 + 17 * 4.": the split of a product
                a, b, a2, tens, a3, units = map(int, re.findall(r"\d+", line))
                assert a == a2 == a3 and tens % 10 == 0 and 0 < units < 10 and tens + units == b
                continue
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


# ---- the wide distribution and the unseen set --------------------------------------------------------------------
def _whole_words(texts: list[str]) -> set[str]:
    return {word for text in texts for word in re.findall(r"[^\W\d_]+(?:'s)?", text)}


def test_the_classic_problems_are_those_of_the_first_generator() -> None:
    """The wide distribution must leave the classic stream untouched: the shipped test set and the first
    built-in model's training batches are fixed by it. These questions were written by the first generator."""
    assert (
        make_split("test", 1)[0].question
        == json.loads(
            (Path(arithmetic.__file__).parents[1] / "assets" / "arithmetic" / "test.jsonl").read_text().splitlines()[0]
        )["question"]
    )
    classic = train_batch(0, 0, 64)
    assert {p.template for p in classic} <= set(TEMPLATES)
    names = {name for name, _ in arithmetic.CLASSIC.people}
    assert len(names) == 12 and all(any(n in p.question for n in names) or p.template == "days" for p in classic)


def test_wide_training_covers_every_kind_with_many_words_and_wordings() -> None:
    problems = [p for step in range(30) for p in train_batch(0, step, 64, "wide")]
    assert {p.template for p in problems} == set(WIDE_TEMPLATES)
    bare = [p for p in problems if p.template.startswith("bare_")]
    assert 0.15 < len(bare) / len(problems) < 0.40
    names = {name for name, _ in TRAIN_SURFACE.people if any(name in p.question for p in problems)}
    assert len(names) > 200, "no name recurs often: hundreds are used"
    assert len(TRAIN_SURFACE.things) > 150 and len(TRAIN_SURFACE.people) > 300
    languages = {"Joaquín", "Zeynep", "Priya", "Chidi", "Yuki", "Olga", "Łukasz", "Ingrid"}
    assert len(languages & {n for n, _ in pools.PEOPLE}) == len(languages)
    # Several wordings per template, and numbers told out of order: in "earnings" the amount spent comes
    # first and is used last.
    for template in ("containers", "savings", "shopping", "days", "sharing"):
        wordings = {re.sub(r"\d+", "N", p.question.split(".")[0]) for p in problems if p.template == template}
        assert len(wordings) > 5, template
    earnings = next(p for p in problems if p.template == "earnings")
    rate, hours, spent = earnings.skeleton
    assert earnings.question.index(str(spent)) < earnings.question.index(f" {rate} ")
    assert earnings.solution.index(f"{rate} * {hours}") < earnings.solution.index(f"- {spent} ")


def test_unseen_words_and_wordings_never_occur_in_training() -> None:
    for field in ("people", "things", "shop_items", "purchases", "containers", "shops", "activities"):
        train, held = set(getattr(TRAIN_SURFACE, field)), set(getattr(UNSEEN_SURFACE, field))
        assert held and not train & held, field
    held_words = (
        {name for name, _ in UNSEEN_SURFACE.people}
        | {w for pool in ("things", "shop_items", "purchases", "containers") for w in getattr(UNSEEN_SURFACE, pool)}
        | {verb for verb, _, _ in UNSEEN_SURFACE.activities}
    )
    train_texts = [t for p in itertools.islice(iter_train(0, "wide"), 6000) for t in (p.question, p.solution)]
    assert not held_words & _whole_words(train_texts)
    assert not any(f" {shop} " in text or f" {shop}." in text for shop in UNSEEN_SURFACE.shops for text in train_texts)
    # Wordings: every problem records the wording it was told with, and renders from it.
    wordings = [w for w in vars(arithmetic).values() if isinstance(w, Wordings)]
    assert len(wordings) >= 9 and all(w.held_out and not set(w.held_out) & set(w.train) for w in wordings)
    held_out = {w for ws in wordings for w in ws.held_out}
    train = list(itertools.islice(iter_train(0, "wide"), 6000))
    assert not {p.wording for p in train} & held_out
    assert len({p.wording for p in train}) > 150
    unseen = make_unseen(500)
    assert {p.wording for p in unseen} <= held_out
    for problem in [*train[:300], *unseen[:100]]:
        pattern = re.escape(problem.wording)
        pattern = re.sub(r"\\\{\w+\\\}", lambda m: ".+", pattern)
        assert re.fullmatch(pattern, problem.question), (problem.wording, problem.question)


def test_unseen_problems_hold_out_their_arithmetic_by_hash() -> None:
    unseen = make_unseen(500)
    assert len({p.question for p in unseen}) == 500
    assert all(split_of(p) == "test" for p in unseen)
    bare = [p for p in unseen if p.template.startswith("bare_")]
    assert len(bare) >= 100 and {p.template for p in bare} == {"bare_add", "bare_sub", "bare_mul", "bare_div"}
    train_pairs = {(p.template, p.skeleton) for p in itertools.islice(iter_train(0, "wide"), 20000)}
    assert not train_pairs & {(p.template, p.skeleton) for p in unseen}


def test_unseen_questions_split_into_tokens_seen_in_training() -> None:
    """The model keeps the first built-in tokenizer: an unseen name falls apart into pieces (down to bytes), and
    every piece of every unseen question must be one that training text produces."""
    tokenizer = ModelTokenizer(Path(arithmetic.__file__).parents[1] / "assets" / "builtin")
    seen = {
        token
        for p in itertools.islice(iter_train(0, "wide"), 20000)
        for token in tokenizer.encode(f"{p.question}\n\n{p.solution}", add_special_tokens=False)
    }
    unseen = {token for p in make_unseen(500) for token in tokenizer.encode(p.question, add_special_tokens=False)}
    assert unseen <= seen, [tokenizer.decode([t]) for t in unseen - seen]
    pieces = tokenizer.encode("Leo has 45 marbles.", add_special_tokens=False)
    assert [tokenizer.decode([t]) for t in pieces][:3] == ["L", "e", "o"]


def test_write_unseen_set(tmp_path: Path) -> None:
    path = write_unseen_set(tmp_path / "unseen.jsonl", count=20)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [set(r) for r in records] == [{"question", "answer", "kind"}] * 20
    assert [r["kind"] for r in records] == [p.template for p in make_unseen(20)]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        make_split("dev", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        train_batch(0, 0, 0)
    with pytest.raises(ValueError, match="distribution"):
        train_batch(0, 0, 4, "broad")  # type: ignore[arg-type]


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
