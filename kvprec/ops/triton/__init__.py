"""Triton launchers, registered with the op registry on import (bodies in the top-level triton_kernels package).

Importing kvprec never imports this package (triton is optional); kvprec.ops imports it on the first call that
resolves to the Triton backend. Under TRITON_INTERPRET=1 (set before this import) the kernels run on CPU tensors
in Triton's interpreter, which is how CPU CI tests them.
"""
from .. import registry as _registry
from . import decode_attention, quantize
from . import quantize_append
from . import curvature
from . import novelty

_registry.register_triton("decode_attention", decode_attention.decode_attention)
_registry.register_triton("quantize_keys", quantize.quantize_keys)
_registry.register_triton("quantize_values", quantize.quantize_values)
_registry.register_triton("dequantize_keys", quantize.dequantize_keys)
_registry.register_triton("dequantize_values", quantize.dequantize_values)
_registry.register_triton("quantize_append", quantize_append.quantize_append)
_registry.register_triton("curvature_reduce", curvature.curvature_reduce)
_registry.register_triton("curvature_sum_max", curvature.curvature_sum_max)
_registry.register_triton("novelty_reduce", novelty.novelty_reduce)

__all__ = ["decode_attention", "quantize"]
