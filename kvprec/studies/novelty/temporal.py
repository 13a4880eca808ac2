"""Temporal statistics of a novelty series x_t (one value per decode step) and of its spike times.

* robust z-score over a trailing window (causal): z_t = (x_t - med) / (1.4826 MAD), med and MAD the median and
  median absolute deviation of x[t - w, t) (1.4826 MAD estimates a normal's standard deviation); undefined (NaN)
  while fewer than ``min_history`` earlier values exist. A spike is a step with z_t > threshold (3.5: Iglewicz and
  Hoaglin's cut-off for the modified z-score). A MAD of 0 (a flat window) is replaced by the smallest positive
  spacing of the window's values, or 1e-12 when all are equal, so an equal value scores 0 and a larger one a spike.
* burstiness (Goh and Barabasi 2008) of the inter-spike intervals tau: B = (sigma - mu) / (sigma + mu) with mu, sigma
  the mean and (population) standard deviation of tau. A Poisson process has exponential intervals (sigma = mu,
  B = 0); a periodic one B = -1; bursts B > 0. It needs at least two intervals.
* the null of spike times: the same number of spikes placed uniformly at random among the analysed steps (a
  Bernoulli process conditioned on its count, the discrete-time Poisson process); ``burstiness_null`` samples B under
  it, and the Monte Carlo p-value of an observed B is (1 + #{B_null >= B}) / (1 + reps).
* Poisson tests with scipy.stats: Kolmogorov-Smirnov of the intervals against an exponential of the same mean
  (two-sided; the mean is estimated, so the p-value is conservative), and the index of dispersion of spike counts in
  consecutive bins: D = (m - 1) s^2 / c_bar ~ chi2(m - 1) under Poisson counts; the one-sided p-value P(chi2 >= D)
  tests for clustering (over-dispersion).
* sample autocorrelation r_k = sum_t (x_t - m)(x_{t+k} - m) / sum_t (x_t - m)^2 and the Ljung-Box statistic
  Q = n (n + 2) sum_{k=1..h} r_k^2 / (n - k) ~ chi2(h) (white noise null).
* skewness and excess kurtosis (Fisher; scipy.stats.skew / kurtosis, bias-corrected) with D'Agostino's skewtest
  (n >= 8) and the Anscombe-Glynn kurtosistest (n >= 20).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

#: the normal consistency constant of the MAD
MAD_SCALE = 1.4826


def robust_z(x: np.ndarray, window: int, min_history: int = 8) -> np.ndarray:
    """Causal robust z-score of x [n] over the trailing ``window`` values (module docstring): float64 [n]."""
    x = np.asarray(x, dtype=np.float64)
    z = np.full(len(x), np.nan)
    for t in range(len(x)):
        ref = x[max(0, t - window):t]
        ref = ref[np.isfinite(ref)]
        if len(ref) < min_history or not np.isfinite(x[t]):
            continue
        med = np.median(ref)
        scale = MAD_SCALE * np.median(np.abs(ref - med))
        if scale <= 0:
            gaps = np.diff(np.unique(ref))
            scale = float(gaps.min()) if len(gaps) else 1e-12
        z[t] = (x[t] - med) / scale
    return z


def spikes(x: np.ndarray, window: int, threshold: float = 3.5, min_history: int = 8) -> np.ndarray:
    """Indices of the spikes of x (robust z > threshold), int64, ascending."""
    z = robust_z(x, window, min_history)
    return np.flatnonzero(np.nan_to_num(z, nan=-np.inf) > threshold).astype(np.int64)


def burstiness(times: np.ndarray) -> Optional[float]:
    """Goh-Barabasi B of the intervals between event ``times`` (sorted); None with fewer than 3 events or a zero
    mean interval."""
    tau = np.diff(np.sort(np.asarray(times, dtype=np.float64)))
    if len(tau) < 2:
        return None
    mu, sigma = tau.mean(), tau.std()
    return float((sigma - mu) / (sigma + mu)) if sigma + mu > 0 else None


def burstiness_null(n_events: int, n_steps: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """B of ``n_events`` distinct steps drawn uniformly from ``n_steps``, ``reps`` times: float64 [reps] (module
    docstring's null); empty when B is undefined (fewer than 3 events)."""
    if n_events < 3 or n_events > n_steps:
        return np.zeros(0)
    times = np.sort(np.argsort(rng.random((reps, n_steps)), axis=1)[:, :n_events], axis=1)  # a uniform k-subset
    tau = np.diff(times, axis=1).astype(np.float64)
    mu, sigma = tau.mean(1), tau.std(1)
    return (sigma - mu) / (sigma + mu)


def poisson_tests(times: np.ndarray, n_steps: int, bin_size: int) -> Dict[str, Optional[float]]:
    """KS of the intervals against an exponential of their mean, and the index-of-dispersion test of the counts in
    bins of ``bin_size`` steps (module docstring): {ks_statistic, ks_p, dispersion, dispersion_p, bins}."""
    from scipy import stats

    times = np.sort(np.asarray(times, dtype=np.float64))
    out: Dict[str, Optional[float]] = {"ks_statistic": None, "ks_p": None, "dispersion": None, "dispersion_p": None,
                                       "bins": None}
    tau = np.diff(times)
    if len(tau) >= 2 and tau.mean() > 0:
        ks = stats.kstest(tau, "expon", args=(0, tau.mean()))
        out["ks_statistic"], out["ks_p"] = float(ks.statistic), float(ks.pvalue)
    m = n_steps // bin_size
    if m >= 2 and len(times):
        counts = np.bincount((times[times < m * bin_size] // bin_size).astype(int), minlength=m)
        mean = counts.mean()
        if mean > 0:
            d = (m - 1) * counts.var(ddof=1) / mean
            out["dispersion"], out["dispersion_p"] = float(counts.var(ddof=1) / mean), float(stats.chi2.sf(d, m - 1))
        out["bins"] = int(m)
    return out


def autocorrelation(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Sample autocorrelation r_1 .. r_max_lag of x (module docstring); NaN where undefined."""
    x = np.asarray(x, dtype=np.float64)
    y = x - x.mean()
    den = float((y * y).sum())
    out = np.full(max_lag, np.nan)
    if den <= 0:
        return out
    for k in range(1, min(max_lag, len(x) - 1) + 1):
        out[k - 1] = float((y[:-k] * y[k:]).sum() / den)
    return out


def ljung_box(x: np.ndarray, lags: int) -> Dict[str, Optional[float]]:
    """Ljung-Box Q over lags 1..lags and its chi2(lags) p-value; None when the series is too short or constant."""
    from scipy import stats

    n = len(x)
    r = autocorrelation(x, lags)
    if n <= lags + 1 or not np.isfinite(r).all():
        return {"q": None, "p": None}
    q = n * (n + 2) * float((r ** 2 / (n - np.arange(1, lags + 1))).sum())
    return {"q": q, "p": float(stats.chi2.sf(q, lags))}


def shape(x: np.ndarray) -> Dict[str, Optional[float]]:
    """Skewness, excess kurtosis and their tests (module docstring); None where n is too small."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    out: Dict[str, Optional[float]] = {"n": int(len(x)), "skew": None, "skew_z": None, "skew_p": None,
                                       "kurtosis": None, "kurtosis_z": None, "kurtosis_p": None}
    if len(x) < 3 or np.ptp(x) == 0:
        return out
    out["skew"] = float(stats.skew(x, bias=False))
    out["kurtosis"] = float(stats.kurtosis(x, fisher=True, bias=False))
    if len(x) >= 8:
        t = stats.skewtest(x)
        out["skew_z"], out["skew_p"] = float(t.statistic), float(t.pvalue)
    if len(x) >= 20:
        t = stats.kurtosistest(x)
        out["kurtosis_z"], out["kurtosis_p"] = float(t.statistic), float(t.pvalue)
    return out


def finite(x) -> Optional[float]:
    """float(x), or None for NaN / inf / None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
