"""Pure-torch references of the cache-reading kernels (the CPU default and the test oracle).

* :class:`PagedKV` (paged.py): the pools, block table and tail one layer's kernels read;
* :func:`decode_attention` (decode_attention.py): flash-decoding attention over mixed tiers, one block at a time;
  :func:`dense_decode_attention`: the dense oracle on dequantized K/V, in FP32 or a low-precision dtype.
"""
from .decode_attention import decode_attention, dense_decode_attention
from .paged import PagedKV

__all__ = ["PagedKV", "decode_attention", "dense_decode_attention"]
