"""Similarity and redundancy of cached keys or values (pure torch).

Shapes: one layer's keys or values x [H, T, D]. Cosine similarity cos(a, b) = a.b / (|a| |b|) (0 when either is
zero). Measures:

* adjacent tokens: mean_t cos(x_t, x_{t+1}) per head, beside the mean over all pairs of distinct tokens
  (baseline: what two tokens share anyway), from |sum_t u_t|^2 = T + sum_{s != t} u_s.u_t for unit vectors u_t;
* heads of a layer: mean_t cos(x_{i,t}, x_{j,t}) (raw coordinates: what merging two heads' entries needs) and
  linear CKA (Kornblith et al. 2019) of the two [T, D] matrices with centred columns,
  CKA(A, B) = ||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F), which ignores any rotation of a head's channels and asks
  whether two heads hold the same information;
* the same head in adjacent layers: the same two measures between layer l and l + 1 (MiniCache, arXiv:2405.14366,
  merges adjacent layers' entries by direction);
* clusters: leader clustering in token order (a token joins the first leader with cos >= tau, else becomes a
  leader): T / leaders is the compression that merging each token into its leader would allow; adjacent runs
  (a token joins its predecessor's run when cos(x_{t-1}, x_t) >= tau): T / runs.

These compressions are upper bounds of what direction-only merging allows: the merged entries also need their
norms (one number per token) and an index of their leader, which the ratios leave out.
"""
from __future__ import annotations

import numpy as np
import torch


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last dimension (zero rows stay zero), FP64."""
    x = x.double()
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp_min(1e-300), torch.zeros_like(x))


def adjacent_cosine(x: torch.Tensor) -> torch.Tensor:
    """[..., T - 1]: cos(x_t, x_{t+1}) of x [..., T, D]."""
    u = unit(x)
    return (u[..., 1:, :] * u[..., :-1, :]).sum(-1)


def mean_pair_cosine(x: torch.Tensor) -> torch.Tensor:
    """[...]: mean of cos(x_s, x_t) over ordered pairs s != t of x [..., T, D] (zero tokens counted as 0)."""
    u = unit(x)
    t = x.shape[-2]
    total = u.sum(-2).pow(2).sum(-1) - u.pow(2).sum((-1, -2))
    return total / (t * (t - 1))


def tokenwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[...]: mean_t cos(a_t, b_t) of a, b [..., T, D]."""
    return (unit(a) * unit(b)).sum(-1).mean(-1)


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of a [T, D1] and b [T, D2] (module docstring); 0 when either is constant over tokens."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    cross = (a.T @ b).pow(2).sum()
    den = (a.T @ a).norm() * (b.T @ b).norm()
    return float(cross / den) if float(den) > 0 else 0.0


def head_similarity(x: torch.Tensor):
    """(cosine [H, H], CKA [H, H]) between the heads of x [H, T, D]."""
    h = x.shape[0]
    cos = torch.ones(h, h, dtype=torch.float64)
    cka = torch.ones(h, h, dtype=torch.float64)
    for i in range(h):
        for j in range(i + 1, h):
            cos[i, j] = cos[j, i] = tokenwise_cosine(x[i], x[j])
            cka[i, j] = cka[j, i] = linear_cka(x[i], x[j])
    return cos, cka


def cross_layer_similarity(x: torch.Tensor, y: torch.Tensor):
    """(cosine [H], CKA [H]) between head h of x and head h of y, both [H, T, D]."""
    cos = tokenwise_cosine(x, y)
    cka = torch.tensor([linear_cka(x[h], y[h]) for h in range(x.shape[0])], dtype=torch.float64)
    return cos, cka


def cosine_matrix(x: torch.Tensor) -> np.ndarray:
    """[T, T]: cos(x_s, x_t) of the tokens of x [T, D]."""
    u = unit(x)
    return (u @ u.T).numpy()


def leader_clusters(x, tau: float) -> int:
    """Number of leaders of the greedy clustering of the tokens of x [T, D] at cosine >= tau (module docstring);
    ``x`` may also be the tokens' cosine matrix [T, T] (numpy) from :func:`cosine_matrix`."""
    cos = x if isinstance(x, np.ndarray) else cosine_matrix(x)
    close = cos >= tau  # symmetric
    covered = np.zeros(close.shape[0], dtype=bool)  # close to a leader met so far
    leaders = 0
    for i in range(close.shape[0]):
        if not covered[i]:
            leaders += 1
            covered |= close[i]
    return leaders


def adjacent_runs(x: torch.Tensor, tau: float) -> torch.Tensor:
    """[...]: number of runs of x [..., T, D] when a token joins its predecessor's run at cos >= tau."""
    return (adjacent_cosine(x) < tau).sum(-1) + 1


def greedy_merge_count(sim: torch.Tensor, tau: float) -> int:
    """Items kept when item j is dropped if sim[j, i] >= tau for an earlier kept item i (sim [N, N])."""
    kept = []
    for j in range(sim.shape[0]):
        if not any(float(sim[j, i]) >= tau for i in kept):
            kept.append(j)
    return len(kept)
