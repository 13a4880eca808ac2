"""Pure-torch attention references: over a MixedPrecisionBuffer one block at a time, and dense over K/V tensors.

Both compute, per query head h (KV head h // (Hq / Hkv), GQA without repeating K/V), in FP32:

    s_t = scale * q . k_t                  (scale = 1/sqrt(D) when 0)
    s_t = c * tanh(s_t / c)                (softcap c > 0, Gemma 2)
    s_t = -inf where t is not allowed      (causal, sliding window, mask)
    out = sum_t softmax(s)_t v_t,  lse = log sum_t exp(s_t)

A query row with no allowed key gets out = 0 and lse = -inf (as torch's SDPA), so that left-padding rows
never turn into NaN that would leak into later layers through V.

:func:`attend_blocks` is the oracle of the native ``attend`` and the instrumented "reference" backend of the
kvprec attention function: it reads sealed block i with ``buffer.block(i)`` and the tail, one at a time, and
combines them with an online softmax (flash-decoding), so at most one dequantized block is alive per layer;
blocks that no query's sliding window reaches are not read at all.
A :class:`ReadCounter` proves it: it counts block reads and, through weak references, how many dequantized
blocks were alive at once. (The block loop itself is kvprec/ops/reference/decode_attention.py: one reference.)
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ReadCounter:
    """Instrumentation of :func:`attend_blocks`: calls, blocks read (tail included) and the most dequantized
    blocks alive at the same time during one call."""

    calls: int = 0
    blocks_read: int = 0
    max_live_blocks: int = 0

    def on_read(self, earlier: list, k: torch.Tensor, v: torch.Tensor) -> None:
        live = sum(any(ref() is not None for ref in pair) for pair in earlier) + 1
        self.blocks_read += 1
        self.max_live_blocks = max(self.max_live_blocks, live)
        earlier.append((weakref.ref(k), weakref.ref(v)))


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int) -> torch.Tensor:
    """bool [Q, t]: causal (key at or before the query) and within the window (p - window, p]."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window > 0:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return allowed


def attend_blocks(buffer, q: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: float = 0.0,
                  sliding_window: int = 0, softcap: float = 0.0, block_mass: bool = False,
                  counter: Optional[ReadCounter] = None):
    """Attention of q [B, Hq, Q, D] (the Q newest positions, bottom-right causal) over ``buffer``.

    mask: optional bool [B, Q, N] (True = may attend). Returns (out [B, Hq, Q, D] in q's dtype, lse FP32
    [B, Hq, Q], block_mass FP32 [B, Hq, Q, ceil(N / T)] or an empty tensor), like the native ``attend``.
    The one block-by-block reference, :func:`kvprec.ops.reference.decode_attention.decode_attention`, runs over the
    buffer's live pools (no copy); ``counter`` counts its block reads.
    """
    from . import PagedKV
    from .decode_attention import decode_attention

    on_read = None
    if counter is not None:
        counter.calls += 1
        earlier: list = []
        on_read = lambda k, v: counter.on_read(earlier, k, v)  # noqa: E731
    out, lse, mass = decode_attention(q, PagedKV.from_buffer(buffer), scale=scale or None, mask=mask,
                                      sliding_window=sliding_window, softcap=softcap, block_mass=block_mass,
                                      on_read=on_read)
    return out, lse, mass if mass is not None else torch.empty(0, device=q.device)


def attend_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 scale: float = 0.0, sliding_window: int = 0, softcap: float = 0.0, causal: str = "bottom_right"):
    """Dense attention of q [B, Hq, Q, D] over k, v [B, Hkv, N, D], FP32 inside.

    mask: optional bool [B, Q, N]. causal: "bottom_right" (query i at position N - Q + i, the cache's
    convention), "top_left" (query i at position i: what SDPA's is_causal does) or "none".
    Returns (out [B, Hq, Q, D] in q's dtype, lse FP32 [B, Hq, Q], weights [B, Hq, Q, N] in q's dtype).
    """
    b, hq, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} KV heads")
    g = hq // hkv
    scale = scale or 1.0 / math.sqrt(d)
    s = torch.einsum("bhgqd,bhtd->bhgqt", q.float().reshape(b, hkv, g, nq, d) * scale, k.float())
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    k_pos = torch.arange(n, device=q.device)
    if causal == "none":
        allowed = torch.ones(nq, n, dtype=torch.bool, device=q.device)
        if sliding_window > 0:
            raise ValueError("attention: a sliding window needs causal positions")
    else:
        offset = n - nq if causal == "bottom_right" else 0
        allowed = _allowed(torch.arange(offset, offset + nq, device=q.device), k_pos, sliding_window)
    allowed = allowed[None, None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    weights = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
    out = torch.einsum("bhgqt,bhtd->bhgqd", weights, v.float())
    return (out.reshape(b, hq, nq, d).to(q.dtype), lse.reshape(b, hq, nq),
            weights.reshape(b, hq, nq, n).to(q.dtype))
