"""Load a model and a tokenizer from a local path (nothing is downloaded, ever).

``"tiny"`` (or a ``.safetensors`` file) is the built-in byte-level Llama (kvprec/models/tiny.py), whose
tokenizer is the identity on bytes; any other path is a Hugging Face model directory loaded with
``local_files_only=True``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import torch


@dataclass
class LoadedModel:
    model: object
    encode: Callable[[str], List[int]]
    decode: Callable[[List[int]], str]
    name: str


def load(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    if path == "tiny" or path.endswith(".safetensors"):
        from . import load_tiny_llama

        model = load_tiny_llama(None if path == "tiny" else path, dtype=dtype).to(device)
        return LoadedModel(model, lambda s: list(s.encode("utf-8")),
                           lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace"), "tiny")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--model: {path!r} is neither 'tiny', a .safetensors file of the tiny model, nor a "
                                "local Hugging Face model directory (nothing is downloaded)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=dtype).to(device).eval()
    return LoadedModel(model, lambda s: tok(s)["input_ids"], lambda ids: tok.decode(ids), p.name)
