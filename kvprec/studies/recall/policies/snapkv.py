"""SnapKV, votes of an observation window (Li et al., "SnapKV: LLM Knows What You are Looking for Before
Generation", arXiv:2404.14469).

The last ``window`` queries (the observation window: at the end of the prompt, typically the question) vote for
the positions they attend to; votes are smoothed along positions so that a selected position brings its
neighbours (average pooling of width ``kernel``, stride 1, edges averaged over the positions that exist):

    vote(j)  = sum over the last `window` queries q of a_q(j)
    score(j) = mean of vote over [j - kernel // 2, j + kernel // 2]

The window's own positions are protected; the positions with the lowest score go. SnapKV compresses the prompt
once; under a budget that is a fraction of the growing sequence a policy must also evict during decoding, and
here SnapKV keeps applying its own rule with the window sliding over the newest queries (as decoding-time SnapKV
variants do), from the votes of queries as the policy's cache shows them.
"""
from __future__ import annotations

import torch

from .base import EvictionPolicy, PrefillStats


class SnapKV(EvictionPolicy):
    name = "snapkv"

    def __init__(self, rows: int, capacity: int, fraction: float, window: int = 32, kernel: int = 5):
        super().__init__(rows, capacity, fraction)
        if window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"snapkv: window must be >= 1 and kernel an odd number >= 1, got window={window}, "
                             f"kernel={kernel}")
        self.window, self.kernel = int(window), int(kernel)
        self.rows_seen = torch.zeros(self.window, rows, capacity, dtype=torch.float64)  # ring of the last queries
        self.next = 0  # ring slot of the next query

    def _scores(self, n: int):
        vote = self.rows_seen[..., :n].sum(0)
        score = torch.nn.functional.avg_pool1d(vote[:, None], self.kernel, stride=1, padding=self.kernel // 2,
                                               count_include_pad=False)[:, 0]
        protected = torch.zeros(vote.shape, dtype=torch.bool)
        protected[:, max(0, n - self.window):] = True
        return score, protected

    def prefill_scores(self, stats: PrefillStats, keep: int):
        p, rows = stats.length, stats.last_rows[-self.window:]
        self.rows_seen.zero_()
        self.rows_seen[self.window - rows.shape[0]:, :, :p] = rows.double()
        self.next = 0
        return self._scores(p)

    def observe(self, attention: torch.Tensor) -> None:
        self.rows_seen[self.next].zero_()
        self.rows_seen[self.next, :, :attention.shape[-1]] = attention.double()
        self.next = (self.next + 1) % self.window

    def scores(self, n: int, keep: int):
        return self._scores(n)

    def describe(self) -> str:
        return f"snapkv(window={self.window},kernel={self.kernel})"
