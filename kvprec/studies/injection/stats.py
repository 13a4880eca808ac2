"""Paired statistics across problems: percentile bootstrap intervals and the Wilcoxon signed-rank test.

Problems are the units: an interval resamples problems with replacement (``n_boot`` resamples from one seeded
generator), a paired test compares two conditions on the problems where both have a value. Missing values are NaN
and are left out (a detection latency is NaN where no detection happened; that share is reported beside it).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import numpy as np


def _finite(x: Optional[float]) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else float(x)


def bootstrap_ci(values, statistic: Callable = np.mean, *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> Dict[str, Optional[float]]:
    """{"n", "value", "lo", "hi"}: ``statistic`` of the finite values and its percentile interval; value None
    when there are none, lo/hi None with fewer than two."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"n": 0, "value": None, "lo": None, "hi": None}
    value = float(statistic(x))
    if x.size < 2:
        return {"n": 1, "value": value, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, x.size, size=(n_boot, x.size))]
    stats = statistic(draws, axis=1)
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return {"n": int(x.size), "value": value, "lo": float(lo), "hi": float(hi)}


def curve_band(values: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Dict[str, list]:
    """Mean over axis 0 of ``values`` [n, S] (NaN = missing) per column with a bootstrap band over rows:
    {"mean", "lo", "hi", "n"} lists of length S (None where a column has no value)."""
    v = np.asarray(values, dtype=np.float64)
    n, s = v.shape
    out = {"mean": [None] * s, "lo": [None] * s, "hi": [None] * s, "n": [int(c) for c in np.isfinite(v).sum(0)]}
    if n == 0:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    with warnings.catch_warnings():  # all-NaN columns: nanmean / nanpercentile warn, the result is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(v, axis=0)
        boot = np.nanmean(v[idx], axis=1)                                    # [n_boot, S]
        lo, hi = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=0)
    for j in range(s):
        if out["n"][j]:
            out["mean"][j] = _finite(mean[j])
            if out["n"][j] > 1:
                out["lo"][j], out["hi"][j] = _finite(lo[j]), _finite(hi[j])
    return out


def paired_test(a, b, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Dict[str, Optional[float]]:
    """Wilcoxon signed-rank test of a - b over the problems where both are finite (scipy, two-sided; zero
    differences dropped, as scipy's default "wilcox" zero method), with the median difference and its bootstrap
    interval. {"n", "median_diff", "lo", "hi", "statistic", "p"}; statistic and p None when fewer than two pairs
    differ (no test is possible)."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    ci = bootstrap_ci(d, np.median, n_boot=n_boot, seed=seed, level=level)
    out = {"n": int(d.size), "median_diff": ci["value"], "lo": ci["lo"], "hi": ci["hi"], "statistic": None, "p": None}
    if np.count_nonzero(d) >= 2:
        res = wilcoxon(d)
        out["statistic"], out["p"] = _finite(res.statistic), _finite(res.pvalue)
    return out
