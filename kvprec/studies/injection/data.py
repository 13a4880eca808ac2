"""The problems of the injection study and their JSON format (the built-in sets and ``--dataset FILE`` alike).

A problem is a context the model starts from (``original``) and the context that replaces it (``injected``), each
with its ground-truth answer, plus an optional ``context`` that stays in the prompt before both (the passage of a QA
item). One file holds one set::

    {"kind": "math" | "qa",
     "instruction": "...",                      (optional: a task sentence before every problem; default none)
     "examples": [{"question": "...", "reply": "..."}, ...],
                                                (optional: worked examples shown before every problem, as earlier
                                                 chat turns; default: the kind's built-in examples, EXAMPLES)
     "problems": [
        {"id": "math-0000", "category": "single_number",
         "context": "",                          (optional)
         "original": {"text": "Tom has 5 apples. ...", "answer": "8"},
         "injected": {"text": "Tom has 7 apples. ...", "answer": "10"}},
        ...]}

``kind`` decides how answers are read and checked (kvprec/studies/injection/answers.py): "math" answers are whole
numbers, "qa" answers are words or short phrases found in the reply. ``category`` says how ``injected`` differs from
``original`` (the built-in math set: control, single_number, multiple_numbers, added_step; the QA set: control,
other_attribute, other_person); a category named "control" must have identical texts and answers.

:func:`read_problems` checks a file completely and names the file, the problem and the field of the first fault;
:func:`write_problems` writes the same format (the built-in sets can be exported and edited).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..platform.rundir import StudyInputError

KINDS = ("math", "qa")
CONTROL = "control"

#: worked examples shown before every problem, per kind (a file may give its own). Three-shot replies in one fixed
#: form make SmolLM2-135M-Instruct restate the numbers, calculate and answer in ~30 tokens (a "step by step"
#: instruction instead gave replies past 64 tokens and 8% accuracy on the built-in math set, one sentence without
#: examples 28%, these examples 45%: measured on its first 40 problems), so injection points 5-15 fall inside the
#: reasoning, before the answer.
EXAMPLES = {
    "math": [("Kim has 4 pens. She buys 3 more pens. How many pens does Kim have now?",
              "Kim has 4 pens and buys 3 more, so Kim has 4 + 3 = 7 pens. The answer is 7."),
             ("Dan has 9 cups. He gives 5 cups to Eva. How many cups does Dan have left?",
              "Dan has 9 cups and gives away 5, so Dan has 9 - 5 = 4 cups. The answer is 4."),
             ("Ivy has 3 bags. Each of the bags holds 2 plums. How many plums does Ivy have in total?",
              "Ivy has 3 bags of 2 plums, so Ivy has 3 * 2 = 6 plums. The answer is 6.")],
    "qa": [("Omar lives in Lyon and works as a baker. Jun lives in Oslo and works as a nurse.\n\n"
            "Question: What is Jun's job?",
            "Jun works as a nurse. The answer is nurse."),
           ("Rosa lives in Cairo and works as a pilot. Finn lives in Quito and works as a farmer.\n\n"
            "Question: Where does Rosa live?",
            "Rosa lives in Cairo. The answer is Cairo.")],
}


@dataclass(frozen=True)
class Version:
    """One side of a problem: the text the model reads and the answer that text asks for."""

    text: str
    answer: str


@dataclass(frozen=True)
class Problem:
    id: str
    category: str
    original: Version
    injected: Version
    context: str = ""

    @property
    def is_control(self) -> bool:
        return self.category == CONTROL


@dataclass(frozen=True)
class ProblemSet:
    """``examples``: (question, reply) pairs shown before every problem; ``instruction``: "" or a task sentence."""

    kind: str
    problems: List[Problem]
    instruction: str = ""
    examples: Tuple[Tuple[str, str], ...] = ()


def _field(obj: dict, name: str, where: str, *, required: bool = True, default: str = "") -> str:
    value = obj.get(name, None)
    if value is None:
        if required:
            raise StudyInputError(f"{where}: missing \"{name}\" (a string)")
        return default
    if not isinstance(value, str):
        raise StudyInputError(f"{where}: \"{name}\" must be a string, got {type(value).__name__}")
    return value


def _version(obj, where: str, kind: str) -> Version:
    if not isinstance(obj, dict):
        raise StudyInputError(f"{where}: expected an object with \"text\" and \"answer\"")
    text = _field(obj, "text", where)
    answer = obj.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise StudyInputError(f"{where}: \"answer\" must be a non-empty string (or a whole number)")
    if not text.strip():
        raise StudyInputError(f"{where}: \"text\" is empty")
    answer = answer.strip()
    if kind == "math" and not re.fullmatch(r"-?\d+", answer):
        raise StudyInputError(f"{where}: a math answer must be a whole number, got {answer!r}")
    return Version(text, answer)


def generated(kind: str, n: int, seed: int, categories: Sequence[str],
              make: Callable[[random.Random, int, str], Problem]) -> ProblemSet:
    """A built-in set: ``n`` problems ``make(rng, index, category)`` with the categories in turn (balanced in every
    prefix of len(categories) k), all drawn from one ``random.Random(seed)``, with the kind's examples."""
    if n < 1:
        raise ValueError(f"{kind} problems: n must be >= 1, got {n}")
    rng = random.Random(seed)
    problems = [make(rng, i, categories[i % len(categories)]) for i in range(n)]
    return ProblemSet(kind, problems, "", tuple(EXAMPLES[kind]))


def parse_problems(data, source: str) -> ProblemSet:
    """The ProblemSet of a parsed JSON document (module docstring); StudyInputError naming ``source`` and the
    fault."""
    if not isinstance(data, dict):
        raise StudyInputError(f"--dataset {source}: expected a JSON object with \"kind\" and \"problems\"")
    kind = data.get("kind")
    if kind not in KINDS:
        raise StudyInputError(f"--dataset {source}: \"kind\" must be one of {', '.join(KINDS)}, got {kind!r}")
    instruction = _field(data, "instruction", f"--dataset {source}", required=False)
    examples = data.get("examples", None)
    if examples is None:
        examples = EXAMPLES[kind]
    else:
        if not isinstance(examples, list):
            raise StudyInputError(f"--dataset {source}: \"examples\" must be a list of objects with \"question\" and "
                                  "\"reply\"")
        examples = [(_field(e if isinstance(e, dict) else {}, "question", f"--dataset {source}, examples[{i}]"),
                     _field(e if isinstance(e, dict) else {}, "reply", f"--dataset {source}, examples[{i}]"))
                    for i, e in enumerate(examples)]
    rows = data.get("problems")
    if not isinstance(rows, list) or not rows:
        raise StudyInputError(f"--dataset {source}: \"problems\" must be a non-empty list")
    problems, seen = [], set()
    for i, row in enumerate(rows):
        where = f"--dataset {source}, problem {i}"
        if not isinstance(row, dict):
            raise StudyInputError(f"{where}: expected an object")
        pid = _field(row, "id", where, required=False, default=f"{kind}-{i:04d}")
        where = f"--dataset {source}, problem {i} ({pid})"
        if pid in seen:
            raise StudyInputError(f"{where}: the id is used twice")
        seen.add(pid)
        category = _field(row, "category", where, required=False, default="unlabelled")
        if not category.strip():
            raise StudyInputError(f"{where}: \"category\" is empty")
        problem = Problem(pid, category, _version(row.get("original"), f"{where}, original", kind),
                          _version(row.get("injected"), f"{where}, injected", kind),
                          _field(row, "context", where, required=False))
        if problem.is_control and problem.original != problem.injected:
            raise StudyInputError(f"{where}: category \"control\" needs identical original and injected versions")
        problems.append(problem)
    return ProblemSet(kind, problems, instruction, tuple(tuple(e) for e in examples))


def read_problems(path: str, limit: Optional[int] = None) -> ProblemSet:
    """The problems of the JSON file ``path`` (module docstring), the first ``limit`` of them."""
    p = Path(path)
    if not p.is_file():
        raise StudyInputError(f"--dataset {path}: {'a directory' if p.is_dir() else 'no such file'}; give a JSON "
                              "file of problems, builtin-math or builtin-qa")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StudyInputError(f"--dataset {path}: not a JSON document ({exc})") from None
    return take(parse_problems(data, path), limit)


def take(problems: ProblemSet, limit: Optional[int]) -> ProblemSet:
    """The first ``limit`` problems (all when None)."""
    if limit is None:
        return problems
    return ProblemSet(problems.kind, problems.problems[:limit], problems.instruction, problems.examples)


def to_json(problems: ProblemSet) -> dict:
    """The JSON document of a ProblemSet (what :func:`parse_problems` reads back)."""
    return {"kind": problems.kind, "instruction": problems.instruction,
            "examples": [{"question": q, "reply": r} for q, r in problems.examples],
            "problems": [{"id": p.id, "category": p.category, "context": p.context,
                          "original": {"text": p.original.text, "answer": p.original.answer},
                          "injected": {"text": p.injected.text, "answer": p.injected.answer}}
                         for p in problems.problems]}


def write_problems(problems: ProblemSet, path: str) -> None:
    Path(path).write_text(json.dumps(to_json(problems), indent=1) + "\n", encoding="utf-8")
