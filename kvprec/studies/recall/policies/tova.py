"""TOVA, token omission via attention (Oren et al., "Transformers are Multi-State RNNs", arXiv:2401.06104).

When the cache is over budget, the position with the lowest attention of the current query goes, the current
position included among the candidates:

    evict argmin_j a_t(j),  j in retained set + {t}

At the end of the prefill the query is the last prompt position's. The paper averages the attention over the
heads of a layer and keeps one set per layer; here every row (one KV head, the mean of its query heads) keeps its
own set, as every other policy of this study does.
"""
from __future__ import annotations

import torch

from .base import EvictionPolicy, PrefillStats


class TOVA(EvictionPolicy):
    name = "tova"

    def __init__(self, rows: int, capacity: int, fraction: float):
        super().__init__(rows, capacity, fraction)
        self.last = torch.zeros(rows, capacity, dtype=torch.float64)

    def _unprotected(self, n: int) -> torch.Tensor:
        return torch.zeros(self.held.shape[0], n, dtype=torch.bool)

    def prefill_scores(self, stats: PrefillStats, keep: int):
        p = stats.length
        self.last[:, :p] = stats.last_rows[-1].double()
        return self.last[:, :p], self._unprotected(p)

    def observe(self, attention: torch.Tensor) -> None:
        n = attention.shape[-1]
        self.last[:, :n] = attention.double()

    def scores(self, n: int, keep: int):
        return self.last[:, :n], self._unprotected(n)
