"""Recall arithmetic: budgets, the oracle's needed set and the recall of a retained set.

At a decode step whose query sits at position t, the cache before the step holds the n = t past positions
[0, t) (the current position t is appended by every policy and is left out of both sets). For a budget fraction b:

    K(n)      = min(n, max(1, ceil(b n)))                      positions a policy may retain
    needed_t  = the K(n) positions of [0, t) with the largest attention a_t(j) of the query at t
    recall_t  = |needed_t  intersect  retained_t| / K(n)       in [0, 1]; 1 when the policy kept all it needed

Everything is batched over rows (one row per (layer, KV head), plus any aggregate row): attention [R, n] FP32,
sets as bool masks [R, n]. Ties in the attention are broken by ``torch.topk`` (any K of the tied positions).
"""
from __future__ import annotations

import math

import torch


def budget_size(fraction: float, n: int) -> int:
    """K(n) = min(n, max(1, ceil(b n))), rounding b n to 9 decimals first so that 0.3 * 10 counts as 3, not 4."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"budget fraction must be in (0, 1], got {fraction}")
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool like ``scores`` [R, n]: True at the k largest entries of each row (k clipped to [0, n])."""
    n = scores.shape[-1]
    k = max(0, min(int(k), n))
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        mask.scatter_(-1, torch.topk(scores, k, dim=-1).indices, True)
    return mask


def needed_set(attention: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle's needed set, bool [R, n]: the top-k positions of the current attention ``attention`` [R, n]
    over the past positions (the current position excluded by the caller)."""
    return top_k_mask(attention, k)


def recall(needed: torch.Tensor, retained: torch.Tensor, k: int) -> torch.Tensor:
    """|needed intersect retained| / k per row, FP32 [R]; ``needed`` and ``retained`` bool [R, n]."""
    if needed.shape != retained.shape:
        raise ValueError(f"recall: needed {tuple(needed.shape)} and retained {tuple(retained.shape)} differ in shape")
    if k <= 0:
        raise ValueError(f"recall: k must be >= 1, got {k}")
    return (needed & retained).sum(-1).float() / float(k)
