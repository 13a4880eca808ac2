"""Page-size accounting of kvprec's tiers in a serving engine's terms (vLLM's KV cache spec; docs/serving.md).

vLLM sizes a layer's KV cache in pages: one page holds ``block_size`` tokens of K and V for all
``num_kv_heads`` heads of one layer (``KVCacheSpec.page_size_bytes`` in vllm/v1/kv_cache_interface.py; for a
plain ``AttentionSpec`` that is ``2 * block_size * num_kv_heads * head_size * dtype size``). kvprec's page
(:meth:`kvprec.storage.formats.BlockGeometry.page_bytes`) is one block of ONE head. A vLLM page at one kvprec tier
is therefore ``num_kv_heads`` kvprec pages, each a *slot* of :func:`slot_fields` in that order:

    page_size_bytes = num_kv_heads * slot_bytes
    slot_bytes      = 2 * T * D * bits / 8                        (K and V codes or floats)
                    + 2 * 2 * D          (integer tiers)          (FP16 key scale and zero per channel)
                    + 2 * 2 * T * D / G  (integer tiers)          (FP16 value scale and zero per token and group)

with T = block_size, D = head_size, G the value group. Exact: the same bytes kvprec's own memory report counts
(python_tests/test_serving_layout.py checks both against a live MixedPrecisionBuffer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..storage.formats import BlockGeometry, Tier

__all__ = ["TierPageSpec", "SlotField", "slot_fields"]


@dataclass(frozen=True)
class SlotField:
    """One tensor of a slot: ``name`` (the PagedKV pool field), byte ``offset`` in the slot, ``dtype``, ``shape``
    (per page, i.e. without the pool's page dimension) and its size ``nbytes``."""

    name: str
    offset: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


#: The six pool fields of kvprec.ops.PagedKV, in the order a slot stores them.
POOL_FIELDS = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")


def slot_fields(geometry: BlockGeometry, tier: Tier) -> List[SlotField]:
    """The byte layout of one head's slot at ``tier``: K data, K scale, K zero, V data, V scale, V zero (the
    metadata only for integer tiers), packed back to back in native byte order. The fields' sizes add up to
    ``geometry.page_bytes(tier)``."""
    tier = Tier.parse(tier)
    t, d, g = geometry.block_size, geometry.head_dim, geometry.group_size
    if tier.is_integer:
        data = (torch.uint8, (t, d * tier.bits // 8))
        shapes = {"k": data, "k_scale": (torch.float16, (d,)), "k_zero": (torch.float16, (d,)),
                  "v": data, "v_scale": (torch.float16, (t, d // g)), "v_zero": (torch.float16, (t, d // g))}
    else:
        shapes = {"k": (tier.float_dtype, (t, d)), "v": (tier.float_dtype, (t, d))}
    fields, offset = [], 0
    for name in POOL_FIELDS:
        if name in shapes:
            field = SlotField(name, offset, *shapes[name])
            fields.append(field)
            offset += field.nbytes
    return fields


@dataclass(frozen=True)
class TierPageSpec:
    """A layer's KV cache spec at one kvprec tier, in vLLM's fields (``block_size``, ``num_kv_heads``,
    ``head_size``; the tier in place of ``dtype``) plus kvprec's value group (None: the default for head_size).

    ``num_kv_heads`` is per rank under tensor parallelism, as in vLLM. block_size must be a power of two and
    head_size a multiple of 4 (kvprec's formats; INT2 packs four codes per byte)."""

    block_size: int
    num_kv_heads: int
    head_size: int
    tier: Tier
    group_size: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "tier", Tier.parse(self.tier))
        if isinstance(self.num_kv_heads, bool) or not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads!r} is not accepted; expected an integer >= 1")
        for name in ("block_size", "head_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: {value!r} is not accepted; expected an integer")
        geometry = BlockGeometry(self.block_size, self.head_size, self.group_size)  # raises naming the argument
        object.__setattr__(self, "group_size", geometry.group_size)

    @property
    def geometry(self) -> BlockGeometry:
        return BlockGeometry(self.block_size, self.head_size, self.group_size)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one head's block: kvprec's page at this tier."""
        return self.geometry.page_bytes(self.tier)

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one vLLM page: the block of every KV head of the layer, scales and zeros included."""
        return self.num_kv_heads * self.slot_bytes

    def max_memory_usage_bytes(self, max_model_len: int) -> int:
        """Bytes one request of ``max_model_len`` tokens can hold, counted as vLLM's FullAttentionSpec does:
        ceil(max_model_len / block_size) pages (the last, partial block is a whole page)."""
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 0:
            raise ValueError(f"max_model_len: {max_model_len!r} is not accepted; expected an integer >= 0")
        return -(-max_model_len // self.block_size) * self.page_size_bytes
