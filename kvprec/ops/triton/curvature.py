"""Launcher of the Triton curvature reduction (bodies in triton_kernels/curvature.py).

:func:`curvature_reduce` has the signature and results of kvprec.analysis.curvature.curvature_reduce_reference:
(position [B?, Hkv, N], block [B?, Hkv, ceil(N / T)]) FP64, the same checks and error messages, every
query_reduce / block_reduce option. It checks the inputs on the host, then calls
``torch.ops.kvprec_triton.curvature_position`` (a ``torch.library.triton_op``, so torch.compile sees the two
kernels), which returns the per-position statistic; the block statistic is the reference's
:func:`~kvprec.analysis.curvature.block_reduce` of it (O(N) work in FP64, identical semantics).

Passes over K and V: **cdiv(G*Q, BLOCK_M1) + 1** in all.

1. ``curvature_rows_kernel``, grid (B*Hkv, cdiv(G*Q, BLOCK_M1)): a flash-attention forward of BLOCK_M1 (query
   head, query) rows of one KV head over the K/V tiles they can see (causal: up to the tile's last query), one
   read of K and V per row tile (the tiles of later queries, which read more keys, are launched first). It
   stores per row lse, o (FP32), (s ||q||)^3, ||o||^2, the most attended position t* and ||v_t* - o||^2 (one
   gathered row of V). Why a separate pass:
   kappa_t needs a_t = e^(s_t - lse) and ||v_t - o||, and lse and o are sums over every position of the row,
   unknown until the row has seen its last key; without it one would keep the [G*Q, N] scores (the
   reference's memory) or recompute the row per position tile (N / BLOCK_N passes instead of one).
2. ``curvature_positions_kernel``, grid (B*Hkv, cdiv(N, BLOCK_N)): one read of K and V in all. A program
   holds one K/V tile of BLOCK_N positions in registers and walks the rows that see it (causal: a suffix of
   the query-major rows) in tiles of BLOCK_M2, re-reading q, o, lse for each tile of rows; per position it
   keeps the sum (FP64 accumulator of FP32 tile sums) or the max over rows in registers, so no atomics and no
   [G*Q, N] intermediate. The mean divides by the rows that see the position, in the kernel.

GQA: a program serves all G query heads of its KV head; K/V are never repeated. head_dim (of k and of v) any
size from 1 to 256: padded to a power of two >= 16 in registers with masked loads.

Arithmetic is FP32 (FP64 accumulation of the per-position sums); FP64 inputs, and inputs of mixed dtypes, are
rounded to FP32 first. ||v_t - o||^2 is the expansion ||v_t||^2 - 2 o.v_t + ||o||^2 (a dot), except at each row's
most attended position, where pass 1 forms it as a direct difference: that is where a_t -> 1 makes v_t close to
o and the expansion's rounding (~1e-7 ||v||^2) would dominate (kernel module docstring). Tolerance against the
FP64 reference (python_tests/test_curvature_triton.py), per batch row and KV head::

    |x - ref| <= 5e-5 |ref| + 3e-5 max|ref| + 1e-9 (s max||q||)^3 max||v||^2

for logits of ordinary size (measured 5.3e-6 and 3.6e-6); with logits in the hundreds the FP32 error of the
scores grows with them: 2e-3 |ref| + 1e-3 max|ref| (measured 2.1e-4 and 1.1e-4 at scale 3, head_dim 64).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...triton_kernels.curvature import curvature_positions_kernel, curvature_rows_kernel

from ..reference.curvature import block_reduce as _block_reduce
from ..reference.curvature import check_inputs, _check_reduce

MAX_HEAD_DIM = 256
_REDUCE_CODES = {"mean": 0, "max": 1, "sum": 2}
_PROGRAMS_PER_SM = 2
_INTERPRETER_SMS = 4  # under TRITON_INTERPRET there is no device: a small count still exercises BLOCK_M1 < 64


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(curvature_rows_kernel, InterpretedFunction)


def _padded(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every dimension >= 16


def block_sizes(bh: int, gq: int, n: int, d: int, dv: int, device: torch.device) -> dict:
    """Tile sizes and warps. Pass 2 has cdiv(N, BLOCK_N) programs per KV head, plenty for calibration lengths;
    pass 1 has only cdiv(G*Q, BLOCK_M1), so BLOCK_M1 shrinks (to 16) until about _PROGRAMS_PER_SM programs run
    per SM (Llama-3.2-1B, Q = 64: 8 heads x 256 rows -> BLOCK_M1 = 16, 128 programs). Past width 128 the FP32
    [BLOCK_M, BLOCK_DV] accumulator and V tile need halved tiles and 8 warps to stay in registers. Two pipeline
    stages: the FP32 operands of the tf32x3 dots are large; with three, FP32 inputs need 256 KiB of shared memory
    (pass 1 at head_dim 128, pass 2 at 256), over an H100's 227 KiB. With two the largest is 192 KiB (FP32 at
    those head_dims), FP16 at 64 needs 40 / 48 KiB (triton 3.9's sm_90 compiler; the test compiles them)."""
    width = max(_padded(d), _padded(dv))
    block_m = 64 if width <= 128 else 32
    rows = max(16, triton.next_power_of_2(gq))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else _INTERPRETER_SMS
    block_m1 = min(block_m, rows)
    while block_m1 > 16 and bh * triton.cdiv(gq, block_m1) < _PROGRAMS_PER_SM * sms:
        block_m1 //= 2
    block_n = min(64 if width <= 128 else 32, max(16, triton.next_power_of_2(n)))
    return dict(BLOCK_M1=block_m1, BLOCK_M2=min(block_m, rows), BLOCK_N=block_n,
                BLOCK_D=_padded(d), BLOCK_DV=_padded(dv), num_warps=4 if width <= 128 else 8, num_stages=2)


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not _interpreting():
        return tl.bfloat16
    return tl.float32  # FP32 inputs, and BF16 in the interpreter (its BF16 arithmetic is wrong; BF16 -> FP32 is exact)


@triton_op("kvprec_triton::curvature_position", mutates_args={})
def curvature_position_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                          query_reduce: int) -> torch.Tensor:
    """The checked kernel calls: q [B, Hq, Q, D], k [B, Hkv, N, D], v [B, Hkv, N, DV], one dtype (FP16, BF16 or
    FP32), last dims contiguous; scale > 0; query_reduce 0 mean, 1 max, 2 sum. Returns position FP64
    [B, Hkv, N]. Inputs are assumed checked by :func:`curvature_reduce`."""
    return _positions(q, k, v, scale, causal, (query_reduce,))[0]


@triton_op("kvprec_triton::curvature_position_sum_max", mutates_args={})
def curvature_position_sum_max_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                  causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`curvature_position_op` with query_reduce "sum" and "max" at once: pass 1 (the row statistics,
    cdiv(G*Q, BLOCK_M1) reads of K and V) runs once for both, then pass 2 once per statistic."""
    pos_sum, pos_max = _positions(q, k, v, scale, causal, (_REDUCE_CODES["sum"], _REDUCE_CODES["max"]))
    return pos_sum, pos_max


def _positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
               query_reduces: Tuple[int, ...]) -> List[torch.Tensor]:
    """Pass 1 once, then pass 2 for each of ``query_reduces``: one position tensor FP64 [B, Hkv, N] each."""
    b, hq, nq, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    gq = g * nq
    bh = b * hkv
    dev = q.device
    cfg = block_sizes(bh, gq, n, d, dv, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    o = torch.empty(bh, gq, dv, **f32)
    lse2 = torch.empty(bh, gq, **f32)
    coef = torch.empty(bh, gq, **f32)
    onorm2 = torch.empty(bh, gq, **f32)
    tstar = torch.empty(bh, gq, dtype=torch.int32, device=dev)
    dstar = torch.empty(bh, gq, **f32)
    dot_dtype = _dot_dtype(q.dtype)
    qk_scale = scale * 1.4426950408889634  # base-2 exponentials in the kernels
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    common = dict(CAUSAL=causal, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_DV=cfg["BLOCK_DV"],
                  DOT_DTYPE=dot_dtype, QK_F32=dot_dtype == tl.float32, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    wrap_triton(curvature_rows_kernel)[(bh, triton.cdiv(gq, cfg["BLOCK_M1"]))](
        q, strides[0], strides[1], strides[2], k, strides[3], strides[4], strides[5], v, strides[6], strides[7],
        strides[8], o, lse2, coef, onorm2, tstar, dstar,
        hkv, g, nq, gq, n, d, dv, scale, qk_scale,
        BLOCK_M=cfg["BLOCK_M1"], **common)
    positions = []
    for query_reduce in query_reduces:
        position = torch.empty(b, hkv, n, dtype=torch.float64, device=dev)
        wrap_triton(curvature_positions_kernel)[(bh, triton.cdiv(n, cfg["BLOCK_N"]))](
            q, strides[0], strides[1], strides[2], k, strides[3], strides[4], strides[5], v, strides[6], strides[7],
            strides[8], o, lse2, coef, onorm2, tstar, dstar, position,
            hkv, g, nq, gq, n, d, dv, qk_scale,
            QUERY_REDUCE=query_reduce, BLOCK_M=cfg["BLOCK_M2"], **common)
        positions.append(position)
    return positions


def _kernel_dtype(*xs: torch.Tensor) -> torch.dtype:
    dtypes = {x.dtype for x in xs}
    if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16, torch.float32}:
        return dtypes.pop()
    return torch.float32


def _last_dim_contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def curvature_reduce(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 0.0, causal: bool = True,
                     block_size: int = 64, query_reduce: str = "mean", block_reduce: str = "max"
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton curvature reduction; arguments and results as kvprec.analysis.curvature.curvature_reduce_reference.

    q [B?, Hq, Q, D], k [B?, Hkv, N, D], v [B?, Hkv, N, Dv] on one CUDA device (or CPU under TRITON_INTERPRET=1),
    any float dtypes (FP16 / BF16 / FP32 run as they are; FP64 or mixed dtypes are rounded to FP32), D and Dv
    from 1 to 256, strided (the last dimension is copied only when not contiguous). Returns (position
    [B?, Hkv, N], block [B?, Hkv, ceil(N / block_size)]) FP64; tolerance in the module docstring."""
    _check_reduce("query_reduce", query_reduce)
    _check_reduce("block_reduce", block_reduce)
    if block_size < 1:
        raise ValueError(f"curvature_reduce: block_size {block_size} is not accepted; use a positive size")
    batched, s, q4, k4, v4 = _prepared("curvature_reduce", q, k, v, scale, causal)
    position = curvature_position_op(q4, k4, v4, s, bool(causal), _REDUCE_CODES[query_reduce])
    if not batched:
        position = position.squeeze(0)
    return position, _block_reduce(position, block_size, block_reduce)


def curvature_sum_max(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 0.0, causal: bool = True
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton (sum, max) of kappa per KV head and position, FP64 [B?, Hkv, N] each; arguments and results as
    kvprec.analysis.curvature.curvature_sum_max_reference. The same kernels and arithmetic as two
    :func:`curvature_reduce` calls (query_reduce "sum" and "max"), with their shared first pass run once:
    cdiv(G*Q, BLOCK_M1) + 2 passes over K and V instead of 2 cdiv(G*Q, BLOCK_M1) + 2."""
    batched, s, q4, k4, v4 = _prepared("curvature_sum_max", q, k, v, scale, causal)
    out = curvature_position_sum_max_op(q4, k4, v4, s, bool(causal))
    return tuple(x if batched else x.squeeze(0) for x in out)


def _prepared(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """Host checks of the Triton curvature ops, then (batched, scale, q4, k4, v4): 4-D tensors in one kernel
    dtype with contiguous last dims."""
    batched, _, s, _ = check_inputs(op, q, k, v, scale, causal)
    for what, x in (("head_dim", q.shape[-1]), ("value head_dim", v.shape[-1])):
        if x > MAX_HEAD_DIM:
            raise ValueError(f"{op} (triton): {what} {x} is not supported; accepted head_dim 1 to "
                             f"{MAX_HEAD_DIM} (padded to a power of two >= 16 in registers)")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op} (triton): q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"{op} (triton): q is on {q.device}; the Triton kernels need a CUDA device "
                           "(or TRITON_INTERPRET=1 set before triton_kernels was imported)")
    dtype = _kernel_dtype(q, k, v)
    q4, k4, v4 = (_last_dim_contiguous(x if batched else x.unsqueeze(0), dtype) for x in (q, k, v))
    return batched, float(s), q4, k4, v4
