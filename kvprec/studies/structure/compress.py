"""Compressions of a context cache, each a transform of the K/V tensors with its exact storage bytes.

A cache is a list over layers of (k, v), each [H, T, D] (KV heads, context tokens, channels). The uncompressed
reference stores every element in FP16 (2 bytes): ``dense_bytes``. Every compressed representation below stores
its numbers in FP16 as well, so a compression ratio is dense bytes over stored bytes.

* ``tucker``: per layer, K and V each replaced by a truncated HOSVD (kvprec/studies/structure/tucker.py) at ranks
  (H, r_t, r_d); bytes = 2 * tucker_numbers. Factors are fitted on the cache they compress (an oracle basis).
* ``lowrank`` (Palu-style, arXiv:2407.21118): per layer and head, x [T, D] replaced by its projection onto its top-r
  right singular vectors, x V_r V_r^T; stored as the latent x V_r [T, r] and the basis V_r [D, r]:
  bytes = 2 H r (T + D). Palu fits the basis offline into the projection weights, so storing it per sequence and
  fitting it to the cache itself are the two ways this differs: conservative in bytes, optimistic in error.
* ``drop`` (ThinK-style, arXiv:2407.21018): per layer and head, the D - r least important channels set to zero
  (an attention score q.k then ignores them; a value channel contributes nothing); stored as the r kept channels,
  [T, r], and their indices (one byte each): bytes = 2 H T r + H r. Key channel importance is ThinK's
  ||Q_c|| ||K_c|| with Q the last queries of the prompt (its observation window); value channels by ||V_c||.
* ``prune``: the cache of chosen layers or (layer, KV head) pairs set to zero and stored in 0 bytes. A zero key
  scores 0 against every query and a zero value adds nothing, so the pruned positions keep a share of the softmax
  but carry no information.

Each transform takes ``which`` in {"kv", "k", "v"}: compress both tensors or only keys or only values (the other
stays dense and is counted at FP16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .tucker import HOSVD, hosvd, mode_ranks, tucker_numbers

KV = List[Tuple[torch.Tensor, torch.Tensor]]
FP16_BYTES = 2
WHICH = ("kv", "k", "v")


def dense_bytes(kv: KV) -> int:
    """FP16 bytes of every K and V element of the cache."""
    return sum(FP16_BYTES * (k.numel() + v.numel()) for k, v in kv)


def tensor_bytes(x: torch.Tensor) -> int:
    return FP16_BYTES * x.numel()


def _check_which(which: str) -> str:
    if which not in WHICH:
        raise ValueError(f"which: {which!r} is not accepted; use one of {', '.join(WHICH)}")
    return which


@dataclass
class Compressed:
    """A transformed cache and its stored bytes (``kv_bytes``) beside the dense FP16 bytes."""

    kv: KV
    kv_bytes: int
    dense: int
    params: Dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.dense / self.kv_bytes if self.kv_bytes else math.inf


def _params(which: str, **settings) -> Dict[str, object]:
    """The settings of the tensors ``which`` compresses (keys ending in _k / _v)."""
    return {k: v for k, v in settings.items() if k[-1] in which}


def _apply(kv: KV, which: str, fk, fv, layers: Optional[Sequence[int]] = None) -> Compressed:
    """fk / fv: (layer, x) -> (x', bytes). Layers outside ``layers`` (None: all) stay dense."""
    _check_which(which)
    out, total = [], 0
    for i, (k, v) in enumerate(kv):
        if layers is not None and i not in layers:
            out.append((k, v))
            total += tensor_bytes(k) + tensor_bytes(v)
            continue
        k2, kb = fk(i, k) if which in ("kv", "k") else (k, tensor_bytes(k))
        v2, vb = fv(i, v) if which in ("kv", "v") else (v, tensor_bytes(v))
        out.append((k2, v2))
        total += kb + vb
    return Compressed(out, total, dense_bytes(kv))


# ---- Tucker --------------------------------------------------------------------------------------------------

class TuckerCache:
    """The full HOSVD of every layer's K and V, computed once; truncations at any ranks from it.

    Ranks are the same for every layer: (H, r_t, r_d), the head mode whole; for a target ratio, every (r_t, r_d) of
    :func:`tucker.mode_ranks` is tried and the pair with the least mean relative error over the layers among those
    that compress at least that much is taken (ties: fewer numbers)."""

    def __init__(self, kv: KV):
        self.kv = kv
        self.k = [hosvd(k) for k, _ in kv]
        self.v = [hosvd(v) for _, v in kv]
        self.shape = tuple(kv[0][0].shape)
        self.token_ranks = mode_ranks(self.shape, 1)
        self.channel_ranks = mode_ranks(self.shape, 2)
        self._errors = {}

    def decomposition(self, layer: int, kind: str) -> HOSVD:
        return (self.k if kind == "k" else self.v)[layer]

    def errors(self, kind: str) -> torch.Tensor:
        """FP64 [len(token_ranks), len(channel_ranks)]: mean over layers of the relative error of keys ("k") or
        values ("v") at ranks (H, r_t, r_d)."""
        if kind not in self._errors:
            hs = self.k if kind == "k" else self.v
            self._errors[kind] = torch.stack([h.error_table(self.token_ranks, self.channel_ranks) for h in hs]).mean(0)
        return self._errors[kind]

    def numbers(self) -> torch.Tensor:
        """int64 [len(token_ranks), len(channel_ranks)]: numbers stored per layer and tensor at each rank pair."""
        h = self.shape[0]
        return torch.tensor([[tucker_numbers(self.shape, (h, rt, rd)) for rd in self.channel_ranks]
                             for rt in self.token_ranks], dtype=torch.int64)

    def ranks_for(self, kind: str, ratio: float) -> Tuple[int, int, int]:
        """The ranks for ``ratio`` (class docstring); ValueError when no ranks compress that much."""
        numbers = self.numbers().double()
        fits = numbers * ratio <= math.prod(self.shape)
        if not bool(fits.any()):
            raise ValueError(f"tucker: no ranks of {self.shape} compress {ratio}x")
        err = torch.where(fits, self.errors(kind), torch.full_like(numbers, math.inf))
        best = err.min()
        i, j = min(((int(a), int(b)) for a, b in torch.nonzero(err <= best + 1e-12)),
                   key=lambda ij: (int(numbers[ij]), ij))
        return (self.shape[0], self.token_ranks[i], self.channel_ranks[j])

    def apply(self, ranks_k, ranks_v, which: str = "kv", layers: Optional[Sequence[int]] = None) -> Compressed:
        def f(kind, ranks):
            def go(i, x):
                h = self.decomposition(i, kind)
                return h.reconstruct(ranks).to(x.dtype), FP16_BYTES * tucker_numbers(x.shape, ranks)
            return go
        c = _apply(self.kv, which, f("k", ranks_k), f("v", ranks_v), layers)
        c.params = _params(which, ranks_k=list(ranks_k), ranks_v=list(ranks_v))
        return c


# ---- channels ------------------------------------------------------------------------------------------------

def lowrank_bytes(shape, r: int) -> int:
    h, t, d = shape
    return FP16_BYTES * h * r * (t + d)


def drop_bytes(shape, r: int) -> int:
    h, t, d = shape
    return FP16_BYTES * h * t * r + h * r


def channel_rank_for(shape, ratio: float, bytes_of) -> int:
    """The largest r in 1..D with bytes_of(shape, r) * ratio <= dense FP16 bytes; ValueError if none."""
    dense = FP16_BYTES * math.prod(shape)
    fits = [r for r in range(1, shape[-1] + 1) if bytes_of(shape, r) * ratio <= dense]
    if not fits:
        raise ValueError(f"no channel rank of {tuple(shape)} compresses {ratio}x")
    return max(fits)


def lowrank_project(x: torch.Tensor, r: int) -> torch.Tensor:
    """x [H, T, D] projected per head onto its top-r right singular vectors (computed in FP64)."""
    xd = x.double()
    _, _, vh = torch.linalg.svd(xd, full_matrices=False)  # vh [H, min(T, D), D]
    basis = vh[:, :r].transpose(-1, -2)  # [H, D, r]
    return (xd @ basis @ basis.transpose(-1, -2)).to(x.dtype)


def lowrank(kv: KV, r_k: int, r_v: int, which: str = "kv", layers: Optional[Sequence[int]] = None) -> Compressed:
    c = _apply(kv, which, lambda i, x: (lowrank_project(x, r_k), lowrank_bytes(x.shape, r_k)),
               lambda i, x: (lowrank_project(x, r_v), lowrank_bytes(x.shape, r_v)), layers)
    c.params = _params(which, rank_k=r_k, rank_v=r_v)
    return c


def keep_channels(x: torch.Tensor, scores: torch.Tensor, r: int) -> torch.Tensor:
    """x [H, T, D] with all but the r highest-scoring channels of each head (scores [H, D]) set to zero."""
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(r, dim=-1).indices, True)
    return x * keep[:, None, :].to(x.dtype)


def key_channel_scores(k: torch.Tensor, query_norms: torch.Tensor) -> torch.Tensor:
    """ThinK's key channel importance [H, D]: ||Q_c|| ||K_c||, query_norms [H, D] the channel norms of the
    observation-window queries of each KV head's group."""
    return query_norms.double() * k.double().norm(dim=-2)


def value_channel_scores(v: torch.Tensor) -> torch.Tensor:
    """Value channel importance [H, D]: ||V_c|| over the tokens."""
    return v.double().norm(dim=-2)


def drop(kv: KV, r_k: int, r_v: int, query_norms: Sequence[torch.Tensor], which: str = "kv",
         layers: Optional[Sequence[int]] = None) -> Compressed:
    """query_norms[layer]: [H, D] (see :func:`key_channel_scores`)."""
    c = _apply(kv, which,
               lambda i, x: (keep_channels(x, key_channel_scores(x, query_norms[i]), r_k), drop_bytes(x.shape, r_k)),
               lambda i, x: (keep_channels(x, value_channel_scores(x), r_v), drop_bytes(x.shape, r_v)), layers)
    c.params = _params(which, rank_k=r_k, rank_v=r_v)
    return c


# ---- pruning -------------------------------------------------------------------------------------------------

def prune_count(fraction: float, n_heads: int) -> int:
    """Heads in a chosen pruning set: ``fraction`` of all (layer, KV head) pairs, at least one."""
    return max(1, int(round(fraction * n_heads)))


def lowest_heads(scores, count: int) -> List[Tuple[int, int]]:
    """The ``count`` (layer, KV head) pairs of lowest ``scores`` [L, H] (numpy; ties: lower index first)."""
    order = np.argsort(scores, axis=None, kind="stable")[:count]
    return [tuple(int(x) for x in np.unravel_index(i, scores.shape)) for i in order]


def prune(kv: KV, layers: Sequence[int] = (), heads: Sequence[Tuple[int, int]] = ()) -> Compressed:
    """Zero the cache of every layer in ``layers`` and every (layer, KV head) in ``heads``; they store 0 bytes."""
    n = len(kv)
    for layer in layers:
        if not 0 <= layer < n:
            raise ValueError(f"prune: layer {layer} is not in 0..{n - 1}")
    for layer, head in heads:
        if not 0 <= layer < n or not 0 <= head < kv[layer][0].shape[0]:
            raise ValueError(f"prune: head {layer}:{head} is not a (layer, KV head) of this cache "
                             f"({n} layers, {kv[0][0].shape[0]} KV heads)")
    out, total = [], 0
    for i, (k, v) in enumerate(kv):
        gone = torch.zeros(k.shape[0], dtype=torch.bool)
        if i in layers:
            gone[:] = True
        for layer, head in heads:
            if layer == i:
                gone[head] = True
        keep = (~gone).to(k.dtype)[:, None, None]
        out.append((k * keep, v * keep))
        total += int((~gone).sum()) * (k[0].numel() + v[0].numel()) * FP16_BYTES
    return Compressed(out, total, dense_bytes(kv), {"layers": list(layers), "heads": [list(h) for h in heads]})
