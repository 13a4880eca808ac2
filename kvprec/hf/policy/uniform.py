"""Uniform policy: every sealed block of every layer and head in one tier.

The baseline of KV-cache quantization papers (e.g. KIVI, arXiv:2402.02750, which this storage format follows:
keys per channel, values per token); with ``fp32`` on an FP32 model it is lossless, which the equivalence
tests use.
"""
from __future__ import annotations

import torch

from ...storage.formats import Tier
from ..arguments import tier as parse_tier
from .base import Policy, SealStats


class Uniform(Policy):
    """All sealed blocks in ``tier``."""

    def __init__(self, tier: Tier | str | int = Tier.INT8):
        self.tier = parse_tier(tier, "uniform")

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        return stats.full(self.tier, len(blocks))

    def describe(self) -> str:
        return f"uniform:{self.tier}"


def uniform(tier: Tier | str | int = Tier.INT8) -> Uniform:
    return Uniform(tier)
