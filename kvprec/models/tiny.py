"""The built-in tiny model: a byte-level Llama (vocab 256) trained on source files of Python's standard
library, which ships with every Python, so nothing is downloaded. examples/train_tiny_model.py trains it;
the weights kvprec ships (kvprec/models/tiny_llama_stdlib.safetensors, FP16, 1.6 MB) came from

    python examples/train_tiny_model.py --out kvprec/models/tiny_llama_stdlib.safetensors

and the training log beside them records the losses. Training and evaluation files are disjoint.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Optional

import torch

WEIGHTS = Path(__file__).with_name("tiny_llama_stdlib.safetensors")

# Deterministic corpus: named files of the running Python's stdlib (they differ slightly between Python
# versions; the model is robust to that, and the eval files never overlap the training files).
STDLIB_TRAIN_FILES = ("argparse.py", "textwrap.py", "inspect.py", "typing.py", "dataclasses.py", "pathlib.py",
                      "functools.py", "collections/__init__.py", "enum.py", "ast.py", "logging/__init__.py",
                      "subprocess.py", "tarfile.py", "zipfile.py" if os.path.exists(
                          os.path.join(sysconfig.get_paths()["stdlib"], "zipfile.py")) else "zipfile/__init__.py")
STDLIB_EVAL_FILES = ("difflib.py", "json/decoder.py", "calendar.py", "shutil.py")


def tiny_llama_config(**overrides):
    """LlamaConfig of the tiny model: 4 layers, hidden 128, 4 query heads and 2 KV heads of head_dim 32 (GQA)."""
    from transformers import LlamaConfig

    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=10000.0,
               bos_token_id=None, eos_token_id=None, pad_token_id=0)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def stdlib_text(files: Iterable[str], max_bytes: Optional[int] = None) -> bytes:
    """Concatenated bytes of the named stdlib files (paths relative to the stdlib directory)."""
    root = sysconfig.get_paths()["stdlib"]
    data = b"".join(Path(root, f).read_bytes() for f in files)
    return data[:max_bytes] if max_bytes is not None else data


def byte_tokens(data: bytes) -> torch.Tensor:
    """Bytes -> token ids [len(data)] (int64): the byte value is the token."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)


def load_tiny_llama(path: Optional[os.PathLike] = None, dtype: torch.dtype = torch.float32):
    """The trained tiny model in eval mode, from ``path`` (default: the weights shipped with kvprec)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    path = Path(path) if path is not None else WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"tiny model weights not found at {path}; train them with "
                                "`python examples/train_tiny_model.py --out <path>`")
    meta_path = path.with_suffix(".json")
    overrides = json.loads(meta_path.read_text())["config"] if meta_path.exists() else {}
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the tiny model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval()
