"""MixedPrecisionBuffer: the KV cache of one layer at mixed precision, and its exact memory report.

A thin Python face of the C++ buffer (``csrc/include/kvprec/buffer.h``, exposed as
``torch.classes.kvprec.MixedPrecisionBuffer``) that accepts torch dtypes and devices and tiers as
:class:`~kvprec.storage.formats.Tier`, names (``"int4"``) or ids. Layout (docs/design.md, "Data layout of the cache"):

* positions are grouped in blocks of ``block_size`` (T) tokens; the newest, incomplete block stays in the model
  dtype (the tail); a block is sealed when it fills, at one tier per (batch row, KV head);
* sealed blocks live in paged pools, one per tier; a block table maps (b, h, block) -> (tier, page); a page is
  one block of one (b, h) in the format of :mod:`kvprec.storage.formats` (bit-identical to kvprec.ops.reference.quantize);
* demotion re-quantizes from the highest copy held (the host shadow when kept, else the page); promotion needs
  the shadow (``shadow=True``) and otherwise raises: lost bits are never pretended back.

Shapes: B batch, H KV heads, Hq query heads (a multiple of H), D head_dim, T block_size, L seq_len.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from .._native import require_native
from .formats import BlockGeometry, Tier, default_group_size

TierLike = Union[Tier, str, int]

__all__ = ["MixedPrecisionBuffer", "MemoryReport", "PoolView"]


class PoolView(NamedTuple):
    """One tier's pool; tensors have capacity pages along dim 0 (live pool tensors, not copies).

    float tiers: ``k, v [P, T, D]`` in the tier dtype, metadata None;
    integer tiers: ``k, v`` uint8 ``[P, T, D*bits/8]``, ``k_scale, k_zero`` FP16 ``[P, D]``,
    ``v_scale, v_zero`` FP16 ``[P, T, D/G]``. All None before the tier's first page.
    """

    k: Optional[torch.Tensor]
    k_scale: Optional[torch.Tensor]
    k_zero: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    v_scale: Optional[torch.Tensor]
    v_zero: Optional[torch.Tensor]


@dataclass(frozen=True)
class MemoryReport:
    """Exact bytes of one buffer (the C++ MemoryReport).

    tier_bytes / tier_pages: live pages per tier name; bytes = pages * BlockGeometry.page_bytes(tier)
    (K and V data + FP16 scales and zeros). tail_bytes: the tail as allocated, 2 * B * H * T * D elements of the
    model dtype. table_bytes: 5 bytes (tier int8 + page int32) per (b, h, sealed block). shadow_bytes: host copies
    (not device memory, so not resident). reserved_bytes: all pool capacity, live or free.
    elements: B*H*L*D*2 over the held positions (L minus the evicted blocks' positions).
    """

    tier_bytes: Dict[str, int]
    tier_pages: Dict[str, int]
    tail_bytes: int
    table_bytes: int
    shadow_bytes: int
    reserved_bytes: int
    tokens: int
    elements: int

    @classmethod
    def _from_native(cls, d: Dict[str, int]) -> "MemoryReport":
        names = [str(t) for t in Tier]
        return cls({n: d[n] for n in names}, {n: d[f"pages_{n}"] for n in names}, d["tail"], d["table"], d["shadow"],
                   d["reserved"], d["tokens"], d["elements"])

    @property
    def resident_bytes(self) -> int:
        """Device bytes of the cache: sum(tier_bytes) + tail_bytes + table_bytes."""
        return sum(self.tier_bytes.values()) + self.tail_bytes + self.table_bytes

    @property
    def bits_per_element(self) -> float:
        """resident_bytes * 8 / elements (0 for an empty buffer)."""
        return self.resident_bytes * 8 / self.elements if self.elements else 0.0

    @property
    def compression_vs_fp16(self) -> float:
        """(elements * 2) / resident_bytes: how many times smaller than an FP16 cache of the held tokens."""
        return self.elements * 2 / self.resident_bytes if self.resident_bytes else 0.0

    def format(self) -> str:
        """A text table: one row per tier in use, then tail, table, resident total, shadow and reserved."""
        rows = [f"{'':<18}{'pages':>8}{'bytes':>16}"]
        for name, b in self.tier_bytes.items():
            if self.tier_pages[name]:
                rows.append(f"{name:<18}{self.tier_pages[name]:>8}{b:>16,}")
        rows += [f"{'tail':<26}{self.tail_bytes:>16,}", f"{'block table':<26}{self.table_bytes:>16,}",
                 f"{'resident':<26}{self.resident_bytes:>16,}",
                 f"{'shadow (host)':<26}{self.shadow_bytes:>16,}",
                 f"{'reserved (pools)':<26}{self.reserved_bytes:>16,}",
                 f"{self.tokens} tokens, {self.elements:,} elements: {self.bits_per_element:.3f} bits/element, "
                 f"compression vs fp16 {self.compression_vs_fp16:.2f}x"]
        return "\n".join(rows)


def _dtype_name(dtype: Union[torch.dtype, str]) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str):
        return dtype
    raise ValueError(f"dtype: {dtype!r} is not accepted; use torch.float32, torch.float16 or torch.bfloat16")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _tier_tensor(tiers, shape, what: str) -> torch.Tensor:
    """A Tier/name/id for every entry -> int8 [shape]; a tensor is passed on for the C++ checks."""
    if isinstance(tiers, torch.Tensor):
        if tiers.dtype == torch.bool:  # True would silently mean tier 1 (fp16)
            raise ValueError(f"{what}: a bool tensor is not accepted; use int8 tier ids (0..5)")
        return tiers
    if isinstance(tiers, (Tier, str, int)) and not isinstance(tiers, bool):
        return torch.full(shape, int(Tier.parse(tiers)), dtype=torch.int8)
    raise ValueError(f"{what}: {type(tiers).__name__} is not accepted; use an int8 tensor of tier ids or one tier")


class MixedPrecisionBuffer:
    """The KV cache of one layer: ``append`` K/V, ``attend`` over them, re-tier, crop, select batch rows.

    Args:
        batch, kv_heads: B and H.
        head_dim: D, a multiple of 4 and of ``group_size``. block_size: T, a power of two.
        group_size: G, value quantization group along head_dim (None: ``formats.default_group_size(head_dim)``).
        dtype: model dtype (tail, gather, attention output): torch.float32 / float16 / bfloat16 or its name.
        device: where the pools and the tail live.
        default_tier: tier of sealed blocks when ``append`` gets no ``seal_tiers``.
        shadow: keep a host copy of every sealed block in the model dtype (exact crop, promotion).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int = 128, block_size: int = 64,
                 group_size: Optional[int] = None,
                 dtype: Union[torch.dtype, str] = torch.float16, device: Union[torch.device, str] = "cpu",
                 default_tier: TierLike = Tier.INT4, shadow: bool = False):
        require_native("MixedPrecisionBuffer")
        self._impl = torch.classes.kvprec.MixedPrecisionBuffer(
            int(batch), int(kv_heads), int(head_dim), int(block_size),
            int(default_group_size(head_dim) if group_size is None else group_size), _dtype_name(dtype),
            str(torch.device(device)), int(Tier.parse(default_tier)), bool(shadow))
        # Host mirrors of the sizes, kept by the mutating methods below after the native call succeeded: the
        # cache reads them several times per layer per decode step, and each native method call costs ~2.5 us.
        self._block_size = int(block_size)
        self._batch = int(batch)
        self._seq_len = 0
        self._evicted = 0

    # -- options and state --------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """B (follows index_batch)."""
        return self._batch

    @property
    def kv_heads(self) -> int:
        return self._impl.kv_heads()

    @property
    def head_dim(self) -> int:
        return self._impl.head_dim()

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def group_size(self) -> int:
        return self._impl.group_size()

    @property
    def geometry(self) -> BlockGeometry:
        return BlockGeometry(self.block_size, self.head_dim, self.group_size)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self._impl.dtype()]

    @property
    def device(self) -> torch.device:
        return torch.device(self._impl.device())

    @property
    def default_tier(self) -> Tier:
        return Tier(self._impl.default_tier())

    @property
    def has_shadow(self) -> bool:
        return self._impl.has_shadow()

    @property
    def seq_len(self) -> int:
        """L, positions held (sealed and tail)."""
        return self._seq_len

    @property
    def num_sealed_blocks(self) -> int:
        """L // T: every full block is sealed."""
        return self._seq_len // self._block_size

    @property
    def evicted_blocks(self) -> int:
        """Sealed blocks [0, evicted_blocks) were evicted (:meth:`evict_blocks`): no pages, tier -1 in the table."""
        return self._evicted

    @property
    def tail_len(self) -> int:
        """L - num_sealed_blocks * T: positions in the model-dtype tail."""
        return self._seq_len % self._block_size

    def blocks_sealed_by(self, new_tokens: int) -> int:
        """How many blocks ``append`` of ``new_tokens`` positions would seal: (tail_len + n) // T."""
        if new_tokens < 0:
            raise ValueError(f"new_tokens: {new_tokens} is not accepted; expected >= 0")
        return (self.tail_len + int(new_tokens)) // self._block_size

    def tiers(self) -> torch.Tensor:
        """int8 [B, H, num_sealed_blocks] tier ids of the block table (CPU copy); formats.EVICTED (-1) for
        evicted blocks."""
        return self._impl.tiers()

    def pages(self) -> torch.Tensor:
        """int32 [B, H, num_sealed_blocks] page of each (b, h, block) in its tier's pool (CPU copy); -1 if evicted."""
        return self._impl.pages()

    def pool(self, tier: TierLike) -> PoolView:
        """The live pool tensors of ``tier`` (see :class:`PoolView`)."""
        parts = self._impl.pool(int(Tier.parse(tier)))
        return PoolView(*(t if t.numel() else None for t in parts))

    def tail_keys(self) -> torch.Tensor:
        """[B, H, tail_len, D] model dtype (a view of the tail)."""
        return self._impl.tail_keys()

    def tail_values(self) -> torch.Tensor:
        return self._impl.tail_values()

    # -- reading --------------------------------------------------------------------------------------------
    def block(self, index: int, dtype: Optional[Union[torch.dtype, str]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sealed block ``index`` back in ``dtype`` (default: the model dtype): K, V [B, H, T, D]."""
        return self._impl.block(int(index), None if dtype is None else _dtype_name(dtype))

    def gather(self, start: int = 0, end: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Positions [start, end) (default: all) in the model dtype: K, V [B, H, end - start, D]."""
        return self._impl.gather(int(start), self.seq_len if end is None else int(end))

    def attend(self, q: torch.Tensor, mask: Optional[torch.Tensor] = None, *, scale: Optional[float] = None,
               sliding_window: int = 0, softcap: Optional[float] = None, block_mass: bool = False):
        """Attention of q over the buffer, one block at a time in FP32 (online softmax).

        q [B, Hq, Q, D] in the model dtype: the Q newest positions, bottom-right aligned (query i is at position
        L - Q + i and sees positions <= its own). mask: optional bool [B, Q, L], True = may attend.
        scale: default 1/sqrt(D). sliding_window > 0: keys in (p - window, p]. softcap: s -> c * tanh(s / c).

        Returns (out [B, Hq, Q, D] model dtype, lse [B, Hq, Q] FP32, block_mass [B, Hq, Q, ceil(L/T)] FP32 or
        None): block_mass is the softmax probability of each block (the tail last); rows sum to 1. A query that
        may attend to nothing gets out 0, lse -inf and block mass 0.
        """
        out, lse, mass = self._impl.attend(q, mask, float(scale or 0.0), int(sliding_window), float(softcap or 0.0),
                                           bool(block_mass))
        return out, lse, (mass if block_mass else None)

    # -- writing --------------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor,
               seal_tiers: Optional[Union[torch.Tensor, TierLike]] = None) -> None:
        """Append k, v [B, H, n, D] (any float dtype; stored in the model dtype); seal every block that fills.

        seal_tiers: int8 [B, H, blocks_sealed_by(n)] tier ids, or one tier for all of them (default_tier if None).
        """
        if seal_tiers is not None and not isinstance(seal_tiers, torch.Tensor):
            seal_tiers = _tier_tensor(seal_tiers, (self.batch, self.kv_heads, self.blocks_sealed_by(k.shape[-2])),
                                      "seal_tiers")
        self._impl.append(k, v, seal_tiers)
        self._seq_len += k.shape[-2]

    def set_block_tiers(self, index: int, tiers: Union[torch.Tensor, TierLike]) -> None:
        """Re-tier sealed block ``index``: int8 [B, H] tier ids (-1 = leave as is) or one tier for all rows.

        Demotion re-quantizes from the shadow when kept, else from the page dequantized to FP32; promotion needs
        the shadow and otherwise raises RuntimeError (nothing changes).
        """
        self._impl.set_block_tiers(int(index), _tier_tensor(tiers, (self.batch, self.kv_heads), "tiers"))

    def crop(self, new_len: int) -> None:
        """Keep the first ``new_len`` positions; unsealed blocks return to the tail from the shadow when kept,
        else dequantized (lossy for integer tiers). new_len >= seq_len leaves the buffer as is."""
        self._impl.crop(int(new_len))
        if new_len < self._seq_len:
            self._seq_len = int(new_len)
            self._evicted = min(self._evicted, self._seq_len // self._block_size)

    def evict_blocks(self, count: int) -> None:
        """Release the pages (and shadow copies) of sealed blocks [0, count), for a sliding-window layer whose later
        queries cannot see them. Positions keep their numbering; reading an evicted block raises, and attention
        needs a window that keeps every query away from them. count <= evicted_blocks does nothing."""
        self._impl.evict_blocks(int(count))
        self._evicted = max(self._evicted, int(count))

    def index_batch(self, idx: torch.Tensor) -> None:
        """Keep batch rows ``idx`` (int64 [B']) in that order; repeats allowed. Pages are copied, never shared."""
        self._impl.index_batch(idx)
        self._batch = idx.numel()

    def reset(self) -> None:
        """Empty the buffer; pool capacity stays reserved."""
        self._impl.reset()
        self._seq_len = self._evicted = 0

    def memory(self) -> MemoryReport:
        return MemoryReport._from_native(dict(self._impl.memory()))

    # -- copying and pickling -------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """The buffer as options and CPU tensors, for ``pickle``, ``torch.save`` and ``copy.deepcopy``.

        Kept exactly: the block table's tiers, every held page (codes, scales, zeros), the tail, the host shadow,
        the evicted prefix. Not kept: page numbers and spare pool capacity (a restored buffer holds its live pages
        and nothing more: same ``memory()`` but ``reserved_bytes``). The buffer comes back on the device it was on.
        State: ``pages[tier]`` holds that tier's pool tensors ([n, ...] each, None where the tier has no such part),
        one entry per table entry at that tier in row-major (b, h, block) order.
        """
        tiers, pages = self.tiers(), self.pages()
        state = {"options": dict(batch=self.batch, kv_heads=self.kv_heads, head_dim=self.head_dim,
                                 block_size=self.block_size, group_size=self.group_size, dtype=self.dtype,
                                 device=str(self.device), default_tier=int(self.default_tier), shadow=self.has_shadow),
                 "tiers": tiers, "evicted": self.evicted_blocks, "pages": {},
                 "tail": (self.tail_keys().cpu().clone(), self.tail_values().cpu().clone()), "shadow": []}
        for tier in Tier:
            at_tier = tiers == int(tier)
            if bool(at_tier.any()):
                idx = pages[at_tier].to(torch.int64)
                state["pages"][int(tier)] = [None if part is None else part.index_select(0, idx.to(part.device)).cpu()
                                             for part in self.pool(tier)]
        if self.has_shadow:
            state["shadow"] = [self._impl.shadow_block(j) for j in range(self.evicted_blocks, self.num_sealed_blocks)]
        return state

    def __setstate__(self, state: dict) -> None:
        """Rebuild from :meth:`__getstate__`: seal the same blocks at the same tiers (from the shadow when kept, else
        placeholders), evict the same prefix, then write the saved pages over the new ones and append the tail."""
        o = state["options"]
        self.__init__(**o)
        tiers, evicted = state["tiers"], int(state["evicted"])
        T, n = self.block_size, tiers.shape[-1]
        shape = (self.batch, self.kv_heads, T, self.head_dim)
        placeholder = torch.zeros(shape, dtype=self.dtype, device=self.device)
        blocks = [(placeholder, placeholder)] * evicted + [(k.to(self.device), v.to(self.device)) for k, v in
                                                            state["shadow"]]
        blocks += [(placeholder, placeholder)] * (n - len(blocks))  # no shadow: pages are overwritten below
        seal = torch.where(tiers < 0, int(Tier.INT2), tiers).to(torch.int8)  # evicted: any tier, released below
        for start in range(0, n, 16):  # a few blocks per append bounds the temporary copy
            chunk = blocks[start:start + 16]
            self.append(torch.cat([k for k, _ in chunk], 2), torch.cat([v for _, v in chunk], 2),
                        seal[..., start:start + len(chunk)].contiguous())
        if evicted:
            self.evict_blocks(evicted)
        new_pages = self.pages()
        for tier, parts in state["pages"].items():
            idx = new_pages[tiers == tier].to(torch.int64)
            for live, saved in zip(self.pool(tier), parts):
                if saved is not None:
                    live.index_copy_(0, idx.to(live.device), saved.to(live.device))
        tail_k, tail_v = state["tail"]
        if tail_k.shape[2]:
            self.append(tail_k.to(self.device), tail_v.to(self.device))

    def __repr__(self) -> str:
        return (f"MixedPrecisionBuffer(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, group_size={self.group_size}, dtype={self.dtype}, "
                f"device={self.device}, default_tier={self.default_tier}, shadow={self.has_shadow}, "
                f"seq_len={self.seq_len})")
