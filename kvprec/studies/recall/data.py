"""Multi-hop QA inputs: HotpotQA, MuSiQue and LongBench-format records, normalised to :class:`MultiHopSample`.

Accepted records (one JSON object per line of a ``.jsonl`` file, or a ``.json`` file holding a list of them; the
format is recognised per record by its fields):

* LongBench (``hotpotqa.jsonl``, ``musique.jsonl`` of THUDM/LongBench): ``input`` (the question), ``context`` (the
  passages as one string, "Passage 1:\\n<title>\\n<text>..."), ``answers`` (list), ``_id``; optionally
  ``supporting_facts`` as a list of strings of the context (LongBench itself has none);
* HotpotQA (the original distractor / fullwiki files): ``question``, ``answer``, ``context`` as
  [title, [sentences]] per passage, ``supporting_facts`` as [title, sentence index] pairs, ``_id``;
* MuSiQue (``musique_ans_v1.0_*.jsonl``): ``question``, ``answer``, ``answer_aliases``, ``paragraphs`` as
  {title, paragraph_text, is_supporting}, ``id``.

HotpotQA and MuSiQue passages are joined the way LongBench joins them ("Passage i:\\n<title>\\n<text>", blank line
between passages), so all three give the same prompt for the same passages; supporting facts become the exact
sentences (HotpotQA) or paragraphs (MuSiQue) they name, which :mod:`kvprec.studies.recall.prompt` locates in the
token sequence. ``builtin`` is the invented sample of kvprec/studies/recall/builtin.py (HotpotQA layout).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..platform.rundir import StudyInputError


@dataclass
class MultiHopSample:
    id: str
    question: str
    answers: List[str]
    context: str
    supporting: List[str] = field(default_factory=list)  # spans of ``context`` that support the answer
    source: str = ""


def _passages(pairs) -> str:
    return "\n\n".join(f"Passage {i}:\n{title}\n{text}" for i, (title, text) in enumerate(pairs, 1))


def from_hotpotqa(rec: dict, source: str = "hotpotqa") -> MultiHopSample:
    paragraphs = {title: sentences for title, sentences in rec["context"]}
    supporting = []
    for title, index in rec.get("supporting_facts", []):
        sentences = paragraphs.get(title, [])
        if not 0 <= index < len(sentences):
            raise ValueError(f"supporting fact [{title!r}, {index}] names no sentence of the context")
        supporting.append(sentences[index].strip())
    return MultiHopSample(str(rec.get("_id", "")), rec["question"], [rec["answer"]],
                          _passages((t, "".join(s).strip()) for t, s in rec["context"]), supporting, source)


def from_musique(rec: dict) -> MultiHopSample:
    paragraphs = rec["paragraphs"]
    answers = [rec["answer"]] + list(rec.get("answer_aliases", []))
    supporting = [p["paragraph_text"].strip() for p in paragraphs if p.get("is_supporting")]
    return MultiHopSample(str(rec.get("id", "")), rec["question"], answers,
                          _passages((p["title"], p["paragraph_text"].strip()) for p in paragraphs), supporting,
                          "musique")


def from_longbench(rec: dict) -> MultiHopSample:
    answers = rec["answers"]
    if isinstance(answers, str):
        answers = [answers]
    supporting = list(rec.get("supporting_facts") or [])
    if not all(isinstance(s, str) for s in supporting):
        raise ValueError("a LongBench record's supporting_facts must be strings of its context")
    return MultiHopSample(str(rec.get("_id", "")), rec["input"], list(answers), rec["context"], supporting,
                          f"longbench:{rec.get('dataset', '')}".rstrip(":"))


def normalize(rec) -> MultiHopSample:
    """One record of any accepted format as a MultiHopSample; ValueError says what is missing."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    try:
        if "paragraphs" in rec:
            return from_musique(rec)
        if "input" in rec and isinstance(rec.get("context"), str):
            return from_longbench(rec)
        if "question" in rec and isinstance(rec.get("context"), list):
            return from_hotpotqa(rec)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed record ({type(exc).__name__}: {exc})") from None
    raise ValueError("not a LongBench (input, context, answers), HotpotQA (question, answer, context as "
                     "[title, sentences], supporting_facts) or MuSiQue (question, answer, paragraphs) record; "
                     f"fields: {', '.join(sorted(rec))}")


def builtin() -> List[MultiHopSample]:
    from .builtin import RECORDS

    return [from_hotpotqa(rec, "builtin") for rec in RECORDS]


def load_dataset(spec: str, max_samples: Optional[int] = None) -> List[MultiHopSample]:
    """``"builtin"`` or a path to a .jsonl / .json file of records; the first ``max_samples`` (all if None).
    StudyInputError (a ValueError) names ``--dataset``, the file and the line of a bad record."""
    if spec == "builtin":
        samples = builtin()
    else:
        path = Path(spec)
        if not path.is_file():
            raise StudyInputError(f"--dataset: {spec!r} is neither 'builtin' nor a file (a .jsonl of LongBench, "
                                    "HotpotQA or MuSiQue records, or a .json list of them)")
        text = path.read_text(encoding="utf-8")
        samples = []
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StudyInputError(f"--dataset {spec}: not valid JSON ({exc})") from None
            for i, rec in enumerate(records):
                try:
                    samples.append(normalize(rec))
                except ValueError as exc:
                    raise StudyInputError(f"--dataset {spec}: record {i}: {exc}") from None
        else:
            for line_no, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    samples.append(normalize(json.loads(line)))
                except (ValueError, json.JSONDecodeError) as exc:
                    raise StudyInputError(f"--dataset {spec}: line {line_no}: {exc}") from None
                if max_samples is not None and len(samples) >= max_samples:
                    break
        if not samples:
            raise StudyInputError(f"--dataset {spec}: no records")
    return samples[:max_samples] if max_samples is not None else samples
