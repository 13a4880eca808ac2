"""Pure-torch decode attention over a mixed-precision paged cache: the CPU default and the kernels' oracle.

For query head h (KV head h // (Hq / Hkv): GQA without repeating K/V) and query i at position
p_i = N - Q + i (bottom-right aligned: the Q queries are the Q newest positions), everything in FP32:

    s_t = scale * q_i . k_t                 (scale = 1/sqrt(D) by default)
    s_t = c * tanh(s_t / c)                 (softcap c > 0, Gemma 2)
    s_t = -inf unless t <= p_i, t > p_i - W (sliding window W > 0) and mask[b, i, t]
    out_i = sum_t softmax(s)_t v_t,  lse_i = log sum_t exp(s_t)
    block_mass_i[j] = sum_{t in block j} softmax(s)_t     (the tail is the last block)

The cache is read one block at a time (block j of every (b, h), each row in its own tier, dequantized through
kvprec.ops.reference.quantize to FP32) and folded in with an online softmax, as the flash-decoding kernels do:

    m' = max(m, max_t s_t),  l' = l e^(m - m') + sum_t e^(s_t - m'),  acc' = acc e^(m - m') + sum_t e^(s_t - m') v_t

A query row that may attend to nothing gets out = 0, lse = -inf and block mass 0 (as the native ``attend``
and torch's SDPA), so padded rows never turn into NaN.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from .paged import PagedKV


def check_inputs(q: torch.Tensor, paged: PagedKV, mask: Optional[torch.Tensor], sliding_window: int,
                 softcap: float) -> None:
    """Raise ValueError for inputs every backend rejects (shapes, dtypes, Q vs N, negative window or cap)."""
    if q.dim() != 4:
        raise ValueError(f"decode_attention: q must be [B, Hq, Q, D], got shape {tuple(q.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"decode_attention: q dtype {q.dtype} is not accepted; use float16, bfloat16 or float32")
    paged.validate()
    b, hq, nq, d = q.shape
    if (b, d) != (paged.batch, paged.head_dim):
        raise ValueError(f"decode_attention: q is [B={b}, Hq, Q, D={d}] but the cache holds B={paged.batch}, "
                         f"D={paged.head_dim}")
    if hq % paged.kv_heads:
        raise ValueError(f"decode_attention: {hq} query heads are not a multiple of {paged.kv_heads} KV heads")
    n = paged.seq_len
    if not 1 <= nq <= n:
        raise ValueError(f"decode_attention: Q = {nq} queries need 1 <= Q <= N = {n} cached positions (the queries "
                         "are the Q newest positions)")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, nq, n)):
        raise ValueError(f"decode_attention: mask must be bool [B={b}, Q={nq}, N={n}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if sliding_window < 0:
        raise ValueError(f"decode_attention: sliding_window must be >= 0 (0 = none), got {sliding_window}")
    if softcap < 0:
        raise ValueError(f"decode_attention: softcap must be >= 0 (0 = none), got {softcap}")
    e, t = paged.evicted_blocks, paged.block_size
    # Every backend skips block j when its last position j*T + T - 1 <= N - Q - W: evicted blocks must all be skipped.
    if e and not (sliding_window > 0 and e * t - 1 <= n - nq - sliding_window):
        raise ValueError(f"decode_attention: blocks 0..{e - 1} were evicted (positions < {e * t}), but a query at "
                         f"position {n - nq} with sliding_window {sliding_window} (0 = none) would see them; attend "
                         "with the window the blocks were evicted for")


def decode_attention(q: torch.Tensor, paged: PagedKV, *, scale: Optional[float] = None,
                     mask: Optional[torch.Tensor] = None, sliding_window: int = 0, softcap: float = 0.0,
                     block_mass: bool = False, on_read: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Attention of q [B, Hq, Q, D] over ``paged`` (formulas in the module docstring).

    mask: optional bool [B, Q, N], True = may attend (padding). Returns out [B, Hq, Q, D] in q's dtype,
    lse FP32 [B, Hq, Q] and, if ``block_mass``, FP32 [B, Hq, Q, NB + (1 if TL > 0)] (rows sum to 1), else None.
    Blocks that no query's sliding window reaches are not read (decode with a window costs O(window)).
    on_read(k, v) is called with each block read (instrumentation: kvprec.ops.reference.attention.ReadCounter).
    """
    check_inputs(q, paged, mask, sliding_window, softcap)
    b, hq, nq, d = q.shape
    hkv, t_blk, nb, tl = paged.kv_heads, paged.block_size, paged.num_blocks, paged.tail_len
    g = hq // hkv
    n = paged.seq_len
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dev = q.device
    qf = q.float().reshape(b, hkv, g, nq, d) * scale
    q_pos = torch.arange(n - nq, n, device=dev)

    m = torch.full((b, hkv, g, nq), float("-inf"), device=dev)
    l = torch.zeros_like(m)
    acc = torch.zeros(b, hkv, g, nq, d, device=dev)
    partial = []  # per block: (sum_t e^(s_t - m'), m') with m' the running maximum after the block
    for j in range(nb + (1 if tl else 0)):
        if sliding_window > 0 and j * t_blk + t_blk - 1 <= n - nq - sliding_window:
            if block_mass:
                partial.append((torch.zeros_like(m), torch.zeros_like(m)))
            continue
        if j < nb:
            k, v = paged.block(j, torch.float32)
        else:
            k, v = paged.tail_k.float(), paged.tail_v.float()
        if on_read is not None:
            on_read(k, v)
        start = j * t_blk
        k_pos = torch.arange(start, start + k.shape[2], device=dev)
        s = torch.einsum("bhgqd,bhtd->bhgqt", qf, k)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if sliding_window > 0:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        allowed = allowed[None, None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :, start:start + k.shape[2]]
        s = s.masked_fill(~allowed, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all -inf so far: no shift
        p = torch.exp(s - m_safe[..., None])
        correction = torch.exp(m - m_safe)
        l = l * correction + p.sum(-1)
        acc = acc * correction[..., None] + torch.einsum("bhgqt,bhtd->bhgqd", p, v)
        if block_mass:
            partial.append((p.sum(-1), m_safe))
        m = m_new
        del k, v, s, p  # at most one dequantized block alive

    has_keys = l > 0
    l_safe = l.clamp(min=torch.finfo(torch.float32).tiny)
    out = torch.where(has_keys[..., None], acc / l_safe[..., None], 0.0)
    lse = torch.where(has_keys, m + torch.log(l_safe), float("-inf"))
    mass = None
    if block_mass:
        lse_safe = torch.where(has_keys, lse, 0.0)
        mass = torch.stack([sums * torch.exp(m_at - lse_safe) for sums, m_at in partial], -1)
        mass = torch.where(has_keys[..., None], mass, 0.0).reshape(b, hq, nq, -1)
    return out.reshape(b, hq, nq, d).to(q.dtype), lse.reshape(b, hq, nq), mass


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                           mask: Optional[torch.Tensor] = None, sliding_window: int = 0, softcap: float = 0.0,
                           dtype: torch.dtype = torch.float32
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense attention of q [B, Hq, Q, D] over k, v [B, Hkv, N, D] with products and softmax in ``dtype``.

    The oracle the block-wise paths are checked against: with ``dtype=torch.float32`` on dequantized K/V it is the
    FP32 reference; with float16 / bfloat16 it is the "same-dtype torch implementation" whose error against
    FP32 sets the tolerance of the low-precision kernels (docs/design.md, "Kernels and dispatch"). Same masking
    conventions as :func:`decode_attention`. Returns out [B, Hq, Q, D] in ``dtype``, lse FP32 [B, Hq, Q] (of the
    ``dtype`` scores) and the attention weights FP32 [B, Hq, Q, N] (softmax in ``dtype``, then widened).
    """
    b, hq, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    s = torch.einsum("bhgqd,bhtd->bhgqt", q.to(dtype).reshape(b, hkv, g, nq, d), k.to(dtype)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    q_pos = torch.arange(n - nq, n, device=q.device)
    k_pos = torch.arange(n, device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window > 0:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    allowed = allowed[None, None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s.float(), -1)
    empty = torch.isinf(lse)[..., None]
    p = torch.where(empty, 0.0, torch.softmax(s.masked_fill(empty, 0.0), -1)).to(dtype)
    out = torch.einsum("bhgqt,bhtd->bhgqd", p, v.to(dtype))
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq), p.float().reshape(b, hq, nq, n)
