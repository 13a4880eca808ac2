"""Key novelty: how far new keys lie from a window of recent keys, per batch row and KV head.

The pure-torch reference (the CPU default and the oracle of the Triton kernel, kvprec/ops/triton/novelty.py). The
dispatching entry point :func:`kvprec.analysis.novelty.novelty` (op "novelty_reduce") and the rolling
``NoveltyTracker`` live in kvprec/analysis/novelty.py.

Shapes: k_new [B, H, n, D] (the newest keys), window [B, H, W, D] (the recent keys they are compared with),
rank r with 1 <= r <= min(W, D). Per (b, h), with the window matrix X = window[b, h] [W, D] and each new key
k = k_new[b, h, i] [D]::

    m        = (1/W) sum_w X_w                                   the window mean
    cosine   = 1 - k.m / (||k|| ||m||)                          in [0, 2];  1 when ||k|| = 0 or ||m|| = 0
    l2       = ||k - m||
    residual = ||k - U U^T k|| / ||k||                          in [0, 1];  0 when ||k|| = 0

U [D, r'] holds the top right singular vectors of the uncentered X (X = P diag(s) V^T, s descending; U = the
first r columns of V), keeping only those whose singular value exceeds the numerical-rank tolerance of FP32,
s_j > max(W, D) * eps_fp32 * s_1 (torch.linalg.matrix_rank's default rule at FP32, the precision this op is
defined in). Directions of a rank-deficient window are numerically null, and any choice of them would be arbitrary,
so the subspace is the window's row space cut to r directions: a window of rank 2 with r = 4 projects onto 2
directions, an all-zero window onto none (residual 1 for every nonzero key). Where s_r = s_(r+1) > 0 the top-r
subspace itself is not unique; the result then depends on the SVD's choice (measure zero for real keys).

Zero-norm conventions (the same in every backend): a zero key or a zero window mean has no direction, so its
cosine similarity is taken as 0 (cosine distance 1, as sklearn's cosine_distances does); a zero key lies in every
subspace, so its residual is 0. l2 needs no convention.

Results are FP32 [B, H, n] for any floating inputs (float16, bfloat16, float32, float64). The reference computes in
FP64 (inputs are exact in it) and rounds once; the Triton kernel computes in FP32 (tolerance in
python_tests/test_novelty.py). Keys are compared with the window as given: the "novelty over time" study calls
:class:`NoveltyTracker` from the cache, which compares before it rolls the new keys in.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Tuple

import torch

#: FP32 machine epsilon: the rank tolerance is max(W, D) * FP32_EPS * s_1 (module docstring).
FP32_EPS = torch.finfo(torch.float32).eps


class NoveltyResult(NamedTuple):
    cosine: torch.Tensor    # [B, H, n] FP32: 1 - cos(k, window mean)
    l2: torch.Tensor        # [B, H, n] FP32: ||k - window mean||
    residual: torch.Tensor  # [B, H, n] FP32: ||k - U U^T k|| / ||k||, the share outside the top-r subspace


def check_inputs(op: str, k_new, window, rank, *, finite: bool = True) -> Tuple[int, int, int, int, int, int]:
    """Checks the arguments without copying them; returns (B, H, n, W, D, rank). Shared by the reference and the
    Triton launcher, so both raise the same errors. ``finite`` also checks the values (one synchronisation)."""
    _check_tensor(op, "k_new", k_new, "[B, H, n, D]")
    _check_tensor(op, "window", window, "[B, H, W, D]")
    b, h, n, d = k_new.shape
    wb, wh, w, wd = window.shape
    if (wb, wh) != (b, h):
        raise ValueError(f"{op}: window must match k_new in batch and heads; k_new {list(k_new.shape)}, "
                         f"window {list(window.shape)}")
    if wd != d:
        raise ValueError(f"{op}: window has head_dim {wd} but k_new has head_dim {d}")
    if d < 1:
        raise ValueError(f"{op}: head_dim must be >= 1, got shapes k_new {list(k_new.shape)}, "
                         f"window {list(window.shape)}")
    if w < 1:
        raise ValueError(f"{op}: window must hold W >= 1 keys, got shape {list(window.shape)} (an empty window "
                         "has no mean and no subspace; NoveltyTracker defines its first call separately)")
    if window.device != k_new.device:
        raise ValueError(f"{op}: k_new and window must be on one device, got {k_new.device} and {window.device}")
    if isinstance(rank, bool):
        raise ValueError(f"{op}: rank must be an integer in [1, min(W, D)] = [1, {min(w, d)}], got {rank!r}")
    try:
        r = operator.index(rank)
    except TypeError:
        raise ValueError(f"{op}: rank must be an integer in [1, min(W, D)] = [1, {min(w, d)}], "
                         f"got {rank!r}") from None
    if not 1 <= r <= min(w, d):
        raise ValueError(f"{op}: rank {r} is out of range; accepted 1 <= rank <= min(W, D) = min({w}, {d})")
    if finite:
        _check_finite(op, "k_new", k_new)
        _check_finite(op, "window", window)
    return b, h, n, w, d, r


def _check_tensor(op: str, name: str, t, shape: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be a floating tensor (float32, float64, float16, bfloat16), got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be {shape}, got shape {list(t.shape)}")


def _check_finite(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} contains non-finite values")


def window_basis(window: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-r right singular vectors of each window matrix: window [B, H, W, D] (float32 or float64) ->
    basis [B, H, r, D] in window's dtype, rows orthonormal, with the rows of numerically null directions
    (s_j <= max(W, D) * eps_fp32 * s_1, module docstring) set to zero. Batched torch.linalg.svd."""
    w, d = window.shape[-2:]
    _, s, vh = torch.linalg.svd(window, full_matrices=False)   # s [B, H, min(W, D)], vh [B, H, min(W, D), D]
    tol = s[..., :1] * (max(w, d) * FP32_EPS)
    keep = s[..., :rank] > tol
    return vh[..., :rank, :] * keep.unsqueeze(-1).to(vh.dtype)


def _empty(b: int, h: int, n: int, device) -> NoveltyResult:
    z = torch.zeros(b, h, n, dtype=torch.float32, device=device)
    return NoveltyResult(z, z.clone(), z.clone())


def novelty_reference(k_new: torch.Tensor, window: torch.Tensor, rank: int) -> NoveltyResult:
    """(cosine, l2, residual), each FP32 [B, H, n]; formulas and conventions in the module docstring. FP64."""
    b, h, n, _, _, r = check_inputs("novelty_reduce", k_new, window, rank)
    if b * h * n == 0:
        return _empty(b, h, n, k_new.device)
    k = k_new.double()
    x = window.double()
    mean = x.mean(dim=2, keepdim=True)                       # [B, H, 1, D]
    knorm = k.norm(dim=-1)                                   # [B, H, n]
    mnorm = mean.norm(dim=-1)                                # [B, H, 1]
    denom = knorm * mnorm
    cos = torch.where(denom > 0, (k * mean).sum(-1) / torch.where(denom > 0, denom, 1.0), 0.0)
    cosine = (1.0 - cos).clamp(0.0, 2.0)
    l2 = (k - mean).norm(dim=-1)
    basis = window_basis(x, r)                               # [B, H, r, D]
    outside = (k - (k @ basis.transpose(-1, -2)) @ basis).norm(dim=-1)   # a direct difference: no cancellation
    residual = torch.where(knorm > 0, outside / torch.where(knorm > 0, knorm, 1.0), 0.0).clamp(0.0, 1.0)
    return NoveltyResult(cosine.float(), l2.float(), residual.float())
