"""The policy interface: how the tier of each sealed block is chosen.

A policy is a small object with one required method, :meth:`Policy.assign`, called by a cache layer each time
blocks are sealed (a block seals when its ``block_size`` positions are filled), and two optional hooks:

* :meth:`Policy.on_attention` receives the per-block attention mass emitted by the attention kernel, for
  policies that set ``wants_attention_mass`` (the layer also accumulates it in :class:`AttentionStats`);
* :meth:`Policy.rebalance` runs after every cache update of a layer and may re-tier sealed blocks of that layer
  (demotion re-quantizes from the highest copy held; promotion needs the host shadow). It runs once per layer per
  decode step, so it must be cheap when there is nothing to do: :func:`needs_rebalance` lets a policy skip the
  work while the block table and the quantity its decision depends on are unchanged.

Policies never import transformers: they see a cache layer through a few members of ``AdaptiveLayer``:
``layer_idx``, ``block_size``, ``geometry`` (BlockGeometry), ``get_seq_length()``, ``tiers()`` (int8
[B, H_kv, n_sealed]; ``formats.EVICTED`` = -1 for the first ``evicted_blocks`` blocks of a sliding-window layer,
which hold nothing and cannot be re-tiered), ``set_block_tiers(index, tiers)``, ``memory()`` (the buffer's
MemoryReport), ``stats``
(:class:`AttentionStats`, or None when no policy asked for attention mass), and optionally ``table_version`` /
``rebalance_memo`` (see :func:`needs_rebalance`).

Tier ids order precision: a smaller id is a higher precision (FP32=0 > FP16 > BF16 > INT8 > INT4 > INT2=5),
so "demote" means "raise the id".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional

import torch

from ...storage.formats import Tier


@dataclass
class AttentionStats:
    """Attention mass accumulated per block of one layer (the unsealed tail is the last block).

    mass: FP32 [B, H_kv, n_blocks], sum over steps, query positions and the query heads of each KV head's group
          of the attention probability that fell on the block.
    seen: FP32 [n_blocks], how many (query position, query head per KV head) pairs could see the block, so
          ``mass / seen`` is the mean attention a block received per query (1.0 = all of it).
    """

    mass: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, device) -> "AttentionStats":
        return cls(torch.zeros(batch, kv_heads, 0, device=device), torch.zeros(0, device=device))

    def resize(self, n_blocks: int) -> None:
        """Grow with zeros (new blocks) or truncate (crop) to ``n_blocks``."""
        have = self.mass.shape[-1]
        if n_blocks > have:
            self.mass = torch.nn.functional.pad(self.mass, (0, n_blocks - have))
            self.seen = torch.nn.functional.pad(self.seen, (0, n_blocks - have))
        else:
            self.mass, self.seen = self.mass[..., :n_blocks], self.seen[:n_blocks]

    def index_batch(self, idx: torch.Tensor) -> None:
        self.mass = self.mass.index_select(0, idx.to(self.mass.device))

    def add(self, block_mass: torch.Tensor, seq_len: int, block_size: int) -> None:
        """Accumulate the attention kernel's block mass [B, Hq, Q, n_blocks] for queries at the Q newest positions.

        A query at position p can see block j when p >= j * block_size (causal), which gives ``seen``.
        """
        b, hq, q, n = block_mass.shape
        if n > self.mass.shape[-1]:
            self.resize(n)
        hkv = self.mass.shape[1]
        self.mass[..., :n] += block_mass.float().reshape(b, hkv, hq // hkv, q, n).sum(dim=(2, 3)).to(self.mass.device)
        positions = torch.arange(seq_len - q, seq_len, device=self.seen.device)
        starts = torch.arange(n, device=self.seen.device) * block_size
        self.seen[:n] += (positions[:, None] >= starts[None, :]).sum(0).float() * (hq // hkv)

    def mean(self) -> torch.Tensor:
        """Mean attention per query, FP32 [B, H_kv, n_blocks]; +inf for blocks no query has seen yet, so
        that a policy treats an unobserved block as important rather than as unimportant."""
        seen = self.seen.to(self.mass.device)
        return torch.where(seen > 0, self.mass / seen.clamp(min=1), torch.full_like(self.mass, float("inf")))


@dataclass
class SealStats:
    """What a policy sees when blocks are sealed.

    batch, kv_heads, block_size: the layer's geometry; seq_len: the length after the append that seals;
    new_keys, new_values: the K/V being appended, [B, H_kv, n, D] (post-RoPE, model dtype; the keys as stored, i.e.
    times the layer's rotation when the cache has ``key_rotation``, the values likewise with ``value_rotation``: norms
    and inner products are the model's); the blocks being sealed are the first ``len(blocks) * block_size``
    positions of (old tail + new positions); layer: the cache layer (``buffer``, ``stats``), for policies that read
    more.
    """

    batch: int
    kv_heads: int
    block_size: int
    seq_len: int
    new_keys: torch.Tensor
    new_values: torch.Tensor
    layer: object = None

    def full(self, tier: Tier, n: int) -> torch.Tensor:
        """Tiers int8 [B, H_kv, n], all ``tier``."""
        return torch.full((self.batch, self.kv_heads, n), int(tier), dtype=torch.int8)


class Policy:
    """Base class. Subclasses implement :meth:`assign`; the hooks default to doing nothing."""

    #: set by policies that read attention mass: the attention function then asks the kernel for it
    wants_attention_mass: bool = False

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        """Tiers for the blocks ``blocks`` (sealed block indices) of layer ``layer_idx``: int8 [B, H_kv, len(blocks)]."""
        raise NotImplementedError(f"{type(self).__name__} does not implement assign()")

    def on_attention(self, layer_idx: int, block_mass: torch.Tensor) -> None:
        """Per-block attention mass of one attention call, FP32 [B, Hq, Q, n_blocks] (the tail is the last block)."""

    def rebalance(self, cache, layer_idx: int) -> None:
        """Re-tier sealed blocks of layer ``layer_idx`` after its update (``cache.layers[layer_idx]``)."""

    def check_geometry(self, geometry) -> None:
        """Raise ValueError if the policy cannot work with a cache of this :class:`BlockGeometry` (block_size,
        head_dim, group_size); called when the cache is built for a model, before any update. Default: no check."""

    def importance(self, layer) -> Optional[torch.Tensor]:
        """How much each sealed block matters, FP32 [B, H_kv, n_sealed] (larger = keep at higher precision),
        for wrappers that must choose what to demote (:class:`~kvprec.policy.budget.Budget`); None if the
        policy has no opinion."""
        return None

    def describe(self) -> str:
        return type(self).__name__


def needs_rebalance(policy: Policy, layer, key: Callable[[], Hashable]) -> bool:
    """Whether ``policy`` must rebalance ``layer`` now: False when the layer's block table (``table_version``,
    bumped by every seal, re-tier, crop and batch selection) and ``key()`` (what else the decision depends on, e.g.
    the block index where the window starts) are what they were at the policy's last rebalance of this layer.

    Layers without ``rebalance_memo`` (test doubles) always rebalance. A rebalance that re-tiers bumps the version,
    so the next call recomputes once and finds nothing to do; the decode steps between changes cost a lookup.
    """
    memo = getattr(layer, "rebalance_memo", None)
    if memo is None:
        return True
    state = (layer.table_version, key())
    if memo.get(id(policy)) == state:
        return False
    memo[id(policy)] = state
    return True


def evicted_blocks(layer) -> int:
    """How many leading sealed blocks of ``layer`` a sliding window evicted (0 for layers without eviction)."""
    return int(getattr(layer, "evicted_blocks", 0))


def demote_to(layer, targets: torch.Tensor) -> int:
    """Demote sealed blocks of ``layer`` to ``targets`` (int8 [B, H_kv, n_sealed], -1 = keep) wherever the target
    is a lower precision (higher id) than the current tier. Returns the number of (row, head, block) re-tiered.

    One ``set_block_tiers`` call per block index that changes: the buffer re-tiers pages, never the sequence.
    """
    current = layer.tiers()
    targets = targets.to(current.device)
    change = (targets >= 0) & (current >= 0) & (targets > current)  # current -1: evicted, nothing to re-tier
    if not bool(change.any()):
        return 0
    per_block = torch.where(change, targets, torch.full_like(targets, -1))
    for index in torch.nonzero(change.any(dim=0).any(dim=0)).flatten().tolist():
        layer.set_block_tiers(index, per_block[..., index].contiguous())
    return int(change.sum())
