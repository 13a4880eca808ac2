"""kvprec: a mixed-precision KV cache whose precision is chosen per block of positions, layer and KV head.

Importing kvprec never fails because the native library did not load; ``kvprec.native_available()`` says
whether it did, and a native op raises a clear error with build instructions when it did not.
"""
import torch  # noqa: F401  (must precede the native library: it has no RUNPATH to torch/lib)

from ._native import cuda_kernels_available, native_available, require_native
from .formats import BlockGeometry, QuantizedBlock, Tier
from .buffer import MemoryReport, MixedPrecisionBuffer
from . import ops

__version__ = "0.1.0"

__all__ = ["Tier", "BlockGeometry", "QuantizedBlock", "ops", "native_available", "cuda_kernels_available",
           "require_native", "__version__"]
__all__ += ["MixedPrecisionBuffer", "MemoryReport"]
