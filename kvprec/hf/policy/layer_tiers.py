"""Layer-tiers policy: a fixed set of layers stores its blocks at ``high``, every other layer at ``low``.

Per-layer bit allocation from measured sensitivity: examples/layer_sensitivity.py demotes one layer at a time from
``high`` to ``low`` on held-out text and ranks the layers by what that costs in NLL; the layers whose demotion costs
most are kept at ``high`` (``layers``), as many as the bit budget allows. Page bits per element are then
``low`` + (``high`` - ``low``) x len(layers) / L, the same in every batch row and KV head.
"""
from __future__ import annotations

import torch

from ...storage.formats import Tier
from ..arguments import tier as parse_tier
from .base import Policy, SealStats


def parse_layers(layers) -> frozenset:
    """Layer indices from an int, an iterable of ints, or text "3+7+12" (the policy-string form; "" = none)."""
    if isinstance(layers, str):
        items = [t for t in layers.split("+") if t.strip()]
        if not all(t.strip().isdigit() for t in items):
            raise ValueError(f"layer_tiers: layers must be layer indices joined by '+', e.g. '0+3+7', got {layers!r}")
        return frozenset(int(t) for t in items)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        out = frozenset(layers)
    except TypeError:
        raise ValueError(f"layer_tiers: layers must be layer indices, got {layers!r}") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in out):
        raise ValueError(f"layer_tiers: layers must be whole numbers >= 0, got {sorted(out, key=str)}")
    return out


class LayerTiers(Policy):
    """Blocks of the layers in ``layers`` at ``high``, of every other layer at ``low``."""

    def __init__(self, layers="", high: Tier | str | int = Tier.INT4, low: Tier | str | int = Tier.INT2):
        self.layers = parse_layers(layers)
        self.high, self.low = parse_tier(high, "layer_tiers high"), parse_tier(low, "layer_tiers low")

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        return stats.full(self.high if layer_idx in self.layers else self.low, len(blocks))

    def describe(self) -> str:
        return f"layer_tiers:layers={'+'.join(map(str, sorted(self.layers)))},high={self.high},low={self.low}"
