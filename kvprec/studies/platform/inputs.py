"""Study inputs: the built-in prompt suite (offline), ``--text FILE``, ``--dataset FILE``, the model and device.

Prompt suite: one instruction per prompt type, each asking for a long answer of one kind of content. A model with a
chat template (an instruct model's tokenizer) gets the instruction as a user turn with the generation prompt; a
model without one (the built-in byte-level tiny model) gets the instruction as plain text followed by a blank line.

``--text FILE``: the whole file is one prompt, type "file" (cut to its first ``max_prompt_tokens`` tokens).
``--dataset FILE``: JSON Lines, one object per line with "prompt" (a string) and optionally "type" (a string;
default "dataset"); blank lines are skipped. Every malformed line is an error naming the file and the line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from ...models.chat import prompt_token_ids
from .rundir import StudyInputError

#: prompt type -> instruction (the suite of ``--suite``): prose explanation, code generation, mixed content,
#: step-by-step reasoning, topic transitions.
PROMPT_SUITE = {
    "prose": "Explain in several paragraphs of plain prose why the sky is blue during the day and red at sunset. "
             "Write for a curious reader without formulas.",
    "code": "Write a complete Python module that implements a least-recently-used cache class with get, put and "
            "resize methods, with docstrings, and a small test function that exercises every method.",
    "mixed": "Write a short tutorial on reading CSV files in Python: explain each step in prose, show code blocks, "
             "a table of the csv module's main options as markdown, and a numbered list of common mistakes.",
    "reasoning": "Solve this step by step, numbering each step and checking the arithmetic: a train leaves at 9:40 "
                 "and travels 237 km at 79 km/h, waits 25 minutes, then travels 154 km at 88 km/h. When does it "
                 "arrive, and what is its average speed over the whole trip including the wait?",
    "transitions": "Write five short paragraphs, each on a different topic, in this order: the life cycle of a "
                   "star, how to bake sourdough bread, the rules of chess castling, the history of the printing "
                   "press, and how vaccines train the immune system.",
}

DEVICES = ("cpu", "cuda")


@dataclass
class Prompt:
    """One study input: its type, where it came from, and its text."""

    type: str
    source: str
    text: str


def check_device(name: str) -> None:
    """``--device``: cpu, cuda or cuda:N where this torch build has CUDA."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICES:
        raise StudyInputError(f"--device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StudyInputError(f"--device {name}: CUDA is not available in this torch build / on this machine; "
                              "use --device cpu")


def _read_text(path: str, flag: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise StudyInputError(f"{flag} {path}: {'a directory' if p.is_dir() else 'no such file'}; give a text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise StudyInputError(f"{flag} {path}: the file is empty")
    return text


def read_dataset(path: str, limit: Optional[int] = None) -> List[Prompt]:
    """The prompts of a JSON Lines file (module docstring), at most ``limit``."""
    prompts = []
    for number, line in enumerate(_read_text(path, "--dataset").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StudyInputError(f"--dataset {path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise StudyInputError(f"--dataset {path}, line {number}: expected an object with a non-empty string "
                                  "\"prompt\" (and optionally a string \"type\")")
        kind = row.get("type", "dataset")
        if not isinstance(kind, str) or not kind.strip():
            raise StudyInputError(f"--dataset {path}, line {number}: \"type\" must be a non-empty string")
        prompts.append(Prompt(kind.strip(), f"{path}:{number}", row["prompt"]))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise StudyInputError(f"--dataset {path}: no prompts (one JSON object per line with \"prompt\")")
    return prompts


def select_prompts(*, prompt_types: Sequence[str] = (), suite: bool = False, text: Optional[str] = None,
                   dataset: Optional[str] = None, dataset_limit: Optional[int] = None) -> List[Prompt]:
    """The prompts of a run: built-in types, the whole suite, a text file or a dataset (one source only)."""
    sources = [name for name, given in (("--prompt-type", bool(prompt_types)), ("--suite", suite),
                                        ("--text", text is not None), ("--dataset", dataset is not None)) if given]
    if len(sources) > 1:
        raise StudyInputError(f"{' and '.join(sources)}: give one source of prompts")
    if text is not None:
        return [Prompt("file", text, _read_text(text, "--text"))]
    if dataset is not None:
        return read_dataset(dataset, dataset_limit)
    chosen = list(PROMPT_SUITE) if suite else list(dict.fromkeys(prompt_types))
    for kind in chosen:
        if kind not in PROMPT_SUITE:
            raise StudyInputError(f"--prompt-type {kind}: use one of {', '.join(PROMPT_SUITE)} (or --suite)")
    return [Prompt(kind, "built-in", PROMPT_SUITE[kind]) for kind in chosen]


def tokenizer_of(loaded):
    """The Hugging Face tokenizer of a kvprec.models.loading.LoadedModel, or None (the byte-level tiny model)."""
    return getattr(loaded, "tokenizer", None)


def prompt_ids(loaded, text: str, *, chat: bool = True, max_tokens: Optional[int] = None) -> List[int]:
    """Token ids of a prompt: the chat template's user turn plus generation prompt where the tokenizer has a
    template and ``chat``, else the text and a blank line; the first ``max_tokens`` tokens of the text."""
    tok = tokenizer_of(loaded)
    if max_tokens is not None:
        ids = loaded.encode(text)
        if len(ids) > max_tokens:
            text = loaded.decode(ids[:max_tokens])
    return prompt_token_ids(tok, loaded.encode, text, "auto" if chat else "off", plain_suffix="\n\n")


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """kvprec.models.loading.load(name): 'tiny', the names it registers, a .safetensors file of the tiny model or a
    local Hugging Face model directory (nothing is downloaded)."""
    import torch

    from ...models.loading import load

    return load(name, dtype=getattr(torch, dtype), device=device)
