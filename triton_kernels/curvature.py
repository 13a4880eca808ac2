"""Per-position attention curvature reduced over queries: @triton.jit bodies only.

Launcher, checks and block sizes: kvprec/ops/triton/curvature.py. The closed form (kvprec/curvature.h, oracle
kvprec.analysis.curvature.curvature_reduce_reference) for query row r (query head h*G + g, query i at position
p_i = N - Q + i) and cached position t of KV head h, with s the softmax scale:

    a_rt     = softmax_t(s q_r.k_t)                 o_r = sum_t a_rt v_t
    ||J_rt|| = s a_rt ||v_t - o_r|| ||q_r||           ||H_rt|| = s^2 a_rt |1 - 2 a_rt| ||v_t - o_r|| ||q_r||^2
    kappa_rt = a_rt ||J_rt|| ||H_rt|| = (s ||q_r||)^3 a_rt^3 |1 - 2 a_rt| ||v_t - o_r||^2

and position[t] = sum (or max) over the G*Q rows r of the KV head (causal: rows with p_i >= t), divided by the
number of those rows for the mean. Rows are numbered query-major, r = i*G + g, so that the rows that see a
position t form a suffix r >= max(0, t - (N - Q)) * G of the row range (causal skip without per-head loops).

Shapes (B batch, Hkv KV heads, G = Hq / Hkv, GQ = G*Q rows per KV head, D / DV head_dim of k / v, padded to
BLOCK_D / BLOCK_DV with masked loads):

    q [B, Hq, Q, D], k [B, Hkv, N, D], v [B, Hkv, N, DV] (strided, last dim contiguous)
    o [B*Hkv, GQ, DV] FP32; lse2, coef, onorm2, dstar [B*Hkv, GQ] FP32; tstar [B*Hkv, GQ] int32
                                                                (written by pass 1, read by pass 2)
    position [B*Hkv, N] FP64

Pass 1 (:func:`curvature_rows_kernel`, grid (B*Hkv, cdiv(GQ, BLOCK_M))): flash-attention forward of BLOCK_M
rows over the K/V tiles they can see, online softmax in base 2:

    x = s log2(e) q.k;  m' = max(m, rowmax x);  l' = l 2^(m - m') + rowsum 2^(x - m');  acc' = acc 2^(m - m') + p v

and stores per row lse2 = m + log2 l, o = acc / l, coef = (s ||q||)^3, onorm2 = ||o||^2, the most attended
position t* (the first argmax of the scores) and dstar = ||v_t* - o||^2 as a direct difference.
Pass 2 (:func:`curvature_positions_kernel`, grid (B*Hkv, cdiv(N, BLOCK_N))): holds one K/V tile in registers,
walks the rows that see it in tiles of BLOCK_M, recomputes a = 2^(x - lse2) and forms

    ||v_t - o_r||^2 = ||v_t||^2 - 2 o_r.v_t + ||o_r||^2        (a dot instead of a [M, N, DV] difference)

clamped at 0, except at (r, t*_r), where it takes dstar_r. The expansion loses about 1e-7 (||v_t||^2 + ||o||^2)
to rounding; that is large against ||v_t - o||^2 only where v_t is close to o, and since v_t - o =
sum_u a_u (v_t - v_u), that happens systematically only where a_t -> 1, at the row's argmax (elsewhere only by
coincidence, where kappa is small anyway). Per position it accumulates the tile's column sum (FP32) into an FP64
sum, or keeps a running max.
Products that feed o and ||v - o||^2 are FP32 dots (tf32x3 on tensor cores: ~2^-21 relative error; the
interpreter multiplies in FP32): with a half-precision p or o, ||v_t - o||^2 would lose ~1e-3 of ||v||^2.
Scores use q's dtype (FP16/BF16 products are exact in the FP32 accumulator) or tf32x3 for FP32 inputs.
"""
import triton
import triton.language as tl

# Globals read inside @triton.jit bodies must be tl.constexpr.
LOG2E = tl.constexpr(1.4426950408889634)

# query_reduce codes (kvprec.ops.triton.curvature._REDUCE_CODES).
_MEAN = tl.constexpr(0)
_MAX = tl.constexpr(1)
_SUM = tl.constexpr(2)


@triton.jit
def _dot_f32(a, b):
    """FP32 x FP32 -> FP32 at about FP32 accuracy (three TF32 products on tensor cores)."""
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _scores(qd, k, qk_scale, QK_F32: tl.constexpr):
    """Scores in base-2 units, s log2(e) q.k^T: [BLOCK_M, BLOCK_N] FP32 from q [BLOCK_M, BLOCK_D] and a K tile
    [BLOCK_N, BLOCK_D], both in the dot dtype (padded channels are 0 in both)."""
    if QK_F32:
        x = _dot_f32(qd, tl.trans(k))
    else:
        x = tl.dot(qd, tl.trans(k))
    return x * qk_scale


@triton.jit
def _row_index(rows, G, NQ, N, h, stride_qb, stride_qh, stride_qq, b):
    """Query-major rows r = i*G + g -> (position p_i, element offset of q[b, h*G + g, i, 0])."""
    g = rows % G
    i = rows // G
    q_off = b.to(tl.int64) * stride_qb + (h * G + g).to(tl.int64) * stride_qh + i.to(tl.int64) * stride_qq
    return N - NQ + i, q_off


@triton.jit
def curvature_rows_kernel(
        q_ptr, stride_qb, stride_qh, stride_qq,
        k_ptr, stride_kb, stride_kh, stride_kn,
        v_ptr, stride_vb, stride_vh, stride_vn,
        o_ptr, lse2_ptr, coef_ptr, onorm2_ptr, tstar_ptr, dstar_ptr,
        Hkv, G, NQ, GQ, N, D, DV, scale, qk_scale,
        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, DOT_DTYPE: tl.constexpr, QK_F32: tl.constexpr):
    """Pass 1: lse, o and the per-row factors of BLOCK_M rows of one (b, KV head) (module doc)."""
    bh = tl.program_id(0)
    # Causal: a row tile of later queries reads more keys; launching those first shortens the tail.
    rtile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv

    rows = rtile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GQ
    q_pos, q_off = _row_index(rows, G, NQ, N, h, stride_qb, stride_qh, stride_qq, b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32)
    qnorm = tl.sqrt(tl.sum(q * q, axis=1))
    qd = q.to(DOT_DTYPE)

    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    t_star = tl.zeros([BLOCK_M], tl.int32)  # the row's most attended position (first of the largest scores)
    if CAUSAL:
        # The last row of the tile (largest query index) sees the most keys; padded rows see what it sees.
        last = tl.minimum(rtile * BLOCK_M + BLOCK_M, GQ) - 1
        hi = N - NQ + last // G + 1
    else:
        hi = N
    for t0 in range(0, hi, BLOCK_N):
        t = t0 + offs_n
        t_ok = t < N
        k = tl.load(k_base + t[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        x = _scores(qd, k, qk_scale, QK_F32)
        allowed = t_ok[None, :]
        if CAUSAL:
            allowed = allowed & (t[None, :] <= q_pos[:, None])
        x = tl.where(allowed, x, float("-inf"))
        # Tile 0 holds position 0, which every row sees (Q <= N), so m is finite from the first tile on.
        tile_max = tl.max(x, axis=1)
        t_star = tl.where(tile_max > m_i, t0 + tl.argmax(x, axis=1), t_star)
        m_new = tl.maximum(m_i, tile_max)
        p = tl.exp2(x - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_base + t[:, None].to(tl.int64) * stride_vn + offs_dv[None, :],
                    mask=t_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot_f32(p, v)
        m_i = m_new

    o = acc / l_i[:, None]
    sq = scale * qnorm
    out = bh.to(tl.int64) * GQ + rows
    tl.store(o_ptr + out[:, None] * DV + offs_dv[None, :], o, mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(lse2_ptr + out, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(coef_ptr + out, sq * sq * sq, mask=row_ok)
    tl.store(onorm2_ptr + out, tl.sum(o * o, axis=1), mask=row_ok)
    # ||v_t* - o||^2 as a direct difference: the one position where v_t can be close to o for a reason (a_t -> 1)
    v_star = tl.load(v_base + t_star[:, None].to(tl.int64) * stride_vn + offs_dv[None, :],
                     mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
    diff = v_star - o
    tl.store(tstar_ptr + out, t_star, mask=row_ok)
    tl.store(dstar_ptr + out, tl.sum(diff * diff, axis=1), mask=row_ok)


@triton.jit
def curvature_positions_kernel(
        q_ptr, stride_qb, stride_qh, stride_qq,
        k_ptr, stride_kb, stride_kh, stride_kn,
        v_ptr, stride_vb, stride_vh, stride_vn,
        o_ptr, lse2_ptr, coef_ptr, onorm2_ptr, tstar_ptr, dstar_ptr, pos_ptr,
        Hkv, G, NQ, GQ, N, D, DV, qk_scale,
        CAUSAL: tl.constexpr, QUERY_REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_DTYPE: tl.constexpr, QK_F32: tl.constexpr):
    """Pass 2: position[b, h, t] for one tile of BLOCK_N positions, over every row that sees it (module doc)."""
    bh = tl.program_id(0)
    ntile = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv

    t = ntile * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + t[:, None].to(tl.int64) * stride_kn
                + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + t[:, None].to(tl.int64) * stride_vn
                + offs_dv[None, :], mask=t_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
    vnorm2 = tl.sum(v * v, axis=1)
    vt = tl.trans(v)

    total = tl.zeros([BLOCK_N], tl.float64)
    peak = tl.zeros([BLOCK_N], tl.float32)  # kappa >= 0, and every position is seen by at least one row
    if CAUSAL:
        r_lo = tl.maximum(ntile * BLOCK_N - (N - NQ), 0) * G
    else:
        r_lo = 0
    for r0 in range(r_lo, GQ, BLOCK_M):
        rows = r0 + offs_m
        row_ok = rows < GQ
        q_pos, q_off = _row_index(rows, G, NQ, N, h, stride_qb, stride_qh, stride_qq, b)
        qd = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32).to(DOT_DTYPE)
        stat = bh.to(tl.int64) * GQ + rows
        lse2 = tl.load(lse2_ptr + stat, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + stat, mask=row_ok, other=0.0)
        onorm2 = tl.load(onorm2_ptr + stat, mask=row_ok, other=0.0)
        t_star = tl.load(tstar_ptr + stat, mask=row_ok, other=-1)
        d_star = tl.load(dstar_ptr + stat, mask=row_ok, other=0.0)
        o = tl.load(o_ptr + stat[:, None] * DV + offs_dv[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)

        x = _scores(qd, k, qk_scale, QK_F32)
        allowed = row_ok[:, None] & t_ok[None, :]
        if CAUSAL:
            allowed = allowed & (t[None, :] <= q_pos[:, None])
        a = tl.where(allowed, tl.exp2(x - lse2[:, None]), 0.0)
        dist2 = tl.maximum(onorm2[:, None] + vnorm2[None, :] - 2.0 * _dot_f32(o, vt), 0.0)
        # The expansion loses ~1e-7 (||v_t||^2 + ||o||^2) to rounding, which matters only where v_t is near o:
        # v_t - o = sum_u a_u (v_t - v_u) is small systematically only where a_t -> 1, i.e. at the row's argmax,
        # whose distance pass 1 formed as a direct difference.
        dist2 = tl.where(t[None, :] == t_star[:, None], d_star[:, None], dist2)
        # a ||J|| ||H|| = a (s a ||v - o|| ||q||) (s^2 a |1 - 2a| ||v - o|| ||q||^2)
        kappa = coef[:, None] * (a * a * a) * tl.abs(1.0 - 2.0 * a) * dist2
        if QUERY_REDUCE == _MAX:
            peak = tl.maximum(peak, tl.max(kappa, axis=0))
        else:
            total += tl.sum(kappa, axis=0).to(tl.float64)

    if QUERY_REDUCE == _MAX:
        result = peak.to(tl.float64)
    elif QUERY_REDUCE == _MEAN:
        if CAUSAL:
            seen = G * tl.maximum(NQ - tl.maximum(t - (N - NQ), 0), 1)  # >= 1 past N too (lanes not stored)
        else:
            seen = G * NQ + tl.zeros([BLOCK_N], tl.int32)
        result = total / seen.to(tl.float64)
    else:
        result = total
    tl.store(pos_ptr + bh.to(tl.int64) * N + t, result, mask=t_ok)
