"""Novelty of new keys against a window of recent keys: @triton.jit body only.

Launcher, checks and block sizes: kvprec/ops/triton/novelty.py; definitions and the oracle:
kvprec.analysis.novelty. Shapes (B batch, H KV heads, n new keys, W window keys, R = rank, D head_dim padded to
BLOCK_D with masked loads):

    k [B, H, n, D], window [B, H, W, D]   fp32 / fp16 / bf16 (each its own), strided, last dim contiguous
    basis [B*H, R, D] FP32 contiguous      the top-R right singular vectors of each window, null rows zeroed
                                           (computed by the launcher with batched torch.linalg.svd)
    cosine, l2, residual [B*H, n] FP32

Grid (B*H, cdiv(n, BLOCK_N)): a program reads its window once, in tiles of BLOCK_W rows, to form the mean m, then
its BLOCK_N keys k once, and writes per key, in FP32:

    cosine   = clamp(1 - k.m / (||k|| ||m||), 0, 2)       1 where ||k|| ||m|| = 0
    l2       = ||k - m||
    residual = min(||k - sum_j (u_j.k) u_j|| / ||k||, 1)   0 where ||k|| = 0   (u_j the rows of the basis)

The residual is a direct difference, not sqrt(||k||^2 - ||U^T k||^2), which would cancel for keys inside the
subspace. The R projections are a loop of row loads and FP32 multiply-reduces: R * BLOCK_N * D multiply-adds is
tiny against the window read, and it keeps full FP32 accuracy (no TF32 dot) at any R, n and D.
"""
import triton
import triton.language as tl


@triton.jit
def novelty_kernel(
        k_ptr, stride_kb, stride_kh, stride_kn,
        w_ptr, stride_wb, stride_wh, stride_ww,
        u_ptr, cos_ptr, l2_ptr, res_ptr,
        H, N, W, D, R,
        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """cosine, l2, residual of BLOCK_N new keys of one (b, h) against its window (module doc)."""
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = bh // H
    h = bh % H

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    # Window mean: per-slot FP32 sums of BLOCK_W rows, reduced once at the end.
    w_base = w_ptr + b.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh
    offs_w = tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_W, BLOCK_D], tl.float32)
    for w0 in range(0, W, BLOCK_W):
        rows = w0 + offs_w
        x = tl.load(w_base + rows[:, None].to(tl.int64) * stride_ww + offs_d[None, :],
                    mask=(rows < W)[:, None] & d_ok[None, :], other=0.0)
        acc += x.to(tl.float32)
    mean = tl.sum(acc, axis=0) / W                                   # [BLOCK_D], 0 in padded channels
    mnorm = tl.sqrt(tl.sum(mean * mean, axis=0))

    keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < N
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)   # [BLOCK_N, BLOCK_D]
    knorm = tl.sqrt(tl.sum(k * k, axis=1))

    denom = knorm * mnorm
    pos = denom > 0.0
    cos = tl.where(pos, tl.sum(k * mean[None, :], axis=1) / tl.where(pos, denom, 1.0), 0.0)
    cosine = tl.minimum(tl.maximum(1.0 - cos, 0.0), 2.0)

    diff = k - mean[None, :]
    l2 = tl.sqrt(tl.sum(diff * diff, axis=1))

    u_base = u_ptr + bh.to(tl.int64) * R * D
    proj = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(0, R):
        u = tl.load(u_base + j * D + offs_d, mask=d_ok, other=0.0)  # [BLOCK_D]
        c = tl.sum(k * u[None, :], axis=1)                            # u_j.k  [BLOCK_N]
        proj += c[:, None] * u[None, :]
    rest = k - proj
    outside = tl.sqrt(tl.sum(rest * rest, axis=1))
    nonzero = knorm > 0.0
    residual = tl.where(nonzero, tl.minimum(outside / tl.where(nonzero, knorm, 1.0), 1.0), 0.0)

    out = bh.to(tl.int64) * N + keys
    tl.store(cos_ptr + out, cosine, mask=key_ok)
    tl.store(l2_ptr + out, l2, mask=key_ok)
    tl.store(res_ptr + out, residual, mask=key_ok)
