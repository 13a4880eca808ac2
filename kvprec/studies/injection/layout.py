"""Where each condition's tokens sit in one batched cache.

Every condition of a problem (baseline, oracle, an injection per point and tier, the noise controls) is a batch row
of one AdaptiveCache, so a decode step serves them all. Rows must then hold the same number of slots, but their
spans differ in length (an added step, a different question); the layout gives every row the same slots and marks
the ones a row does not use as holes (attention mask 0), with each token's position (RoPE) counted over real
tokens only::

    slots  [0, P)          the prompt before the span (pre), identical in every row
           [P, S0)         holes up to the next block boundary, S0 = ceil(P / T) T
           [S0, S0 + C)    the span region: the row's span, then holes; C = ceil(longest span / T) T
           [G, ...)        generated tokens, G = S0 + C

    position of the span's j-th token: P + j; of the k-th generated token: P + len(span of the row) + k

So the span region starts and ends on block boundaries: a splice crops the cache at S0 without cutting a block,
and a policy can store exactly the span's blocks at another tier (kvprec/studies/injection/tiers.py). Replacing a
row's span by one of another length moves its generated tokens by the difference in positions, not in slots
(kvprec/studies/injection/surgery.py: shift_keys). Holes hold a copy of a neighbouring real K/V (never read through
the mask, but inside a block they must not widen the range a quantized block is scaled to).

Sliding-window layers count the window in slots, not positions, so a layout with holes is refused for a model
whose window is shorter than the longest sequence (:func:`check_windows`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch


@dataclass
class Layout:
    """Slots of one problem's cache; ``span_len[b]``: the length of row b's current span."""

    pre_len: int
    block_size: int
    capacity: int
    span_len: List[int]

    @classmethod
    def plan(cls, pre_len: int, block_size: int, longest_span: int, span_len: List[int]) -> "Layout":
        return cls(pre_len, block_size, math.ceil(longest_span / block_size) * block_size, list(span_len))

    @property
    def span_start(self) -> int:
        return math.ceil(self.pre_len / self.block_size) * self.block_size

    @property
    def gen_start(self) -> int:
        return self.span_start + self.capacity

    @property
    def span_blocks(self) -> range:
        return range(self.span_start // self.block_size, self.gen_start // self.block_size)

    @property
    def rows(self) -> int:
        return len(self.span_len)

    def positions(self, first: int, count: int) -> torch.Tensor:
        """Positions [B, count] of generated tokens first, ..., first + count - 1 of every row."""
        base = torch.tensor([self.pre_len + n for n in self.span_len], dtype=torch.long)
        return base[:, None] + torch.arange(first, first + count)[None, :]

    def mask(self, slots: int) -> torch.Tensor:
        """Attention mask [B, slots] (long): 1 on the real tokens of each row, 0 on holes."""
        m = torch.zeros(self.rows, slots, dtype=torch.long)
        m[:, :self.pre_len] = 1
        m[:, self.gen_start:] = 1
        for b, n in enumerate(self.span_len):
            m[b, self.span_start:self.span_start + n] = 1
        return m

    def region(self, span_k: torch.Tensor, span_v: torch.Tensor):
        """One row's span region [1, H, C, D] from its span's K/V [1, H, n, D] (n <= C): holes copy the last token."""
        n = span_k.shape[-2]
        if n > self.capacity:
            raise ValueError(f"layout: a span of {n} tokens does not fit the span region of {self.capacity}")
        pad = self.capacity - n
        return (torch.cat([span_k, span_k[..., -1:, :].expand(-1, -1, pad, -1)], dim=-2),
                torch.cat([span_v, span_v[..., -1:, :].expand(-1, -1, pad, -1)], dim=-2))

    def prefix(self, pre_k: torch.Tensor, pre_v: torch.Tensor, rows: int):
        """Slots [0, S0) for ``rows`` rows from the pre K/V [1, H, P, D]: holes copy the last pre token."""
        pad = self.span_start - self.pre_len
        k = torch.cat([pre_k, pre_k[..., -1:, :].expand(-1, -1, pad, -1)], dim=-2)
        v = torch.cat([pre_v, pre_v[..., -1:, :].expand(-1, -1, pad, -1)], dim=-2)
        return k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)


def check_windows(config, longest_sequence: int) -> None:
    """ValueError if a sliding-window layer's window is shorter than ``longest_sequence`` slots (holes would
    change what the window covers)."""
    from ...hf.cache import sliding_windows

    windows = [w for w in sliding_windows(config) if w]
    if windows and min(windows) < longest_sequence:
        raise ValueError(f"the model has sliding-window layers (window {min(windows)}) shorter than the "
                         f"{longest_sequence} slots of a problem's cache; the study's layout with holes would change "
                         "what they attend to")
