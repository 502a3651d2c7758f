"""Seeded grade-school arithmetic word problems in the GSM8K answer style.

Every problem is a short story (or a bare sum) with one to four operations, a solution with one equation per
line, and the final line `The answer is N.`.

Two distributions share the templates:

* **classic**: the six original templates with their original wording and small word lists. The shipped
  500-problem test set is its test split, unchanged since the first built-in model.
* **wide**: what the model trains on. The same templates, each with many wordings (some with the numbers in a
  different order than they are used), two more two-step templates whose numbers come out of order, and bare
  arithmetic (`What is 17 * 24?`), with names, items, shops and activities drawn from the pools of
  `depthwave.data.pools`.

Splits are a partition of the problem space, not of a list: a problem's split is decided by a hash of its
*skeleton* (template and numbers, the words left out), keyed by the split seed. So a train problem never shares
its arithmetic with a validation or test problem, however many train problems are drawn.

The **unseen** set goes further: its problems are test-split skeletons told with the held-out part of every pool
and the held-out wordings, so no name, item, shop, activity or wording of it ever occurs in training.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from depthwave.data import pools
from depthwave.errors import OneLineArgumentParser

T = TypeVar("T")
Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
Distribution = Literal["classic", "wide"]
DISTRIBUTIONS: tuple[Distribution, ...] = ("classic", "wide")

# Shares of the skeleton space. Small held-out shares suffice: the smallest template ("sharing") has about
# 38,000 skeletons, the others 2·10^5 to 10^7, so 5% still holds thousands of distinct problems of each.
_SPLIT_BOUNDS: tuple[tuple[Split, float], ...] = (("test", 0.05), ("validation", 0.10), ("train", 1.0))

# Room for any solution: the longest (a two-digit product split into tens and units) is about 60 tokens.
MAX_ANSWER_TOKENS = 128

_ANSWER_LINE = re.compile(r"The answer is (-?[\d,]+)\.?")


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    """The step-by-step solution; its last line is `The answer is N.`."""
    answer: int
    template: str
    skeleton: tuple[int, ...]
    """The numbers of the problem in template order: with `template`, what decides its split."""
    wording: str = ""
    """The wording (a format string of the template) the question was told with."""

    def to_record(self) -> dict[str, str]:
        """The JSONL schema shared with GSM8K: `answer` is the full solution text."""
        return {"question": self.question, "answer": self.solution}


# ---- surfaces: the words a problem is told with ---------------------------------------------------------------
@dataclass(frozen=True)
class Surface:
    """The pools a problem's words come from, and which of each template's wordings it may use."""

    name: str
    people: tuple[tuple[str, str], ...]
    things: tuple[str, ...]
    shop_items: tuple[str, ...]
    purchases: tuple[str, ...]
    containers: tuple[str, ...]
    shops: tuple[str, ...]
    days: tuple[str, ...]
    activities: tuple[tuple[str, str, str], ...]
    wordings: Literal["classic", "train", "held_out"]


_CLASSIC_PEOPLE = (
    ("Ana", "she"), ("Ben", "he"), ("Mia", "she"), ("Tom", "he"), ("Zoe", "she"), ("Omar", "he"),
    ("Emma", "she"), ("Noah", "he"), ("Lily", "she"), ("Jack", "he"), ("Sara", "she"), ("Liam", "he"),
)  # fmt: skip
_CLASSIC_THINGS = ("apples", "marbles", "stickers", "cards", "pencils", "cookies", "shells", "stamps", "beads", "eggs")
_CLASSIC_SHOP_ITEMS = ("pens", "books", "cups", "hats", "toys", "plates", "shirts", "lamps")
_CLASSIC_PURCHASES = ("game", "bike", "coat", "radio", "watch")
_CLASSIC_CONTAINERS = ("bags", "boxes", "jars", "packs")
_CLASSIC_ACTIVITIES = (
    ("reads", "read", "pages"), ("runs", "run", "laps"), ("writes", "write", "lines"), ("folds", "fold", "cranes"),
)  # fmt: skip

CLASSIC = Surface(
    "classic",
    _CLASSIC_PEOPLE,
    _CLASSIC_THINGS,
    _CLASSIC_SHOP_ITEMS,
    _CLASSIC_PURCHASES,
    _CLASSIC_CONTAINERS,
    ("shop",),
    ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"),
    _CLASSIC_ACTIVITIES,
    "classic",
)


def _wide_surfaces() -> tuple[Surface, Surface]:
    keep = {
        *(name for name, _ in _CLASSIC_PEOPLE),
        *_CLASSIC_THINGS,
        *_CLASSIC_SHOP_ITEMS,
        *_CLASSIC_PURCHASES,
        *_CLASSIC_CONTAINERS,
        *(word for activity in _CLASSIC_ACTIVITIES for word in activity),
        "shop",
    }
    parts = [
        pools.partition(pools.PEOPLE, keep, words=lambda person: person[:1]),
        pools.partition(pools.THINGS, keep),
        pools.partition(pools.SHOP_ITEMS, keep),
        pools.partition(pools.PURCHASES, keep),
        pools.partition(pools.CONTAINERS, keep),
        pools.partition(pools.SHOPS, keep),
        (pools.DAYS, pools.DAYS),  # seven words: too few to hold any out
        pools.partition(pools.ACTIVITIES, keep, words=lambda activity: (activity[0], activity[2])),
    ]
    train = Surface("train", *(part[0] for part in parts), wordings="train")  # type: ignore[arg-type, misc]
    unseen = Surface("unseen", *(part[1] for part in parts), wordings="held_out")  # type: ignore[arg-type, misc]
    return train, unseen


TRAIN_SURFACE, UNSEEN_SURFACE = _wide_surfaces()


def _pick(rng: random.Random, pool: Sequence[T]) -> T:
    # A pool of one is taken without drawing, so that the classic problems keep the random stream (and thus
    # the exact problems) of the first generator, which had no shop pool and one wording per template.
    return pool[0] if len(pool) == 1 else rng.choice(pool)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiouAEIOU" else "a ") + noun


def _expand(layouts: Sequence[Sequence[Sequence[str]]]) -> tuple[str, ...]:
    """All wordings of a template: each layout is a list of sentence slots, each slot a list of variants."""
    return tuple(" ".join(parts) for layout in layouts for parts in itertools.product(*layout))


def _wording_held_out(wording: str) -> bool:
    digest = hashlib.blake2b(f"depthwave-wording:{wording}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 5 == 0


@dataclass(frozen=True)
class Wordings:
    """A template's wordings; the first is the classic one, always on the training side."""

    all: tuple[str, ...]
    held_out: tuple[str, ...] = field(init=False)
    train: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # About one wording in five is held out by hash, and at least one of every template.
        held = tuple(w for w in self.all[1:] if _wording_held_out(w)) or self.all[-1:]
        object.__setattr__(self, "held_out", held)
        object.__setattr__(self, "train", tuple(w for w in self.all if w not in held))

    def for_surface(self, surface: Surface) -> tuple[str, ...]:
        if surface.wordings == "classic":
            return self.all[:1]
        return self.held_out if surface.wordings == "held_out" else self.train


def _person(rng: random.Random, surface: Surface) -> dict[str, str]:
    name, pronoun = _pick(rng, surface.people)
    return {"name": name, "pron": pronoun, "Pron": pronoun.capitalize()}


def _finish(template: str, said: tuple[str, str], steps: list[str], answer: int, numbers: tuple[int, ...]) -> Problem:
    solution = "\n".join([*steps, f"The answer is {answer}."])
    question, wording = said
    return Problem(question, solution, answer, template, numbers, wording)


def _say(rng: random.Random, surface: Surface, wordings: Wordings, **words: object) -> tuple[str, str]:
    """(the question, the wording it was told with)."""
    wording = _pick(rng, wordings.for_surface(surface))
    return wording.format(**words), wording


# ---- the story templates --------------------------------------------------------------------------------------
_SHOPPING = Wordings(
    _expand(
        [
            [
                [
                    "{name} buys {n1} {item1} for {p1} dollars each and {n2} {item2} for {p2} dollars each.",
                    "{name} gets {n1} {item1} at {p1} dollars each and {n2} {item2} at {p2} dollars each.",
                    "At the {shop}, {name} buys {n1} {item1} that cost {p1} dollars each and {n2} {item2} that "
                    "cost {p2} dollars each.",
                ],
                [
                    "How many dollars does {name} spend?",
                    "How many dollars does {name} pay in total?",
                    "How much does {name} spend in dollars?",
                ],
            ],
            [
                [
                    "{Item1} cost {p1} dollars each and {item2} cost {p2} dollars each.",
                    "At the {shop}, {item1} are {p1} dollars each and {item2} are {p2} dollars each.",
                ],
                ["{name} buys {n1} {item1} and {n2} {item2}.", "{name} takes {n1} {item1} and {n2} {item2}."],
                ["How many dollars does {name} spend?", "How many dollars does {name} pay?"],
            ],
        ]
    )
)


def _shopping(rng: random.Random, surface: Surface) -> Problem:
    person = _person(rng, surface)
    item1, item2 = rng.sample(surface.shop_items, 2)
    n1, n2 = rng.randint(2, 9), rng.randint(2, 9)
    p1, p2 = rng.randint(11, 99), rng.randint(11, 99)
    cost1, cost2 = n1 * p1, n2 * p2
    shop = _pick(rng, surface.shops)
    said = _say(
        rng, surface, _SHOPPING, **person, item1=item1, Item1=item1.capitalize(), item2=item2,
        n1=n1, n2=n2, p1=p1, p2=p2, shop=shop,
    )  # fmt: skip
    steps = [
        f"The {item1} cost {n1} * {p1} = {cost1} dollars.",
        f"The {item2} cost {n2} * {p2} = {cost2} dollars.",
        f"{person['Pron']} spends {cost1} + {cost2} = {cost1 + cost2} dollars.",
    ]
    return _finish("shopping", said, steps, cost1 + cost2, (n1, p1, n2, p2))


_CONTAINERS = Wordings(
    _expand(
        [
            [
                ["{name} has {start} {thing}.", "{name} starts with {start} {thing}.", "{name} owns {start} {thing}."],
                [
                    "{Pron} buys {count} {container} with {size} {thing} in each.",
                    "{Pron} buys {count} {container} of {thing}, each holding {size}.",
                    "{Pron} gets {count} more {container} that hold {size} {thing} each.",
                ],
                [
                    "Then {pron} gives away {given} {thing}.",
                    "After that {pron} gives {given} {thing} to a friend.",
                    "Later {pron} gives away {given} of them.",
                ],
                [
                    "How many {thing} does {name} have now?",
                    "How many {thing} does {name} have left?",
                    "How many {thing} does {name} end up with?",
                ],
            ],
            [
                [
                    "There are {size} {thing} in each of the {count} {container} that {name} buys.",
                    "Each of the {count} {container} that {name} buys holds {size} {thing}.",
                ],
                [
                    "{Pron} already had {start} {thing}, and then {pron} gives away {given}.",
                    "Before that {pron} had {start} {thing}, and afterwards {pron} gives away {given}.",
                ],
                ["How many {thing} does {name} have now?", "How many {thing} does {name} keep?"],
            ],
        ]
    )
)


def _containers(rng: random.Random, surface: Surface) -> Problem:
    person = _person(rng, surface)
    thing, container = _pick(rng, surface.things), _pick(rng, surface.containers)
    start, count, size = rng.randint(10, 99), rng.randint(2, 9), rng.randint(11, 99)
    bought = count * size
    total = start + bought
    given = rng.randint(10, total - 1)
    said = _say(
        rng, surface, _CONTAINERS, **person, thing=thing, container=container, start=start, count=count,
        size=size, given=given,
    )  # fmt: skip
    pron, Pron = person["pron"], person["Pron"]
    steps = [
        f"{Pron} buys {count} * {size} = {bought} {thing}.",
        f"{Pron} has {start} + {bought} = {total} {thing}.",
        f"After giving some away {pron} has {total} - {given} = {total - given} {thing}.",
    ]
    return _finish("containers", said, steps, total - given, (start, count, size, given))


_SAVINGS = Wordings(
    _expand(
        [
            [
                [
                    "{name} saves {rate} dollars every week for {times} weeks.",
                    "{name} puts away {rate} dollars each week for {times} weeks.",
                    "For {times} weeks, {name} saves {rate} dollars a week.",
                ],
                [
                    "Then {pron} spends {spent} dollars on {a_purchase}.",
                    "After that {pron} buys {a_purchase} for {spent} dollars.",
                    "{Pron} then pays {spent} dollars for {a_purchase}.",
                ],
                [
                    "How many dollars does {name} have left?",
                    "How many dollars are left?",
                    "How many dollars does {name} still have?",
                ],
            ],
            [
                [
                    "{name} buys {a_purchase} for {spent} dollars with the money {pron} saved.",
                    "{name} pays {spent} dollars for {a_purchase} out of {pron_pos} savings.",
                ],
                [
                    "{Pron} had saved {rate} dollars every week for {times} weeks.",
                    "For {times} weeks {pron} had saved {rate} dollars a week.",
                ],
                ["How many dollars does {name} have left?", "How many dollars are left?"],
            ],
        ]
    )
)


def _possessive(pronoun: str) -> str:
    return "her" if pronoun == "she" else "his"


def _income_then_spending(
    rng: random.Random, surface: Surface, template: str, wordings: Wordings, verb: str
) -> Problem:
    """Savings and earnings: `rate` dollars `times` times, then a purchase; the rest is left."""
    person = _person(rng, surface)
    purchase = _pick(rng, surface.purchases)
    rate, times = rng.randint(11, 99), rng.randint(2, 9)
    income = rate * times
    spent = rng.randint(10, income - 1)
    said = _say(
        rng, surface, wordings, **person, a_purchase=_article(purchase), rate=rate, times=times, spent=spent,
        pron_pos=_possessive(person["pron"]),
    )  # fmt: skip
    steps = [
        f"{person['Pron']} {verb} {rate} * {times} = {income} dollars.",
        f"{person['Pron']} has {income} - {spent} = {income - spent} dollars left.",
    ]
    return _finish(template, said, steps, income - spent, (rate, times, spent))


def _savings(rng: random.Random, surface: Surface) -> Problem:
    return _income_then_spending(rng, surface, "savings", _SAVINGS, "saves")


_DAYS = Wordings(
    _expand(
        [
            [
                [
                    "{A_shop} gets {a} {thing} on {day1}, {b} {thing} on {day2} and {c} {thing} on {day3}.",
                    "On {day1} {a_shop} gets {a} {thing}, on {day2} {b} and on {day3} {c}.",
                    "{A_shop} receives {a} {thing} on {day1}, {b} on {day2} and {c} on {day3}.",
                ],
                ["It sells {sold} {thing}.", "Then it sells {sold} of them.", "It sells {sold} {thing} that week."],
                [
                    "How many {thing} are left?",
                    "How many {thing} does the {shop} have left?",
                    "How many {thing} remain?",
                ],
            ],
            [
                ["{A_shop} sells {sold} {thing} this week.", "This week {a_shop} sells {sold} {thing}."],
                [
                    "It got {a} {thing} on {day1}, {b} on {day2} and {c} on {day3}.",
                    "It had received {a} on {day1}, {b} on {day2} and {c} on {day3}.",
                ],
                ["How many {thing} are left?", "How many {thing} remain?"],
            ],
        ]
    )
)


def _days(rng: random.Random, surface: Surface) -> Problem:
    thing = _pick(rng, surface.things)
    day1, day2, day3 = rng.sample(surface.days, 3)
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
    total = a + b + c
    sold = rng.randint(10, total - 1)
    shop = _pick(rng, surface.shops)
    said = _say(
        rng, surface, _DAYS, thing=thing, day1=day1, day2=day2, day3=day3, a=a, b=b, c=c, sold=sold, shop=shop,
        a_shop=_article(shop), A_shop=_article(shop).capitalize(),
    )  # fmt: skip
    steps = [
        f"The first two days give {a} + {b} = {a + b} {thing}.",
        f"With the third day it has {a + b} + {c} = {total} {thing}.",
        f"After selling it has {total} - {sold} = {total - sold} {thing}.",
    ]
    return _finish("days", said, steps, total - sold, (a, b, c, sold))


_SHARING = Wordings(
    _expand(
        [
            [
                [
                    "{name} shares {total} {thing} equally among {friends} friends.",
                    "{name} splits {total} {thing} evenly between {friends} friends.",
                    "{name} divides {total} {thing} equally among {friends} friends.",
                ],
                [
                    "Each friend then loses {eaten} {thing}.",
                    "Then each friend gives away {eaten} {thing}.",
                    "Each friend then uses {eaten} of them.",
                ],
                [
                    "How many {thing} does each friend have now?",
                    "How many {thing} does each friend have left?",
                    "How many {thing} are left for each friend?",
                ],
            ],
            [
                [
                    "Each of {friends} friends gets an equal share of the {total} {thing} that {name} has.",
                    "{friends} friends share {name}'s {total} {thing} equally.",
                ],
                ["Then each friend loses {eaten} {thing}.", "Each friend then gives away {eaten}."],
                ["How many {thing} does each friend have now?", "How many {thing} does each friend keep?"],
            ],
        ]
    )
)


def _sharing(rng: random.Random, surface: Surface) -> Problem:
    person = _person(rng, surface)
    thing = _pick(rng, surface.things)
    friends, share = rng.randint(2, 9), rng.randint(11, 99)
    total = friends * share
    eaten = rng.randint(1, share - 1)
    said = _say(rng, surface, _SHARING, **person, thing=thing, total=total, friends=friends, eaten=eaten)
    steps = [
        f"Each friend gets {total} / {friends} = {share} {thing}.",
        f"Each friend has {share} - {eaten} = {share - eaten} {thing} now.",
    ]
    return _finish("sharing", said, steps, share - eaten, (total, friends, eaten))


_COMPARE = Wordings(
    _expand(
        [
            [
                [
                    "{name1} {verb} {rate1} {unit} a day for {days1} days.",
                    "For {days1} days, {name1} {verb} {rate1} {unit} a day.",
                    "{name1} {verb} {rate1} {unit} each day for {days1} days.",
                ],
                [
                    "{name2} {verb} {rate2} {unit} a day for {days2} days.",
                    "{name2} {verb} {rate2} {unit} each day for {days2} days.",
                    "For {days2} days, {name2} {verb} {rate2} {unit} a day.",
                ],
                [
                    "How many more {unit} does {name1} {plain} than {name2}?",
                    "How many {unit} more than {name2} does {name1} {plain}?",
                ],
            ]
        ]
    )
)


def _compare(rng: random.Random, surface: Surface) -> Problem:
    name1, name2 = _person(rng, surface)["name"], _person(rng, surface)["name"]
    while name2 == name1:
        name2 = _person(rng, surface)["name"]
    verb, plain, unit = _pick(rng, surface.activities)
    while True:
        rate1, days1 = rng.randint(11, 99), rng.randint(2, 9)
        rate2, days2 = rng.randint(11, 99), rng.randint(2, 9)
        if rate1 * days1 > rate2 * days2:
            break
    total1, total2 = rate1 * days1, rate2 * days2
    said = _say(
        rng, surface, _COMPARE, name1=name1, name2=name2, verb=verb, plain=plain, unit=unit, rate1=rate1,
        days1=days1, rate2=rate2, days2=days2,
    )  # fmt: skip
    steps = [
        f"{name1} {verb} {rate1} * {days1} = {total1} {unit}.",
        f"{name2} {verb} {rate2} * {days2} = {total2} {unit}.",
        f"{name1} {verb} {total1} - {total2} = {total1 - total2} more {unit}.",
    ]
    return _finish("compare", said, steps, total1 - total2, (rate1, days1, rate2, days2))


# Two-step problems told backwards: the number used last comes first.
_EARNINGS = Wordings(
    _expand(
        [
            [
                [
                    "{name} spends {spent} dollars after earning {rate} dollars an hour for {times} hours.",
                    "{name} pays {spent} dollars for {a_purchase} with the money from {times} hours of work at "
                    "{rate} dollars an hour.",
                    "After {pron} spends {spent} dollars, {name} counts what is left of {pron_pos} pay: {rate} "
                    "dollars an hour for {times} hours.",
                ],
                [
                    "How many dollars does {name} have left?",
                    "How many dollars are left?",
                    "How many dollars does {name} keep?",
                ],
            ]
        ]
    )
)


def _earnings(rng: random.Random, surface: Surface) -> Problem:
    return _income_then_spending(rng, surface, "earnings", _EARNINGS, "earns")


_RESTOCK = Wordings(
    _expand(
        [
            [
                [
                    "{A_shop} sells {sold} {thing} today.",
                    "Today {a_shop} sells {sold} {thing}.",
                    "By evening {a_shop} has sold {sold} {thing}.",
                ],
                [
                    "In the morning it had {start} {thing}, and then {count} {container} with {size} {thing} each "
                    "arrived.",
                    "It started the day with {start} {thing}, and {count} {container} of {size} {thing} each "
                    "were delivered.",
                    "It had {start} {thing} before {count} {container} holding {size} {thing} each arrived.",
                ],
                ["How many {thing} does it have now?", "How many {thing} are left?", "How many {thing} remain?"],
            ]
        ]
    )
)


def _restock(rng: random.Random, surface: Surface) -> Problem:
    thing, container = _pick(rng, surface.things), _pick(rng, surface.containers)
    shop = _pick(rng, surface.shops)
    start, count, size = rng.randint(10, 99), rng.randint(2, 9), rng.randint(11, 99)
    bought = count * size
    total = start + bought
    sold = rng.randint(10, total - 1)
    said = _say(
        rng, surface, _RESTOCK, thing=thing, container=container, start=start, count=count, size=size,
        sold=sold, a_shop=_article(shop), A_shop=_article(shop).capitalize(),
    )  # fmt: skip
    steps = [
        f"The delivery is {count} * {size} = {bought} {thing}.",
        f"It had {start} + {bought} = {total} {thing}.",
        f"After selling it has {total} - {sold} = {total - sold} {thing}.",
    ]
    return _finish("restock", said, steps, total - sold, (sold, start, count, size))


# ---- bare arithmetic --------------------------------------------------------------------------------------------
_OPERATORS = {"add": ("+", "plus"), "sub": ("-", "minus"), "mul": ("*", "times"), "div": ("/", "divided by")}
_BARE = Wordings(
    tuple(
        prefix.replace("{expr}", expr)
        for prefix in (
            "What is {expr}?",
            "Compute {expr}.",
            "Calculate {expr}.",
            "Find {expr}.",
            "What is the value of {expr}?",
            "Work out {expr}.",
            "How much is {expr}?",
            "Evaluate {expr}.",
            "Please compute {expr}.",
            "What do you get for {expr}?",
        )
        for expr in ("{a} {symbol} {b}", "{a} {word} {b}")
    )
)


def _multiplication_steps(a: int, b: int) -> list[str]:
    """One line when a factor is a digit; otherwise b is split into tens and units, each product a digit
    product with a zero appended at most, then summed."""
    if a < 10 or b < 10 or b % 10 == 0:
        return [f"{a} * {b} = {a * b}."]
    tens, units = b - b % 10, b % 10
    return [
        f"{a} * {b} = {a} * {tens} + {a} * {units}.",
        f"{a} * {tens} = {a * tens}.",
        f"{a} * {units} = {a * units}.",
        f"{a * tens} + {a * units} = {a * b}.",
    ]


def _operands(rng: random.Random, operator: str) -> tuple[int, int]:
    if operator == "add":
        return rng.randint(10, 999), rng.randint(10, 999)
    if operator == "sub":
        a = rng.randint(20, 999)
        return a, rng.randint(10, a - 1)
    if operator == "mul":
        if rng.random() < 0.5:
            digit, number = rng.randint(2, 9), rng.randint(11, 99)
            return (digit, number) if rng.random() < 0.5 else (number, digit)
        return rng.randint(11, 99), rng.randint(11, 99)
    divisor, quotient = rng.randint(2, 9), rng.randint(11, 99)
    return divisor * quotient, divisor


def _bare(operator: str) -> Callable[[random.Random, Surface], Problem]:
    def generate(rng: random.Random, surface: Surface) -> Problem:
        a, b = _operands(rng, operator)
        symbol, word = _OPERATORS[operator]
        said = _say(rng, surface, _BARE, a=a, b=b, symbol=symbol, word=word)
        if operator == "mul":
            steps, answer = _multiplication_steps(a, b), a * b
        else:
            answer = {"add": a + b, "sub": a - b, "div": a // b}[operator]
            steps = [f"{a} {symbol} {b} = {answer}."]
        return _finish(f"bare_{operator}", said, steps, answer, (a, b))

    return generate


Template = Callable[[random.Random, Surface], Problem]

TEMPLATES: dict[str, Template] = {
    "shopping": _shopping,
    "containers": _containers,
    "savings": _savings,
    "days": _days,
    "sharing": _sharing,
    "compare": _compare,
}
"""The classic templates."""

# The wide distribution's templates and their weights: bare arithmetic is about a quarter of all problems.
WIDE_TEMPLATES: dict[str, tuple[Template, float]] = {
    **{name: (template, 1.0) for name, template in TEMPLATES.items()},
    "earnings": (_earnings, 1.0),
    "restock": (_restock, 1.0),
    **{f"bare_{operator}": (_bare(operator), 0.75) for operator in _OPERATORS},
}


def random_problem(rng: random.Random, distribution: Distribution = "classic") -> Problem:
    """One problem of a distribution, whatever its split: classic problems with the classic surface, wide ones
    with the training surface."""
    if distribution == "classic":
        return TEMPLATES[rng.choice(tuple(TEMPLATES))](rng, CLASSIC)
    return _wide_problem(rng, TRAIN_SURFACE)


def _wide_problem(rng: random.Random, surface: Surface) -> Problem:
    names = tuple(WIDE_TEMPLATES)
    name = rng.choices(names, weights=[WIDE_TEMPLATES[n][1] for n in names])[0]
    return WIDE_TEMPLATES[name][0](rng, surface)


def split_of(problem: Problem, seed: int = 0) -> Split:
    """The split a problem belongs to under `seed`: a fixed function of its template and numbers."""
    key = f"{seed}:{problem.template}:{','.join(map(str, problem.skeleton))}".encode()
    fraction = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    return next(split for split, bound in _SPLIT_BOUNDS if fraction < bound)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def _draw(rng: random.Random, split: Split, seed: int, distribution: Distribution) -> Problem:
    while True:
        problem = random_problem(rng, distribution)
        if split_of(problem, seed) == split:
            return problem


def _distinct(draw: Callable[[], Problem], count: int) -> list[Problem]:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < count:
        problem = draw()
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def make_split(split: Split, count: int, seed: int = 0, distribution: Distribution = "classic") -> list[Problem]:
    """The first `count` problems of a split, distinct by question text; the same list for the same seed.
    The classic test split is the shipped test set."""
    _check_split(split)
    _check_distribution(distribution)
    stream = "" if distribution == "classic" else ":wide"
    rng = random.Random(f"depthwave-arithmetic:{seed}:{split}{stream}")
    return _distinct(lambda: _draw(rng, split, seed, distribution), count)


def make_unseen(count: int, seed: int = 0) -> list[Problem]:
    """The unseen set: test-split problems of the wide templates told only with held-out names, items, shops,
    activities and wordings, so that nothing of their surface occurs in training."""
    rng = random.Random(f"depthwave-arithmetic:{seed}:unseen")

    def draw() -> Problem:
        while True:
            problem = _wide_problem(rng, UNSEEN_SURFACE)
            if split_of(problem, seed) == "test":
                return problem

    return _distinct(draw, count)


def train_batch(seed: int, step: int, batch_size: int, distribution: Distribution = "classic") -> list[Problem]:
    """The training problems of one optimizer step: a function of (seed, step) alone, so a resumed run sees
    exactly the batches an uninterrupted one would. Drawn with replacement from the train split."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_distribution(distribution)
    stream = "" if distribution == "classic" else ":wide"
    rng = random.Random(f"depthwave-arithmetic:{seed}:train:{step}{stream}")
    return [_draw(rng, "train", seed, distribution) for _ in range(batch_size)]


def iter_train(seed: int = 0, distribution: Distribution = "classic") -> Iterator[Problem]:
    """An endless stream of train-split problems (for tokenizer training and inspection)."""
    step = 0
    while True:
        yield from train_batch(seed, step, 64, distribution)
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


def write_jsonl(problems: Sequence[Problem], path: str | Path, with_kind: bool = False) -> Path:
    """Write problems as JSON Lines with the fields `question` and `answer` (the full solution), and with
    `with_kind` the template as `kind` (the unseen set's per-kind accuracy is read from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem in problems:
            record = {**problem.to_record(), "kind": problem.template} if with_kind else problem.to_record()
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_test_set(path: str | Path, count: int = 500, seed: int = 0) -> Path:
    """The fixed test set (at least 500 problems for the built-in model's evaluation) as JSONL."""
    return write_jsonl(make_split("test", count, seed), path)


def write_unseen_set(path: str | Path, count: int = 500, seed: int = 0) -> Path:
    """The unseen set (words and wordings held out of training) as JSONL, with each problem's kind."""
    return write_jsonl(make_unseen(count, seed), path, with_kind=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineArgumentParser(
        prog="python -m depthwave.data.arithmetic",
        description="Write a split of the arithmetic word problems (or the unseen set) as JSONL.",
    )
    parser.add_argument("path", type=Path, help="output .jsonl file")
    parser.add_argument("--split", choices=(*SPLITS, "unseen"), default="test")
    parser.add_argument("--distribution", choices=DISTRIBUTIONS, default="classic", help="ignored for unseen")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.split == "unseen":
        write_unseen_set(args.path, args.count, args.seed)
    else:
        write_jsonl(make_split(args.split, args.count, args.seed, args.distribution), args.path)
    print(f"wrote {args.count} {args.split} problems to {args.path}")


if __name__ == "__main__":
    main()
