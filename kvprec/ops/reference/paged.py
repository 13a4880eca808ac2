"""PagedKV: the tensors a decode-attention kernel reads, detached from the buffer object that owns them.

One layer's cache as the kernels see it (docs/design.md, "Data layout of the cache"; csrc/include/kvprec/buffer.h):

* ``pools[tier] = (k, k_scale, k_zero, v, v_scale, v_zero)``, one paged pool per tier present:
  float tiers ``k, v [P, T, D]`` in the tier dtype, metadata None;
  integer tiers ``k, v`` uint8 ``[P, T, D*bits/8]``, ``k_scale, k_zero`` FP16 ``[P, D]``,
  ``v_scale, v_zero`` FP16 ``[P, T, D/G]`` (the formats of :mod:`kvprec.storage.formats`);
* the block table ``tiers`` int8 ``[B, Hkv, NB]`` and ``pages`` int32 ``[B, Hkv, NB]``: sealed block j of
  (b, h) is page ``pages[b, h, j]`` of pool ``tiers[b, h, j]``;
* the unsealed tail ``tail_k, tail_v [B, Hkv, TL, D]`` in the model dtype, ``0 <= TL < T``;
* ``evicted_blocks`` E: blocks [0, E) were evicted by a sliding-window layer (tier ``formats.EVICTED`` = -1,
  page -1, no data); positions keep their numbering, and attention must use a window that skips them.

Positions 0..N-1 (N = NB*T + TL): sealed blocks first, then the tail.

:meth:`PagedKV.from_dense` builds one from dense K/V and a tier map (tests, benchmarks) by quantizing every
block with :mod:`kvprec.ops.reference.quantize`; :meth:`PagedKV.from_buffer` wraps a live
:class:`~kvprec.storage.buffer.MixedPrecisionBuffer` without copying its pools.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from ...storage import formats
from . import quantize as quantize_ref
from ...storage.formats import QuantizedBlock, Tier

Pool = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
             Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass
class PagedKV:
    """Paged pools per tier, block table and tail of one layer (shapes in the module docstring)."""

    pools: Dict[Tier, Pool]
    tiers: torch.Tensor
    pages: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    block_size: int
    group_size: int
    #: the pools and block table come from a MixedPrecisionBuffer (:meth:`from_buffer`), which keeps them
    #: consistent: :meth:`validate` then checks only the tail, which is what changes between decode steps
    buffer_owned: bool = False
    evicted_blocks: int = 0

    # -- geometry ---------------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.tail_k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.tail_k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.tail_k.shape[3]

    @property
    def num_blocks(self) -> int:
        """NB, sealed blocks."""
        return self.tiers.shape[2]

    @property
    def tail_len(self) -> int:
        return self.tail_k.shape[2]

    @property
    def seq_len(self) -> int:
        """N = NB * T + TL."""
        return self.num_blocks * self.block_size + self.tail_len

    @property
    def device(self) -> torch.device:
        return self.tail_k.device

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency between pools, block table and tail (only the tail for
        a view of a buffer, ``buffer_owned``)."""
        b, h, tl, d = self.tail_k.shape if self.tail_k.dim() == 4 else (None,) * 4
        if b is None or self.tail_v.shape != self.tail_k.shape:
            raise ValueError(f"PagedKV: tail_k and tail_v must both be [B, Hkv, TL, D], got "
                             f"{tuple(self.tail_k.shape)} and {tuple(self.tail_v.shape)}")
        t, g = self.block_size, self.group_size
        formats.BlockGeometry(t, d, g)  # raises on a bad block size / head_dim / group size
        if tl >= t:
            raise ValueError(f"PagedKV: tail_len {tl} must be < block_size {t} (a full tail is a sealed block)")
        if self.buffer_owned:
            return
        if self.tiers.dim() != 3 or tuple(self.tiers.shape[:2]) != (b, h) or self.tiers.dtype != torch.int8:
            raise ValueError(f"PagedKV: tiers must be int8 [B={b}, Hkv={h}, NB], got {self.tiers.dtype} "
                             f"{tuple(self.tiers.shape)}")
        if self.pages.shape != self.tiers.shape or self.pages.dtype != torch.int32:
            raise ValueError(f"PagedKV: pages must be int32 with the shape of tiers {tuple(self.tiers.shape)}, got "
                             f"{self.pages.dtype} {tuple(self.pages.shape)}")
        for tier, pool in self.pools.items():
            tier = Tier.parse(tier)
            k, ks, kz, v, vs, vz = pool
            width = d * tier.bits // 8 if tier.is_integer else d
            dtype = torch.uint8 if tier.is_integer else tier.float_dtype
            for name, x in (("k", k), ("v", v)):
                if x is None or x.dim() != 3 or tuple(x.shape[1:]) != (t, width) or x.dtype != dtype:
                    raise ValueError(f"PagedKV: pool {tier} {name} must be {dtype} [P, {t}, {width}], got "
                                     f"{None if x is None else (x.dtype, tuple(x.shape))}")
            if k.shape[0] != v.shape[0]:
                raise ValueError(f"PagedKV: pool {tier} k and v hold different page counts")
            if tier.is_integer:
                want = {"k_scale": (ks, (d,)), "k_zero": (kz, (d,)), "v_scale": (vs, (t, d // g)),
                        "v_zero": (vz, (t, d // g))}
                for name, (x, shape) in want.items():
                    if x is None or x.dtype != torch.float16 or tuple(x.shape) != (k.shape[0], *shape):
                        raise ValueError(f"PagedKV: pool {tier} {name} must be float16 [P, {', '.join(map(str, shape))}]"
                                         f", got {None if x is None else (x.dtype, tuple(x.shape))}")
        e = self.evicted_blocks
        if not 0 <= e <= self.tiers.shape[2]:
            raise ValueError(f"PagedKV: evicted_blocks {e} must lie in [0, NB={self.tiers.shape[2]}]")
        if self.tiers.device.type == "cpu" and self.tiers.numel():
            # Only a host table is checked: on a GPU this would be a synchronisation per call.
            if bool((self.tiers[..., :e] != formats.EVICTED).any()) or bool((self.tiers[..., e:] < 0).any()):
                raise ValueError(f"PagedKV: tier {formats.EVICTED} (evicted) must fill exactly blocks [0, "
                                 f"evicted_blocks={e}) of the table")
            for tid in torch.unique(self.tiers[..., e:]).tolist():
                tier = Tier.parse(int(tid))
                if tier not in self.pools:
                    raise ValueError(f"PagedKV: the block table uses tier {tier} but there is no {tier} pool")
                used = self.pages[..., e:][self.tiers[..., e:] == tid]
                cap = self.pools[tier][0].shape[0]
                if used.min().item() < 0 or used.max().item() >= cap:
                    raise ValueError(f"PagedKV: pages of tier {tier} must lie in [0, {cap}), got "
                                     f"[{used.min().item()}, {used.max().item()}]")

    # -- reading ----------------------------------------------------------------------------------------------
    def block(self, index: int, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sealed block ``index`` of every (b, h), dequantized through kvprec.ops.reference.quantize: K, V [B, Hkv, T, D].

        Rows are grouped by tier so each tier is dequantized with one batched call."""
        if index < self.evicted_blocks:
            raise ValueError(f"PagedKV.block: block {index} was evicted (blocks 0..{self.evicted_blocks - 1})")
        b, h, d, t = self.batch, self.kv_heads, self.head_dim, self.block_size
        tiers = self.tiers[:, :, index].reshape(-1).to(self.device)
        pages = self.pages[:, :, index].reshape(-1).to(self.device).long()
        k_out = torch.empty(b * h, t, d, dtype=dtype, device=self.device)
        v_out = torch.empty_like(k_out)
        for tid in torch.unique(tiers).tolist():
            tier = Tier(int(tid))
            rows = (tiers == tid).nonzero().squeeze(1)
            kc, ks, kz, vc, vs, vz = self.pools[tier]
            p = pages[rows]
            pick = (lambda x: None if x is None else x[p])
            k_out[rows] = quantize_ref.dequantize_keys(QuantizedBlock(kc[p], pick(ks), pick(kz)), tier, d, dtype)
            v_out[rows] = quantize_ref.dequantize_values(QuantizedBlock(vc[p], pick(vs), pick(vz)), tier, d,
                                                    self.group_size, dtype)
        return k_out.reshape(b, h, t, d), v_out.reshape(b, h, t, d)

    def dense(self, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """All N positions dequantized: K, V [B, Hkv, N, D] in ``dtype`` (for tests; materialises everything).
        Evicted blocks read as zeros."""
        ks, vs = [], []
        for j in range(self.num_blocks):
            if j < self.evicted_blocks:
                zero = torch.zeros(self.batch, self.kv_heads, self.block_size, self.head_dim, dtype=dtype,
                                   device=self.device)
                ks.append(zero)
                vs.append(zero)
                continue
            k, v = self.block(j, dtype)
            ks.append(k)
            vs.append(v)
        ks.append(self.tail_k.to(dtype))
        vs.append(self.tail_v.to(dtype))
        return torch.cat(ks, 2), torch.cat(vs, 2)

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, k: torch.Tensor, v: torch.Tensor, tiers: Union[torch.Tensor, Tier, str, int],
                   block_size: int = 64, group_size: int = 32, spare_pages: int = 1,
                   generator: Optional[torch.Generator] = None) -> "PagedKV":
        """Quantize dense ``k, v [B, Hkv, N, D]`` into pools: block j of (b, h) at tier ``tiers[b, h, j]``.

        tiers: int8 [B, Hkv, N // T] tier ids, or one tier for every block. The last N % T positions stay in
        the tail, in k's dtype. Pages are laid out in a random order (``generator``) and each pool gets
        ``spare_pages`` unused pages, so that a kernel which ignores the page indirection reads wrong data.
        """
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"from_dense: k and v must both be [B, Hkv, N, D], got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        b, h, n, d = k.shape
        t = block_size
        formats.BlockGeometry(t, d, group_size)
        nb = n // t
        if not isinstance(tiers, torch.Tensor):
            tiers = torch.full((b, h, nb), int(Tier.parse(tiers)), dtype=torch.int8)
        tiers = tiers.to(torch.int8).cpu()
        if tuple(tiers.shape) != (b, h, nb):
            raise ValueError(f"from_dense: tiers must be [B={b}, Hkv={h}, NB={nb}], got {tuple(tiers.shape)}")
        kb = k[:, :, :nb * t].reshape(b, h, nb, t, d)
        vb = v[:, :, :nb * t].reshape(b, h, nb, t, d)
        pages = torch.zeros(b, h, nb, dtype=torch.int32)
        pools: Dict[Tier, Pool] = {}
        for tid in torch.unique(tiers).tolist():
            tier = Tier(int(tid))
            where = (tiers == tid).nonzero()  # [n_used, 3] (b, h, j)
            used = where.shape[0]
            cap = used + spare_pages
            order = torch.randperm(cap, generator=generator)[:used]
            sel = (where[:, 0].to(k.device), where[:, 1].to(k.device), where[:, 2].to(k.device))
            qk = quantize_ref.quantize_keys(kb[sel], tier)
            qv = quantize_ref.quantize_values(vb[sel], tier, group_size)
            pool = []
            for part in (qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero):
                if part is None:
                    pool.append(None)
                    continue
                full = torch.zeros((cap, *part.shape[1:]), dtype=part.dtype, device=k.device)
                full[order.to(k.device)] = part
                pool.append(full)
            pools[tier] = tuple(pool)
            pages[where[:, 0], where[:, 1], where[:, 2]] = order.to(torch.int32)
        paged = cls(pools, tiers.to(k.device), pages.to(k.device), k[:, :, nb * t:].clone(),
                    v[:, :, nb * t:].clone(), t, group_size)
        paged.validate()
        return paged

    @classmethod
    def from_buffer(cls, buffer) -> "PagedKV":
        """The live pools, block table and tail of a :class:`~kvprec.storage.buffer.MixedPrecisionBuffer` (no pool copy;
        the block table, a host copy in the buffer, is moved to the buffer's device)."""
        pools: Dict[Tier, Pool] = {}
        for tier in Tier:
            view = buffer.pool(tier)
            if view.k is not None:
                pools[tier] = tuple(view)
        device = buffer.device
        return cls(pools, buffer.tiers().to(device), buffer.pages().to(device), buffer.tail_keys(),
                   buffer.tail_values(), buffer.block_size, buffer.group_size, buffer_owned=True,
                   evicted_blocks=buffer.evicted_blocks)
