"""Budget wrapper: any policy, then demote the least important blocks until a memory budget is met.

Two kinds of budget:

* ``bits_per_element``: sealed blocks of each layer may use at most this many bits per K/V element, metadata
  (FP16 scales and zeros) included: sum(page bytes) * 8 <= bits * (B * H * n_sealed * T * D * 2). The unsealed
  tail (at most one block, in the model dtype) is a fixed overhead no policy can shrink, so it is not counted.
* ``bytes``: the cache's resident bytes (pages + tail + block table, as :meth:`AdaptiveCache.memory_report`
  prints) may not exceed ``bytes``; each layer gets an equal share, bytes / num_layers (the supported families
  have identical layers, so an equal share is also the proportional one). Under tensor parallelism ``bytes`` is
  the budget of the whole model: each rank takes the share of its KV heads (kvprec/hf/distributed.py).

After the wrapped policy has assigned and rebalanced a layer, the least important block is demoted down the
ladder (default FP32 -> FP16 -> INT8 -> INT4 -> INT2, stopping at ``floor``) rung by rung until the budget is
met or it reaches the floor, then the next least important, and so on: importance comes from the wrapped policy
(:meth:`Policy.importance`), else newer blocks count as more important (ties: the oldest block goes first).
This is a greedy answer to the multiple-choice knapsack of docs/design.md that never touches a block while a less
important one could still give bytes. If even every block at ``floor`` exceeds the budget,
:class:`BudgetError` is raised before anything is changed. Demotion is one way (without a shadow), so a block
judged unimportant early stays demoted.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...storage.formats import Tier
from ..arguments import real_number, tier as parse_tier
from .base import Policy, SealStats, demote_to, evicted_blocks, needs_rebalance
from .registry import get
from ..distributed import head_share

DEFAULT_LADDER = (Tier.FP32, Tier.FP16, Tier.INT8, Tier.INT4, Tier.INT2)


class BudgetError(ValueError):
    """The budget cannot be met even with every sealed block at the floor tier."""


class Budget(Policy):
    def __init__(self, policy, bytes: Optional[int] = None, bits_per_element: Optional[float] = None,
                 floor: Tier | str | int = Tier.INT2, ladder: Sequence[Tier | str | int] = DEFAULT_LADDER):
        if (bytes is None) == (bits_per_element is None):
            raise ValueError("budget: give exactly one of bytes= (whole cache) or bits_per_element= (sealed blocks)")
        self.floor = parse_tier(floor, "budget floor")
        if bits_per_element is not None:
            bits_per_element = real_number(bits_per_element, "budget: bits_per_element")
            if not bits_per_element > self.floor.bits:
                raise BudgetError(f"budget: bits_per_element={bits_per_element} cannot be met: the floor tier "
                                  f"{self.floor} stores {self.floor.bits} bits per element before its scales and "
                                  f"zeros; lower the floor or raise the budget")
        elif isinstance(bytes, bool) or not isinstance(bytes, int) or not bytes > 0:
            raise ValueError(f"budget: bytes must be a positive whole number, got {bytes!r}")
        self.bytes, self.bits_per_element = bytes, bits_per_element
        self.ladder = sorted({parse_tier(t, "budget ladder") for t in ladder} | {self.floor})
        self.ladder = [t for t in self.ladder if t <= self.floor]
        self.inner = get(policy)

    @property
    def wants_attention_mass(self) -> bool:
        return self.inner.wants_attention_mass

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        return self.inner.assign(layer_idx, blocks, stats)

    def on_attention(self, layer_idx: int, block_mass: torch.Tensor) -> None:
        self.inner.on_attention(layer_idx, block_mass)

    def importance(self, layer) -> Optional[torch.Tensor]:
        return self.inner.importance(layer)

    def check_geometry(self, geometry) -> None:
        """A bits_per_element budget below what the floor tier's pages take at this geometry (data plus FP16 scales
        and zeros: INT2 is 2 + 16 / block_size + 16 / group_size bits) can never be met: refused before any update."""
        self.inner.check_geometry(geometry)
        if self.bits_per_element is None:
            return
        g = geometry
        least = g.page_bytes(self.floor) * 8 / (2 * g.block_size * g.head_dim)
        if self.bits_per_element < least:
            raise BudgetError(f"budget: bits_per_element={self.bits_per_element} cannot be met at block_size "
                              f"{g.block_size}, head_dim {g.head_dim}, value group {g.group_size}: every page at the "
                              f"floor tier {self.floor} takes {least:g} bits per element with its scales and zeros; "
                              "raise the budget, or use larger blocks or value groups")

    def rebalance(self, cache, layer_idx: int) -> None:
        self.inner.rebalance(cache, layer_idx)
        self.enforce(cache, layer_idx)

    # ------------------------------------------------------------------------------------------------------
    def _limit(self, cache, layer) -> tuple[float, int]:
        """(bytes the sealed pages of ``layer`` may use, bytes they use now)."""
        report = layer.memory()
        pages = int(sum(report.tier_bytes.values()))
        if self.bits_per_element is not None:
            b, h, n = layer.tiers().shape
            g = layer.geometry
            held = n - evicted_blocks(layer)  # blocks a sliding window evicted hold no elements
            return self.bits_per_element * (b * h * held * g.block_size * g.head_dim * 2) / 8, pages
        fixed = report.resident_bytes - pages
        # Under tensor parallelism this rank holds a share of the heads and takes that share of the bytes
        # (kvprec/hf/distributed.py): the ranks together meet the budget without talking to each other.
        return self.bytes * head_share(cache, layer) / len(cache.layers) - fixed, pages

    def _next_tier(self, tier: int) -> int:
        """The next ladder rung below ``tier`` (the nearest larger id); ``tier`` itself at or below the floor."""
        return min((int(t) for t in self.ladder if int(t) > tier), default=tier)

    def enforce(self, cache, layer_idx: int) -> int:
        """Demote blocks of layer ``layer_idx`` until its share of the budget is met; returns blocks demoted."""
        layer = cache.layers[layer_idx]
        # Pages, tail and table bytes change only with the block table (appends to the tail do not change its
        # allocated size): between seals and re-tiers there is nothing to check.
        if not needs_rebalance(self, layer, lambda: None):
            return 0
        tiers = layer.tiers()[..., evicted_blocks(layer):]  # evicted blocks hold no pages
        if tiers.shape[-1] == 0:
            return 0
        page = torch.tensor([layer.geometry.page_bytes(t) for t in Tier], dtype=torch.float64)
        limit, used = self._limit(cache, layer)
        at_floor = torch.maximum(tiers.to(torch.int64), torch.tensor(int(self.floor)))
        minimum = float(page[at_floor].sum())
        if minimum > limit + 1e-6:
            what = (f"{self.bits_per_element} bits per element" if self.bits_per_element is not None
                    else f"{self.bytes} bytes ({self.bytes / len(cache.layers):.0f} per layer, tail and block "
                         f"table included)")
            raise BudgetError(f"budget of {what} cannot be met for layer {layer_idx} at {layer.get_seq_length()} "
                              f"tokens: even with every sealed block at {self.floor} its pages need "
                              f"{minimum:.0f} bytes, {limit:.0f} available; raise the budget or lower the floor")
        demoted = 0
        while used > limit + 1e-6:
            plan = self._plan(layer, page, used - limit)
            if plan is None:  # the floor check above said this cannot happen: the accounting disagrees
                raise BudgetError(f"budget: layer {layer_idx} still uses {used} bytes of pages with every block at "
                                  f"{self.floor}, over the {limit:.0f} computed from page sizes")
            demoted += demote_to(layer, plan)
            limit, used = self._limit(cache, layer)
        return demoted

    def _plan(self, layer, page: torch.Tensor, deficit: float) -> Optional[torch.Tensor]:
        """Target tiers int8 [B, H, n] (-1 = keep) saving at least ``deficit`` bytes: the least important block
        goes down the ladder rung by rung, to the floor if needed, before the next one is touched (ties: oldest
        block first). None if no block is above the floor."""
        tiers = layer.tiers().to(torch.int64)
        b, h, n = tiers.shape
        importance = self.importance(layer)
        if importance is None:  # newer blocks matter more
            importance = torch.arange(n, dtype=torch.float64)
        importance = importance.to(torch.float64).cpu().expand(b, h, n)
        # Block-major flattening, so a stable sort puts equal importance in age order.
        flat_tiers = tiers.permute(2, 0, 1).flatten()
        order = torch.argsort(importance.permute(2, 0, 1).flatten(), stable=True)
        targets = flat_tiers.clone()
        saved = 0.0
        movable = (flat_tiers[order] >= 0) & (flat_tiers[order] < int(self.floor))  # -1: evicted, no page
        for i in order[movable].tolist():
            while saved < deficit:
                nxt = self._next_tier(int(targets[i]))
                if nxt == int(targets[i]):
                    break
                saved += float(page[targets[i]] - page[nxt])
                targets[i] = nxt
            if saved >= deficit:
                break
        if saved == 0.0:
            return None
        targets = torch.where(targets != flat_tiers, targets, -1)
        return targets.reshape(n, b, h).permute(1, 2, 0).to(torch.int8)

    def describe(self) -> str:
        what = f"bits_per_element={self.bits_per_element}" if self.bytes is None else f"bytes={self.bytes}"
        return f"budget({self.inner.describe()}, {what}, floor={self.floor})"


def budget(policy, bytes: Optional[int] = None, bits_per_element: Optional[float] = None,
           floor: Tier | str | int = Tier.INT2, ladder: Sequence[Tier | str | int] = DEFAULT_LADDER) -> Budget:
    return Budget(policy, bytes=bytes, bits_per_element=bits_per_element, floor=floor, ladder=ladder)
