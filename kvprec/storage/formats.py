"""Storage formats: precision tiers, block geometry and the bit layout of a sealed page.

The constants mirror csrc/include/kvprec/formats.h (checked by python_tests/test_formats.py). The pure-torch
quantize / dequantize reference that defines the codes bit for bit (the CPU default and the oracle of the C++,
CUDA and Triton kernels) is kvprec/ops/reference/quantize.py.

Layout of one sealed block of T positions and D channels, for one (batch row, KV head):

* float tiers (FP32/FP16/BF16): K and V as ``[T, D]`` in the tier dtype, no metadata.
* integer tiers (INT8/INT4/INT2): asymmetric codes in ``[0, qmax]``, ``x ~= code * scale + zero``;
  keys per channel within the block (KIVI, arXiv:2402.02750: key outlier channels persist), scale/zero
  FP16 ``[D]``; values per token in groups of G channels, scale/zero FP16 ``[T, D/G]``. Codes are packed
  along head_dim, little end first: INT4 two per byte (element 2j in the low nibble), INT2 four per byte.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

import torch

FP16_MAX = 65504.0


#: The tier id block tables hold for a block evicted by a sliding-window layer (no page; csrc kEvictedTier).
EVICTED = -1


class Tier(enum.IntEnum):
    """A precision tier; the integer value is the tier id used by the native code and the block table."""

    FP32 = 0
    FP16 = 1
    BF16 = 2
    INT8 = 3
    INT4 = 4
    INT2 = 5

    @property
    def bits(self) -> int:
        """Storage bits per element of K or V data, metadata excluded."""
        return _BITS[self]

    @property
    def is_integer(self) -> bool:
        return self in (Tier.INT8, Tier.INT4, Tier.INT2)

    @property
    def qmax(self) -> int:
        """Largest code of an integer tier (2^bits - 1); 0 for float tiers."""
        return (1 << self.bits) - 1 if self.is_integer else 0

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits if self.is_integer else 0

    @property
    def effective_bits(self) -> float:
        """Precision in bits comparable with a float mantissa p (unit roundoff 2^-p).

        Floats: 24 / 11 / 8 (mantissa with its implicit bit). Integers: the worst-case error relative to the
        group's half-range is (step/2)/(range/2) = 1/qmax, so p = log2(qmax): 7.99 / 3.91 / 1.58.
        """
        return _FLOAT_MANTISSA[self] if not self.is_integer else math.log2(self.qmax)

    @property
    def float_dtype(self) -> torch.dtype:
        if self.is_integer:
            raise ValueError(f"tier {self.name.lower()} is an integer tier and has no float dtype")
        return _FLOAT_DTYPE[self]

    @classmethod
    def parse(cls, value: "Tier | str | int") -> "Tier":
        """Accepts a Tier, its name ('int4', 'INT4') or its id; raises ValueError naming what is accepted."""
        if isinstance(value, Tier):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and 0 <= value < len(cls):
            return cls(value)
        raise ValueError(f"tier: {value!r} is not a tier; accepted {', '.join(t.name.lower() for t in cls)}")

    def __str__(self) -> str:
        return self.name.lower()


_BITS = {Tier.FP32: 32, Tier.FP16: 16, Tier.BF16: 16, Tier.INT8: 8, Tier.INT4: 4, Tier.INT2: 2}
_FLOAT_MANTISSA = {Tier.FP32: 24.0, Tier.FP16: 11.0, Tier.BF16: 8.0}
_FLOAT_DTYPE = {Tier.FP32: torch.float32, Tier.FP16: torch.float16, Tier.BF16: torch.bfloat16}


#: The largest value group :func:`default_group_size` picks (transformers' QuantizedCache q_group_size default).
MAX_DEFAULT_GROUP = 64


def default_group_size(head_dim: int) -> int:
    """The value group G used when none is given: the largest divisor of ``head_dim`` that is <= 64 (64 for head_dim
    64 / 128 / 256, 32 for 32, 40 for 80, 48 for 96). At G = 64 and D = 64 a uniform INT4 cache keeps 0.285-0.295x
    the bytes of FP16 (tail and tables included); at G = 32 it kept 0.300-0.310x, over the 0.30x target
    (python_tests/test_hf_cache_ops.py checks it)."""
    if head_dim <= 0:
        raise ValueError(f"head_dim: {head_dim} is not accepted; it must be positive")
    return max(g for g in range(1, min(head_dim, MAX_DEFAULT_GROUP) + 1) if head_dim % g == 0)


@dataclass(frozen=True)
class BlockGeometry:
    """Block size T (power of two), head_dim D (multiple of 4) and value group size G (divides D; None:
    :func:`default_group_size`)."""

    block_size: int = 64
    head_dim: int = 128
    group_size: Optional[int] = None

    def __post_init__(self):
        if self.group_size is None:
            object.__setattr__(self, "group_size", default_group_size(self.head_dim))
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: {self.block_size} is not accepted; use a power of two (default 64)")
        if self.head_dim <= 0 or self.head_dim % 4:
            raise ValueError(f"head_dim: {self.head_dim} is not accepted; kvprec needs a positive multiple of 4 "
                             "(INT2 packs 4 per byte)")
        if self.group_size <= 0 or self.head_dim % self.group_size:
            raise ValueError(f"group_size: {self.group_size} must divide head_dim {self.head_dim}")

    def metadata_bytes(self, tier: Tier) -> int:
        """FP16 scale and zero: keys per channel [D], values per (token, group) [T, D/G]."""
        if not tier.is_integer:
            return 0
        return 2 * 2 * self.head_dim + 2 * 2 * self.block_size * (self.head_dim // self.group_size)

    def page_bytes(self, tier: Tier) -> int:
        """Bytes of one page: K and V of one block of one (batch row, KV head), metadata included."""
        return 2 * self.block_size * self.head_dim * tier.bits // 8 + self.metadata_bytes(tier)


@dataclass
class QuantizedBlock:
    """codes: integer tiers uint8 [N, T, D*bits/8]; float tiers the data [N, T, D] in the tier dtype.
    scale, zero: FP16, keys [N, D], values [N, T, D/G]; None for float tiers."""

    codes: torch.Tensor
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
