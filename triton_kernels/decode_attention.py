"""Flash-decoding attention over a mixed-precision paged KV cache: @triton.jit bodies only.

Launch logic, checks and the split heuristic live in kvprec/ops/triton/decode_attention.py. Shapes (B batch,
Hkv KV heads, G = Hq / Hkv query heads per KV head, Q queries, D head_dim, T block_size, NB sealed blocks,
TL < T tail positions, N = NB*T + TL, NBT = NB + (1 if TL else 0), S splits, GQ = G*Q rows per KV head):

    q [B, Hq, Q, D]; pools as in kvprec.storage.formats; tiers int8 / pages int32 [B, Hkv, NB]; tail [B, Hkv, TL, D]
    m_part, l_part [B*Hkv, S, GQ], acc_part [B*Hkv, S, GQ, D]           (FP32 partials of each split)
    blk_m, blk_s [B*Hkv, GQ, NBT]                                        (FP32, only with BLOCK_MASS)

Kernel 1 (:func:`decode_split_kernel`), grid (B*Hkv*R, S) with R = cdiv(GQ, BLOCK_M) row tiles: a program owns
one KV head, BLOCK_M of its GQ (query head, query) rows, and a contiguous range of blocks, so each block's K/V
is read once for all G query heads (GQA without repeat_kv). Per block it reads the block's tier and page from
the block table, dequantizes the page in registers (code * scale + zero in FP32, then rounded to the dot dtype:
q's dtype, as flash attention feeds its tensor-core dots), and folds it in with an online softmax in FP32:

    s = scale * q k^T;  s = c tanh(s / c) (softcap);  s = -inf outside causal / window / mask
    m' = max(m, rowmax s);  p = e^(s - m');  l' = l e^(m - m') + rowsum p;  acc' = acc e^(m - m') + p v

(for BLOCK_MASS it also stores (m', rowsum p) per block). The split holding the last block also reads the tail.
Scores use tl.dot when T >= 16 (rows padded to BLOCK_M >= 16), else broadcast-multiply and tl.sum.
Kernel 2 (:func:`decode_reduce_kernel`), one program per (b, KV head, row): combines the splits,

    m* = max_s m_s;  l = sum_s l_s e^(m_s - m*);  out = sum_s acc_s e^(m_s - m*) / l;  lse = m* + log l

and, for BLOCK_MASS, block_mass[j] = blk_s[j] e^(blk_m[j] - lse): a pass over per-block scalars, not over K.
Rows with no allowed key get out 0, lse -inf, mass 0.
"""
import triton
import triton.language as tl

# Globals read inside @triton.jit bodies must be tl.constexpr (the compiler refuses plain globals; the
# interpreter does not check).
LOG2E = tl.constexpr(1.4426950408889634)

# Tier ids (kvprec.storage.formats.Tier).
_FP32 = tl.constexpr(0)
_FP16 = tl.constexpr(1)
_BF16 = tl.constexpr(2)
_INT8 = tl.constexpr(3)
_INT4 = tl.constexpr(4)
_INT2 = tl.constexpr(5)


@triton.jit
def round_to_bf16(x):
    """FP32 -> BF16 with round-to-nearest-even on the bit pattern.

    The interpreter truncates on ``.to(tl.bfloat16)``; this spelling is exact on both and costs a few integer
    ops where it is used (final stores only). NaN stays NaN, inf stays inf."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_float_tile(pool, page, offs_t, offs_d, D: tl.constexpr, T: tl.constexpr, OUT: tl.constexpr):
    """[T, D] of one page of a float pool [P, T, D], converted to OUT (the dot dtype) right after the load."""
    return tl.load(pool + page * (T * D) + offs_t[:, None] * D + offs_d[None, :]).to(tl.float32).to(OUT)


@triton.jit
def _load_int_tile(codes, scale, zero, page, offs_t, offs_d, D: tl.constexpr, T: tl.constexpr, GS: tl.constexpr,
                   BITS: tl.constexpr, IS_V: tl.constexpr, OUT: tl.constexpr):
    """[T, D] of one page of an integer pool, dequantized in registers (code * scale + zero in FP32), as OUT.

    Codes uint8 [P, T, D*BITS/8]: element d of a row in byte d // (8/BITS) at bit (d % (8/BITS)) * BITS. Keys:
    scale, zero FP16 [P, D] (per channel); values: FP16 [P, T, D/GS] (per token and group). The byte of element
    d is loaded once per element: lanes of a warp that share a byte coalesce into one transaction, so the
    memory traffic is the packed size."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    DP: tl.constexpr = D // PER
    NG: tl.constexpr = D // GS
    byte = tl.load(codes + page * (T * DP) + offs_t[:, None] * DP + (offs_d // PER)[None, :])
    code = (byte.to(tl.int32) >> ((offs_d % PER) * BITS)[None, :]) & QMAX
    if IS_V:
        meta = page * (T * NG) + offs_t[:, None] * NG + (offs_d // GS)[None, :]
        x = code.to(tl.float32) * tl.load(scale + meta).to(tl.float32) + tl.load(zero + meta).to(tl.float32)
    else:
        meta = page * D + offs_d
        x = code.to(tl.float32) * tl.load(scale + meta).to(tl.float32)[None, :] \
            + tl.load(zero + meta).to(tl.float32)[None, :]
    return x.to(OUT)


@triton.jit
def _load_sealed_tile(tier, page, p32, p16, pbf, c8, s8, z8, c4, s4, z4, c2, s2, z2,
                      offs_t, offs_d, D: tl.constexpr, T: tl.constexpr, GS: tl.constexpr, IS_V: tl.constexpr,
                      OUT: tl.constexpr,
                      HAS_FP32: tl.constexpr, HAS_FP16: tl.constexpr, HAS_BF16: tl.constexpr,
                      HAS_INT8: tl.constexpr, HAS_INT4: tl.constexpr, HAS_INT2: tl.constexpr,
                      SINGLE_TIER: tl.constexpr):
    """K (or V, IS_V) [T, D] of a sealed block at ``tier`` / ``page``, as OUT. Only the branches of tiers whose
    pool exists are compiled (HAS_*); with a single pool there is no runtime branch at all (SINGLE_TIER)."""
    x = tl.zeros([T, D], OUT)
    if SINGLE_TIER:
        if HAS_FP32:
            x = _load_float_tile(p32, page, offs_t, offs_d, D, T, OUT)
        if HAS_FP16:
            x = _load_float_tile(p16, page, offs_t, offs_d, D, T, OUT)
        if HAS_BF16:
            x = _load_float_tile(pbf, page, offs_t, offs_d, D, T, OUT)
        if HAS_INT8:
            x = _load_int_tile(c8, s8, z8, page, offs_t, offs_d, D, T, GS, 8, IS_V, OUT)
        if HAS_INT4:
            x = _load_int_tile(c4, s4, z4, page, offs_t, offs_d, D, T, GS, 4, IS_V, OUT)
        if HAS_INT2:
            x = _load_int_tile(c2, s2, z2, page, offs_t, offs_d, D, T, GS, 2, IS_V, OUT)
    else:
        if HAS_FP32:
            if tier == _FP32:
                x = _load_float_tile(p32, page, offs_t, offs_d, D, T, OUT)
        if HAS_FP16:
            if tier == _FP16:
                x = _load_float_tile(p16, page, offs_t, offs_d, D, T, OUT)
        if HAS_BF16:
            if tier == _BF16:
                x = _load_float_tile(pbf, page, offs_t, offs_d, D, T, OUT)
        if HAS_INT8:
            if tier == _INT8:
                x = _load_int_tile(c8, s8, z8, page, offs_t, offs_d, D, T, GS, 8, IS_V, OUT)
        if HAS_INT4:
            if tier == _INT4:
                x = _load_int_tile(c4, s4, z4, page, offs_t, offs_d, D, T, GS, 4, IS_V, OUT)
        if HAS_INT2:
            if tier == _INT2:
                x = _load_int_tile(c2, s2, z2, page, offs_t, offs_d, D, T, GS, 2, IS_V, OUT)
    return x


@triton.jit
def _softmax_step(qd, k, m_i, k_pos, k_ok, q_pos, q_idx, row_ok, mask_row_ptr, stride_mq, sm_scale, softcap, window,
                  HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Scores of a K tile [T, D] and the online-softmax update of the running maximum.

    Returns (m', p = e^(s - m') [BLOCK_M, T], alpha = e^(m - m'), rowsum p, m' with -inf -> 0)."""
    if USE_DOT:
        if DOT_IEEE:
            s = tl.dot(qd, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(qd, tl.trans(k))
    else:
        s = tl.sum(qd.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    s = s * sm_scale
    if HAS_SOFTCAP:
        # c * tanh(s / c) through exp: tanh(x) = 1 - 2 / (e^(2x) + 1); exact limits at +-inf, no libdevice.
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (s / softcap)) + 1.0))
    allowed = row_ok[:, None] & k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
    if HAS_MASK:
        mk = tl.load(mask_row_ptr + q_idx[:, None] * stride_mq + k_pos[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0)
        allowed = allowed & (mk != 0)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing allowed so far keeps m = -inf; shift by 0 instead so that no (-inf) - (-inf) appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2((s - m_safe[:, None]) * LOG2E)
    alpha = tl.exp2((m_i - m_safe) * LOG2E)
    return m_new, p, alpha, tl.sum(p, axis=1), m_safe


@triton.jit
def _pv(p, v, USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr):
    """p [BLOCK_M, T] FP32 times a V tile [T, D] (dot dtype) -> [BLOCK_M, D] FP32."""
    if USE_DOT:
        if DOT_IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
    else:
        pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return pv


@triton.jit
def decode_split_kernel(
        q_ptr, stride_qb, stride_qh, stride_qq,
        k32, v32, k16, v16, kbf, vbf,
        k8, ks8, kz8, v8, vs8, vz8,
        k4, ks4, kz4, v4, vs4, vz4,
        k2, ks2, kz2, v2, vs2, vz2,
        tiers_ptr, pages_ptr,
        tk_ptr, tv_ptr, stride_tb, stride_th, stride_tt,
        mask_ptr, stride_mb, stride_mq,
        m_part, l_part, acc_part, blk_m, blk_s,
        Hkv, G, NQ, GQ, R, NB, TL, N, NBT, j_first, blocks_per_split, S,
        sm_scale, softcap, window,
        D: tl.constexpr, T: tl.constexpr, GS: tl.constexpr, BLOCK_M: tl.constexpr,
        HAS_FP32: tl.constexpr, HAS_FP16: tl.constexpr, HAS_BF16: tl.constexpr,
        HAS_INT8: tl.constexpr, HAS_INT4: tl.constexpr, HAS_INT2: tl.constexpr, SINGLE_TIER: tl.constexpr,
        HAS_TAIL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_MASS: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Partial attention of one (b, KV head, row tile) over blocks [j_first + split * bps, ...) (module doc).

    K and V tiles are held in the dot dtype (half the registers of FP32), and V is read after the scores so
    that the two tiles are not alive together."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    bh = pid // R
    rtile = pid % R
    b = bh // Hkv
    h = bh % Hkv

    rows = rtile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GQ
    g = rows // NQ
    q_idx = rows % NQ
    q_pos = N - NQ + q_idx
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, T)

    q_offs = b.to(tl.int64) * stride_qb + (h * G + g)[:, None].to(tl.int64) * stride_qh \
        + q_idx[:, None] * stride_qq + offs_d[None, :]
    qd = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0).to(tl.float32).to(DOT_DTYPE)
    mask_row_ptr = mask_ptr + b.to(tl.int64) * stride_mb

    m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    j_lo = j_first + split * blocks_per_split
    j_hi = tl.minimum(j_lo + blocks_per_split, NBT)
    sealed_hi = tl.minimum(j_hi, NB)
    table = bh.to(tl.int64) * NB
    blk_row = (bh.to(tl.int64) * GQ + rows) * NBT
    t_ok = offs_t < T
    for j in range(j_lo, sealed_hi):
        tier = tl.load(tiers_ptr + table + j).to(tl.int32)
        page = tl.load(pages_ptr + table + j).to(tl.int64)
        k = _load_sealed_tile(tier, page, k32, k16, kbf, k8, ks8, kz8, k4, ks4, kz4, k2, ks2, kz2, offs_t, offs_d,
                              D, T, GS, False, DOT_DTYPE, HAS_FP32, HAS_FP16, HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT2,
                              SINGLE_TIER)
        m_i, p, alpha, p_sum, m_safe = _softmax_step(qd, k, m_i, j * T + offs_t, t_ok, q_pos, q_idx, row_ok,
                                                     mask_row_ptr, stride_mq, sm_scale, softcap, window, HAS_MASK,
                                                     HAS_WINDOW, HAS_SOFTCAP, USE_DOT, DOT_IEEE)
        v = _load_sealed_tile(tier, page, v32, v16, vbf, v8, vs8, vz8, v4, vs4, vz4, v2, vs2, vz2, offs_t, offs_d,
                              D, T, GS, True, DOT_DTYPE, HAS_FP32, HAS_FP16, HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT2,
                              SINGLE_TIER)
        l_i = l_i * alpha + p_sum
        acc = acc * alpha[:, None] + _pv(p, v, USE_DOT, DOT_IEEE)
        if BLOCK_MASS:
            tl.store(blk_m + blk_row + j, m_safe, mask=row_ok)
            tl.store(blk_s + blk_row + j, p_sum, mask=row_ok)
    if HAS_TAIL:
        # The tail is block NB, the last of the range; only the split whose range reaches it reads it.
        if j_hi == NBT:
            tail_ok = offs_t < TL
            t_offs = b.to(tl.int64) * stride_tb + h.to(tl.int64) * stride_th + offs_t[:, None] * stride_tt \
                + offs_d[None, :]
            k = tl.load(tk_ptr + t_offs, mask=tail_ok[:, None], other=0.0).to(tl.float32).to(DOT_DTYPE)
            m_i, p, alpha, p_sum, m_safe = _softmax_step(qd, k, m_i, NB * T + offs_t, tail_ok, q_pos, q_idx, row_ok,
                                                         mask_row_ptr, stride_mq, sm_scale, softcap, window, HAS_MASK,
                                                         HAS_WINDOW, HAS_SOFTCAP, USE_DOT, DOT_IEEE)
            v = tl.load(tv_ptr + t_offs, mask=tail_ok[:, None], other=0.0).to(tl.float32).to(DOT_DTYPE)
            l_i = l_i * alpha + p_sum
            acc = acc * alpha[:, None] + _pv(p, v, USE_DOT, DOT_IEEE)
            if BLOCK_MASS:
                tl.store(blk_m + blk_row + NB, m_safe, mask=row_ok)
                tl.store(blk_s + blk_row + NB, p_sum, mask=row_ok)

    part = (bh.to(tl.int64) * S + split) * GQ + rows
    tl.store(m_part + part, m_i, mask=row_ok)
    tl.store(l_part + part, l_i, mask=row_ok)
    tl.store(acc_part + part[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def decode_reduce_kernel(
        m_part, l_part, acc_part, blk_m, blk_s,
        out_ptr, stride_ob, stride_oh, stride_oq, lse_ptr, mass_ptr,
        Hkv, G, NQ, GQ, S, NBT, j_first,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_MASS: tl.constexpr,
        OUT_BF16: tl.constexpr):
    """Combine the S split partials of one (b, KV head, row) into out, lse (and block mass); module doc.

    Two passes over the splits (max, then sums) keep every loop-carried value a vector."""
    pid = tl.program_id(0)
    bh = pid // GQ
    r = pid % GQ
    b = bh // Hkv
    h = bh % Hkv
    g = r // NQ
    q_idx = r % NQ
    hq = h * G + g
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    base = bh.to(tl.int64) * S * GQ + r

    m_vec = tl.zeros([BLOCK_S], tl.float32) - float("inf")
    for s0 in range(0, S, BLOCK_S):
        s_ok = s0 + offs_s < S
        m_vec = tl.maximum(m_vec, tl.load(m_part + base + (s0 + offs_s) * GQ, mask=s_ok, other=float("-inf")))
    m_star = tl.max(m_vec, axis=0)
    m_safe = tl.where(m_star == float("-inf"), 0.0, m_star)

    l_vec = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s_ok = s0 + offs_s < S
        idx = base + (s0 + offs_s) * GQ
        m_s = tl.load(m_part + idx, mask=s_ok, other=float("-inf"))
        w = tl.exp2((m_s - m_safe) * LOG2E)  # a split with nothing allowed has m_s = -inf: weight 0
        l_vec += tl.load(l_part + idx, mask=s_ok, other=0.0) * w
        acc_s = tl.load(acc_part + idx[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        acc += tl.sum(acc_s * w[:, None], axis=0)
    l_tot = tl.sum(l_vec, axis=0)
    has_keys = l_tot > 0.0
    l_safe = tl.where(has_keys, l_tot, 1.0)
    out = tl.where(has_keys, acc / l_safe, 0.0)
    lse = tl.where(has_keys, m_safe + tl.log(l_safe), float("-inf"))

    o_offs = b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + q_idx * stride_oq + offs_d
    if OUT_BF16:
        tl.store(out_ptr + o_offs, round_to_bf16(out))
    else:
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty))
    row = (b.to(tl.int64) * (Hkv * G) + hq) * NQ + q_idx
    tl.store(lse_ptr + row, lse)
    if BLOCK_MASS:
        lse_safe = tl.where(has_keys, lse, 0.0)
        offs_j = tl.arange(0, BLOCK_J)
        blk_row = (bh.to(tl.int64) * GQ + r) * NBT
        for j0 in range(0, NBT, BLOCK_J):
            j = j0 + offs_j
            j_ok = j < NBT
            live = j_ok & (j >= j_first)  # blocks before the sliding window were never read: mass 0
            bm = tl.load(blk_m + blk_row + j, mask=live, other=0.0)
            bs = tl.load(blk_s + blk_row + j, mask=live, other=0.0)
            # A row with no allowed key has every rowsum 0, hence mass 0 without a separate test.
            mass = tl.where(live, bs * tl.exp2((bm - lse_safe) * LOG2E), 0.0)
            tl.store(mass_ptr + row * NBT + j, mass, mask=j_ok)
