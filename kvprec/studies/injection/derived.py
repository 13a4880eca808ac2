"""Derived measures of one injected row, from its per-step curves after the injection (pure numpy; hand-checked in
python_tests/test_study_injection.py).

Inputs are the steps since injection s = 0, 1, ... of one row (its valid steps from its injection point on):
``kl`` (KL to the oracle), ``unadapted`` (KL of the original context alone to the oracle, on the same tokens) and
the noise controls' ``kl`` at the same point of the same problem. Every curve is first smoothed by a trailing mean
over ``smooth`` steps (step s averages s - smooth + 1 .. s, fewer at the start), since single tokens swing the KL
by orders of magnitude (a digit against a space).

* detection latency   the first s where the smoothed KL is below the noise band: under the smallest smoothed noise
                      KL over the noise controls and the steps s - h .. s + h (h = ``band_halfwidth``) — the injected
                      context brings the model closer to the oracle than any same-length noise does around then;
* adaptation point    the first s where the smoothed KL has closed ``fraction`` of the unadapted gap:
                      1 - kl / unadapted >= fraction (undefined where the smoothed gap is below ``min_gap`` at every
                      step: nothing to adapt to, as in the controls);
* stabilisation       steps from the adaptation point to the first s after which the gap stays closed to the end;
* remaining gap       the mean KL over the last ``window`` valid steps (nats), and relative to the unadapted gap
                      over the same steps;
* converged           the remaining gap is at most ``converged_kl``.
A measure that cannot happen within the row's steps is NaN (never detected, never adapted); without noise controls
(a noise row itself) there is no detection latency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np


@dataclass(frozen=True)
class Definitions:
    smooth: int = 3
    band_halfwidth: int = 1
    fraction: float = 0.5
    min_gap: float = 1e-3
    window: int = 5
    converged_kl: float = 0.1


def trailing_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Mean of x[max(0, s - width + 1) .. s] for every s (x finite, 1-D)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    s = np.arange(x.size)
    lo = np.maximum(0, s - width + 1)
    return (c[s + 1] - c[lo]) / (s + 1 - lo)


def noise_band(noise: Sequence[np.ndarray], length: int, d: Definitions) -> np.ndarray:
    """Lower edge of the noise band [length]: min over controls and steps s - h .. s + h of their smoothed KL
    (+inf where no control has a step there)."""
    low = np.full(length, np.inf)
    for curve in noise:
        sm = trailing_mean(curve, d.smooth) if len(curve) else np.zeros(0)
        for s in range(length):
            window = sm[max(0, s - d.band_halfwidth):s + d.band_halfwidth + 1]
            if window.size:
                low[s] = min(low[s], float(window.min()))
    return low


def derived(kl: np.ndarray, unadapted: np.ndarray, noise: Sequence[np.ndarray], d: Definitions) -> Dict[str, float]:
    """The measures of the module docstring for one row (curves over its steps since injection)."""
    kl, unadapted = np.asarray(kl, np.float64), np.asarray(unadapted, np.float64)
    n = kl.size
    nan = float("nan")
    out = {"steps": float(n), "detection_latency": nan, "adaptation_point": nan, "stabilisation": nan,
           "remaining_gap": nan, "relative_gap": nan, "converged": nan}
    if n == 0:
        return out
    sk, su = trailing_mean(kl, d.smooth), trailing_mean(unadapted, d.smooth)
    below = np.flatnonzero(sk < noise_band(noise, n, d)) if len(noise) else np.zeros(0, np.int64)
    if below.size:
        out["detection_latency"] = float(below[0])
    defined = su >= d.min_gap
    if defined.any():
        closed = np.where(defined, 1.0 - sk / np.where(defined, su, 1.0), np.nan)
        ok = defined & (closed >= d.fraction)
        hits = np.flatnonzero(ok)
        if hits.size:
            adapt = int(hits[0])
            out["adaptation_point"] = float(adapt)
            # first s after which every defined step stays closed (undefined steps, gap ~0, do not break it)
            broken = np.flatnonzero(defined & ~ok)
            stable = int(broken[-1]) + 1 if broken.size else 0
            if stable < n:
                out["stabilisation"] = float(max(stable, adapt) - adapt)
    tail = slice(max(0, n - d.window), n)
    out["remaining_gap"] = float(kl[tail].mean())
    gap = float(unadapted[tail].mean())
    out["relative_gap"] = out["remaining_gap"] / gap if gap >= d.min_gap else nan
    out["converged"] = float(out["remaining_gap"] <= d.converged_kl)
    return out
