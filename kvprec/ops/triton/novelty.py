"""Launcher of the Triton novelty reduction (body in triton_kernels/novelty.py).

:func:`novelty_reduce` has the signature, checks, error messages and results of
kvprec.analysis.novelty.novelty_reference: NoveltyResult(cosine, l2, residual), each FP32 [B, H, n]. It checks the
inputs on the host, computes the top-r basis of every window OUTSIDE the kernel with one batched
``torch.linalg.svd`` in FP32 (:func:`kvprec.analysis.novelty.window_basis`: right singular vectors, numerically
null directions zeroed), then calls ``torch.ops.kvprec_triton.novelty_reduce`` (a ``torch.library.triton_op``, so
torch.compile sees the kernel). The kernel fuses the window mean, the cosine and L2 distances and the projection
residual: per (b, h, tile of BLOCK_N new keys) one read of the window and one of the keys. With n <= BLOCK_N (a
decode step, a short speculative run) that is one read of the window per (b, h); a long run of new keys re-reads
the window once per tile (from L2, in practice). The SVD reads the window too: it is the cost of an exact top-r
subspace, and what dominates the op at decode.

Inputs: any float dtypes; FP16 / BF16 / FP32 are read as they are (k_new and window may differ), FP64 is rounded to
FP32 first; strided (the last dimension is copied only when not contiguous); head_dim 1 to 512 (padded to a power
of two in registers with masked loads). Arithmetic is FP32 (the tolerance against the FP64 reference is stated in
python_tests/test_novelty.py). FP32 also bounds the range: keys with |x| above ~1e18 overflow ||k||^2, and keys
below ~1e-19 count as zero, where the FP64 reference would still resolve them.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from ...triton_kernels.novelty import novelty_kernel

from ..reference.novelty import NoveltyResult, check_inputs, window_basis

MAX_HEAD_DIM = 512
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TILE_ELEMENTS = 4096  # FP32 elements per [rows, BLOCK_D] register tile: 32 per thread at 4 warps


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(novelty_kernel, InterpretedFunction)


def block_sizes(n: int, w: int, d: int) -> dict:
    """BLOCK_D covers head_dim; the key tile and the window tile hold about _TILE_ELEMENTS values each."""
    block_d = triton.next_power_of_2(d)
    rows = max(1, _TILE_ELEMENTS // block_d)
    return dict(BLOCK_N=min(triton.next_power_of_2(n), rows), BLOCK_W=min(triton.next_power_of_2(w), rows),
                BLOCK_D=block_d)


@triton_op("kvprec_triton::novelty_reduce", mutates_args={})
def novelty_reduce_op(k_new: torch.Tensor, window: torch.Tensor, basis: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked kernel call: k_new [B, H, n, D], window [B, H, W, D] (FP16 / BF16 / FP32, last dim
    contiguous), basis [B, H, R, D] FP32 contiguous. Returns cosine, l2, residual FP32 [B, H, n]. Inputs are
    assumed checked by :func:`novelty_reduce`."""
    b, h, n, d = k_new.shape
    w = window.shape[2]
    r = basis.shape[2]
    f32 = dict(dtype=torch.float32, device=k_new.device)
    cosine = torch.empty(b, h, n, **f32)
    l2 = torch.empty(b, h, n, **f32)
    residual = torch.empty(b, h, n, **f32)
    if b * h * n:
        cfg = block_sizes(n, w, d)
        wrap_triton(novelty_kernel)[(b * h, triton.cdiv(n, cfg["BLOCK_N"]))](
            k_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
            window, window.stride(0), window.stride(1), window.stride(2),
            basis, cosine, l2, residual,
            h, n, w, d, r, num_warps=4, **cfg)
    return cosine, l2, residual


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _KERNEL_DTYPES:
        x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def novelty_reduce(k_new: torch.Tensor, window: torch.Tensor, rank: int) -> NoveltyResult:
    """Triton novelty reduction; arguments and results as kvprec.analysis.novelty.novelty_reference.

    k_new [B, H, n, D], window [B, H, W, D] on one CUDA device (or CPU under TRITON_INTERPRET=1), 1 <= rank <=
    min(W, D), head_dim <= 512. Returns NoveltyResult(cosine, l2, residual), each FP32 [B, H, n]."""
    b, h, n, w, d, r = check_inputs("novelty_reduce", k_new, window, rank)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"novelty_reduce (triton): head_dim {d} is not supported; accepted head_dim 1 to "
                         f"{MAX_HEAD_DIM} (padded to a power of two in registers); backend='torch' takes any")
    if k_new.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"novelty_reduce (triton): k_new is on {k_new.device}; the Triton kernel needs a CUDA "
                           "device (or TRITON_INTERPRET=1 set before triton_kernels was imported)")
    if b * h * n == 0:
        z = torch.zeros(b, h, n, dtype=torch.float32, device=k_new.device)
        return NoveltyResult(z, z.clone(), z.clone())
    basis = window_basis(window.float(), r).contiguous()
    return NoveltyResult(*novelty_reduce_op(_kernel_input(k_new), _kernel_input(window), basis))
