"""Sink + window policy: attention sinks and the recent window at high precision, the rest at low precision.

StreamingLLM (Xiao et al., arXiv:2309.17453) keeps the first few tokens ("attention sinks") and a window of the
most recent tokens; here nothing is evicted, the other blocks are stored at the ``rest`` tier instead. A sealed
block j covers positions [j T, (j+1) T) and is kept at ``recent`` while

    j T < sinks                      (it holds a sink token), or
    (j+1) T > seq_len - window       (it overlaps the last ``window`` positions).

Blocks are sealed when they fill, usually inside the window; as the sequence grows the window moves past them,
and :meth:`SinkWindow.rebalance` demotes them to ``rest`` with ``set_block_tiers`` (a page move, re-quantized
from the highest copy held).
"""
from __future__ import annotations

import torch

from ...storage.formats import Tier
from ..arguments import tier as parse_tier
from .base import Policy, SealStats, demote_to, needs_rebalance


class SinkWindow(Policy):
    def __init__(self, sinks: int = 4, window: int = 128, rest: Tier | str | int = Tier.INT4,
                 recent: Tier | str | int = Tier.FP16):
        for name, value in (("sinks", sinks), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"sink_window: {name} must be a whole number of tokens, got {value!r}")
        if sinks < 0 or window < 0:
            raise ValueError(f"sink_window: sinks ({sinks}) and window ({window}) must be >= 0 tokens")
        self.sinks, self.window = int(sinks), int(window)
        self.rest, self.recent = parse_tier(rest, "sink_window rest"), parse_tier(recent, "sink_window recent")
        if self.recent > self.rest:
            raise ValueError(f"sink_window: recent tier {self.recent} is a lower precision than rest tier "
                             f"{self.rest}; the window and sinks are the blocks to keep at higher precision")

    def _keep(self, blocks: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
        """bool [n]: block indices ``blocks`` that hold a sink or overlap the window."""
        return (blocks * block_size < self.sinks) | ((blocks + 1) * block_size > seq_len - self.window)

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        keep = self._keep(torch.arange(blocks.start, blocks.stop), stats.block_size, stats.seq_len)
        tiers = torch.where(keep, int(self.recent), int(self.rest)).to(torch.int8)
        return tiers.expand(stats.batch, stats.kv_heads, len(blocks)).contiguous()

    def rebalance(self, cache, layer_idx: int) -> None:
        layer = cache.layers[layer_idx]
        # Block j leaves the window when (j + 1) T <= seq_len - window: the set changes once per T tokens.
        if not needs_rebalance(self, layer, lambda: max(0, layer.get_seq_length() - self.window) // layer.block_size):
            return
        b, h, n = layer.tiers().shape
        if n == 0:
            return
        keep = self._keep(torch.arange(n), layer.block_size, layer.get_seq_length())
        targets = torch.where(keep, -1, int(self.rest)).to(torch.int8)
        demote_to(layer, targets.expand(b, h, n))

    def importance(self, layer) -> torch.Tensor:
        """Sinks and window blocks first, then newer before older."""
        b, h, n = layer.tiers().shape
        idx = torch.arange(n)
        score = self._keep(idx, layer.block_size, layer.get_seq_length()).float() * n + idx.float()
        return score.expand(b, h, n)

    def describe(self) -> str:
        return f"sink_window:sinks={self.sinks},window={self.window},rest={self.rest},recent={self.recent}"


def sink_window(sinks: int = 4, window: int = 128, rest: Tier | str | int = Tier.INT4,
                recent: Tier | str | int = Tier.FP16) -> SinkWindow:
    return SinkWindow(sinks, window, rest, recent)
