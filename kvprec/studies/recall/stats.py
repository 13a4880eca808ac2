"""Statistics of the recall study: correlations with p-values and bootstrap confidence intervals, entropy bins.

Point estimates and p-values are scipy's (``pearsonr``, ``spearmanr``; the p-values assume independent steps).
Decode steps of one generation are not independent (entropy and recall drift along a sequence), so each interval
is computed twice, by resampling with replacement

* steps (``unit="step"``): the usual bootstrap, too narrow under autocorrelation;
* samples (``unit="sample"``): whole generations, the cluster bootstrap, honest about the dependence but coarse
  when there are few samples. The study's verdicts use it.

A resample is a weight per step (how often it was drawn, or how often its sample was drawn), so every statistic is
a weighted one: Pearson r of the weighted moments, Spearman rho as Pearson r of the mid-ranks in the resampled
(repeated) data. Intervals are percentile intervals of ``n_boot`` resamples drawn from one seeded generator; all
statistics of one call share the same resamples, so differences between them (e.g. rho at two budgets over the
same steps) get paired intervals.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x, y [B, n] or [n]; weights w [B, n] -> r [B] (NaN where a variance is 0)."""
    total = w.sum(-1, keepdims=True)
    mx, my = (w * x).sum(-1, keepdims=True) / total, (w * y).sum(-1, keepdims=True) / total
    dx, dy = x - mx, y - my
    cov, vx, vy = (w * dx * dy).sum(-1), (w * dx * dx).sum(-1), (w * dy * dy).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(vx * vy)
    return np.where((vx > 1e-300) & (vy > 1e-300), r, np.nan)


def _midranks(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mid-ranks [B, n] of ``values`` [n] in the sample that repeats value i w[b, i] times (ties share a rank)."""
    unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # steps grouped by value, in increasing value
    starts = np.searchsorted(inverse[order], np.arange(len(unique)))
    counts = np.add.reduceat(w[:, order], starts, axis=1)  # [B, U]: weight of each distinct value
    below = np.cumsum(counts, -1) - counts
    return (below + (counts + 1) / 2)[:, inverse]


def resample_weights(n: int, groups: Optional[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] weights: multinomial counts of steps, or of whole groups (each step weighted by its group's)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    labels, index = np.unique(groups, return_inverse=True)
    k = len(labels)
    per_group = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(np.float64)
    return per_group[:, index]


def _interval(values: np.ndarray, level: float) -> List[Optional[float]]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [None, None]
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _finite(x: float) -> Optional[float]:
    return float(x) if np.isfinite(x) else None


def correlations(x: np.ndarray, ys: Dict[str, np.ndarray], groups: np.ndarray, *, n_boot: int = 2000,
                 seed: int = 0, level: float = 0.95, differences: Sequence[tuple] = ()) -> dict:
    """Pearson and Spearman of ``x`` [n] with each ``ys[name]`` [n] (finite, over the same steps as x), with scipy
    p-values and bootstrap intervals by step and by group (``groups`` [n], e.g. the sample of each step); None
    where a variable is constant.

    ``differences``: pairs (a, b) of names; the paired intervals of r_a - r_b and rho_a - rho_b are added under
    ``"a - b"``. Returns {name: {"n", "groups", "pearson": {"r", "p", "ci_step", "ci_sample"}, "spearman": {...}}}.
    """
    from scipy.stats import pearsonr, spearmanr

    x = np.asarray(x, dtype=np.float64)
    n = x.size
    boots = {unit: resample_weights(n, None if unit == "step" else groups, n_boot, seed) for unit in ("step", "sample")}
    xr = {unit: _midranks(x, w) for unit, w in boots.items()}
    draws: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    out: Dict[str, dict] = {}
    for name, y in ys.items():
        y = np.asarray(y, dtype=np.float64)
        if y.shape != x.shape or not np.isfinite(y).all() or not np.isfinite(x).all():
            raise ValueError(f"correlations: {name} must be finite and shaped like x {x.shape}, got {y.shape}")
        constant = n < 3 or np.ptp(y) == 0 or np.ptp(x) == 0
        entry = {"n": int(n), "groups": int(len(np.unique(groups)))}
        draws[name] = {}
        for method in ("pearson", "spearman"):
            if constant:
                entry[method] = {"r": None, "p": None, "ci_step": [None, None], "ci_sample": [None, None]}
                draws[name][method] = {u: np.full(n_boot, np.nan) for u in boots}
                continue
            test = pearsonr(x, y) if method == "pearson" else spearmanr(x, y)
            entry[method] = {"r": _finite(test.statistic), "p": _finite(test.pvalue)}
            draws[name][method] = {}
            for unit, w in boots.items():
                if method == "pearson":
                    r = _weighted_pearson(x[None], y[None], w)
                else:
                    r = _weighted_pearson(xr[unit], _midranks(y, w), w)
                draws[name][method][unit] = r
                entry[method][f"ci_{unit}"] = _interval(r, level)
        out[name] = entry
    for a, b in differences:
        entry = {}
        for method in ("pearson", "spearman"):
            ra, rb = out[a][method]["r"], out[b][method]["r"]
            entry[method] = {"diff": None if ra is None or rb is None else ra - rb}
            for unit in boots:
                entry[method][f"ci_{unit}"] = _interval(draws[a][method][unit] - draws[b][method][unit], level)
        out[f"{a} - {b}"] = entry
    return out


def bin_index(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin of each value for increasing ``edges`` e_0 < ... < e_m: [v >= e_0] + sum_{i >= 1} [v > e_i], so with the
    default edges (1.0, 2.5) low is v < 1.0, medium 1.0 <= v <= 2.5 and high v > 2.5 (nats)."""
    values = np.asarray(values, dtype=np.float64)
    index = (values >= edges[0]).astype(np.int64)
    for e in edges[1:]:
        index += values > e
    return index


def bin_labels(edges: Sequence[float]) -> List[str]:
    labels = [f"low (< {edges[0]:g})"]
    for lo, hi in zip(edges[:-1], edges[1:]):
        labels.append(f"[{lo:g}, {hi:g}]")
    labels.append(f"high (> {edges[-1]:g})")
    if len(edges) == 2:
        labels[1] = f"medium ({edges[0]:g}..{edges[1]:g})"
    return labels


def mean_interval(values: np.ndarray, groups: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """Mean of ``values`` [n] (finite) with percentile intervals over resampled steps and resampled groups."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "mean": None, "ci_step": [None, None], "ci_sample": [None, None]}
    entry = {"n": int(values.size), "mean": float(values.mean())}
    for unit in ("step", "sample"):
        w = resample_weights(values.size, None if unit == "step" else groups, n_boot, seed)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (w * values).sum(-1) / w.sum(-1)
        entry[f"ci_{unit}"] = _interval(means, level)
    return entry
