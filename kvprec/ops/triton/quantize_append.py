"""Launcher of the Triton quantize_append kernel (body in triton_kernels/quantize_append.py).

:func:`quantize_append` has the signature kvprec.ops calls for ``backend="triton"`` and writes what the reference
(kvprec.ops.reference.quantize.quantize_append) writes, bit for bit. The kernel runs as the ``torch.library.triton_op``
``torch.ops.kvprec_triton.quantize_append`` (in place: codes, scale, zero, amax), launched with
``enable_fp_fusion=False`` like the other quantizers (kvprec/ops/triton/quantize.py says why).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from ...triton_kernels.quantize_append import quantize_append_kernel

from ..reference import quantize as quantize_ref
from ...storage.formats import Tier
from .quantize import _check_device

_OUT_KIND = {Tier.FP32: 1, Tier.FP16: 2, Tier.BF16: 3}
# Elements per program: 16 per thread with 8 warps, 64-92 registers and no spills on sm_90 at T=64, D=128.
_TILE = 4096


def _lead3(x: torch.Tensor):
    """Leading dims of x [..., T, D] padded in front to three: sizes and element strides."""
    nl = x.dim() - 2
    sizes = [1] * (3 - nl) + list(x.shape[:nl])
    strides = [0] * (3 - nl) + list(x.stride()[:nl])
    return sizes, strides


@triton_op("kvprec_triton::quantize_append", mutates_args={"codes", "scale", "zero", "amax"})
def quantize_append_op(x: torch.Tensor, pages: torch.Tensor, codes: torch.Tensor, scale: Optional[torch.Tensor],
                       zero: Optional[torch.Tensor], amax: Optional[torch.Tensor], tier: int, keys: bool,
                       group_size: int) -> None:
    """x [..., T, D] (unit stride along D), pages on x's device, shape x.shape[:-2]; see quantize_ref.quantize_append."""
    t, d = x.shape[-2:]
    (_, l1, l2), (s0, s1, s2) = _lead3(x)
    n = pages.numel()
    if n == 0 or x.numel() == 0:
        return
    tr = Tier(tier)
    gs = group_size if (tr.is_integer and not keys) else 1
    # A tile of about _TILE elements per program, made of whole quantization groups: integer keys take all T
    # rows of a chunk of channels, values and float tiers whole rows (kernel docstring).
    if tr.is_integer and keys:
        block_t = triton.next_power_of_2(t)
        block_d = min(triton.next_power_of_2(d), max(8, _TILE // block_t))
        chunks = triton.cdiv(d, block_d)
    else:
        block_d = triton.next_power_of_2(d)
        block_t = min(triton.next_power_of_2(t), max(1, _TILE // block_d))
        chunks = triton.cdiv(t, block_t)
    reshape = (not keys and tr.is_integer and block_d == d and gs & (gs - 1) == 0)
    wrap_triton(quantize_append_kernel)[(n, chunks)](
        x, pages, codes, scale if scale is not None else codes, zero if zero is not None else codes,
        amax.view(torch.int32) if amax is not None else pages,
        l1, l2, s0, s1, s2, x.stride(-2), codes.shape[0], t, d,
        GS=gs, BITS=tr.bits if tr.is_integer else 8, KEYS=keys, OUT_KIND=_OUT_KIND.get(tr, 0),
        HAS_AMAX=amax is not None, GROUPS_RESHAPE=reshape, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=8, enable_fp_fusion=False)


def quantize_append(x: torch.Tensor, tier, pages: torch.Tensor, codes: torch.Tensor,
                    scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None,
                    amax: Optional[torch.Tensor] = None, *, keys: bool, group_size: int = 32) -> None:
    """Whole blocks x [..., T, D] at ``tier`` into ``pages`` of a pool, in place (kvprec.ops.reference.quantize.quantize_append,
    bit for bit; amax raised as there)."""
    tier = Tier.parse(tier)
    quantize_ref.check_append_args(x, tier, pages, codes, scale, zero, amax, keys, group_size)
    _check_device(x, "quantize_append")
    if not tier.is_integer:
        scale = zero = None
    if x.stride(-1) != 1:  # rows are read with unit stride; any other layout of the leading dims is read in place
        x = x.contiguous()
    quantize_append_op(x, pages.to(x.device), codes, scale, zero, amax, int(tier), keys, group_size)
