"""A generator of MAWPS-style arithmetic word problems with ground truth, each with an augmented version to inject.

A base problem is one operation in a short story (MAWPS's single-operation problems: add, subtract, multiply), with
small numbers so that a 135M-parameter model solves a measurable share of them. Its injected version differs in one
of four ways (the categories, in turn, so every prefix of 4k problems is balanced):

* ``control``           identical text and answer (injecting it must change nothing);
* ``single_number``     one number of the story changes (so does the answer);
* ``multiple_numbers``  both numbers change;
* ``added_step``        a sentence with a second operation comes before the question (the answer changes).

Everything is drawn from one ``random.Random(seed)``: the same seed gives the same problems on every machine.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, List, Tuple

from .data import Problem, ProblemSet, Version, generated

CATEGORIES = ("control", "single_number", "multiple_numbers", "added_step")

NAMES = [("Tom", "he", "him", "his"), ("Sara", "she", "her", "her"), ("Ben", "he", "him", "his"),
         ("Mia", "she", "her", "her"), ("Sam", "he", "him", "his"), ("Lily", "she", "her", "her"),
         ("Jack", "he", "him", "his"), ("Emma", "she", "her", "her"), ("Leo", "he", "him", "his"),
         ("Anna", "she", "her", "her"), ("Max", "he", "him", "his"), ("Zoe", "she", "her", "her")]
FRIENDS = ["Alex", "Kate", "Nick", "Ruby", "Paul", "Nora"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "balloons", "cards", "shells", "stamps"]
CONTAINERS = ["boxes", "bags", "baskets", "jars"]


@dataclass(frozen=True)
class Template:
    """One story: numbers (a, b) drawn by ``draw``, the sentences, the question, the answer ``solve(a, b)``."""

    name: str
    draw: Callable[[random.Random], Tuple[int, int]]
    story: Callable[[dict, int, int], List[str]]
    question: Callable[[dict], str]
    solve: Callable[[int, int], int]


def _add_draw(rng):
    return rng.randint(2, 20), rng.randint(2, 20)


def _sub_draw(rng):
    a = rng.randint(8, 25)
    return a, rng.randint(2, a - 3)


def _mul_draw(rng):
    return rng.randint(2, 6), rng.randint(2, 6)


TEMPLATES = [
    Template("buy", _add_draw,
             lambda w, a, b: [f"{w['N']} has {a} {w['I']}.", f"{w['P'].capitalize()} buys {b} more {w['I']}."],
             lambda w: f"How many {w['I']} does {w['N']} have now?", lambda a, b: a + b),
    Template("gift", _add_draw,
             lambda w, a, b: [f"{w['N']} has {a} {w['I']}.", f"{w['F']} gives {w['O']} {b} more {w['I']}."],
             lambda w: f"How many {w['I']} does {w['N']} have now?", lambda a, b: a + b),
    Template("give_away", _sub_draw,
             lambda w, a, b: [f"{w['N']} has {a} {w['I']}.", f"{w['P'].capitalize()} gives {b} {w['I']} to "
                                                                f"{w['F']}."],
             lambda w: f"How many {w['I']} does {w['N']} have left?", lambda a, b: a - b),
    Template("groups", _mul_draw,
             lambda w, a, b: [f"{w['N']} has {a} {w['C']}.", f"Each of the {w['C']} holds {b} {w['I']}."],
             lambda w: f"How many {w['I']} does {w['N']} have in total?", lambda a, b: a * b),
]


def _words(rng: random.Random) -> dict:
    name, subject, obj, _ = rng.choice(NAMES)
    return {"N": name, "P": subject, "O": obj, "F": rng.choice(FRIENDS), "I": rng.choice(ITEMS),
            "C": rng.choice(CONTAINERS)}


def _text(t: Template, w: dict, a: int, b: int, extra: str = "") -> str:
    return " ".join(t.story(w, a, b) + ([extra] if extra else []) + [t.question(w)])


def _changed(rng: random.Random, t: Template, a: int, b: int, which: str) -> Tuple[int, int]:
    """New (a, b) with ``which`` ("a", "b" or "ab") changed, the template's ranges kept and the answer changed."""
    for _ in range(1000):
        na, nb = t.draw(rng)
        na, nb = (na if "a" in which else a), (nb if "b" in which else b)
        if t.name == "give_away" and not 2 <= nb <= na - 3:
            continue
        if ("a" in which and na == a) or ("b" in which and nb == b) or t.solve(na, nb) == t.solve(a, b):
            continue
        return na, nb
    raise RuntimeError(f"math_problems: no valid change of {which} for {t.name} ({a}, {b})")  # pragma: no cover


def _added_step(rng: random.Random, t: Template, w: dict, a: int, b: int) -> Tuple[str, int]:
    """A sentence with a second operation and the new answer (never negative)."""
    answer = t.solve(a, b)
    c = rng.randint(2, 9)
    if answer - c >= 1 and rng.random() < 0.5:
        return f"Then {w['P']} gives {c} {w['I']} to {w['F']}.", answer - c
    return f"Then {w['P']} finds {c} more {w['I']}.", answer + c


def make_problem(rng: random.Random, index: int, category: str) -> Problem:
    t = rng.choice(TEMPLATES)
    w = _words(rng)
    a, b = t.draw(rng)
    original = Version(_text(t, w, a, b), str(t.solve(a, b)))
    if category == "control":
        injected = original
    elif category == "single_number":
        na, nb = _changed(rng, t, a, b, rng.choice("ab"))
        injected = Version(_text(t, w, na, nb), str(t.solve(na, nb)))
    elif category == "multiple_numbers":
        na, nb = _changed(rng, t, a, b, "ab")
        injected = Version(_text(t, w, na, nb), str(t.solve(na, nb)))
    elif category == "added_step":
        sentence, answer = _added_step(rng, t, w, a, b)
        injected = Version(_text(t, w, a, b, sentence), str(answer))
    else:
        raise ValueError(f"math_problems: unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
    return Problem(f"math-{index:04d}", category, original, injected)


def math_problems(n: int = 500, seed: int = 0) -> ProblemSet:
    """``n`` problems, the categories in turn (balanced in every prefix of 4k), from ``seed``."""
    return generated("math", n, seed, CATEGORIES, make_problem)
