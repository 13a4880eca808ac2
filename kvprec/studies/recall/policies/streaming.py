"""StreamingLLM, attention sinks + a sliding window (Xiao et al., "Efficient Streaming Language Models with
Attention Sinks", arXiv:2309.17453).

The first ``sinks`` positions (the attention sinks, 4 in the paper) are protected; of the rest only the most
recent survive: when a position must go, the oldest unprotected one goes (score = position index). With a budget
of K the retained set is the sinks and the last K - sinks positions that were never evicted.
"""
from __future__ import annotations

import torch

from .base import EvictionPolicy, PrefillStats


class StreamingLLM(EvictionPolicy):
    name = "streaming"

    def __init__(self, rows: int, capacity: int, fraction: float, sinks: int = 4):
        super().__init__(rows, capacity, fraction)
        if sinks < 0:
            raise ValueError(f"streaming: sinks must be >= 0 positions, got {sinks}")
        self.sinks = int(sinks)

    def _scores(self, n: int):
        scores = torch.arange(n, dtype=torch.float64).expand(self.held.shape[0], n)
        protected = torch.zeros(self.held.shape[0], n, dtype=torch.bool)
        protected[:, :self.sinks] = True
        return scores, protected

    def prefill_scores(self, stats: PrefillStats, keep: int):
        return self._scores(stats.length)

    def scores(self, n: int, keep: int):
        return self._scores(n)

    def describe(self) -> str:
        return f"streaming(sinks={self.sinks})"
