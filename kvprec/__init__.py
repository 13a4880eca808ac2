"""kvprec: a mixed-precision KV cache whose precision is chosen per block of positions, layer and KV head.

Importing kvprec never fails because the native library did not load; ``kvprec.native_available()`` says
whether it did, and a native op raises a clear error with build instructions when it did not.
"""
import sys

import torch  # noqa: F401  (must precede the native library: it has no RUNPATH to torch/lib)

from ._native import cuda_kernels_available, native_available, require_native
from .storage.formats import BlockGeometry, QuantizedBlock, Tier
from .storage.buffer import MemoryReport, MixedPrecisionBuffer
from . import ops
from .hf import policy

# ``kvprec.policy`` is the public name of the policy package (it lives with the transformers integration, whose
# cache calls it): ``from kvprec.policy import budget`` and ``kvprec.policy.get(...)`` keep working.
sys.modules[__name__ + ".policy"] = policy

__version__ = "0.1.0"

# The Hugging Face drop-in needs transformers (an optional dependency): loaded on first use, not at import.
_HF_NAMES = {"AdaptiveCache": "hf.cache", "enable": "hf.attention", "enabled": "hf.attention"}


def __getattr__(name):
    if name in _HF_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_HF_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'kvprec' has no attribute {name!r}")


__all__ = ["Tier", "BlockGeometry", "QuantizedBlock", "ops", "policy", "native_available", "cuda_kernels_available",
           "require_native", "AdaptiveCache", "enable", "enabled", "__version__"]
__all__ += ["MixedPrecisionBuffer", "MemoryReport"]
