"""Prompts for the recall study: LongBench's multi-hop template, chat formatting, token positions of the context
and of the supporting facts.

The user message is LongBench's HotpotQA / MuSiQue prompt (THUDM/LongBench ``dataset2prompt``) with one change of
instruction for ``style="reason"`` (the default): the model is asked to reason step by step before answering, so
that a decode run has more than the few steps of a bare answer; ``style="answer"`` keeps LongBench's wording.

For an instruct model (a tokenizer with a chat template, ``chat="auto"``) the message goes through
``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; a base model (or ``chat="off"``) gets the
message as plain text. The byte-level tiny model has no tokenizer: a character's token positions are its UTF-8
bytes.

Token positions come from the tokenizer's offset mapping: a token belongs to a character span when their
character ranges overlap. A prompt longer than ``max_tokens`` is cut in the middle of the context (as LongBench
truncates in the middle), and spans are clipped to what is left.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ...models.chat import chat_text, uses_chat
from .data import MultiHopSample

INSTRUCTIONS = {
    "answer": "Answer the question based on the given passages. Only give me the answer and do not output any "
              "other words.",
    "reason": "Answer the question based on the given passages. First explain your reasoning step by step, "
              "naming the passages you use, then give the answer.",
}


@dataclass
class EncodedPrompt:
    ids: torch.Tensor                      # int64 [P]
    context: Tuple[int, int]               # token range [start, end) of the passages
    supporting: List[Tuple[int, int]] = field(default_factory=list)  # token ranges of the supporting facts found
    missing_supporting: int = 0            # supporting facts not found (or cut away by truncation)
    truncated: int = 0                     # context tokens removed from the middle
    chat: bool = False


def user_message(sample: MultiHopSample, style: str) -> str:
    if style not in INSTRUCTIONS:
        raise ValueError(f"prompt style {style!r}: accepted {', '.join(INSTRUCTIONS)}")
    instruction = INSTRUCTIONS[style]
    return (f"{instruction}\n\nThe following are given passages.\n{sample.context}\n\n{instruction}\n\n"
            f"Question: {sample.question}\nAnswer:")


def _tokens_with_offsets(text: str, tokenizer) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Token ids and each token's character range [a, b) in ``text``."""
    if tokenizer is None:  # byte-level: one token per UTF-8 byte
        ids, offsets = [], []
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(b)
                offsets.append((i, i + 1))
        return ids, offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _span(offsets: List[Tuple[int, int]], start: int, end: int) -> Tuple[int, int]:
    """Token range [i, j) of the tokens overlapping characters [start, end); (0, 0) if none."""
    hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return (hit[0], hit[-1] + 1) if hit else (0, 0)


def encode(sample: MultiHopSample, tokenizer=None, *, chat: str = "auto", style: str = "reason",
           max_tokens: Optional[int] = None) -> EncodedPrompt:
    """The prompt of ``sample`` as token ids, with the token ranges of its context and supporting facts."""
    message = user_message(sample, style)
    use_chat = uses_chat(tokenizer, chat)
    text = chat_text(tokenizer, message) if use_chat else message
    c0 = text.find(sample.context)
    ids, offsets = _tokens_with_offsets(text, tokenizer)
    context = _span(offsets, c0, c0 + len(sample.context))
    spans, missing = [], 0
    for fact in sample.supporting:
        at = sample.context.find(fact)
        if at < 0 or not fact:
            missing += 1
            continue
        spans.append(_span(offsets, c0 + at, c0 + at + len(fact)))
    cut = 0
    if max_tokens is not None and len(ids) > max_tokens:
        cut = len(ids) - max_tokens
        inside = context[1] - context[0]
        if cut >= inside:
            raise ValueError(f"--max-prompt-tokens {max_tokens}: sample {sample.id!r} needs {len(ids) - inside} "
                             "tokens without its passages; raise the limit")
        a = context[0] + (inside - cut) // 2  # remove [a, a + cut): the middle of the context
        ids = ids[:a] + ids[a + cut:]
        context = (context[0], context[1] - cut)
        kept = []
        for s, e in spans:
            s2, e2 = (s if s < a else max(a, s - cut)), (e if e <= a else max(a, e - cut))
            if e2 > s2:
                kept.append((s2, e2))
            else:
                missing += 1
        spans = kept
    return EncodedPrompt(torch.tensor(ids, dtype=torch.int64), context, spans, missing, cut, use_chat)


def position_mask(spans: List[Tuple[int, int]], length: int) -> torch.Tensor:
    """bool [length]: True at the token positions inside any of ``spans``."""
    mask = torch.zeros(length, dtype=torch.bool)
    for s, e in spans:
        mask[s:e] = True
    return mask
