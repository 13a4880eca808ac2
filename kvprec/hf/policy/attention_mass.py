"""Attention-mass policy: blocks that receive little attention are stored at low precision (H2O-style, online).

H2O (Zhang et al., arXiv:2306.14048) keeps the "heavy hitters", the positions with the largest accumulated
attention, and evicts the rest. Here nothing is evicted: the attention kernel emits the attention probability
that fell on each block (free, from the same pass), the layer accumulates it in
:class:`~kvprec.policy.base.AttentionStats`, and a block's score is its mean mass per query that could see it,

    score_j = (sum over steps, queries, grouped query heads of sum_{t in block j} p_t) / seen_j.

Per (batch row, KV head), of the n_seen blocks some query has attended to, the ceil(keep * n_seen) with the
highest score are "heavy" and stay at ``high``; the others go to ``low``. A block no query has seen yet is heavy
too, never ranked below observed ones: at prefill the cache seals every block before the prefill's own attention
records any mass, and ranking those blocks then (all tied) would demote the oldest ones, the attention sinks, for
good. They are ranked once the mass is in: :meth:`AttentionMass.rebalance` demotes sealed blocks that are not
heavy at every seal and every ``every`` tokens (default: the block size). Not after each
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
        """bool like ``scores``: every unseen block (+inf), and the ceil(keep * n_seen) highest of the n_seen seen
        ones per row (ties broken toward newer blocks). Whether a block was seen is the same for every row and
        head (``AttentionStats.seen`` is per block)."""
        unseen = torch.isinf(scores)
        n_seen = int((~unseen).flatten(0, -2).all(0).sum()) if scores.numel() else 0
        k = math.ceil(self.keep * n_seen)
        if k >= n_seen:
            return torch.ones_like(scores, dtype=torch.bool)
        # Unseen blocks rank last here (they are heavy anyway); ties go to newer blocks: a stable sort of the
        # reversed sequence.
        observed = torch.where(unseen, float("-inf"), scores)
        n = scores.shape[-1]
        ranked = n - 1 - torch.argsort(observed.flip(-1), dim=-1, descending=True, stable=True)
        heavy = torch.zeros_like(scores, dtype=torch.bool)
        return heavy.scatter_(-1, ranked[..., :k], True) | unseen

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
        """The score (mean mass per query, <= 1); an unseen block ranks above every seen one, 2 + j / n for block
        j > 0 and 3 for block 0: with no mass yet (a budget enforced right after prefill) the first block, which
        holds the attention sinks, is the last to be demoted and newer blocks go after older ones."""
        n = layer.tiers().shape[-1]
        scores = self._scores(layer, n)
        prior = torch.arange(n, dtype=torch.float32) / max(n, 1)
        if n:
            prior[0] = 1.0
        return torch.where(torch.isinf(scores), 2.0 + prior, scores)

    def describe(self) -> str:
        return f"attention_mass:keep={self.keep},high={self.high},low={self.low},every={self.every}"


def attention_mass(keep: float = 0.5, high: Tier | str | int = Tier.FP16,
                   low: Tier | str | int = Tier.INT4, every: int = 0) -> AttentionMass:
    return AttentionMass(keep, high, low, every)
