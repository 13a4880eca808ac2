"""kvprec's own tiering read as an eviction policy: a block counts as kept when its tier is INT8 or above.

One :class:`~kvprec.hf.cache.AdaptiveCache` runs the sample teacher-forced on the oracle's tokens under the "kvprec"
attention, one batch row per budget fraction b (the same tokens in every row), row b under the policy
``spec.format(budget=b)`` (:class:`PerRow`; default
``attention_mass:keep={budget},high=int8,low=int4,every=1``: kvprec's online H2O-like policy keeping the fraction b
of sealed blocks per KV head at INT8 and the rest at INT4, re-ranked every token, the cadence of the simulated
eviction policies). After the step whose query sits at position t, the kept set of a (layer, KV head) is

    { j < t : j in a sealed block with tier id <= INT8 }  union  { j < t : j in the unsealed tail }

which is what that step's query read at INT8 or better (the tail is in the model dtype). Its size is not forced
to K: demotion is one way, so a block that falls out of the heavy set stays at INT4 even if it becomes heavy again,
and the kept set can shrink below the budget; the study reports its mean size over K beside the recall.
"""
from __future__ import annotations

from typing import List

import torch

from ...hf.policy import AttentionStats, Policy, SealStats
from ...storage.formats import Tier


class RowLayer:
    """Batch row ``row`` of a cache layer, seen through the members a policy uses (kvprec/hf/policy/base.py) as a
    layer of one row: its tiers, its attention statistics, and re-tiering that leaves the other rows as they are
    (tier -1)."""

    def __init__(self, layer, row: int):
        self.layer, self.row = layer, row
        self.layer_idx, self.block_size, self.geometry = layer.layer_idx, layer.block_size, layer.geometry

    def get_seq_length(self) -> int:
        return self.layer.get_seq_length()

    def tiers(self) -> torch.Tensor:
        return self.layer.tiers()[self.row:self.row + 1]

    def set_block_tiers(self, index: int, tiers: torch.Tensor) -> None:
        full = torch.full(self.layer.tiers().shape[:2], -1, dtype=torch.int8)
        full[self.row] = tiers.reshape(-1).to(torch.int8)
        self.layer.set_block_tiers(index, full)

    @property
    def stats(self):
        s = self.layer.stats
        return None if s is None else AttentionStats(s.mass[self.row:self.row + 1], s.seen)

    @property
    def evicted_blocks(self) -> int:
        return self.layer.evicted_blocks

    @property
    def table_version(self) -> int:
        return self.layer.table_version

    @property
    def rebalance_memo(self) -> dict:
        return self.layer.rebalance_memo

    def memory(self):
        return self.layer.memory()


class _RowCache:
    def __init__(self, cache, row: int):
        self.layers = [RowLayer(layer, row) for layer in cache.layers]


class PerRow(Policy):
    """Batch row b of the cache follows ``policies[b]``: one cache holds the same sequence under several policies
    (one decode pass instead of one per policy). Each policy sees only its row (:class:`RowLayer`)."""

    def __init__(self, policies: List[Policy]):
        self.policies = list(policies)
        self.wants_attention_mass = any(p.wants_attention_mass for p in self.policies)

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        if stats.batch != len(self.policies):
            raise ValueError(f"PerRow: {stats.batch} batch rows for {len(self.policies)} policies")
        return torch.cat([p.assign(layer_idx, blocks, SealStats(1, stats.kv_heads, stats.block_size, stats.seq_len,
                                                                 stats.new_keys[b:b + 1], stats.new_values[b:b + 1],
                                                                 RowLayer(stats.layer, b)))
                          for b, p in enumerate(self.policies)])

    def on_attention(self, layer_idx: int, block_mass: torch.Tensor) -> None:
        for b, p in enumerate(self.policies):
            p.on_attention(layer_idx, block_mass[b:b + 1])

    def rebalance(self, cache, layer_idx: int) -> None:
        for b, p in enumerate(self.policies):
            p.rebalance(_RowCache(cache, b), layer_idx)

    def describe(self) -> str:
        return "per_row(" + "; ".join(p.describe() for p in self.policies) + ")"


def kept_mask(cache, length: int) -> torch.Tensor:
    """bool [B, L * H_kv, length]: positions [0, length) held at INT8 or above in each batch row of ``cache``."""
    rows = []
    for layer in cache.layers:
        tiers = layer.tiers().to(torch.int64)  # [B, H_kv, n_sealed]
        t = layer.block_size
        kept = (tiers >= 0) & (tiers <= int(Tier.INT8))
        mask = torch.ones(*tiers.shape[:2], max(length, tiers.shape[2] * t), dtype=torch.bool)
        mask[..., :tiers.shape[2] * t] = kept.repeat_interleave(t, dim=2)
        rows.append(mask[..., :length])
    return torch.cat(rows, 1)


class TieringRun:
    """The AdaptiveCache of one sample: batch row b under the policy of budget fraction b, fed the same tokens."""

    def __init__(self, model, spec: str, fractions: List[float], block_size: int):
        from ...hf.cache import AdaptiveCache
        from ...hf.policy import get

        self.model = model
        self.specs = [spec.format(budget=b) for b in fractions]
        self.cache = AdaptiveCache(model.config, policy=PerRow([get(s) for s in self.specs]), block_size=block_size)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` [n] (the prompt, then one token per step) to every row; logits FP32 [n_budgets, V] of the
        last position."""
        from ...hf.attention import enabled

        with enabled(self.model):
            batch = ids[None].expand(len(self.specs), -1).to(self.model.device)
            return self.model(input_ids=batch, past_key_values=self.cache, use_cache=True).logits[:, -1].float().cpu()

    def kept(self, length: int) -> torch.Tensor:
        """bool [n_budgets, L * H_kv, length]: what each row held at INT8 or above for the last query."""
        return kept_mask(self.cache, length)

    def resident_bytes(self) -> List[int]:
        """Resident bytes of each row (the cache's bytes split evenly: rows have equal shapes; pages per row differ,
        so the split is by each row's page bytes plus an even share of tails and tables)."""
        report = self.cache.memory_report()
        fixed = int(report.tail_bytes.sum() + report.table_bytes.sum() + report.rotation_bytes.sum())
        rows = len(self.specs)
        pages = torch.zeros(rows, dtype=torch.float64)
        for layer in self.cache.layers:
            page = torch.tensor([layer.geometry.page_bytes(t) for t in Tier], dtype=torch.float64)
            tiers = layer.tiers().to(torch.int64)
            pages += torch.where(tiers >= 0, page[tiers.clamp(min=0)], 0.0).sum((1, 2))
        return [int(p) + fixed // rows for p in pages.tolist()]
