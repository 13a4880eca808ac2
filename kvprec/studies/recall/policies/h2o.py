"""H2O, heavy hitters + a recent window (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", arXiv:2306.14048).

Score of a position j: its accumulated attention over every query so far that could see it,

    acc(j) = sum_{q >= j} a_q(j)        (prefill queries included; decode queries as the policy's cache shows them)

Of the K retained positions, the r = ceil(recent * K) most recent are protected (the recent window; H2O's default
splits the budget in halves, recent = 0.5) and the others are the heavy hitters: when a position must go, the
unprotected one with the lowest acc goes. At the end of the prefill this keeps the last r prompt positions and the
K - r with the largest column sums of the prompt's attention.
"""
from __future__ import annotations

import math

import torch

from .base import EvictionPolicy, PrefillStats


class H2O(EvictionPolicy):
    name = "h2o"

    def __init__(self, rows: int, capacity: int, fraction: float, recent: float = 0.5):
        super().__init__(rows, capacity, fraction)
        if not 0.0 <= recent < 1.0:
            raise ValueError(f"h2o: recent must be a fraction of the budget in [0, 1), got {recent}")
        self.recent = float(recent)
        self.acc = torch.zeros(rows, capacity, dtype=torch.float64)

    def _window(self, n: int, keep: int) -> torch.Tensor:
        r = math.ceil(round(self.recent * keep, 9))
        protected = torch.zeros(self.held.shape[0], n, dtype=torch.bool)
        if r:
            protected[:, n - r:] = True
        return protected

    def prefill_scores(self, stats: PrefillStats, keep: int):
        p = stats.length
        self.acc[:, :p] = stats.colsum.double()
        return self.acc[:, :p], self._window(p, keep)

    def observe(self, attention: torch.Tensor) -> None:
        self.acc[:, :attention.shape[-1]] += attention.double()

    def scores(self, n: int, keep: int):
        return self.acc[:, :n], self._window(n, keep)

    def describe(self) -> str:
        return f"h2o(recent={self.recent:g})"
