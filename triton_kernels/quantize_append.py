"""quantize_append: whole blocks quantized straight into the pages of a pool. @triton.jit bodies only; launcher:
kvprec/ops/triton/quantize_append.py; format and reference: kvprec.ops.reference.quantize.quantize_append (bit for bit).

Grid (N, chunks): program (i, j) handles one tile of block i of x [L0, L1, L2, T, D] (leading dims padded to
three, element strides SX0..SX2, SXT, unit stride along D), a tile that holds whole quantization groups:

* integer keys (per channel over the T positions): all T rows of channels [j*BLOCK_D, (j+1)*BLOCK_D);
* integer values (per token over groups of GS channels) and float tiers: whole rows [j*BLOCK_T, (j+1)*BLOCK_T).

So every input byte is read once and every page byte written once, while a tile stays small enough (about 4096
elements) to live in registers without spilling. The tile is masked to nothing when pages[i] is negative or
>= P. Each program raises amax with the largest FP32 bit pattern of |x| in its tile (an integer max: NaN > inf >
finite, order-free), with an atomic only when that is larger than what amax holds. Then

* float tiers (OUT_KIND 1/2/3 = fp32/fp16/bf16): the tile cast to the tier dtype goes to page pages[i] of
  codes [P, T, D] (bf16 rounds to nearest even on the bit pattern: the interpreter truncates a plain cast);
* integer tiers (OUT_KIND 0, BITS 8/4/2): per-group FP16 scale/zero from the tile in registers, codes packed
  PER = 8/BITS per byte along D, stored to codes [P, T, D/PER] and scale/zero (keys [P, D], values [P, T, D/GS]).

The group arithmetic is kvprec's (triton_kernels/quantize.py: directed FP16 rounding, IEEE division, round half
to even); launch with enable_fp_fusion=False.
"""
import triton
import triton.language as tl

from .decode_attention import round_to_bf16
from .quantize import _codes, _pack, _scale_zero, _value_groups


@triton.jit
def _raise_amax(amax_ptr, bits):
    """amax = max(amax, max(bits)) on the FP32 bit patterns, skipping the atomic when it would not raise it."""
    one = tl.arange(0, 1)
    m = tl.zeros([1], tl.int32) + tl.max(tl.max(bits, axis=1), axis=0)
    cur = tl.load(amax_ptr + one)
    tl.atomic_max(amax_ptr + one, m, mask=m > cur)


@triton.jit
def quantize_append_kernel(x_ptr, pages_ptr, codes_ptr, scale_ptr, zero_ptr, amax_ptr,
                           L1, L2, SX0, SX1, SX2, SXT, P, T, D,
                           GS: tl.constexpr, BITS: tl.constexpr, KEYS: tl.constexpr, OUT_KIND: tl.constexpr,
                           HAS_AMAX: tl.constexpr, GROUPS_RESHAPE: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (N, chunks), see the module docstring. Integer keys: BLOCK_T >= T, chunks over D; otherwise
    BLOCK_D >= D, chunks over T. GROUPS_RESHAPE (values, BLOCK_D == D, GS a power of two) reduces the groups as a
    [BLOCK_T, D/GS, GS] view in one pass; otherwise groups are reduced one at a time with a masked min/max, which
    works for any GS that divides D."""
    CHANNEL_CHUNKS: tl.constexpr = KEYS and OUT_KIND == 0
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    i2 = i % L2
    i1 = (i // L2) % L1
    i0 = i // (L1 * L2)
    page = tl.load(pages_ptr + i).to(tl.int64)
    if CHANNEL_CHUNKS:
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = j * BLOCK_D + tl.arange(0, BLOCK_D)
    else:
        offs_t = j * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
    # "page is live" as vectors (the interpreter refuses a scalar bool broadcast into a mask)
    page_t = page + tl.zeros([BLOCK_T], tl.int64)
    page_d = page + tl.zeros([BLOCK_D], tl.int64)
    t_ok = offs_t < T
    d_ok = offs_d < D
    row_ok = t_ok & (page_t >= 0) & (page_t < P)
    col_ok = d_ok & (page_d >= 0) & (page_d < P)
    ok = row_ok[:, None] & d_ok[None, :]
    x_base = x_ptr + i0 * SX0 + i1 * SX1 + i2 * SX2
    x = tl.load(x_base + offs_t[:, None] * SXT + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_AMAX:
        _raise_amax(amax_ptr, tl.where(ok, tl.abs(x).to(tl.int32, bitcast=True), 0))

    if OUT_KIND != 0:
        dst = codes_ptr + page * (T * D) + offs_t[:, None] * D + offs_d[None, :]
        if OUT_KIND == 3:
            tl.store(dst, round_to_bf16(x), mask=ok)
        else:
            tl.store(dst, x.to(codes_ptr.dtype.element_ty), mask=ok)
    else:
        PER: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        if KEYS:
            mn = tl.min(tl.where(ok, x, float("inf")), axis=0)
            mx = tl.max(tl.where(ok, x, float("-inf")), axis=0)
            # Channels past D (tile padding) and skipped blocks: finite placeholders, never stored.
            mn = tl.where(col_ok, mn, 0.0)
            mx = tl.where(col_ok, mx, 0.0)
            scale, zero = _scale_zero(mn, mx, QMAX)
            tl.store(scale_ptr + page * D + offs_d, scale, mask=col_ok)
            tl.store(zero_ptr + page * D + offs_d, zero, mask=col_ok)
            c = _codes(x, scale.to(tl.float32)[None, :], zero.to(tl.float32)[None, :], QMAX)
        else:
            NG = D // GS
            meta = page * (T * NG) + offs_t * NG
            if GROUPS_RESHAPE:
                NGB: tl.constexpr = BLOCK_D // GS
                xg = tl.reshape(x, (BLOCK_T, NGB, GS))
                mn = tl.min(tl.where(t_ok[:, None, None], xg, float("inf")), axis=2)
                mx = tl.max(tl.where(t_ok[:, None, None], xg, float("-inf")), axis=2)
                mn = tl.where(t_ok[:, None], mn, 0.0)  # rows past T: finite placeholders, never stored
                mx = tl.where(t_ok[:, None], mx, 0.0)
                scale, zero = _scale_zero(mn, mx, QMAX)
                offs_g = tl.arange(0, NGB)
                m_ok = row_ok[:, None] & (offs_g < NG)[None, :]
                tl.store(scale_ptr + meta[:, None] + offs_g[None, :], scale, mask=m_ok)
                tl.store(zero_ptr + meta[:, None] + offs_g[None, :], zero, mask=m_ok)
                cg = _codes(xg, scale.to(tl.float32)[:, :, None], zero.to(tl.float32)[:, :, None], QMAX)
                c = tl.reshape(cg, (BLOCK_T, BLOCK_D))
            else:
                scale_f, zero_f = _value_groups(x, t_ok, row_ok, offs_d // GS, NG, meta, scale_ptr, zero_ptr, QMAX,
                                                BLOCK_T, BLOCK_D)
                c = _codes(x, scale_f, zero_f, QMAX)
        packed = _pack(c, BLOCK_T, BLOCK_D, BITS)
        DP = D // PER
        if CHANNEL_CHUNKS:
            offs_b = j * (BLOCK_D // PER) + tl.arange(0, BLOCK_D // PER)
        else:
            offs_b = tl.arange(0, BLOCK_D // PER)
        tl.store(codes_ptr + page * (T * DP) + offs_t[:, None] * DP + offs_b[None, :], packed,
                 mask=row_ok[:, None] & (offs_b < DP)[None, :])
