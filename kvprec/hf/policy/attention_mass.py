"""Attention-mass policy: blocks that receive little attention are stored at low precision (H2O-style, online).

H2O (Zhang et al., arXiv:2306.14048) keeps the "heavy hitters", the positions with the largest accumulated
attention, and evicts the rest. Here nothing is evicted: the attention kernel emits the attention probability
that fell on each block (free, from the same pass), the layer accumulates it in
:class:`~kvprec.policy.base.AttentionStats`, and a block's score is its mean mass per query that could see it,

    score_j = (sum over steps, queries, grouped query heads of sum_{t in block j} p_t) / seen_j.

Per (batch row, KV head), the ceil(keep * n) blocks with the highest score are "heavy" and stay at ``high``; the
others go to ``low``. At sealing, a block is compared with the blocks already sealed (a block no query has seen
yet, e.g. right after prefill, counts as heavy); :meth:`AttentionMass.rebalance` demotes sealed blocks that
dropped out of the heavy set at every seal and every ``every`` tokens (default: the block size). Not after each
token: ranking the scores reads them on the host, a device synchronisation per layer that would stall decode,
and one token moves a block's mean mass by about 1/seen. Demotion is one way unless the cache keeps a host shadow:
as in H2O, a block judged light is not brought back.
"""
from __future__ import annotations

import math

import torch

from ...storage.formats import Tier
from ..arguments import real_number, tier as parse_tier
from .base import Policy, SealStats, demote_to, evicted_blocks, needs_rebalance


class AttentionMass(Policy):
    wants_attention_mass = True

    def __init__(self, keep: float = 0.5, high: Tier | str | int = Tier.FP16, low: Tier | str | int = Tier.INT4,
                 every: int = 0):
        if not 0.0 < real_number(keep, "attention_mass: keep") <= 1.0:
            raise ValueError(f"attention_mass: keep must be a fraction in (0, 1], got {keep}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"attention_mass: every must be a whole number of tokens >= 0 (0 = the block size), "
                             f"got {every!r}")
        self.keep, self.every = float(keep), every
        self.high, self.low = parse_tier(high, "attention_mass high"), parse_tier(low, "attention_mass low")
        if self.high > self.low:
            raise ValueError(f"attention_mass: high tier {self.high} is a lower precision than low tier {self.low}")

    @staticmethod
    def _scores(layer, n: int) -> torch.Tensor:
        """FP32 [B, H_kv, n] mean mass per query of blocks 0..n-1; +inf where unseen or not tracked yet."""
        b, h, _ = layer.tiers().shape
        stats = layer.stats
        if stats is None:
            return torch.full((b, h, n), float("inf"))
        scores = stats.mean().cpu()[..., :n]
        return torch.nn.functional.pad(scores, (0, n - scores.shape[-1]), value=float("inf"))

    def _heavy(self, scores: torch.Tensor) -> torch.Tensor:
        """bool like ``scores``: the ceil(keep * n) highest per row (ties broken toward newer blocks)."""
        n = scores.shape[-1]
        k = math.ceil(self.keep * n)
        if k >= n:
            return torch.ones_like(scores, dtype=torch.bool)
        # Ties (e.g. several unseen blocks at +inf) go to newer blocks: a stable sort of the reversed sequence.
        ranked = n - 1 - torch.argsort(scores.flip(-1), dim=-1, descending=True, stable=True)
        heavy = torch.zeros_like(scores, dtype=torch.bool)
        return heavy.scatter_(-1, ranked[..., :k], True)

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        # Ranked among the blocks still held: a sliding window's evicted blocks (a prefix) take no heavy slot.
        e = evicted_blocks(stats.layer)
        heavy = self._heavy(self._scores(stats.layer, blocks.stop)[..., e:])[..., blocks.start - e:blocks.stop - e]
        return torch.where(heavy, int(self.high), int(self.low)).to(torch.int8)

    def rebalance(self, cache, layer_idx: int) -> None:
        layer = cache.layers[layer_idx]
        if not needs_rebalance(self, layer, lambda: layer.get_seq_length() // (self.every or layer.block_size)):
            return
        n, e = layer.tiers().shape[-1], evicted_blocks(layer)
        if n == e:
            return
        scores = self._scores(layer, n)
        heavy = torch.ones_like(scores, dtype=torch.bool)  # evicted blocks: nothing to demote
        heavy[..., e:] = self._heavy(scores[..., e:])
        demote_to(layer, torch.where(heavy, -1, int(self.low)).to(torch.int8))

    def importance(self, layer) -> torch.Tensor:
        scores = self._scores(layer, layer.tiers().shape[-1])
        return torch.nan_to_num(scores, posinf=torch.finfo(torch.float32).max)

    def describe(self) -> str:
        return f"attention_mass:keep={self.keep},high={self.high},low={self.low},every={self.every}"


def attention_mass(keep: float = 0.5, high: Tier | str | int = Tier.FP16,
                   low: Tier | str | int = Tier.INT4, every: int = 0) -> AttentionMass:
    return AttentionMass(keep, high, low, every)
