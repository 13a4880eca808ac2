"""The policy that stores an injected span at a lower precision than the rest of the cache.

:class:`SpanTiers` puts every sealed block at ``base`` (FP32 in the study, so everything but the span is exact) and
the blocks of one span of positions at a tier chosen per batch row (rows are conditions: the same injection at
FP32, INT8, INT4, INT2). The study places the span on whole blocks (kvprec/studies/injection/layout.py), so exactly
the injected positions take the row's tier. The span's tiers change when a row's span is replaced: set
:attr:`row_tiers` before the splice re-appends the span; its blocks seal again and take the new tiers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...hf.policy.base import Policy, SealStats
from ...storage.formats import Tier


class SpanTiers(Policy):
    """Blocks in ``span_blocks`` at ``row_tiers[b]`` for batch row b; every other block at ``base``."""

    def __init__(self, base: Tier = Tier.FP32, span_blocks: range = range(0),
                 row_tiers: Optional[Sequence[int]] = None):
        self.base = Tier(base)
        self.span_blocks = span_blocks
        self.row_tiers = None if row_tiers is None else torch.as_tensor(list(row_tiers), dtype=torch.int8)

    def set_rows(self, row_tiers: Sequence[int]) -> None:
        self.row_tiers = torch.as_tensor([int(t) for t in row_tiers], dtype=torch.int8)

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        tiers = stats.full(self.base, len(blocks))
        if self.row_tiers is None:
            return tiers
        if self.row_tiers.numel() != stats.batch:
            raise ValueError(f"SpanTiers: {self.row_tiers.numel()} row tiers for a cache of {stats.batch} rows")
        for j, block in enumerate(blocks):
            if block in self.span_blocks:
                tiers[:, :, j] = self.row_tiers[:, None]
        return tiers

    def describe(self) -> str:
        rows = "" if self.row_tiers is None else ",".join(str(Tier(int(t))) for t in self.row_tiers)
        return (f"span_tiers:base={self.base},blocks={self.span_blocks.start}-{self.span_blocks.stop}"
                + (f",rows={rows}" if rows else ""))
