"""Conversion between kvprec's paged pools and a vLLM-style paged layout of one layer, and its inverse.

kvprec (:class:`kvprec.ops.PagedKV`): one pool per tier, a page per (batch row b, KV head h, block j), and the
block table ``tiers, pages [B, Hkv, NB]``. vLLM (docs/serving.md): one byte tensor per layer whose rows are
physical blocks, each block holding one block of ALL heads, and one block table per request,
``block_table[b, j]`` = physical block (vllm/v1/worker/block_table.py). This module maps one onto the other:

* ``kv_cache`` uint8 ``[num_blocks, page_size_bytes]`` with ``page_size_bytes = Hkv * slot_bytes`` of the
  layer's slot tier (:class:`~kvprec.serving.page_size.TierPageSpec`); block n holds head h's page in bytes
  ``[h * slot_bytes, h * slot_bytes + page_bytes(tier))`` in the field order of
  :func:`~kvprec.serving.page_size.slot_fields`, the rest of the slot zero;
* ``block_table`` int32 ``[B, NB]``: physical block of (request b, logical block j), as vLLM's;
* ``head_tiers`` int8 ``[num_blocks, Hkv]``: the tier of each head's slot, -1 in blocks that hold nothing. This is
  the one table vLLM has no place for: its page has one format per layer. With one tier for every head of a
  layer the table is constant (the spec's tier) and the layout is exactly what a vLLM KV cache spec describes;
  with mixed tiers each slot is sized for the widest tier, and :meth:`VLLMPagedLayer.memory` counts the padding;
* block 0 is the null block, as vLLM's ``BlockPool.null_block`` (vllm/v1/core/block_pool.py): it never holds data,
  and the blocks a sliding-window layer evicted point to it (vLLM's managers put the null block in place of
  skipped blocks, ``remove_skipped_blocks`` in vllm/v1/core/single_type_kv_cache_manager.py);
* the unsealed tail (``tail_k, tail_v [B, Hkv, TL, D]``, model dtype) is carried as it is: a quantized page can
  only be written once its block is full (key scales are per channel over the block), so the tail is not a page.

Round trip: :func:`from_vllm` of :func:`to_vllm` gives every (b, h, j) the same tier and bit-identical codes,
scales and zeros (pages renumbered); :func:`to_vllm` of :func:`from_vllm` with the same block table gives the
same bytes. python_tests/test_serving_layout.py checks both, and that attention over the converted pools equals
attention over the original.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..ops import PagedKV
from ..storage.formats import EVICTED, BlockGeometry, Tier
from .page_size import POOL_FIELDS, TierPageSpec, slot_fields

__all__ = ["VLLMPagedLayer", "LayoutMemory", "to_vllm", "from_vllm", "NULL_BLOCK"]

#: The physical block that holds nothing (vLLM's null block, block id 0).
NULL_BLOCK = 0


@dataclass(frozen=True)
class LayoutMemory:
    """Bytes of one layer's vLLM-style layout.

    allocated_bytes: ``num_blocks * page_size_bytes``, every physical block (what the engine reserves).
    block_bytes: the blocks the block table references (null block excluded) times page_size_bytes: what the
    engine's allocator hands out for these requests.
    payload_bytes: the kvprec pages inside them, each at its own tier (``sum page_bytes(tier)`` over (b, h, j)):
    what kvprec's pools hold for the same blocks.
    padding_bytes: block_bytes - payload_bytes, the cost of one page size per layer (0 with one tier per layer).
    """

    allocated_bytes: int
    block_bytes: int
    payload_bytes: int

    @property
    def padding_bytes(self) -> int:
        return self.block_bytes - self.payload_bytes


@dataclass
class VLLMPagedLayer:
    """One layer in the vLLM-style layout (shapes in the module docstring)."""

    spec: TierPageSpec
    kv_cache: torch.Tensor
    block_table: torch.Tensor
    head_tiers: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    evicted_blocks: int = 0

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.shape[0]

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency of the tensors with the spec and each other."""
        spec, h = self.spec, self.spec.num_kv_heads
        if self.kv_cache.dtype != torch.uint8 or self.kv_cache.dim() != 2 or \
                self.kv_cache.shape[1] != spec.page_size_bytes or self.kv_cache.shape[0] < 1:
            raise ValueError(f"VLLMPagedLayer: kv_cache must be uint8 [num_blocks >= 1, page_size_bytes="
                             f"{spec.page_size_bytes}], got {self.kv_cache.dtype} {tuple(self.kv_cache.shape)}")
        if self.head_tiers.dtype != torch.int8 or tuple(self.head_tiers.shape) != (self.num_blocks, h):
            raise ValueError(f"VLLMPagedLayer: head_tiers must be int8 [num_blocks={self.num_blocks}, Hkv={h}], got "
                             f"{self.head_tiers.dtype} {tuple(self.head_tiers.shape)}")
        if self.tail_k.dim() != 4 or self.tail_v.shape != self.tail_k.shape or self.tail_k.shape[1] != h \
                or self.tail_k.shape[3] != spec.head_size or self.tail_k.shape[2] >= spec.block_size:
            raise ValueError(f"VLLMPagedLayer: tail_k and tail_v must both be [B, Hkv={h}, TL < {spec.block_size}, "
                             f"D={spec.head_size}], got {tuple(self.tail_k.shape)} and {tuple(self.tail_v.shape)}")
        b = self.tail_k.shape[0]
        if self.block_table.dtype != torch.int32 or self.block_table.dim() != 2 or self.block_table.shape[0] != b:
            raise ValueError(f"VLLMPagedLayer: block_table must be int32 [B={b}, NB], got {self.block_table.dtype} "
                             f"{tuple(self.block_table.shape)}")
        e, nb = self.evicted_blocks, self.block_table.shape[1]
        if not 0 <= e <= nb:
            raise ValueError(f"VLLMPagedLayer: evicted_blocks {e} must lie in [0, NB={nb}]")
        table = self.block_table.cpu()
        if bool((table[:, :e] != NULL_BLOCK).any()):
            raise ValueError(f"VLLMPagedLayer: evicted blocks [0, {e}) must point to the null block {NULL_BLOCK}")
        live = table[:, e:]
        if live.numel() and (int(live.min()) <= NULL_BLOCK or int(live.max()) >= self.num_blocks):
            raise ValueError(f"VLLMPagedLayer: live blocks must lie in [1, num_blocks={self.num_blocks}) (block "
                             f"{NULL_BLOCK} is the null block), got [{int(live.min())}, {int(live.max())}]")
        tiers = self.head_tiers.cpu()
        used = tiers[live.reshape(-1).long()] if live.numel() else tiers[:0]
        if bool(((used < 0) | (used >= len(Tier))).any()):
            raise ValueError(f"VLLMPagedLayer: a live block has a head tier outside 0..{len(Tier) - 1}")
        for tid in torch.unique(used).tolist():
            tier = Tier(int(tid))
            if spec.geometry.page_bytes(tier) > spec.slot_bytes:
                raise ValueError(f"VLLMPagedLayer: head tier {tier} needs {spec.geometry.page_bytes(tier)} bytes but "
                                 f"the spec's slot ({spec.tier}) holds {spec.slot_bytes}")

    def memory(self) -> LayoutMemory:
        """Exact bytes (see :class:`LayoutMemory`)."""
        live = self.block_table[:, self.evicted_blocks:].reshape(-1).long().cpu()
        per_tier = torch.tensor([self.spec.geometry.page_bytes(t) for t in Tier], dtype=torch.int64)
        payload = int(per_tier[self.head_tiers.cpu()[live].long()].sum()) if live.numel() else 0
        return LayoutMemory(self.num_blocks * self.spec.page_size_bytes, live.numel() * self.spec.page_size_bytes,
                            payload)


def _checked_block_table(block_table: Optional[torch.Tensor], b: int, nb: int, e: int,
                         num_blocks: Optional[int]) -> Tuple[torch.Tensor, int]:
    """The block table (default 1, 2, ... row by row after the evicted blocks) and num_blocks (default: one past the
    largest block used), checked."""
    if block_table is None:
        block_table = torch.zeros(b, nb, dtype=torch.int32)
        block_table[:, e:] = torch.arange(1, 1 + b * (nb - e), dtype=torch.int32).reshape(b, nb - e)
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or \
            tuple(block_table.shape) != (b, nb):
        raise ValueError(f"to_vllm: block_table must be int32 [B={b}, NB={nb}], got "
                         f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    table = block_table.cpu()
    if num_blocks is None:
        num_blocks = int(table.max()) + 1 if table.numel() else 1
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"to_vllm: num_blocks {num_blocks!r} is not accepted; expected an integer >= 1")
    if bool((table[:, :e] != NULL_BLOCK).any()):
        raise ValueError(f"to_vllm: block_table must point the {e} evicted blocks of each row to the null block "
                         f"{NULL_BLOCK}")
    live = table[:, e:].reshape(-1)
    if live.numel() and (int(live.min()) <= NULL_BLOCK or int(live.max()) >= num_blocks):
        raise ValueError(f"to_vllm: block_table's live entries must lie in [1, num_blocks={num_blocks}) (block "
                         f"{NULL_BLOCK} is the null block), got [{int(live.min())}, {int(live.max())}]")
    if torch.unique(live).numel() != live.numel():
        raise ValueError("to_vllm: block_table gives one physical block to two (request, block) entries; kvprec "
                         "pages are never shared, so each live entry needs its own block")
    return block_table, num_blocks


def to_vllm(paged: PagedKV, *, slot_tier=None, block_table: Optional[torch.Tensor] = None,
            num_blocks: Optional[int] = None) -> VLLMPagedLayer:
    """kvprec's pools of one layer -> the vLLM-style layout.

    slot_tier: the tier whose page size every head slot gets (the spec's tier); default: the widest tier present
    (FP16 when no block is sealed). A tier present that needs more bytes raises ValueError.
    block_table: int32 [B, NB], the physical blocks the engine's allocator gave each (request, block); default:
    1, 2, ... row by row. Evicted blocks must point to the null block 0.
    num_blocks: rows of ``kv_cache`` (default: one past the largest block used); must exceed every block id.
    """
    paged.validate()
    b, h, d, nb, e = paged.batch, paged.kv_heads, paged.head_dim, paged.num_blocks, paged.evicted_blocks
    geometry = BlockGeometry(paged.block_size, d, paged.group_size)
    present = [Tier.parse(t) for t in paged.pools]
    widest = max(present, key=geometry.page_bytes) if present else Tier.FP16
    spec = TierPageSpec(paged.block_size, h, d, widest if slot_tier is None else Tier.parse(slot_tier),
                        paged.group_size)
    for tier in paged.pools:
        if spec.geometry.page_bytes(Tier.parse(tier)) > spec.slot_bytes:
            raise ValueError(f"to_vllm: slot_tier {spec.tier} ({spec.slot_bytes} bytes per head) cannot hold the "
                             f"{Tier.parse(tier)} pages present ({spec.geometry.page_bytes(Tier.parse(tier))} bytes); "
                             "use a tier at least as wide or leave slot_tier unset")
    block_table, num_blocks = _checked_block_table(block_table, b, nb, e, num_blocks)

    device = paged.device
    kv_cache = torch.zeros(num_blocks, h, spec.slot_bytes, dtype=torch.uint8, device=device)
    head_tiers = torch.full((num_blocks, h), EVICTED, dtype=torch.int8)
    tiers = paged.tiers[:, :, e:].cpu()                       # [B, H, NB - E]
    pages = paged.pages[:, :, e:].cpu().long()
    blocks = block_table[:, e:].cpu().long().unsqueeze(1).expand(b, h, nb - e)  # physical block of (b, h, j)
    heads = torch.arange(h).view(1, h, 1).expand(b, h, nb - e)
    for tid in torch.unique(tiers).tolist():
        tier = Tier(int(tid))
        sel = tiers == tid
        rows = _pack(paged.pools[tier], pages[sel].to(device), spec, tier)  # [n, page_bytes(tier)]
        kv_cache[blocks[sel].to(device), heads[sel].to(device), :rows.shape[1]] = rows
        head_tiers[blocks[sel], heads[sel]] = int(tid)
    layer = VLLMPagedLayer(spec, kv_cache.reshape(num_blocks, spec.page_size_bytes), block_table.to(device),
                           head_tiers.to(device), paged.tail_k, paged.tail_v, e)
    layer.validate()
    return layer


def _pack(pool, pages: torch.Tensor, spec: TierPageSpec, tier: Tier) -> torch.Tensor:
    """Pages ``pages`` of one tier's pool as byte rows [n, page_bytes(tier)] in slot_fields order."""
    parts = dict(zip(POOL_FIELDS, pool))
    return torch.cat([parts[f.name][pages].contiguous().view(torch.uint8).reshape(pages.numel(), f.nbytes)
                      for f in slot_fields(spec.geometry, tier)], dim=1)


def from_vllm(layer: VLLMPagedLayer) -> PagedKV:
    """The vLLM-style layout of one layer -> kvprec's pools (one pool per tier present, exactly as many pages as
    (b, h, j) entries use it, numbered in (b, h, j) order). A physical block shared by several requests (vLLM's
    prefix caching) becomes one page per (b, h, j): kvprec pages are never shared."""
    layer.validate()
    spec, device = layer.spec, layer.kv_cache.device
    b, nb, e, h = layer.block_table.shape[0], layer.block_table.shape[1], layer.evicted_blocks, spec.num_kv_heads
    slots = layer.kv_cache.reshape(layer.num_blocks, h, spec.slot_bytes)
    blocks = layer.block_table[:, e:].cpu().long().unsqueeze(1).expand(b, h, nb - e)
    heads = torch.arange(h).view(1, h, 1).expand(b, h, nb - e)
    tiers_live = layer.head_tiers.cpu()[blocks, heads]      # [B, H, NB - E]
    tiers = torch.full((b, h, nb), EVICTED, dtype=torch.int8)
    pages = torch.full((b, h, nb), -1, dtype=torch.int32)
    tiers[:, :, e:] = tiers_live
    pools: Dict[Tier, tuple] = {}
    for tid in torch.unique(tiers_live).tolist():
        tier = Tier(int(tid))
        sel = tiers_live == tid
        n = int(sel.sum())
        rows = slots[blocks[sel].to(device), heads[sel].to(device)]  # [n, slot_bytes]
        fields = {f.name: rows[:, f.offset:f.offset + f.nbytes].contiguous().view(f.dtype).reshape(n, *f.shape)
                  for f in slot_fields(spec.geometry, tier)}
        pools[tier] = tuple(fields.get(name) for name in POOL_FIELDS)
        live_pages = pages[:, :, e:]
        live_pages[sel] = torch.arange(n, dtype=torch.int32)
    paged = PagedKV(pools, tiers.to(device), pages.to(device), layer.tail_k, layer.tail_v, spec.block_size,
                    spec.group_size, evicted_blocks=e)
    paged.validate()
    return paged
