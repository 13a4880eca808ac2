"""The pure-torch quantize / dequantize reference: the CPU default and the oracle.

The C++ kernels (csrc/core/quantize.cpp), the CUDA kernels (csrc/cuda/) and the Triton kernels (triton_kernels/)
must match it bit for bit. The page layout is described in kvprec/storage/formats.py.

Quantization of one group g, all arithmetic in FP32 (qmax = 2^bits - 1)::

    zero  = fp16_round_down(min g)
    scale = fp16_round_up((max g - zero) / qmax)
    code  = clamp(round_half_even((x - zero) / scale), 0, qmax)        (0 where scale == 0)
    x'    = clamp(code * scale + zero, -65504, 65504)                   (multiply, then add, then clamp)

Rounding zero down and scale up makes the stored FP16 pair cover [min g, max g], so no code is clipped and
the element error is ``|x - x'| <= scale / 2`` up to FP32 rounding (<= 2^-23 (|x| + scale) per operation).
Inputs must be finite and FP16-representable in magnitude (|x| <= 65504), since scale and zero are FP16.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...storage.formats import FP16_MAX, QuantizedBlock, Tier


# ---------------------------------------------------------------------------------------------------------
# Directed rounding to FP16, on the bit pattern: one ulp step toward -inf / +inf where round-to-nearest
# went the wrong way. The IEEE half bit pattern is monotone in magnitude within each sign.

def _step_fp16(h: torch.Tensor, toward_negative: bool) -> torch.Tensor:
    u = h.view(torch.int16).to(torch.int32) & 0xFFFF
    is_zero = (u == 0) | (u == 0x8000)
    negative = (u & 0x8000) != 0
    if toward_negative:
        stepped = torch.where(negative, u + 1, u - 1)
        stepped = torch.where(is_zero, torch.full_like(u, 0x8001), stepped)
    else:
        stepped = torch.where(negative, u - 1, u + 1)
        stepped = torch.where(is_zero, torch.full_like(u, 0x0001), stepped)
    stepped = torch.where(stepped >= 0x8000, stepped - 0x10000, stepped)
    return stepped.to(torch.int16).view(torch.float16)


def fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest FP16 value <= x (x FP32)."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, _step_fp16(h, toward_negative=True), h)


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest FP16 value >= x (x FP32)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, _step_fp16(h, toward_negative=False), h)


# ---------------------------------------------------------------------------------------------------------

def _checked_fp32(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"{what}: expected a [N, T, D] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating dtype (float32, float16, bfloat16), got {x.dtype}")
    xf = x.float()
    if xf.numel():
        amax = xf.abs().max().item()
        if not math.isfinite(amax) or amax > FP16_MAX:
            raise ValueError(f"{what}: integer tiers store FP16 scales, so values must be finite with "
                             f"|x| <= 65504; got max |x| = {amax}")
    return xf


def _store_float(x: torch.Tensor, tier: Tier, what: str) -> torch.Tensor:
    """x stored at a float tier (a copy). FP16 storage of a wider dtype refuses |x| > 65504 (it would be inf)."""
    if tier is Tier.FP16 and x.dtype != torch.float16 and x.numel():
        amax = x.abs().max().float().item()
        if amax > FP16_MAX:
            raise ValueError(f"{what}: the fp16 tier holds |x| <= 65504; got max |x| = {amax}")
    return x.to(tier.float_dtype, copy=True).contiguous()


def _quantize_groups(xf: torch.Tensor, dim: int, qmax: int):
    """Quantize FP32 ``xf`` with one (scale, zero) per slice along ``dim``; returns codes uint8, scale, zero."""
    # + 0.0 turns -0 into +0: the stored bits must not depend on which zero a reduction returns.
    mn = xf.amin(dim=dim, keepdim=True) + 0.0
    mx = xf.amax(dim=dim, keepdim=True) + 0.0
    zero = fp16_round_down(mn)
    zf = zero.float()
    # Divide by a full tensor, not a Python scalar: a scalar divisor may be turned into a reciprocal multiply.
    scale = fp16_round_up((mx - zf) / torch.full_like(mx, float(qmax)))
    sf = scale.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    codes = torch.round((xf - zf) / safe).clamp_(0, qmax)
    codes = torch.where(sf > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    return codes, scale.squeeze(dim), zero.squeeze(dim)


def pack_codes(codes: torch.Tensor, tier: Tier) -> torch.Tensor:
    """uint8 codes [..., D] in [0, qmax] -> packed uint8 [..., D*bits/8], element k*i+j at bits j*bits."""
    tier = Tier.parse(tier)
    per = tier.codes_per_byte
    if per == 1:
        return codes.contiguous()
    if codes.shape[-1] % per:
        raise ValueError(f"pack_codes: last dimension {codes.shape[-1]} is not a multiple of {per}")
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * tier.bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, tier: Tier, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: packed uint8 [..., D*bits/8] -> codes uint8 [..., D]."""
    tier = Tier.parse(tier)
    per = tier.codes_per_byte
    if packed.shape[-1] * per != head_dim:
        raise ValueError(f"unpack_codes: packed last dimension {packed.shape[-1]} does not hold head_dim "
                         f"{head_dim} codes of {tier}")
    if per == 1:
        return packed.contiguous()
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * tier.bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & tier.qmax
    return c.reshape(*packed.shape[:-1], head_dim).to(torch.uint8)


def quantize_keys(x: torch.Tensor, tier: Tier | str | int) -> QuantizedBlock:
    """Keys [N, T, D] -> per-channel (over the T positions of the block) quantized block."""
    tier = Tier.parse(tier)
    if not tier.is_integer:
        return QuantizedBlock(_store_float(x, tier, "quantize_keys: x"))
    xf = _checked_fp32(x, "quantize_keys: x")
    codes, scale, zero = _quantize_groups(xf, dim=1, qmax=tier.qmax)
    return QuantizedBlock(pack_codes(codes, tier), scale, zero)


def quantize_values(x: torch.Tensor, tier: Tier | str | int, group_size: int) -> QuantizedBlock:
    """Values [N, T, D] -> per-token quantized block with groups of ``group_size`` channels."""
    tier = Tier.parse(tier)
    if not tier.is_integer:
        return QuantizedBlock(_store_float(x, tier, "quantize_values: x"))
    xf = _checked_fp32(x, "quantize_values: x")
    n, t, d = xf.shape
    if group_size <= 0 or d % group_size:
        raise ValueError(f"quantize_values: group_size {group_size} must divide head_dim {d}")
    codes, scale, zero = _quantize_groups(xf.reshape(n, t, d // group_size, group_size), dim=3, qmax=tier.qmax)
    return QuantizedBlock(pack_codes(codes.reshape(n, t, d), tier), scale, zero)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = codes.float() * scale.float()
    y = y + zero.float()
    # Inputs obey |x| <= 65504, so clamping there never moves x' away from x; without it, code * scale + zero
    # may round past 65504 (by up to scale / 2) and a cast to FP16 would turn it into inf.
    return y.clamp_(-FP16_MAX, FP16_MAX).to(dtype)


def dequantize_keys(q: QuantizedBlock, tier: Tier | str | int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Back to ``dtype`` [N, T, D]: x' = code * scale[channel] + zero[channel], in FP32, cast once."""
    tier = Tier.parse(tier)
    if not tier.is_integer:
        return q.codes.to(dtype, copy=True)
    codes = unpack_codes(q.codes, tier, head_dim)
    return _dequantize(codes, q.scale.unsqueeze(1), q.zero.unsqueeze(1), dtype)


def dequantize_values(q: QuantizedBlock, tier: Tier | str | int, head_dim: int, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Back to ``dtype`` [N, T, D]: x' = code * scale[token, group] + zero[token, group]."""
    tier = Tier.parse(tier)
    if not tier.is_integer:
        return q.codes.to(dtype, copy=True)
    if group_size <= 0 or head_dim % group_size:
        raise ValueError(f"dequantize_values: group_size {group_size} must divide head_dim {head_dim}")
    codes = unpack_codes(q.codes, tier, head_dim)
    n, t, d = codes.shape
    codes = codes.reshape(n, t, d // group_size, group_size)
    return _dequantize(codes, q.scale.unsqueeze(-1), q.zero.unsqueeze(-1), dtype).reshape(n, t, d)


def element_error_bound(scale: torch.Tensor) -> torch.Tensor:
    """The stated bound on |x - x'| for elements of a group with FP16 ``scale``: scale / 2."""
    return scale.float() / 2


# ---------------------------------------------------------------------------------------------------------
# quantize_append: whole blocks quantized straight into the pages of a pool (the buffer's seal path).

def _append_meta_shape(keys: bool, t: int, d: int, group_size: int) -> tuple:
    return (d,) if keys else (t, d // group_size)


def check_append_args(x: torch.Tensor, tier: Tier, pages: torch.Tensor, codes: torch.Tensor,
                      scale: Optional[torch.Tensor], zero: Optional[torch.Tensor], amax: Optional[torch.Tensor],
                      keys: bool, group_size: int, what: str = "quantize_append") -> None:
    """Raise ValueError naming the first bad argument of :func:`quantize_append` (shapes in its docstring).

    Pages held on the host are range-checked here; pages on a GPU are not (that would synchronise): the kernels
    skip entries outside [0, P) and ``kvprec.ops.quantize_append(check=True)`` reports them afterwards."""
    tier = Tier.parse(tier)
    if not isinstance(x, torch.Tensor) or not 3 <= x.dim() <= 5:
        raise ValueError(f"{what}: x must be a [..., T, D] tensor with 1 to 3 leading dims, got shape "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{what}: x has dtype {x.dtype}; expected float32, float16 or bfloat16")
    t, d = x.shape[-2:]
    if tier.is_integer:
        if d % tier.codes_per_byte:
            raise ValueError(f"{what}: head_dim {d} of x is not a multiple of {tier.codes_per_byte} "
                             f"({tier} packs {tier.codes_per_byte} codes per byte)")
        if not keys and (group_size <= 0 or d % group_size):
            raise ValueError(f"{what}: group_size {group_size} must divide head_dim {d}")
    lead = tuple(x.shape[:-2])
    if (not isinstance(pages, torch.Tensor) or pages.dtype not in (torch.int32, torch.int64)
            or tuple(pages.shape) != lead):
        raise ValueError(f"{what}: pages must be int32 or int64 with shape x.shape[:-2] = {list(lead)}, got "
                         f"{(pages.dtype, tuple(pages.shape)) if isinstance(pages, torch.Tensor) else pages!r}")
    if pages.device.type != "cpu" and pages.device != x.device:
        raise ValueError(f"{what}: pages is on {pages.device}; expected the host or x's device {x.device}")
    width, dtype = (d * tier.bits // 8, torch.uint8) if tier.is_integer else (d, tier.float_dtype)
    if (not isinstance(codes, torch.Tensor) or codes.dim() != 3 or tuple(codes.shape[1:]) != (t, width)
            or codes.dtype != dtype or not codes.is_contiguous()):
        raise ValueError(f"{what}: codes must be a contiguous {dtype} pool [P, {t}, {width}] for {tier} (block_size "
                         f"{t}, head_dim {d}), got " + (f"{codes.dtype} {tuple(codes.shape)}"
                                                        if isinstance(codes, torch.Tensor) else repr(codes)))
    if codes.device != x.device:
        raise ValueError(f"{what}: codes is on {codes.device}; expected x's device {x.device}")
    p = codes.shape[0]
    meta = _append_meta_shape(keys, t, d, group_size)
    for name, m in (("scale", scale), ("zero", zero)):
        if not tier.is_integer:
            if m is not None and m.numel():
                raise ValueError(f"{what}: {name} must be None (or empty) for the float tier {tier}")
            continue
        if (m is None or m.dtype != torch.float16 or tuple(m.shape) != (p, *meta) or not m.is_contiguous()
                or m.device != x.device):
            raise ValueError(f"{what}: {name} must be a contiguous float16 [{', '.join(map(str, (p, *meta)))}] on "
                             f"{x.device} ({'keys: [P, D]' if keys else 'values: [P, T, D/group_size]'}), got "
                             f"{None if m is None else (m.dtype, tuple(m.shape), str(m.device))}")
    if amax is not None and (amax.dtype != torch.float32 or amax.numel() != 1 or amax.device != x.device):
        raise ValueError(f"{what}: amax must be a float32 tensor of one element on {x.device}, got "
                         f"{amax.dtype} {tuple(amax.shape)} on {amax.device}")
    if pages.device.type == "cpu" and pages.numel():
        flat = pages.reshape(-1)
        bad = (flat >= p).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"{what}: pages[{i}] (flat index) = {int(flat[i])} is out of range; the pool holds {p} "
                             "pages (a negative entry skips its block)")


def quantize_append(x: torch.Tensor, tier: Tier | str | int, pages: torch.Tensor, codes: torch.Tensor,
                    scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None,
                    amax: Optional[torch.Tensor] = None, *, keys: bool, group_size: int = 32) -> None:
    """Quantize whole blocks ``x [..., T, D]`` at ``tier`` and write them into pages of a pool, in place.

    x: float32 / float16 / bfloat16, 1 to 3 leading dims (N blocks, row-major), any strides. Block i goes to page
    ``pages[i]`` (int32/int64, shape ``x.shape[:-2]``, on the host or x's device); a negative entry skips the
    block (not read, not written). Pool (kvprec.ops.reference.paged layout): integer tiers ``codes`` uint8
    ``[P, T, D*bits/8]``, ``scale``/``zero`` FP16 keys ``[P, D]``, values ``[P, T, D/group_size]``; float tiers
    ``codes [P, T, D]`` in the tier dtype, no scale/zero. A page gets exactly what :func:`quantize_keys` /
    :func:`quantize_values` return for its block (this reference runs their arithmetic, then index writes);
    pages not named are untouched. Non-negative entries must be distinct.

    amax (optional float32, one element): ``amax = max(amax, max |x|)`` over the blocks written, NaN if any is
    NaN: the fused range check. Blocks that are not finite with |x| <= 65504 get unspecified bytes at integer
    tiers; the caller reads amax (one synchronisation for any number of calls) and discards them.
    """
    tier = Tier.parse(tier)
    check_append_args(x, tier, pages, codes, scale, zero, amax, keys, group_size)
    t, d = x.shape[-2:]
    x3 = x.reshape(-1, t, d)
    dst = pages.reshape(-1).to(device=x.device, dtype=torch.int64)
    live = ((dst >= 0) & (dst < codes.shape[0])).nonzero().squeeze(1)
    if live.numel() == 0:
        return
    xs, dst = x3[live], dst[live]
    if amax is not None:
        amax.copy_(torch.maximum(amax, xs.abs().amax().float().reshape(amax.shape)))
    if not tier.is_integer:
        codes.index_copy_(0, dst, xs.to(tier.float_dtype))
        return
    xf = xs.float()
    if keys:
        c, s, z = _quantize_groups(xf, dim=1, qmax=tier.qmax)
    else:
        n = xf.shape[0]
        c, s, z = _quantize_groups(xf.reshape(n, t, d // group_size, group_size), dim=3, qmax=tier.qmax)
        c = c.reshape(n, t, d)
    codes.index_copy_(0, dst, pack_codes(c, tier))
    scale.index_copy_(0, dst, s)
    zero.index_copy_(0, dst, z)


def check_append_amax(amax: torch.Tensor, tier: Tier | str | int, x_dtype: torch.dtype, what: str) -> None:
    """The range contract of the tier on an ``amax`` from :func:`quantize_append` (one synchronisation):
    integer tiers need finite values with |x| <= 65504 (FP16 scales); the fp16 tier from a wider dtype refuses
    |x| > 65504 (it would store inf), as :func:`quantize_keys` does. Raises ValueError naming ``what``."""
    tier = Tier.parse(tier)
    if not tier.is_integer and not (tier is Tier.FP16 and x_dtype != torch.float16):
        return
    value = float(amax.reshape(-1)[0])
    if tier.is_integer and not (math.isfinite(value) and value <= FP16_MAX):
        raise ValueError(f"{what}: integer tiers store FP16 scales, so values must be finite with |x| <= 65504; "
                         f"got max |x| = {value}")
    if not tier.is_integer and value > FP16_MAX:
        raise ValueError(f"{what}: the fp16 tier holds |x| <= 65504; got max |x| = {value}")
