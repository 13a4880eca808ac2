"""A generator of semantic QA items with alternative questions: a short text about two people (where each lives and
what each does), a question about one fact, and an alternative question whose answer is another fact of the same
text. The text stays in the prompt (the problem's ``context``); only the question is injected, so the model must
answer a different question about what it has already read.

Categories, in turn (balanced in every prefix of 3k items):

* ``control``          the same question;
* ``other_attribute``  the same person, the other fact (where they live <-> what they do);
* ``other_person``     the same fact of the other person.

Names, cities and jobs are drawn without repetition inside an item, so every answer occurs once in the text.
"""
from __future__ import annotations

import random

from .data import Problem, ProblemSet, Version, generated

CATEGORIES = ("control", "other_attribute", "other_person")

PEOPLE = ["Anna", "Ben", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Irene", "Jonas", "Kira", "Liam"]
CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Dublin", "Prague", "Lisbon", "Athens", "Warsaw"]
JOBS = ["doctor", "teacher", "lawyer", "painter", "chef", "farmer", "pilot", "dentist", "writer", "singer"]


def _question(person: str, fact: str) -> str:
    return f"Question: Where does {person} live?" if fact == "city" else f"Question: What is {person}'s job?"


def make_item(rng: random.Random, index: int, category: str) -> Problem:
    people = rng.sample(PEOPLE, 2)
    cities, jobs = rng.sample(CITIES, 2), rng.sample(JOBS, 2)
    facts = {p: {"city": c, "job": j} for p, c, j in zip(people, cities, jobs)}
    context = " ".join(f"{p} lives in {facts[p]['city']} and works as a {facts[p]['job']}." for p in people)
    who, fact = rng.randrange(2), rng.choice(["city", "job"])
    original = Version(_question(people[who], fact), facts[people[who]][fact])
    if category == "control":
        injected = original
    elif category == "other_attribute":
        other = "job" if fact == "city" else "city"
        injected = Version(_question(people[who], other), facts[people[who]][other])
    elif category == "other_person":
        injected = Version(_question(people[1 - who], fact), facts[people[1 - who]][fact])
    else:
        raise ValueError(f"qa_problems: unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
    return Problem(f"qa-{index:04d}", category, original, injected, context=context)


def qa_problems(n: int = 300, seed: int = 0) -> ProblemSet:
    """``n`` items, the categories in turn, from ``seed``."""
    return generated("qa", n, seed, CATEGORIES, make_item)
