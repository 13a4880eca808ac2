"""Launcher of the Triton flash-decoding kernels (bodies in triton_kernels/decode_attention.py).

:func:`decode_attention` has the signature of the reference (kvprec.ops.reference.decode_attention) plus an optional
``num_splits``; it checks the inputs on the host, then calls ``torch.ops.kvprec_triton.decode_attention``, a
``torch.library.triton_op`` (so torch.compile sees the two kernels) that allocates and launches:

1. ``decode_split_kernel``, grid (B*Hkv*R, S): partial (m, l, acc) of every split of the block range, and
   per-block (m, rowsum p) when block mass is asked for;
2. ``decode_reduce_kernel``, grid (B*Hkv*G*Q,): the log-sum-exp combination into out, lse and block mass.

Split count: decode has B*Hkv*R programs per split (R = row tiles, 1 when G*Q <= 16), far fewer than an H100
has SMs at batch 1, so the block range is split until there are about ``_PROGRAMS_PER_SM`` programs per SM
(132 SMs on an H100: B=1, Hkv=8, N=16384 gives 66 splits of 4 blocks). Blocks wholly before every query's
sliding window are not part of the range at all.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...triton_kernels.decode_attention import decode_reduce_kernel, decode_split_kernel

from ..native import flatten_decode_pools
from ..registry import TRITON_DECODE_HEAD_DIMS
from ..reference.decode_attention import check_inputs
from ..reference.paged import PagedKV

HEAD_DIMS = TRITON_DECODE_HEAD_DIMS
_PROGRAMS_PER_SM = 4
_INTERPRETER_SMS = 4  # under TRITON_INTERPRET there is no device: a small count keeps several splits in tests


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(decode_split_kernel, InterpretedFunction)


def _block_m(gq: int, head_dim: int) -> int:
    # tl.dot needs M >= 16; past 64 rows (32 at D=256) the FP32 accumulator no longer fits in registers.
    return min(max(16, triton.next_power_of_2(gq)), 64 if head_dim <= 128 else 32)


def _first_block(n: int, nq: int, window: int, block_size: int) -> int:
    """First block any query can see: the earliest query is at N - Q and sees keys > N - Q - window."""
    if window <= 0:
        return 0
    return max(0, (n - nq - window + 1) // block_size)


def choose_num_splits(programs_per_split: int, live_blocks: int, device: torch.device) -> int:
    """Splits so that about _PROGRAMS_PER_SM programs run per SM, never more than one split per block."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _INTERPRETER_SMS
    want = triton.cdiv(_PROGRAMS_PER_SM * sms, max(1, programs_per_split))
    return max(1, min(live_blocks, want))


@triton_op("kvprec_triton::decode_attention", mutates_args={})
def decode_attention_op(q: torch.Tensor, pools: List[Optional[torch.Tensor]], tiers: torch.Tensor,
                        pages: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, mask: Optional[torch.Tensor],
                        scale: float, sliding_window: int, softcap: float, block_mass: bool, num_splits: int,
                        block_size: int, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked kernel call: q [B, Hq, Q, D], the 24 pool slots (None where a pool is absent), block table,
    tail, optional uint8 mask [B, Q, N]. Returns out [B, Hq, Q, D] (q dtype), lse [B, Hq, Q], block mass
    [B, Hq, Q, NBT] FP32 (empty unless ``block_mass``). Inputs are assumed checked by :func:`decode_attention`."""
    b, hq, nq, d = q.shape
    hkv, tl_len = tail_k.shape[1], tail_k.shape[2]
    nb = tiers.shape[2]
    t = block_size
    n = nb * t + tl_len
    nbt = nb + (1 if tl_len else 0)
    g = hq // hkv
    gq = g * nq
    block_m = _block_m(gq, d)
    r = triton.cdiv(gq, block_m)
    j_first = _first_block(n, nq, sliding_window, t)
    live = nbt - j_first
    s = max(1, min(num_splits, live))
    bps = triton.cdiv(live, s)
    s = triton.cdiv(live, bps)  # no split left without a block

    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    m_part = torch.empty(b * hkv, s, gq, **f32)
    l_part = torch.empty(b * hkv, s, gq, **f32)
    acc_part = torch.empty(b * hkv, s, gq, d, **f32)
    if block_mass:
        blk_m = torch.empty(b * hkv, gq, nbt, **f32)
        blk_s = torch.empty(b * hkv, gq, nbt, **f32)
        mass = torch.empty(b, hq, nq, nbt, **f32)
    else:
        blk_m = blk_s = mass = torch.empty(0, **f32)
    out = torch.empty(b, hq, nq, d, dtype=q.dtype, device=dev)
    lse = torch.empty(b, hq, nq, **f32)

    present = [pools[i] is not None for i in (0, 2, 4, 6, 12, 18)]  # the k slot of each tier, in tier order
    args = [x if x is not None else q for x in pools]  # absent pools: any pointer, their branch is not compiled
    has_tail = tl_len > 0
    tk, tv = (tail_k, tail_v) if has_tail else (q, q)
    tail_strides = (tail_k.stride(0), tail_k.stride(1), tail_k.stride(2)) if has_tail else (0, 0, 0)
    tiers_arg, pages_arg = (tiers, pages) if nb else (q, q)
    has_mask = mask is not None
    mask_arg = mask if has_mask else q
    mask_strides = (mask.stride(0), mask.stride(1)) if has_mask else (0, 0)

    interp = _interpreting()
    if q.dtype == torch.float32:
        dot_dtype, dot_ieee = tl.float32, True
    elif q.dtype == torch.bfloat16 and interp:
        dot_dtype, dot_ieee = tl.float32, False  # the interpreter's bf16 arithmetic is wrong: FP32 dots there
    else:
        dot_dtype, dot_ieee = (tl.float16 if q.dtype == torch.float16 else tl.bfloat16), False

    wrap_triton(decode_split_kernel)[(b * hkv * r, s)](
        q, q.stride(0), q.stride(1), q.stride(2),
        *args,
        tiers_arg, pages_arg,
        tk, tv, *tail_strides,
        mask_arg, *mask_strides,
        m_part, l_part, acc_part, blk_m, blk_s,
        hkv, g, nq, gq, r, nb, tl_len, n, nbt, j_first, bps, s,
        scale, softcap, sliding_window,
        D=d, T=t, GS=group_size, BLOCK_M=block_m,
        HAS_FP32=present[0], HAS_FP16=present[1], HAS_BF16=present[2],
        HAS_INT8=present[3], HAS_INT4=present[4], HAS_INT2=present[5], SINGLE_TIER=sum(present) == 1,
        HAS_TAIL=has_tail, HAS_MASK=has_mask, HAS_WINDOW=sliding_window > 0, HAS_SOFTCAP=softcap > 0,
        BLOCK_MASS=block_mass, USE_DOT=t >= 16, DOT_DTYPE=dot_dtype, DOT_IEEE=dot_ieee,
        num_warps=4 if d <= 128 else 8)
    wrap_triton(decode_reduce_kernel)[(b * hkv * gq,)](
        m_part, l_part, acc_part, blk_m, blk_s,
        out, out.stride(0), out.stride(1), out.stride(2), lse, mass,
        hkv, g, nq, gq, s, nbt, j_first,
        D=d, BLOCK_S=min(32, triton.next_power_of_2(s)), BLOCK_J=min(256, triton.next_power_of_2(nbt)),
        BLOCK_MASS=block_mass, OUT_BF16=q.dtype == torch.bfloat16,
        num_warps=4)
    return out, lse, mass


def decode_attention(q: torch.Tensor, paged: PagedKV, *, scale: Optional[float] = None,
                     mask: Optional[torch.Tensor] = None, sliding_window: int = 0, softcap: float = 0.0,
                     block_mass: bool = False, num_splits: Optional[int] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Triton decode attention; arguments and results as kvprec.ops.reference.decode_attention.

    q: float16 or bfloat16 (float32 also works, with IEEE FP32 dots) [B, Hq, Q, D], D in {64, 128, 256}; the
    cache tensors on q's device. num_splits: override the split heuristic (:func:`choose_num_splits`).
    """
    check_inputs(q, paged, mask, sliding_window, softcap)
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"decode_attention (triton): head_dim {d} is not supported; accepted head_dim "
                         f"{', '.join(map(str, HEAD_DIMS))}")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"decode_attention (triton): q is on {q.device}; the Triton kernels need a CUDA device "
                           "(or TRITON_INTERPRET=1 set before triton_kernels was imported)")
    dev = q.device
    for what, x in (("tail_k", paged.tail_k), ("tiers", paged.tiers), ("pages", paged.pages)):
        if x.device != dev:
            raise ValueError(f"decode_attention (triton): {what} is on {x.device} but q is on {dev}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    tail_k, tail_v = paged.tail_k, paged.tail_v
    if tail_k.stride() != tail_v.stride() or (tail_k.numel() and tail_k.stride(-1) != 1):
        tail_k, tail_v = tail_k.contiguous(), tail_v.contiguous()
    mask_u8 = None
    if mask is not None:
        mask_u8 = (mask if mask.stride(-1) == 1 else mask.contiguous()).view(torch.uint8)
    pools = flatten_decode_pools(paged)  # the op's one slot order (kvprec/ops/native.py)
    for x in pools:
        if x is not None and x.device != dev:
            raise ValueError(f"decode_attention (triton): a pool tensor is on {x.device} but q is on {dev}")

    b, hq, nq, _ = q.shape
    n, nbt = paged.seq_len, paged.num_blocks + (1 if paged.tail_len else 0)
    if num_splits is None:
        gq = hq // paged.kv_heads * nq
        programs = b * paged.kv_heads * triton.cdiv(gq, _block_m(gq, d))
        live = nbt - _first_block(n, nq, sliding_window, paged.block_size)
        num_splits = choose_num_splits(programs, live, dev)
    elif num_splits < 1:
        raise ValueError(f"decode_attention (triton): num_splits must be >= 1, got {num_splits}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out, lse, mass = decode_attention_op(q, pools, paged.tiers.contiguous(), paged.pages.contiguous(), tail_k, tail_v,
                                         mask_u8, scale, int(sliding_window), float(softcap), bool(block_mass),
                                         int(num_splits), int(paged.block_size), int(paged.group_size))
    return out, lse, (mass if block_mass else None)
