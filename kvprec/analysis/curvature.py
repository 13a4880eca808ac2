"""Attention curvature and locality patterns: the dispatching entry points.

The formulas, shapes and the pure-torch reference are in kvprec/ops/reference/curvature.py; the native kernels in
csrc/core/curvature.cpp; the Triton reduction in kvprec/ops/triton/curvature.py. Each entry point asks the op
registry (kvprec/ops/__init__.py) which backend runs.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import ops
from ..ops.reference.curvature import (REDUCTIONS, CurvatureResult, LocalityPatterns,  # noqa: F401  (re-exported)
                                       attention_curvature_reference, attention_locality_reference, block_reduce,
                                       curvature_reduce_reference, curvature_sum_max_reference, leader_clusters,
                                       resolve_scale)

# ---------------------------------------------------------------------------------------------------------
# Entry points: the reference or the native kernel, chosen by the op registry (kvprec/ops/__init__.py).

def _run(name: str, backend: str, device: torch.device) -> str:
    return ops.resolve_backend(name, backend, device)


def attention_curvature(q, k, v, scale: float = 0.0, causal: bool = True, *, backend: str = "auto") -> CurvatureResult:
    """kappa, a, ||J||, ||H||, each [B?, Hq, Q, N]; see the module docstring."""
    if _run("attention_curvature", backend, q.device) == "torch":
        return attention_curvature_reference(q, k, v, scale, causal)
    return CurvatureResult(*torch.ops.kvprec.attention_curvature(q, k, v, scale, causal))


def curvature_reduce(q, k, v, scale: float = 0.0, causal: bool = True, block_size: int = 64,
                     query_reduce: str = "mean", block_reduce: str = "max", *,
                     backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(position [B?, Hkv, N], block [B?, Hkv, ceil(N / T)]) FP64; see kvprec/curvature.h.

    backend: "torch" (this module's reference), "cpp" (CPU tensors), "triton" (kvprec/ops/triton/curvature.py:
    CUDA tensors, or CPU under TRITON_INTERPRET=1; FP32 arithmetic), "auto" (triton on CUDA, else the reference)."""
    which = _run("curvature_reduce", backend, q.device)
    if which == "torch":
        return curvature_reduce_reference(q, k, v, scale, causal, block_size, query_reduce, block_reduce)
    if which == "triton":
        return tuple(ops.REGISTRY["curvature_reduce"].triton(q, k, v, scale, causal, block_size, query_reduce,
                                                             block_reduce))
    return tuple(torch.ops.kvprec.curvature_reduce(q, k, v, scale, causal, block_size, query_reduce, block_reduce))


def curvature_sum_max(q, k, v, scale: float = 0.0, causal: bool = True, *,
                      backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum, max) of kappa per KV head and position, FP64 [B?, Hkv, N] each, in one pass where the backend can share
    it: "torch" (the reference, kappa once), "triton" (the attention statistics pass once, then one position pass
    per statistic, instead of two whole curvature_reduce calls), "auto" (triton on CUDA, else the reference)."""
    which = _run("curvature_sum_max", backend, q.device)
    if which == "triton":
        return tuple(ops.REGISTRY["curvature_sum_max"].triton(q, k, v, scale, causal))
    return curvature_sum_max_reference(q, k, v, scale, causal)


def attention_locality(q, k, scale: float = 0.0, causal: bool = True, window: int = 64, anchor_factor: float = 4.0,
                       anchor_fraction: float = 0.9, cluster_threshold: float = 0.8, top_clusters: int = 4, *,
                       backend: str = "auto") -> LocalityPatterns:
    if _run("attention_locality", backend, q.device) == "torch":
        return attention_locality_reference(q, k, scale, causal, window, anchor_factor, anchor_fraction,
                                            cluster_threshold, top_clusters)
    return LocalityPatterns(*torch.ops.kvprec.attention_locality(q, k, scale, causal, window, anchor_factor,
                                                                 anchor_fraction, cluster_threshold, top_clusters))
