"""Token ids of a problem's prompt, cut where the injected span begins.

The prompt is the set's worked examples (as earlier chat turns where the tokenizer has a chat template, else as
"question\\nreply\\n\\n" text), then the last user turn: the instruction, the problem's context and the problem
text, then the template's closing tokens (end of the user turn, the assistant's header). It is cut into

* ``pre``: everything before the problem text — identical for every condition;
* a span per version: the problem text (original, injected, or a noise control of the injected text) followed by
  the template's closing tokens, so a span ends where generation begins: replacing it before the first generated
  token gives the oracle's prompt exactly.

Noise controls have the injected text's length in tokens: ``shuffled`` permutes its tokens, ``random`` draws
tokens uniformly from the vocabulary (special tokens excluded; printable bytes for a byte-level model); both keep
the closing tokens, so the chat structure stays intact.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List

from ...models.chat import has_chat_template
from .data import Problem, ProblemSet

NOISE_KINDS = ("shuffled", "random")
_PLACEHOLDER = "\u0000KVPREC-PROBLEM\u0000"


@dataclass
class PromptParts:
    """``pre`` ids; ``spans[name]`` ids of each version ("original", "injected", "noise-<kind>"); ``text_len[name]``
    how many of a span's ids are problem text (the rest are the template's closing tokens)."""

    pre: List[int]
    spans: Dict[str, List[int]]
    text_len: Dict[str, int]


def _encode(loaded, text: str) -> List[int]:
    tok = getattr(loaded, "tokenizer", None)
    if tok is not None:
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(loaded.encode(text))


def _frame(loaded, problems: ProblemSet, problem: Problem):
    """(text before the problem text, text after it)."""
    head = "".join(part + "\n\n" for part in (problems.instruction, problem.context) if part)
    if has_chat_template(getattr(loaded, "tokenizer", None)):
        messages = []
        for question, reply in problems.examples:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": head + _PLACEHOLDER})
        rendered = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        before, found, after = rendered.partition(_PLACEHOLDER)
        if not found:  # pragma: no cover - a template that drops the user's text
            raise ValueError("the chat template does not keep the user's message; cannot place the problem")
        return before, after
    shots = "".join(f"{question}\n{reply}\n\n" for question, reply in problems.examples)
    return shots + head, "\n"


def _vocabulary(loaded) -> List[int]:
    tok = getattr(loaded, "tokenizer", None)
    if tok is None:
        return list(range(32, 127))  # printable ASCII of a byte-level model
    special = set(tok.all_special_ids)
    return [i for i in range(len(tok)) if i not in special]


def build_prompt(loaded, problems: ProblemSet, problem: Problem, noise: List[str], seed: int) -> PromptParts:
    """The PromptParts of ``problem`` with the noise controls ``noise`` (NOISE_KINDS) drawn from ``seed``."""
    before, after = _frame(loaded, problems, problem)
    pre, closing = _encode(loaded, before), _encode(loaded, after)
    texts = {"original": _encode(loaded, problem.original.text), "injected": _encode(loaded, problem.injected.text)}
    rng = random.Random(seed)
    vocabulary = None
    for kind in noise:
        ids = list(texts["injected"])
        if kind == "shuffled":
            rng.shuffle(ids)
        elif kind == "random":
            vocabulary = vocabulary or _vocabulary(loaded)
            ids = [rng.choice(vocabulary) for _ in ids]
        else:
            raise ValueError(f"noise kind {kind!r}; use one of {', '.join(NOISE_KINDS)}")
        texts[f"noise-{kind}"] = ids
    return PromptParts(pre, {name: ids + closing for name, ids in texts.items()},
                       {name: len(ids) for name, ids in texts.items()})
