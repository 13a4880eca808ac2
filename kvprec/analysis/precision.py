"""From curvature to precision tiers: the dispatching entry points of the precision mapper.

Formulas, algorithms and the pure-Python reference: kvprec/ops/reference/precision.py; the native implementation:
csrc/core/precision_mapper.cpp (csrc/include/kvprec/precision_mapper.h).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List

import torch

from .. import ops
from ..ops.reference.precision import (DEFAULT_C, DEFAULT_CANDIDATES, DEFAULT_EPS, DP_MAX_CELLS,  # noqa: F401
                                       METHODS, dp_cells, knapsack_brute_force, knapsack_min_bytes_reference,
                                       knapsack_tiers_reference, ladder, map_tiers_reference, page_costs,
                                       required_bits_reference, tier_errors_reference)
from ..storage.formats import BlockGeometry, Tier

# ---------------------------------------------------------------------------------------------------------
# Entry points (the op registry picks the reference or the native kernel)

def _backend(name: str, backend: str, device: torch.device) -> str:
    return ops.resolve_backend(name, backend, device)


def _ids(candidates: Iterable) -> List[int]:
    return [int(Tier.parse(t)) for t in candidates]


def required_bits(kappa: torch.Tensor, c: float = DEFAULT_C, head_dim: int = 128, eps: float = DEFAULT_EPS, *,
                  backend: str = "auto") -> torch.Tensor:
    """p = log2(c * kappa * D^2 / eps), FP64, same shape as kappa."""
    if _backend("required_bits", backend, kappa.device) == "torch":
        return required_bits_reference(kappa, c, head_dim, eps)
    return torch.ops.kvprec.required_bits(kappa, c, head_dim, eps)


def map_tiers(bits: torch.Tensor, candidates: Iterable = DEFAULT_CANDIDATES,
              geometry: BlockGeometry = BlockGeometry(), *, backend: str = "auto") -> torch.Tensor:
    """Tier ids (int8, same shape as bits) for the threshold mode."""
    ids = _ids(candidates)
    g = geometry
    if _backend("map_tiers", backend, bits.device) == "torch":
        return map_tiers_reference(bits, ids, g.block_size, g.head_dim, g.group_size)
    return torch.ops.kvprec.map_tiers(bits, ids, g.block_size, g.head_dim, g.group_size)


def tier_errors(kappa: torch.Tensor, candidates: Iterable = DEFAULT_CANDIDATES, c: float = DEFAULT_C,
                head_dim: int = 128, *, backend: str = "auto") -> torch.Tensor:
    """Predicted error of each candidate tier, FP64 [*kappa.shape, J] (candidates in the order given)."""
    ids = _ids(candidates)
    if _backend("tier_errors", backend, kappa.device) == "torch":
        return tier_errors_reference(kappa, ids, c, head_dim)
    return torch.ops.kvprec.tier_errors(kappa, ids, c, head_dim)


@dataclass
class KnapsackResult:
    choice: torch.Tensor   # int64 [I]: the chosen column of errors/costs per item
    error: float           # total predicted error
    cost: int              # total bytes
    lower_bound: float     # budget mode: on the optimal error; quality mode: on the optimal bytes
    exact: bool            # solved by the DP (then lower_bound equals the optimum)

    @classmethod
    def from_summary(cls, choice: torch.Tensor, summary: torch.Tensor) -> "KnapsackResult":
        s = summary.tolist()
        return cls(choice, s[0], int(s[1]), s[2], bool(s[3]))


def knapsack_tiers(errors: torch.Tensor, costs: torch.Tensor, budget: int, method: str = "auto", *,
                   backend: str = "auto") -> KnapsackResult:
    """Least total error with total bytes <= budget (errors FP64 [I, J], costs int64 [J] or [I, J])."""
    if _backend("knapsack_tiers", backend, errors.device) == "torch":
        return KnapsackResult.from_summary(*knapsack_tiers_reference(errors, costs, budget, method))
    return KnapsackResult.from_summary(*torch.ops.kvprec.knapsack_tiers(errors, costs, budget, method))


def knapsack_min_bytes(errors: torch.Tensor, costs: torch.Tensor, max_error: float, method: str = "auto", *,
                       backend: str = "auto") -> KnapsackResult:
    """Fewest total bytes with total error <= max_error."""
    if _backend("knapsack_min_bytes", backend, errors.device) == "torch":
        return KnapsackResult.from_summary(*knapsack_min_bytes_reference(errors, costs, max_error, method))
    return KnapsackResult.from_summary(*torch.ops.kvprec.knapsack_min_bytes(errors, costs, max_error, method))
