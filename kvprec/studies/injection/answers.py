"""Reading the answer out of a reply and checking it against the ground truth.

Math (whole numbers), in this order of preference:
1. the last "answer is N" / "answer: N" / "#### N" (the form the examples teach);
2. else the number after the last "=" (the result of the last calculation written);
3. else the last number in the reply.
A reply with no number has no answer (None). Numbers may carry a sign and thousands commas ("1,200").

QA (words): the reply's answer is its text after the last "answer is" when there is one, else the whole reply; it
is correct when the expected answer occurs in it as a whole word, case-insensitively.
"""
from __future__ import annotations

import re
from typing import Optional

_NUMBER = r"-?\d[\d,]*"
_MARKED = re.compile(r"(?:answer\s*(?:is|:)|####)\s*:?\s*\$?\s*(" + _NUMBER + r")", re.IGNORECASE)
_AFTER_EQUALS = re.compile(r"=\s*\$?\s*(" + _NUMBER + r")")
_ANY = re.compile(_NUMBER)


def _int(text: str) -> Optional[str]:
    digits = text.replace(",", "")
    return str(int(digits)) if re.fullmatch(r"-?\d+", digits) else None


def math_answer(reply: str) -> Optional[str]:
    """The whole number a reply gives as its answer (module docstring), as a canonical string, or None."""
    for pattern in (_MARKED, _AFTER_EQUALS, _ANY):
        found = pattern.findall(reply)
        for candidate in reversed(found):
            value = _int(candidate.rstrip(","))
            if value is not None:
                return value
    return None


def qa_answer(reply: str) -> str:
    """The part of a reply that answers (after the last "answer is", else all of it), stripped."""
    parts = re.split(r"answer is", reply, flags=re.IGNORECASE)
    return parts[-1].strip() if len(parts) > 1 else reply.strip()


def extract(kind: str, reply: str) -> str:
    """The answer read from ``reply`` as a string ("" when a math reply has none)."""
    if kind == "math":
        return math_answer(reply) or ""
    return qa_answer(reply)


def matches(kind: str, reply: str, answer: str) -> bool:
    """Whether ``reply`` gives ``answer``: the same whole number (math), or the answer as a whole word in the
    reply's answer part (QA)."""
    if kind == "math":
        got = math_answer(reply)
        return got is not None and got == _int(answer)
    return re.search(r"\b" + re.escape(answer.strip()) + r"\b", qa_answer(reply), re.IGNORECASE) is not None
