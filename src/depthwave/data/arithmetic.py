"""Seeded grade-school arithmetic word problems in the GSM8K answer style.

Every problem is a short story with two to three operations (products of a digit and a two-digit number,
sums and differences with carries and borrows, one exact division), a solution with one equation per line, and
the final line `The answer is N.`.

Splits are a partition of the problem space, not of a list: a problem's split is decided by a hash of its
*skeleton* (template and numbers, the names and objects left out), keyed by the split seed. So a train problem can
never share its question, nor even its arithmetic, with a validation or test problem, however many train
problems are drawn. Within the test and validation splits the problems are also distinct by question text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

# Shares of the skeleton space. Small held-out shares suffice: the smallest template ("sharing") has about
# 38,000 skeletons, the others 2·10^5 to 10^7, so 5% still holds thousands of distinct problems of each.
_SPLIT_BOUNDS: tuple[tuple[Split, float], ...] = (("test", 0.05), ("validation", 0.10), ("train", 1.0))

_ANSWER_LINE = re.compile(r"The answer is (-?[\d,]+)\.?")

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Ana", "she"),
    ("Ben", "he"),
    ("Mia", "she"),
    ("Tom", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Emma", "she"),
    ("Noah", "he"),
    ("Lily", "she"),
    ("Jack", "he"),
    ("Sara", "she"),
    ("Liam", "he"),
)
_THINGS = ("apples", "marbles", "stickers", "cards", "pencils", "cookies", "shells", "stamps", "beads", "eggs")
_SHOP_ITEMS = ("pens", "books", "cups", "hats", "toys", "plates", "shirts", "lamps")
_PURCHASES = ("game", "bike", "coat", "radio", "watch")
_CONTAINERS = ("bags", "boxes", "jars", "packs")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
# (third person, plain form, unit)
_ACTIVITIES = (
    ("reads", "read", "pages"),
    ("runs", "run", "laps"),
    ("writes", "write", "lines"),
    ("folds", "fold", "cranes"),
)


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    """The step-by-step solution; its last line is `The answer is N.`."""
    answer: int
    template: str
    skeleton: tuple[int, ...]
    """The numbers of the problem in template order: with `template`, what decides its split."""

    def to_record(self) -> dict[str, str]:
        """The JSONL schema shared with GSM8K: `answer` is the full solution text."""
        return {"question": self.question, "answer": self.solution}


def _person(rng: random.Random) -> tuple[str, str, str]:
    name, pronoun = rng.choice(_PEOPLE)
    return name, pronoun, pronoun.capitalize()


def _finish(template: str, question: str, steps: list[str], answer: int, numbers: tuple[int, ...]) -> Problem:
    solution = "\n".join([*steps, f"The answer is {answer}."])
    return Problem(question, solution, answer, template, numbers)


def _shopping(rng: random.Random) -> Problem:
    name, _, pron = _person(rng)
    item1, item2 = rng.sample(_SHOP_ITEMS, 2)
    n1, n2 = rng.randint(2, 9), rng.randint(2, 9)
    p1, p2 = rng.randint(11, 99), rng.randint(11, 99)
    cost1, cost2 = n1 * p1, n2 * p2
    question = (
        f"{name} buys {n1} {item1} for {p1} dollars each and {n2} {item2} for {p2} dollars each. "
        f"How many dollars does {name} spend?"
    )
    steps = [
        f"The {item1} cost {n1} * {p1} = {cost1} dollars.",
        f"The {item2} cost {n2} * {p2} = {cost2} dollars.",
        f"{pron} spends {cost1} + {cost2} = {cost1 + cost2} dollars.",
    ]
    return _finish("shopping", question, steps, cost1 + cost2, (n1, p1, n2, p2))


def _containers(rng: random.Random) -> Problem:
    name, pronoun, pron = _person(rng)
    thing, container = rng.choice(_THINGS), rng.choice(_CONTAINERS)
    start, count, size = rng.randint(10, 99), rng.randint(2, 9), rng.randint(11, 99)
    bought = count * size
    total = start + bought
    given = rng.randint(10, total - 1)
    question = (
        f"{name} has {start} {thing}. {pron} buys {count} {container} with {size} {thing} in each. "
        f"Then {pronoun} gives away {given} {thing}. How many {thing} does {name} have now?"
    )
    steps = [
        f"{pron} buys {count} * {size} = {bought} {thing}.",
        f"{pron} has {start} + {bought} = {total} {thing}.",
        f"After giving some away {pronoun} has {total} - {given} = {total - given} {thing}.",
    ]
    return _finish("containers", question, steps, total - given, (start, count, size, given))


def _savings(rng: random.Random) -> Problem:
    name, pronoun, pron = _person(rng)
    purchase = rng.choice(_PURCHASES)
    weekly, weeks = rng.randint(11, 99), rng.randint(2, 9)
    saved = weekly * weeks
    spent = rng.randint(10, saved - 1)
    question = (
        f"{name} saves {weekly} dollars every week for {weeks} weeks. Then {pronoun} spends {spent} "
        f"dollars on a {purchase}. How many dollars does {name} have left?"
    )
    steps = [
        f"{pron} saves {weekly} * {weeks} = {saved} dollars.",
        f"{pron} has {saved} - {spent} = {saved - spent} dollars left.",
    ]
    return _finish("savings", question, steps, saved - spent, (weekly, weeks, spent))


def _days(rng: random.Random) -> Problem:
    thing = rng.choice(_THINGS)
    day1, day2, day3 = rng.sample(_DAYS, 3)
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
    total = a + b + c
    sold = rng.randint(10, total - 1)
    question = (
        f"A shop gets {a} {thing} on {day1}, {b} {thing} on {day2} and {c} {thing} on {day3}. "
        f"It sells {sold} {thing}. How many {thing} are left?"
    )
    steps = [
        f"The first two days give {a} + {b} = {a + b} {thing}.",
        f"With the third day it has {a + b} + {c} = {total} {thing}.",
        f"After selling it has {total} - {sold} = {total - sold} {thing}.",
    ]
    return _finish("days", question, steps, total - sold, (a, b, c, sold))


def _sharing(rng: random.Random) -> Problem:
    name, _, _ = _person(rng)
    thing = rng.choice(_THINGS)
    friends, share = rng.randint(2, 9), rng.randint(11, 99)
    total = friends * share
    eaten = rng.randint(1, share - 1)
    question = (
        f"{name} shares {total} {thing} equally among {friends} friends. Each friend then loses {eaten} "
        f"{thing}. How many {thing} does each friend have now?"
    )
    steps = [
        f"Each friend gets {total} / {friends} = {share} {thing}.",
        f"Each friend has {share} - {eaten} = {share - eaten} {thing} now.",
    ]
    return _finish("sharing", question, steps, share - eaten, (total, friends, eaten))


def _compare(rng: random.Random) -> Problem:
    (name1, _, _), (name2, _, _) = _person(rng), _person(rng)
    while name2 == name1:
        name2, _, _ = _person(rng)
    verb, plain, unit = rng.choice(_ACTIVITIES)
    while True:
        rate1, days1 = rng.randint(11, 99), rng.randint(2, 9)
        rate2, days2 = rng.randint(11, 99), rng.randint(2, 9)
        if rate1 * days1 > rate2 * days2:
            break
    total1, total2 = rate1 * days1, rate2 * days2
    question = (
        f"{name1} {verb} {rate1} {unit} a day for {days1} days. {name2} {verb} {rate2} {unit} a day for "
        f"{days2} days. How many more {unit} does {name1} {plain} than {name2}?"
    )
    steps = [
        f"{name1} {verb} {rate1} * {days1} = {total1} {unit}.",
        f"{name2} {verb} {rate2} * {days2} = {total2} {unit}.",
        f"{name1} {verb} {total1} - {total2} = {total1 - total2} more {unit}.",
    ]
    return _finish("compare", question, steps, total1 - total2, (rate1, days1, rate2, days2))


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "shopping": _shopping,
    "containers": _containers,
    "savings": _savings,
    "days": _days,
    "sharing": _sharing,
    "compare": _compare,
}


def random_problem(rng: random.Random) -> Problem:
    """One problem from a uniformly chosen template, whatever its split."""
    return TEMPLATES[rng.choice(tuple(TEMPLATES))](rng)


def split_of(problem: Problem, seed: int = 0) -> Split:
    """The split a problem belongs to under `seed`: a fixed function of its template and numbers."""
    key = f"{seed}:{problem.template}:{','.join(map(str, problem.skeleton))}".encode()
    fraction = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    return next(split for split, bound in _SPLIT_BOUNDS if fraction < bound)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _draw(rng: random.Random, split: Split, seed: int) -> Problem:
    while True:
        problem = random_problem(rng)
        if split_of(problem, seed) == split:
            return problem


def make_split(split: Split, count: int, seed: int = 0) -> list[Problem]:
    """The first `count` problems of a split, distinct by question text; the same list for the same seed."""
    _check_split(split)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(f"depthwave-arithmetic:{seed}:{split}")
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < count:
        problem = _draw(rng, split, seed)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def train_batch(seed: int, step: int, batch_size: int) -> list[Problem]:
    """The training problems of one optimizer step: a function of (seed, step) alone, so a resumed run sees
    exactly the batches an uninterrupted one would. Drawn with replacement from the train split."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"depthwave-arithmetic:{seed}:train:{step}")
    return [_draw(rng, "train", seed) for _ in range(batch_size)]


def iter_train(seed: int = 0) -> Iterator[Problem]:
    """An endless stream of train-split problems (for tokenizer training and inspection)."""
    step = 0
    while True:
        yield from train_batch(seed, step, 64)
        step += 1


def extract_answer(text: str) -> int | None:
    """The N of the first `The answer is N.` in a solution or a model's output (thousands commas allowed), or
    None when there is no such line."""
    match = _ANSWER_LINE.search(text)
    if match is None:
        return None
    digits = match.group(1).replace(",", "")
    try:
        return int(digits)
    except ValueError:
        return None


def write_jsonl(problems: Sequence[Problem], path: str | Path) -> Path:
    """Write problems as JSON Lines with the fields `question` and `answer` (the full solution)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem.to_record(), ensure_ascii=False) + "\n")
    return path


def write_test_set(path: str | Path, count: int = 500, seed: int = 0) -> Path:
    """The fixed test set (at least 500 problems for the built-in model's evaluation) as JSONL."""
    return write_jsonl(make_split("test", count, seed), path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m depthwave.data.arithmetic",
        description="Write a split of the arithmetic word problems as JSONL.",
    )
    parser.add_argument("path", type=Path, help="output .jsonl file")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_jsonl(make_split(args.split, args.count, args.seed), args.path)
    print(f"wrote {args.count} {args.split} problems to {args.path}")


if __name__ == "__main__":
    main()
