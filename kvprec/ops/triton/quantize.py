"""Launchers of the Triton quantize / dequantize kernels (bodies in triton_kernels/quantize.py).

The Python functions have the signatures kvprec.ops calls for ``backend="triton"`` and return what the
reference (kvprec.ops.reference.quantize) returns, bit for bit. Integer tiers run the kernels through ``torch.library.triton_op``
ops (``torch.ops.kvprec_triton.{quantize_keys, quantize_values, dequantize}``); float tiers are a dtype cast,
which is the format's definition, and are done by torch.

Dequantize is launched with ``enable_fp_fusion=False``: the format defines x' = code * scale + zero as a rounded
multiply followed by a rounded add, and a fused multiply-add would change the last bit (checked in the PTX for
sm_90 with triton 3.9: no fma.rn.f32 in the dequantize kernel). The quantizers get the same option; their only
multiply-add (the parity test of round-half-even) is exact either way.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from ...triton_kernels.quantize import dequantize_kernel, quantize_keys_kernel, quantize_values_kernel

from ...storage import formats
from ..reference import quantize as quantize_ref
from ...storage.formats import QuantizedBlock, Tier

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_input(x: torch.Tensor, what: str) -> None:
    """The reference's contract (kvprec.ops.reference.quantize._checked_fp32), without its FP32 copy."""
    if x.dim() != 3:
        raise ValueError(f"{what}: expected a [N, T, D] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _OUT_DTYPES:
        raise ValueError(f"{what}: expected a floating dtype (float32, float16, bfloat16), got {x.dtype}")
    if x.numel():
        amax = x.abs().max().item()  # one synchronisation, as in the native kernels
        if not math.isfinite(amax) or amax > formats.FP16_MAX:
            raise ValueError(f"{what}: integer tiers store FP16 scales, so values must be finite with "
                             f"|x| <= 65504; got max |x| = {amax}")


def _rows_per_program(d: int) -> int:
    # About 4096 elements per tile: enough bytes in flight per program, few registers per thread.
    return max(1, min(64, 4096 // triton.next_power_of_2(d)))


@triton_op("kvprec_triton::quantize_keys", mutates_args={})
def quantize_keys_op(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, T, D] contiguous -> codes uint8 [N, T, D*bits/8], scale, zero FP16 [N, D]."""
    n, t, d = x.shape
    codes = torch.empty(n, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(n, d, dtype=torch.float16, device=x.device)
    zero = torch.empty(n, d, dtype=torch.float16, device=x.device)
    if x.numel():
        block_d = min(64, triton.next_power_of_2(d))
        block_t = max(1, min(triton.next_power_of_2(t), 4096 // block_d))
        wrap_triton(quantize_keys_kernel)[(n, triton.cdiv(d, block_d))](
            x, codes, scale, zero, t, d, BITS=bits, BLOCK_T=block_t, BLOCK_D=block_d, enable_fp_fusion=False)
    return codes, scale, zero


@triton_op("kvprec_triton::quantize_values", mutates_args={})
def quantize_values_op(x: torch.Tensor, bits: int, group_size: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, T, D] contiguous -> codes uint8 [N, T, D*bits/8], scale, zero FP16 [N, T, D/group_size]."""
    n, t, d = x.shape
    codes = torch.empty(n, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(n, t, d // group_size, dtype=torch.float16, device=x.device)
    zero = torch.empty(n, t, d // group_size, dtype=torch.float16, device=x.device)
    if x.numel():
        block_t = min(triton.next_power_of_2(t), _rows_per_program(d))
        wrap_triton(quantize_values_kernel)[(n, triton.cdiv(t, block_t))](
            x, codes, scale, zero, t, d, group_size, BITS=bits, BLOCK_T=block_t,
            BLOCK_D=triton.next_power_of_2(d), enable_fp_fusion=False)
    return codes, scale, zero


@triton_op("kvprec_triton::dequantize", mutates_args={})
def dequantize_op(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, head_dim: int,
                  group_size: int, keys: bool, dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 [N, T, D*bits/8] + FP16 scale/zero (keys [N, D], values [N, T, D/group_size]) -> [N, T, D]."""
    n, t, _ = codes.shape
    out = torch.empty(n, t, head_dim, dtype=dtype, device=codes.device)
    if out.numel():
        block_t = min(triton.next_power_of_2(t), _rows_per_program(head_dim))
        wrap_triton(dequantize_kernel)[(n, triton.cdiv(t, block_t))](
            codes, scale, zero, out, t, head_dim, group_size if not keys else 1, BITS=bits, KEYS=keys,
            OUT_BF16=dtype == torch.bfloat16, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(head_dim),
            enable_fp_fusion=False)
    return out


def _check_device(x: torch.Tensor, what: str) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    if x.device.type != "cuda" and not isinstance(dequantize_kernel, InterpretedFunction):
        raise RuntimeError(f"{what} (triton): tensors are on {x.device}; the Triton kernels need a CUDA device "
                           "(or TRITON_INTERPRET=1 set before triton_kernels was imported)")


def quantize_keys(x: torch.Tensor, tier) -> QuantizedBlock:
    """Keys [N, T, D] -> QuantizedBlock, per-channel scale/zero FP16 [N, D] (kvprec.ops.reference.quantize.quantize_keys)."""
    tier = Tier.parse(tier)
    if not tier.is_integer:
        return quantize_ref.quantize_keys(x, tier)
    _check_input(x, "quantize_keys: x")
    _check_device(x, "quantize_keys")
    return QuantizedBlock(*quantize_keys_op(x.contiguous(), tier.bits))


def quantize_values(x: torch.Tensor, tier, group_size: int) -> QuantizedBlock:
    """Values [N, T, D] -> QuantizedBlock, per (token, group) scale/zero FP16 [N, T, D/G]."""
    tier = Tier.parse(tier)
    if not tier.is_integer:
        return quantize_ref.quantize_values(x, tier, group_size)
    _check_input(x, "quantize_values: x")
    _check_device(x, "quantize_values")
    if group_size <= 0 or x.shape[2] % group_size:
        raise ValueError(f"quantize_values: group_size {group_size} must divide head_dim {x.shape[2]}")
    if x.shape[2] % 4:
        raise ValueError(f"quantize_values: head_dim {x.shape[2]} is not a multiple of 4 (INT2 packs 4 per byte)")
    return QuantizedBlock(*quantize_values_op(x.contiguous(), tier.bits, group_size))


def _dequantize(q: QuantizedBlock, tier: Tier, head_dim: int, group_size: int, dtype: torch.dtype, keys: bool,
                what: str) -> torch.Tensor:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"{what}: dtype {dtype} is not accepted; use float32, float16 or bfloat16")
    if q.codes.dim() != 3 or q.codes.dtype != torch.uint8 or q.codes.shape[2] * tier.codes_per_byte != head_dim:
        raise ValueError(f"{what}: codes must be uint8 [N, T, {head_dim * tier.bits // 8}] for head_dim {head_dim} "
                         f"at {tier}, got {q.codes.dtype} {tuple(q.codes.shape)}")
    n, t = q.codes.shape[:2]
    meta = (n, head_dim) if keys else (n, t, head_dim // group_size)
    for name, m in (("scale", q.scale), ("zero", q.zero)):
        if m is None or m.dtype != torch.float16 or tuple(m.shape) != meta:
            raise ValueError(f"{what}: {name} must be float16 {list(meta)}, got "
                             f"{None if m is None else (m.dtype, tuple(m.shape))}")
    _check_device(q.codes, what)
    return dequantize_op(q.codes.contiguous(), q.scale.contiguous(), q.zero.contiguous(), tier.bits, head_dim,
                         group_size, keys, dtype)


def dequantize_keys(q: QuantizedBlock, tier, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """QuantizedBlock of keys -> [N, T, D] in ``dtype`` (kvprec.ops.reference.quantize.dequantize_keys, bit for bit)."""
    tier = Tier.parse(tier)
    if not tier.is_integer:
        return quantize_ref.dequantize_keys(q, tier, head_dim, dtype)
    return _dequantize(q, tier, head_dim, 1, dtype, True, "dequantize_keys")


def dequantize_values(q: QuantizedBlock, tier, head_dim: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """QuantizedBlock of values -> [N, T, D] in ``dtype`` (kvprec.ops.reference.quantize.dequantize_values, bit for bit)."""
    tier = Tier.parse(tier)
    if not tier.is_integer:
        return quantize_ref.dequantize_values(q, tier, head_dim, group_size, dtype)
    if group_size <= 0 or head_dim % group_size:
        raise ValueError(f"dequantize_values: group_size {group_size} must divide head_dim {head_dim}")
    return _dequantize(q, tier, head_dim, group_size, dtype, False, "dequantize_values")
