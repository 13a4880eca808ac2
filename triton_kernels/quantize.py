"""Quantize / dequantize of integer-tier blocks, bit-identical to kvprec.ops.reference.quantize: @triton.jit bodies only.

Launchers: kvprec/ops/triton/quantize.py. Shapes (N blocks, T positions, D channels, GS value group size,
BITS in {8, 4, 2}, PER = 8 / BITS codes per byte, QMAX = 2^BITS - 1):

    x [N, T, D] (fp32 / fp16 / bf16, contiguous) -> codes uint8 [N, T, D / PER],
    keys: scale, zero FP16 [N, D] (per channel over the T positions); values: FP16 [N, T, D / GS].

Per group, in FP32 (kvprec.ops.reference.quantize docstring):

    zero  = fp16_round_down(min)                 (-0 canonicalised to +0 first)
    scale = fp16_round_up((max - zero) / QMAX)    (IEEE division: tl.div_rn, not the approximate '/')
    code  = clamp(round_half_even((x - zero) / scale), 0, QMAX), 0 where scale == 0
    x'    = code * scale + zero                   (multiply, then add: launch with enable_fp_fusion=False)

Directed FP16 rounding converts with round-to-nearest, compares in FP32 and steps the bit pattern one ulp where
nearest went the wrong way (the half bit pattern is monotone in magnitude within each sign). Packing is little
end first: element PER*i + j of a row sits at bits j*BITS of byte i.
"""
import triton
import triton.language as tl

from .decode_attention import round_to_bf16


@triton.jit
def _fp16_bits(h):
    return h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _fp16_from_bits(u):
    return u.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def fp16_round_down(x):
    """Largest FP16 value <= x (x FP32), as FP16."""
    h = x.to(tl.float16)
    u = _fp16_bits(h)
    is_zero = (u == 0) | (u == 0x8000)
    stepped = tl.where((u & 0x8000) != 0, u + 1, u - 1)  # toward -inf: away from 0 if negative, else toward 0
    stepped = tl.where(is_zero, 0x8001, stepped)          # below +-0: the smallest negative subnormal
    return tl.where(h.to(tl.float32) > x, _fp16_from_bits(stepped), h)


@triton.jit
def fp16_round_up(x):
    """Smallest FP16 value >= x (x FP32), as FP16."""
    h = x.to(tl.float16)
    u = _fp16_bits(h)
    is_zero = (u == 0) | (u == 0x8000)
    stepped = tl.where((u & 0x8000) != 0, u - 1, u + 1)
    stepped = tl.where(is_zero, 0x0001, stepped)
    return tl.where(h.to(tl.float32) < x, _fp16_from_bits(stepped), h)


@triton.jit
def _scale_zero(mn, mx, QMAX: tl.constexpr):
    """FP16 (scale, zero) of groups with FP32 minima / maxima (any shape)."""
    # The stored bits must not depend on which zero a reduction returned: -0 -> +0 (formats adds 0.0).
    mn = tl.where(mn == 0.0, 0.0, mn)
    mx = tl.where(mx == 0.0, 0.0, mx)
    zero = fp16_round_down(mn)
    qmax = tl.zeros(mn.shape, tl.float32) + QMAX
    scale = fp16_round_up(tl.div_rn(mx - zero.to(tl.float32), qmax))
    return scale, zero


@triton.jit
def _codes(x, scale_f, zero_f, QMAX: tl.constexpr):
    """int32 codes of FP32 x with broadcastable FP32 scale / zero: round half to even of (x - zero) / scale."""
    safe = tl.where(scale_f > 0.0, scale_f, 1.0)
    y = tl.div_rn(x - zero_f, safe)
    f = tl.floor(y)
    frac = y - f  # exact: f <= y < 2^24
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 if f is odd, else 0.0
    r = f + tl.where(frac > 0.5, 1.0, tl.where(frac == 0.5, odd, 0.0))
    r = tl.minimum(tl.maximum(r, 0.0), QMAX * 1.0)
    r = tl.where(scale_f > 0.0, r, 0.0)
    return r.to(tl.int32)


@triton.jit
def _pack(codes, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [BLOCK_T, BLOCK_D] -> uint8 [BLOCK_T, BLOCK_D / PER]; the shifted codes do not overlap, so a
    sum is their bitwise or."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        packed = codes.to(tl.uint8)
    else:
        c = tl.reshape(codes, (BLOCK_T, BLOCK_D // PER, PER))
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(c << shifts[None, None, :], axis=2).to(tl.uint8)
    return packed


@triton.jit
def quantize_keys_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, D,
                         BITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (N, cdiv(D, BLOCK_D)): channels [BLOCK_D] of block n; two passes over T (min/max, then codes)."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    n = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x_base = x_ptr + n * T * D
    mn = tl.zeros([BLOCK_D], tl.float32) + float("inf")
    mx = tl.zeros([BLOCK_D], tl.float32) - float("inf")
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < T)[:, None] & d_ok[None, :]
        x = tl.load(x_base + offs_t[:, None] * D + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, tl.min(tl.where(ok, x, float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.where(ok, x, float("-inf")), axis=0))
    # Channels past D (tile padding) get scale 0, zero 0 and code 0; they are never stored.
    mn = tl.where(d_ok, mn, 0.0)
    mx = tl.where(d_ok, mx, 0.0)
    scale, zero = _scale_zero(mn, mx, QMAX)
    tl.store(scale_ptr + n * D + offs_d, scale, mask=d_ok)
    tl.store(zero_ptr + n * D + offs_d, zero, mask=d_ok)
    scale_f = scale.to(tl.float32)[None, :]
    zero_f = zero.to(tl.float32)[None, :]

    DP = D // PER
    offs_b = d0 // PER + tl.arange(0, BLOCK_D // PER)
    b_ok = offs_b < DP
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        ok = t_ok[:, None] & d_ok[None, :]
        x = tl.load(x_base + offs_t[:, None] * D + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        packed = _pack(_codes(x, scale_f, zero_f, QMAX), BLOCK_T, BLOCK_D, BITS)
        tl.store(codes_ptr + n * T * DP + offs_t[:, None] * DP + offs_b[None, :], packed,
                 mask=t_ok[:, None] & b_ok[None, :])


@triton.jit
def _value_groups(x, t_ok, store_ok, group, NG, meta, scale_ptr, zero_ptr, QMAX: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-token value groups of a [BLOCK_T, BLOCK_D] FP32 tile, one group at a time with a masked min/max (any GS
    that divides D; a group may share a packed byte with the next): stores scale/zero of group gi at
    meta + gi where ``store_ok`` [BLOCK_T], and returns them broadcast over the tile, (scale_f, zero_f) FP32.
    ``group`` [BLOCK_D] is each channel's group (>= NG on the padding: scale 0, code 0, never stored)."""
    scale_f = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    zero_f = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for gi in range(0, NG):
        in_g = (group == gi)[None, :]
        sel = in_g & t_ok[:, None]
        mn = tl.min(tl.where(sel, x, float("inf")), axis=1)
        mx = tl.max(tl.where(sel, x, float("-inf")), axis=1)
        mn = tl.where(t_ok, mn, 0.0)  # rows past T: finite placeholders, never stored
        mx = tl.where(t_ok, mx, 0.0)
        scale, zero = _scale_zero(mn, mx, QMAX)
        tl.store(scale_ptr + meta + gi, scale, mask=store_ok)
        tl.store(zero_ptr + meta + gi, zero, mask=store_ok)
        scale_f = tl.where(in_g, scale.to(tl.float32)[:, None], scale_f)
        zero_f = tl.where(in_g, zero.to(tl.float32)[:, None], zero_f)
    return scale_f, zero_f


@triton.jit
def quantize_values_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, D, GS,
                           BITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (N, cdiv(T, BLOCK_T)): whole rows (BLOCK_D >= D), one (scale, zero) per (token, group of GS).

    Groups are reduced one at a time with a masked min/max, so any GS that divides D works (GS need not be a
    power of two, and a group may share a packed byte with the next)."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    n = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    ok = t_ok[:, None] & (offs_d < D)[None, :]
    x = tl.load(x_ptr + n * T * D + offs_t[:, None] * D + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    NG = D // GS
    scale_f, zero_f = _value_groups(x, t_ok, t_ok, offs_d // GS, NG, (n * T + offs_t) * NG, scale_ptr, zero_ptr,
                                    QMAX, BLOCK_T, BLOCK_D)
    packed = _pack(_codes(x, scale_f, zero_f, QMAX), BLOCK_T, BLOCK_D, BITS)
    DP = D // PER
    offs_b = tl.arange(0, BLOCK_D // PER)
    tl.store(codes_ptr + n * T * DP + offs_t[:, None] * DP + offs_b[None, :], packed,
             mask=t_ok[:, None] & (offs_b < DP)[None, :])


@triton.jit
def dequantize_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, T, D, GS,
                      BITS: tl.constexpr, KEYS: tl.constexpr, OUT_BF16: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (N, cdiv(T, BLOCK_T)): out [N, T, D] = code * scale + zero (keys: scale[n, d]; values:
    scale[n, t, d // GS]), computed in FP32 and cast once to out's dtype."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    n = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    ok = t_ok[:, None] & d_ok[None, :]
    DP = D // PER
    byte = tl.load(codes_ptr + n * T * DP + offs_t[:, None] * DP + (offs_d // PER)[None, :], mask=ok, other=0)
    code = (byte.to(tl.int32) >> ((offs_d % PER) * BITS)[None, :]) & QMAX
    if KEYS:
        scale = tl.load(scale_ptr + n * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(zero_ptr + n * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    else:
        NG = D // GS
        meta = (n * T + offs_t[:, None]) * NG + (offs_d // GS)[None, :]
        scale = tl.load(scale_ptr + meta, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + meta, mask=ok, other=0.0).to(tl.float32)
    y = code.to(tl.float32) * scale
    y = y + zero
    y = tl.minimum(tl.maximum(y, -65504.0), 65504.0)  # within the input contract |x| <= 65504 (see kvprec/ops/reference/quantize.py)
    o_offs = n * T * D + offs_t[:, None] * D + offs_d[None, :]
    if OUT_BF16:
        tl.store(out_ptr + o_offs, round_to_bf16(y), mask=ok)
    else:
        tl.store(out_ptr + o_offs, y.to(out_ptr.dtype.element_ty), mask=ok)
