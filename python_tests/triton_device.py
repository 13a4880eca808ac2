"""Where the Triton tests run. Import this before anything imports triton: without a CUDA device it sets
TRITON_INTERPRET=1 (triton reads it once, when it is imported), so the kernels run in Triton's interpreter on CPU
tensors; with one they compile for it.

DEVICE: "cuda" or "cpu". TRITON: triton is installed and can run here (compiled on CUDA, or the interpreter).
skip_module_without_triton(): called at module level, skips the whole module unless TRITON.
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = (importlib.util.find_spec("triton") is not None
          and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"))


def skip_module_without_triton() -> None:
    pytest.importorskip("triton")
    if not TRITON:
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
