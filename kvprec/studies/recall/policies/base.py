"""Eviction simulation: the retained set of a permanent-eviction policy, batched over rows.

A row is one (layer, KV head) of the model (or an aggregate of them); positions are [0, capacity). The simulator
holds a bool mask ``held`` [R, capacity] with exactly K(n) = ``budget_size(fraction, n)`` positions per row among
the n positions seen so far (kvprec/studies/recall/recall.py), and changes it only by eviction: a position that
left can never come back (that is what separates an eviction policy from a top-K oracle).

Life of a simulator (one sample):

* :meth:`start` after the prompt of P positions is prefilled with the full cache: every prompt position is held,
  then the policy evicts down to K(P) by its prefill rule (:meth:`EvictionPolicy.prefill_scores`);
* :meth:`step` after each decode step's query at position t = n attended: the policy observes that query's
  attention over [0, t] as the policy's own cache shows it (restricted to held positions and t, renormalised to
  sum to 1), position t joins the held set, and the policy evicts down to K(n + 1).

Which positions go is the policy's one decision, :meth:`EvictionPolicy.scores`: a score per position (lower
goes first) and a ``protected`` mask of positions evicted only when nothing else is left (a recent window,
attention sinks); ties go to the older position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..recall import budget_size


@dataclass
class PrefillStats:
    """What the policies read from the prefill of P prompt positions (full attention, per row).

    colsum: FP32 [R, P], sum over the P prompt queries of the attention each position received (H2O's score);
    last_rows: FP32 [W, R, P], the attention of the last W prompt queries (oldest first; position p of row w is 0
    where the query cannot see it), SnapKV's observation window and, in its last row, TOVA's query.
    """

    colsum: torch.Tensor
    last_rows: torch.Tensor

    @property
    def length(self) -> int:
        return self.colsum.shape[-1]


def restrict(attention: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The attention a cache holding ``visible`` (bool [R, n]) would show: zero elsewhere, renormalised per row.

    (With unchanged scores, softmax over a subset is the full softmax restricted and divided by its mass there.)
    """
    a = attention * visible
    return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def evict_lowest(held: torch.Tensor, scores: torch.Tensor, protected: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [R, count] of the held positions to evict: lowest score first among the unprotected, then (only if
    a row runs out) among the protected; ties to the lower (older) position. ``held``, ``protected`` bool and
    ``scores`` [R, n]."""
    if bool((held.sum(-1) < count).any()):
        raise ValueError(f"evict: asked to evict {count} positions from a row holding fewer")
    group = torch.where(held, protected.to(torch.int64), 2)  # 0 evictable, 1 protected, 2 not held
    order = torch.argsort(scores.double(), dim=-1, stable=True)  # stable: equal scores keep position order
    order = order.gather(-1, torch.argsort(group.gather(-1, order), dim=-1, stable=True))
    return order[:, :count]


class EvictionPolicy:
    """Base class of the simulated eviction policies; subclasses define :attr:`name`, :meth:`scores` and
    :meth:`prefill_scores` (and :meth:`observe` if they keep state)."""

    name = "base"

    def __init__(self, rows: int, capacity: int, fraction: float):
        self.fraction = float(fraction)
        budget_size(self.fraction, 1)  # validates the fraction
        self.held = torch.zeros(rows, capacity, dtype=torch.bool)
        self.n = 0
        #: positions of the budget given to something else (entropy-triggered recall's slots): K(n) - reserve(n)
        #: are the policy's own
        self.reserve: Optional[Callable[[int], int]] = None

    # ---- what a policy defines ------------------------------------------------------------------------------
    def prefill_scores(self, stats: PrefillStats, keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scores FP32 [R, P], protected bool [R, P]) for choosing ``keep`` of the P prompt positions."""
        raise NotImplementedError

    def observe(self, attention: torch.Tensor) -> None:
        """Take the attention [R, t + 1] of the query at t = self.n (restricted to what the policy holds)."""

    def scores(self, n: int, keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scores [R, n], protected bool [R, n]) for evicting down to ``keep`` of the n positions [0, n)."""
        raise NotImplementedError

    # ---- the simulation -------------------------------------------------------------------------------------
    def budget(self, n: int) -> int:
        return budget_size(self.fraction, n) - (self.reserve(n) if self.reserve is not None else 0)

    def shrink(self) -> None:
        """Evict down to the current budget now (after ``reserve`` was set)."""
        keep = self.budget(self.n)
        scores, protected = self.scores(self.n, keep)
        self._evict(scores, protected, int(self.held[0, :self.n].sum()) - keep)

    def retained(self) -> torch.Tensor:
        """bool [R, n]: the positions held before the next query (n = positions seen)."""
        return self.held[:, :self.n]

    def start(self, stats: PrefillStats) -> None:
        p = stats.length
        self.held.zero_()
        self.held[:, :p] = True
        self.n = p
        keep = self.budget(p)
        scores, protected = self.prefill_scores(stats, keep)
        self._evict(scores, protected, p - keep)

    def step(self, attention: torch.Tensor, visible: Optional[torch.Tensor] = None) -> None:
        """The query at t = self.n attended over [0, t] with ``attention`` [R, t + 1]; position t joins and the
        policy evicts down to K(t + 1). ``visible`` (bool [R, t + 1], default: held positions and t) is what the
        query could attend, so the policy sees the attention renormalised over it."""
        t = self.n
        if attention.shape != (self.held.shape[0], t + 1):
            raise ValueError(f"{self.name}: step at position {t} expects attention of shape "
                             f"{(self.held.shape[0], t + 1)}, got {tuple(attention.shape)}")
        if visible is None:
            visible = self.held[:, :t + 1].clone()
            visible[:, t] = True
        self.observe(restrict(attention.float(), visible))
        self.held[:, t] = True
        self.n = t + 1
        self.shrink()

    def _evict(self, scores: torch.Tensor, protected: torch.Tensor, count: int) -> None:
        if count <= 0:
            return
        n = scores.shape[-1]
        gone = evict_lowest(self.held[:, :n], scores, protected, count)
        self.held[:, :n].scatter_(-1, gone, False)

    def describe(self) -> str:
        return self.name
