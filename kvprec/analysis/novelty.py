"""Key novelty: the dispatching entry point :func:`novelty` and :class:`NoveltyTracker`.

Definitions, shapes and the pure-torch reference: kvprec/ops/reference/novelty.py; the Triton kernel:
kvprec/ops/triton/novelty.py (op "novelty_reduce" in kvprec/ops/__init__.py).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import ops
from ..ops.reference.novelty import (NoveltyResult, _check_finite, _check_tensor, check_inputs,  # noqa: F401
                                    novelty_reference, window_basis)

# ---------------------------------------------------------------------------------------------------------
# Entry point: the reference or the Triton kernel, chosen by the op registry (kvprec/ops/__init__.py).

def _run(name: str, backend: str, device: torch.device) -> str:
    return ops.resolve_backend(name, backend, device)


def novelty(k_new: torch.Tensor, window: torch.Tensor, rank: int, *, backend: str = "auto") -> NoveltyResult:
    """Novelty of k_new [B, H, n, D] against window [B, H, W, D] with a top-``rank`` subspace:
    NoveltyResult(cosine, l2, residual), each FP32 [B, H, n]; see the module docstring.

    backend: "torch" (this module's reference, FP64), "triton" (kvprec/ops/triton/novelty.py: CUDA tensors, or
    CPU under TRITON_INTERPRET=1; FP32), "auto" (triton on CUDA where installed, else the reference). There is no
    native kernel ("cpp" / "cuda" raise). Bad arguments raise ValueError naming the argument."""
    check_inputs("novelty_reduce", k_new, window, rank, finite=False)  # before touching .device
    which = _run("novelty_reduce", backend, k_new.device)
    if which == "triton":
        return NoveltyResult(*ops.REGISTRY["novelty_reduce"].triton(k_new, window, rank))
    return novelty_reference(k_new, window, rank)


class NoveltyTracker:
    """Rolling window of the last ``window`` keys per layer, and the novelty of each new key against it.

    ``observe(layer_idx, k_new)`` with k_new [B, H, n, D]: compares the n keys with the layer's window as it was
    BEFORE this call (all n against the same window, not against each other), then appends them in order and
    keeps the newest ``window`` keys (so n > window keeps only the last ``window`` of k_new). While fewer than
    ``window`` keys have been seen the window holds all of them, and the rank used is min(rank, keys held).

    First call of a layer (nothing held): the window is empty, and the result is that of a window of zeros (mean
    0, empty subspace): cosine 1, l2 = ||k||, residual 1 (0 for a zero key). All values are finite.

    The window is stored in FP32 (exact for FP16 / BF16 / FP32 keys) as [B, H, <= window, D]; B, H, D and the
    device must stay the same per layer (ValueError otherwise; ``reset()`` forgets everything). ``backend`` is
    passed to :func:`novelty`.
    """

    def __init__(self, window: int, rank: int, *, backend: str = "auto"):
        for name, v in (("window", window), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NoveltyTracker: {name} must be a positive integer, got {v!r}")
        if rank > window:
            raise ValueError(f"NoveltyTracker: rank {rank} exceeds window {window}; accepted 1 <= rank <= window")
        if backend not in ops.BACKENDS:
            raise ValueError(f"NoveltyTracker: backend {backend!r} is not accepted; use one of "
                             f"{', '.join(ops.BACKENDS)}")
        self.window = window
        self.rank = rank
        self.backend = backend
        self._keys: Dict[int, torch.Tensor] = {}

    def keys(self, layer_idx: int) -> Optional[torch.Tensor]:
        """The keys held for a layer, oldest first: FP32 [B, H, <= window, D], or None before its first call."""
        return self._keys.get(layer_idx)

    def reset(self) -> None:
        self._keys.clear()

    def observe(self, layer_idx: int, k_new: torch.Tensor) -> NoveltyResult:
        """Novelty of k_new [B, H, n, D] against the layer's window, then roll k_new in (class docstring)."""
        held = self._keys.get(layer_idx)
        if held is None:
            _check_tensor("NoveltyTracker.observe", "k_new", k_new, "[B, H, n, D]")
            _check_finite("NoveltyTracker.observe", "k_new", k_new)
            if k_new.shape[-1] < self.rank:
                raise ValueError(f"NoveltyTracker.observe: rank {self.rank} exceeds head_dim {k_new.shape[-1]}; "
                                 "accepted rank <= head_dim")
            result = self._first(k_new)
            fresh = k_new.float()
        else:
            _check_tensor("NoveltyTracker.observe", "k_new", k_new, "[B, H, n, D]")
            if k_new.shape[:2] != held.shape[:2] or k_new.shape[3] != held.shape[3]:
                raise ValueError(f"NoveltyTracker.observe: k_new {list(k_new.shape)} does not match layer "
                                 f"{layer_idx}'s window {list(held.shape)} in batch, heads or head_dim "
                                 "(reset() to start over)")
            result = novelty(k_new, held, min(self.rank, held.shape[2]), backend=self.backend)
            fresh = torch.cat([held, k_new.float()], dim=2)
        if fresh.shape[2]:
            self._keys[layer_idx] = fresh[:, :, -self.window:].contiguous()
        return result

    @staticmethod
    def _first(k_new: torch.Tensor) -> NoveltyResult:
        knorm = k_new.double().norm(dim=-1)
        ones = torch.ones_like(knorm, dtype=torch.float32)
        return NoveltyResult(ones, knorm.float(), (knorm > 0).float())


# ---------------------------------------------------------------------------------------------------------
# Mahalanobis distance from a window under a Ledoit-Wolf shrinkage covariance

def ledoit_wolf_shrinkage(window: torch.Tensor):
    """Ledoit-Wolf (2004) shrinkage of a window's covariance towards a scaled identity, per batch.

    window [..., W, D] (W >= 1 keys). With Y = the rows centered on their mean m, S = Y^T Y / W (the empirical
    covariance), mu = tr(S) / D and ||A||^2 = sum of squares:

        delta = (||S||^2 - D mu^2) / D                     (= ||S - mu I||^2 / D)
        beta  = (sum_k ||y_k||^4 / W - ||S||^2) / (D W)    (sum_k ||y_k y_k^T - S||^2 / (D W^2), >= 0)
        s     = min(beta, delta) / delta   (0 where delta = 0),   Sigma = (1 - s) S + s mu I

    (sklearn.covariance.ledoit_wolf's estimator.) ||S||^2 = ||Y Y^T||^2 / W^2, so only the [W, W] Gram matrix
    is formed. Returns (s, mu, mean): FP64 [...], [...], [..., 1, D]."""
    x = window.double()
    w, d = x.shape[-2:]
    mean = x.mean(dim=-2, keepdim=True)
    y = x - mean
    gram = y @ y.transpose(-1, -2)                                  # [..., W, W]
    sq = gram.diagonal(dim1=-2, dim2=-1)                           # ||y_k||^2
    mu = sq.sum(-1) / (w * d)
    s_norm2 = gram.pow(2).sum(dim=(-2, -1)) / w ** 2                # ||S||^2
    delta = (s_norm2 - d * mu ** 2) / d
    beta = (sq.pow(2).sum(-1) / w - s_norm2) / (d * w)
    beta = torch.minimum(beta.clamp(min=0.0), delta)
    s = torch.where(delta > 0, beta / torch.where(delta > 0, delta, 1.0), torch.zeros_like(delta))
    return s, mu, mean


def shrinkage_covariance(window: torch.Tensor) -> torch.Tensor:
    """The Ledoit-Wolf covariance Sigma [..., D, D] (FP64) of window [..., W, D] (:func:`ledoit_wolf_shrinkage`)."""
    s, mu, mean = ledoit_wolf_shrinkage(window)
    y = window.double() - mean
    emp = y.transpose(-1, -2) @ y / window.shape[-2]
    eye = torch.eye(window.shape[-1], dtype=torch.float64, device=window.device)
    return (1 - s)[..., None, None] * emp + (s * mu)[..., None, None] * eye


#: the identity weight of Sigma is at least this times mu: a window whose estimate has no shrinkage (s = 0, e.g. two
#: keys) has a singular S when W <= D, and the floor keeps Sigma invertible without changing other windows visibly
RIDGE = 1e-6


def mahalanobis(k_new: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance sqrt((k - m)^T Sigma^-1 (k - m)) of each new key from the window mean m under the
    window's Ledoit-Wolf covariance Sigma (:func:`ledoit_wolf_shrinkage`).

    k_new [..., n, D], window [..., W, D] (same leading shape). Sigma = a I + b Y^T Y with a = max(s, RIDGE) mu and
    b = (1 - s) / W, so by the Woodbury identity, with z = Y (k - m) [W]:

        d^2 = (||k - m||^2 - b z^T (a I_W + b Y Y^T)^-1 z) / a

    (no [D, D] matrix is formed). A constant window (mu = 0) has no covariance: NaN. FP32 [..., n], computed in FP64.
    """
    if k_new.shape[:-2] != window.shape[:-2] or k_new.shape[-1] != window.shape[-1]:
        raise ValueError(f"mahalanobis: k_new {list(k_new.shape)} and window {list(window.shape)} must agree in "
                         "leading dimensions and head_dim")
    w = window.shape[-2]
    s, mu, mean = ledoit_wolf_shrinkage(window)
    y = window.double() - mean                                      # [..., W, D]
    r = k_new.double() - mean                                       # [..., n, D]
    a = (torch.maximum(s, torch.full_like(s, RIDGE)) * mu)[..., None, None]
    b = ((1 - s) / w)[..., None, None]
    eye = torch.eye(w, dtype=torch.float64, device=window.device)
    inner = a * eye + b * (y @ y.transpose(-1, -2))                 # [..., W, W]
    z = y @ r.transpose(-1, -2)                                     # [..., W, n]
    safe = torch.where(a > 0, inner, eye.expand_as(inner))
    solved = torch.linalg.solve(safe, z)
    d2 = (r.pow(2).sum(-1) - b[..., 0] * (z * solved).sum(-2)) / torch.where(a > 0, a, 1.0)[..., 0]
    d2 = torch.where(a[..., 0] > 0, d2.clamp(min=0.0), torch.full_like(d2, float("nan")))
    return d2.sqrt().float()


# ---------------------------------------------------------------------------------------------------------
# Novelty of every position of a sequence against the window of the positions just before it

SERIES_METRICS = ("cosine", "l2", "residual", "mahalanobis")


def sliding_novelty(x: torch.Tensor, window: int, rank: int, *, chunk: int = 64,
                    backend: str = "auto") -> Dict[str, torch.Tensor]:
    """Novelty of each position t of x [H, T, D] (H independent series: layers x heads) against the ``window``
    positions x[:, t - window:t] before it: {cosine, l2, residual, mahalanobis}, FP32 [H, T], NaN for
    t < window. The first three are :func:`novelty` (the op "novelty_reduce": the Triton kernel where it runs, the
    reference elsewhere) at ``rank``; mahalanobis is :func:`mahalanobis`. ``chunk`` positions are done at once
    (memory ~ chunk * H * window * D * 8 bytes)."""
    if x.dim() != 3:
        raise ValueError(f"sliding_novelty: x must be [H, T, D], got shape {list(x.shape)}")
    h, t, d = x.shape
    if not (isinstance(window, int) and 1 <= window):
        raise ValueError(f"sliding_novelty: window must be an integer >= 1, got {window!r}")
    if not (isinstance(rank, int) and 1 <= rank <= min(window, d)):
        raise ValueError(f"sliding_novelty: rank {rank!r} out of range; accepted 1 <= rank <= min(window, D) = "
                         f"{min(window, d)}")
    out = {m: torch.full((h, t), float("nan")) for m in SERIES_METRICS}
    if t <= window:
        return out
    windows = x.unfold(1, window, 1)                                # [H, T - W + 1, D, W]: start s = x[:, s:s+W]
    for start in range(window, t, chunk):
        end = min(t, start + chunk)
        win = windows[:, start - window:end - window].permute(1, 0, 3, 2).contiguous()   # [n, H, W, D]
        new = x[:, start:end].transpose(0, 1).unsqueeze(2).contiguous()                 # [n, H, 1, D]
        res = novelty(new, win, rank, backend=backend)
        for m, v in (("cosine", res.cosine), ("l2", res.l2), ("residual", res.residual),
                     ("mahalanobis", mahalanobis(new, win))):
            out[m][:, start:end] = v[..., 0].transpose(0, 1).cpu()
    return out
