"""From curvature to precision tiers: required bits, threshold mapping and the budgeted multiple-choice knapsack.

The native implementation is csrc/core/precision_mapper.cpp (formulas, algorithms and sources in
csrc/include/kvprec/precision_mapper.h); this module holds the pure-Python reference (the entry points that the op registry
dispatches are in kvprec/analysis/precision.py) that follows the native code step for step, with the same
tie-breaks, plus a brute-force oracle for tests.

Required bits (the precision obstruction bound, docs/design.md, "Precision policy")::

    p_t = log2(c * kappa_t * D^2 / eps)        defaults c = 1, eps = 2^-11, D = head_dim

c = 1 is the bound's bare leading-order term (it shifts every p_t by log2 c: the knob to calibrate); eps = 2^-11
is FP16's unit roundoff, i.e. the cache should add no more error than rounding the attention output to FP16.

Threshold mode: the cheapest candidate (by page bytes) whose effective bits cover p_t; the most precise candidate
if none does. Budget mode: choose tier j for item i (a block of one head) to minimise the sum of predicted errors
``e_ij = c * kappa_i * D^2 * 2^(-p_eff(j))`` under a byte budget (multiple-choice knapsack): an exact DP over
cost in units of the gcd of the extra costs when the table has at most ``DP_MAX_CELLS`` cells, else a greedy
over each item's convex hull with the LP-relaxation lower bound. Quality mode: the fewest bytes with total
error <= max_error.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...storage.formats import BlockGeometry, Tier

DEFAULT_C = 1.0
DEFAULT_EPS = 2.0 ** -11
DEFAULT_CANDIDATES = (Tier.INT2, Tier.INT4, Tier.INT8, Tier.FP16)
DP_MAX_CELLS = 1 << 25         # auto switch: the DP's choice table at most 32 MiB (csrc: kDpMaxCells)
_DP_HARD_LIMIT = 1 << 31
_ERROR_SLACK = 1e-12           # relative slack of error comparisons (sums in different orders differ in ulps)
METHODS = ("auto", "dp", "greedy")


def _fmt(x: float) -> str:
    return repr(float(x))


# ---------------------------------------------------------------------------------------------------------
# Formulas

def _check_bound_args(c: float, head_dim: int, eps: float) -> None:
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"c: {_fmt(c)} is not accepted; use a positive constant (default 1)")
    if head_dim < 1:
        raise ValueError(f"head_dim: {head_dim} is not accepted; use a positive head dimension")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: {_fmt(eps)} is not accepted; use a positive error tolerance (default 2^-11)")


def _check_kappa(kappa: torch.Tensor) -> torch.Tensor:
    if not kappa.dtype.is_floating_point:
        raise ValueError(f"kappa must be a floating tensor, got {kappa.dtype}")
    x = kappa.double()
    bad = ~(torch.isfinite(x) & (x >= 0))
    if bool(bad.any()):
        raise ValueError(f"kappa: {_fmt(x[bad][0])} is not accepted; curvature must be finite and >= 0")
    return x


def required_bits_reference(kappa: torch.Tensor, c: float = DEFAULT_C, head_dim: int = 128,
                            eps: float = DEFAULT_EPS) -> torch.Tensor:
    """p = log2(c * kappa * D^2 / eps), FP64, same shape; kappa = 0 gives -inf."""
    _check_bound_args(c, head_dim, eps)
    x = _check_kappa(kappa)
    return torch.log2(c * x * float(head_dim) * float(head_dim) / eps)


def tier_errors_reference(kappa: torch.Tensor, candidates: Sequence[int], c: float = DEFAULT_C,
                          head_dim: int = 128) -> torch.Tensor:
    """e[..., j] = c * kappa * D^2 * 2^(-effective_bits(candidates[j])), FP64 [*kappa.shape, J]."""
    _check_bound_args(c, head_dim, 1.0)
    tiers = [Tier.parse(int(t)) for t in candidates]
    if not tiers:
        raise ValueError("tier_errors: candidates is empty; give at least one tier id")
    x = _check_kappa(kappa)
    factor = torch.tensor([2.0 ** -t.effective_bits for t in tiers], dtype=torch.float64, device=x.device)
    return (c * x * float(head_dim) * float(head_dim)).unsqueeze(-1) * factor


def ladder(candidates: Iterable, geometry: BlockGeometry = BlockGeometry()) -> List[Tier]:
    """Candidates by (page bytes ascending, effective bits descending): the order threshold mapping scans."""
    tiers = [Tier.parse(t) for t in candidates]
    if not tiers:
        raise ValueError("candidates: empty; give at least one tier")
    seen = set()
    for t in tiers:
        if t in seen:
            raise ValueError(f"candidates: {t} is listed twice")
        seen.add(t)
    return sorted(tiers, key=lambda t: (geometry.page_bytes(t), -t.effective_bits))


def page_costs(candidates: Iterable, geometry: BlockGeometry = BlockGeometry()) -> torch.Tensor:
    """Page bytes of each candidate, int64 [J], in the order given."""
    return torch.tensor([geometry.page_bytes(Tier.parse(t)) for t in candidates], dtype=torch.int64)


def map_tiers_reference(bits: torch.Tensor, candidates: Sequence[int], block_size: int = 64, head_dim: int = 128,
                        group_size: int = 32) -> torch.Tensor:
    """Tier ids int8, same shape: the cheapest candidate with effective bits >= bits, else the most precise."""
    if not bits.dtype.is_floating_point:
        raise ValueError(f"map_tiers: bits must be a floating tensor, got {bits.dtype}")
    geometry = BlockGeometry(block_size, head_dim, group_size)
    order = ladder([int(t) for t in candidates], geometry)
    most = order[0]
    for t in order:
        if t.effective_bits > most.effective_bits:
            most = t
    x = bits.double()
    if bool(torch.isnan(x).any()):
        raise ValueError("bits: NaN is not accepted")
    out = torch.full(x.shape, int(most), dtype=torch.int8, device=x.device)
    for t in reversed(order):  # the cheapest covering tier is written last and wins
        out = torch.where(x <= t.effective_bits, torch.tensor(int(t), dtype=torch.int8, device=x.device), out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Knapsack reference (same algorithms and tie-breaks as csrc/core/precision_mapper.cpp)

def _problem(errors: torch.Tensor, costs: torch.Tensor, op: str) -> Tuple[np.ndarray, np.ndarray]:
    if errors.dim() != 2:
        raise ValueError(f"{op}: errors must be [items, choices], got shape {list(errors.shape)}")
    if not errors.dtype.is_floating_point:
        raise ValueError(f"{op}: errors must be a floating tensor, got {errors.dtype}")
    if costs.dtype.is_floating_point or costs.dtype.is_complex or costs.dtype == torch.bool:
        raise ValueError(f"{op}: costs must be an integer tensor of bytes, got {costs.dtype}")
    n_items, n_choices = errors.shape
    if not ((costs.dim() == 1 and costs.shape[0] == n_choices) or
            (costs.dim() == 2 and tuple(costs.shape) == (n_items, n_choices))):
        raise ValueError(f"{op}: costs must be [choices] ({n_choices}) or [items, choices] ([{n_items}, {n_choices}]), "
                         f"got shape {list(costs.shape)}")
    e = errors.detach().double().cpu().numpy().copy()
    c = costs.detach().to(torch.int64).expand(n_items, n_choices).cpu().numpy().copy()
    if n_choices < 1:
        raise ValueError(f"knapsack: choices {n_choices} must be >= 1")
    flat_e, flat_c = e.reshape(-1), c.reshape(-1)
    for x in range(flat_e.size):
        if not (math.isfinite(flat_e[x]) and flat_e[x] >= 0):
            raise ValueError(f"errors: entry {x} is {_fmt(flat_e[x])}; predicted errors must be finite and >= 0")
        if flat_c[x] < 0:
            raise ValueError(f"costs: entry {x} is {int(flat_c[x])}; byte costs must be >= 0")
    return e, c


def _units(c: np.ndarray):
    delta = c - c.min(axis=1, keepdims=True)
    g = int(np.gcd.reduce(delta.reshape(-1))) if delta.size else 0
    unit = g if g > 0 else 1
    delta = delta // unit
    return delta, unit, int(delta.max(axis=1).sum()) if delta.size else 0


def dp_cells(errors: torch.Tensor, costs: torch.Tensor, budget: Optional[int] = None) -> int:
    """Table cells the exact DP needs for ``budget`` (None: the whole frontier, as quality mode)."""
    _, c = _problem(errors, costs, "dp_cells")
    return _dp_cells(c, budget)


def _dp_cells(c: np.ndarray, budget: Optional[int]) -> int:
    _, unit, max_units = _units(c)
    cols = max_units if budget is None else min(max((budget - int(c.min(axis=1).sum())) // unit, 0), max_units)
    return c.shape[0] * (cols + 1)


def _run_dp(e: np.ndarray, delta: np.ndarray, width: int):
    n_items, n_choices = e.shape
    if n_choices > 127:
        raise ValueError(f"knapsack: the exact DP takes at most 127 choices per item, got {n_choices}; "
                         "use method='greedy'")
    cols = width + 1
    if n_items > 0 and cols > _DP_HARD_LIMIT // n_items:
        raise ValueError(f"knapsack: the exact DP would need {float(n_items * cols)!r} table cells (more than 2^31); "
                         "use method='greedy' or 'auto'")
    best = np.zeros(cols)
    table = np.zeros((n_items, cols), dtype=np.int8)
    for i in range(n_items):
        cand = np.full((n_choices, cols), np.inf)
        for j in range(n_choices):
            d = int(delta[i, j])
            if d < cols:
                cand[j, d:] = best[:cols - d] + e[i, j]
        table[i] = np.argmin(cand, axis=0)  # first minimum: the lowest j wins ties, as in the C++ loop
        best = cand[table[i], np.arange(cols)]
    return best, table


def _reconstruct(delta: np.ndarray, table: np.ndarray, w: int) -> np.ndarray:
    choice = np.zeros(table.shape[0], dtype=np.int64)
    for i in range(table.shape[0] - 1, -1, -1):
        choice[i] = table[i, w]
        w -= int(delta[i, choice[i]])
    return choice


def _hull(e: np.ndarray, c: np.ndarray, i: int) -> List[int]:
    order = sorted(range(e.shape[1]), key=lambda j: (int(c[i, j]), float(e[i, j]), j))
    hull: List[int] = []
    for j in order:
        if hull and not e[i, j] < e[i, hull[-1]]:
            continue  # dominated
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            lhs = (e[i, a] - e[i, b]) * float(c[i, j] - c[i, b])
            rhs = (e[i, b] - e[i, j]) * float(c[i, b] - c[i, a])
            if lhs <= rhs:
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _segments(e: np.ndarray, c: np.ndarray):
    hulls = [_hull(e, c, i) for i in range(e.shape[0])]
    segs = []
    for i, h in enumerate(hulls):
        for k in range(len(h) - 1):
            dc = int(c[i, h[k + 1]] - c[i, h[k]])
            de = float(e[i, h[k]] - e[i, h[k + 1]])
            segs.append((de / float(dc), i, k, dc, de))
    segs.sort(key=lambda s: (-s[0], s[1], s[2]))
    return hulls, segs


def _start_error(e: np.ndarray, hulls) -> float:
    total = 0.0
    for i, h in enumerate(hulls):
        total += float(e[i, h[0]])
    return total


def _totals(e: np.ndarray, c: np.ndarray, choice: np.ndarray) -> Tuple[float, int]:
    err, cost = 0.0, 0
    for i, j in enumerate(choice):
        err += float(e[i, j])
        cost += int(c[i, j])
    return err, cost


def _summary(e, c, choice, lower_bound, exact):
    err, cost = _totals(e, c, choice)
    return torch.from_numpy(np.asarray(choice, dtype=np.int64)), torch.tensor(
        [err, float(cost), lower_bound(err, cost), 1.0 if exact else 0.0], dtype=torch.float64)


def _within(max_error: float) -> float:
    return max_error + abs(max_error) * _ERROR_SLACK


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not accepted; use auto, dp or greedy")


def knapsack_tiers_reference(errors: torch.Tensor, costs: torch.Tensor, budget: int,
                             method: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimise total error with total cost <= budget. Returns (choice int64 [I],
    summary FP64 [4] = (error, cost, lower bound on the optimal error, exact))."""
    e, c = _problem(errors, costs, "knapsack_tiers")
    _check_method(method)
    lo = int(c.min(axis=1).sum()) if c.size else 0
    if budget < lo:
        raise ValueError(f"budget: {budget} bytes is below the minimum achievable {lo} bytes "
                         "(every item at its cheapest choice)")
    use_dp = method == "dp" or (method == "auto" and e.shape[1] <= 127 and _dp_cells(c, budget) <= DP_MAX_CELLS)
    if use_dp:
        delta, unit, max_units = _units(c)
        width = min((budget - lo) // unit, max_units)
        _, table = _run_dp(e, delta, width)
        choice = _reconstruct(delta, table, width)
        return _summary(e, c, choice, lambda err, cost: err, True)
    hulls, segs = _segments(e, c)
    room = budget - lo
    lp, lp_room = _start_error(e, hulls), room
    for _, _, _, dc, de in segs:
        if dc <= lp_room:
            lp_room -= dc
            lp -= de
        else:
            lp -= de * float(lp_room) / float(dc)
            break
    pos = [0] * e.shape[0]
    left = room
    for _, i, k, dc, _ in segs:
        if pos[i] == k and dc <= left:
            pos[i] = k + 1
            left -= dc
    choice = np.array([hulls[i][pos[i]] for i in range(e.shape[0])], dtype=np.int64)
    return _summary(e, c, choice, lambda err, cost: max(0.0, min(lp, err)), False)


def knapsack_min_bytes_reference(errors: torch.Tensor, costs: torch.Tensor, max_error: float,
                                 method: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimise total cost with total error <= max_error. Returns (choice int64 [I],
    summary FP64 [4] = (error, cost, lower bound on the optimal bytes, exact))."""
    e, c = _problem(errors, costs, "knapsack_min_bytes")
    _check_method(method)
    if math.isnan(max_error):
        raise ValueError("max_error: NaN is not accepted")
    least = 0.0
    for i in range(e.shape[0]):
        least += float(e[i].min())
    if least > _within(max_error):
        raise ValueError(f"max_error: {_fmt(max_error)} is below the minimum achievable predicted error {_fmt(least)} "
                         "(every item at its most precise choice)")
    lo = int(c.min(axis=1).sum()) if c.size else 0
    use_dp = method == "dp" or (method == "auto" and e.shape[1] <= 127 and _dp_cells(c, None) <= DP_MAX_CELLS)
    if use_dp:
        delta, _, max_units = _units(c)
        best, table = _run_dp(e, delta, max_units)
        w = 0
        while w < max_units and best[w] > _within(max_error):
            w += 1
        choice = _reconstruct(delta, table, w)
        return _summary(e, c, choice, lambda err, cost: float(cost), True)
    hulls, segs = _segments(e, c)
    pos = [0] * e.shape[0]
    err, cost, bound = _start_error(e, hulls), lo, float(lo)
    for _, i, k, dc, de in segs:
        if err <= _within(max_error):
            break
        pos[i] = k + 1
        bound = float(cost) + float(dc) * (err - max_error) / de
        err -= de
        cost += dc
    choice = np.array([hulls[i][pos[i]] for i in range(e.shape[0])], dtype=np.int64)
    return _summary(e, c, choice, lambda err_, cost_: min(max(bound, float(lo)), float(cost_)), False)


def knapsack_brute_force(errors: torch.Tensor, costs: torch.Tensor, budget: Optional[int] = None,
                         max_error: Optional[float] = None) -> Tuple[Optional[Tuple[int, ...]], float, int]:
    """The oracle: every assignment (J^I of them). With ``budget``: the least error with cost <= budget; with
    ``max_error``: the least cost with error <= max_error. Returns (choice, error, cost); choice None if infeasible."""
    e, c = _problem(errors, costs, "knapsack_brute_force")
    best = (None, math.inf, math.inf)
    for choice in itertools.product(range(e.shape[1]), repeat=e.shape[0]):
        err, cost = _totals(e, c, np.array(choice))
        if budget is not None and cost <= budget and err < best[1]:
            best = (choice, err, cost)
        if max_error is not None and err <= _within(max_error) and cost < best[2]:
            best = (choice, err, cost)
    return best
