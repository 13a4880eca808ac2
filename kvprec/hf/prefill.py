"""Prefill attention over an AdaptiveLayer with torch's fused SDPA kernel, part by part, merged by log-sum-exp.

A prefill chunk (query length Q >= :data:`MIN_QUERIES`) through the block kernel (``MixedPrecisionBuffer.attend``)
costs what a matrix-vector loop costs per query. Here the chunk reads the same stored K/V through torch's GEMM-based
flash-attention CPU kernel. bench/bench_prefill_attention.py, at SmolLM2-135M-Instruct's heads (9 query / 3 KV,
head_dim 64), Q = 1024 after 3072 or 7168 positions, FP32 model, 1 thread: the split takes 0.67-0.72x the block
kernel's time (FP32 and INT4 blocks) and 0.80-0.90x what DynamicCache's attention takes (SDPA over dense K/V with
the causal mask). Below Q = 64-128 (FP32 blocks) or 256 (INT4) the block kernel is faster: ``buffer.gather`` of the
past (integer blocks are dequantized block by block) then costs more than the kernel's reads.

How:

* the positions are cut into parts: the earlier positions [e0, s0) (s0 = N - Q, the chunk's first position; e0
  the first one any query's window reaches and not evicted) in segments of :data:`SEGMENT` positions, then the
  chunk's own positions [s0, N);
* each part is read back with ``buffer.gather`` — what the cache stores, in the model dtype: integer blocks
  dequantized, FP blocks as stored, the tail exact. So the chunk attends to its own sealed blocks at their tiers,
  as the block kernel does (not at full precision as transformers' QuantizedCache does for its residual), and FP32
  tiers hold the model's K/V bit for bit, so they stay token-exact against DynamicCache;
* ``aten._scaled_dot_product_flash_attention_for_cpu`` (GQA native, is_causal top-left: the chunk's own part is
  square, so that is the cache's bottom-right causality) gives each part's out_p [B, Hq, Q, D] and lse_p
  [B, Hq, Q]; they merge as

      M = max_p lse_p;  w_p = exp(lse_p - M);  out = sum_p w_p out_p / sum_p w_p;  lse = M + log sum_p w_p

  (:func:`merge`; the C++ kernel's split merge, csrc/core/attention_cpu.cpp, is the same formula over its
  (m, l, acc) states, inside the kernel).

Masks: the structural one (causal in the chunk's part, the sliding window where it bites) and the HF mask
([B, Q, N] bool) are combined per part; a part whose combined mask is all True (or exactly causal) runs without
one, else with an additive mask. A query row with no allowed key in a part contributes nothing (the flash kernel
gives lse 0 there, so it is set to -inf); a row with no allowed key at all gets out 0 and lse -inf, as the block
kernel. Softcap (SDPA has none), block mass (for the policies that read it) and short query lengths (a gather of
the whole past for a few queries costs more than the block kernel reads) stay on the block kernel: :func:`applies`.
At most SEGMENT positions of earlier K/V are dequantized at once per layer.
"""
from __future__ import annotations

from typing import Optional

import torch

#: query lengths from which a CPU prefill chunk takes this path (below: the block kernel, faster there; see the
#: module docstring)
MIN_QUERIES = 256
#: earlier positions gathered and attended at once (bounds the dequantized copy alive per layer)
SEGMENT = 4096


def applies(q: torch.Tensor, softcap: float, block_mass: bool) -> bool:
    """Whether queries ``q`` [B, Hq, Q, D] on the CPU take the split path (see the module docstring)."""
    return q.device.type == "cpu" and q.shape[2] >= MIN_QUERIES and not softcap and not block_mass


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two attentions of the same queries over disjoint key sets: out [B, H, Q, D], lse FP32 [B, H, Q]
    (-inf: no key; its out is ignored). Returns (out FP32, lse FP32) of the attention over the union."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, 0.0)  # both -inf: weights 0, lse -inf below
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    out = (out_a.float() * w_a[..., None] + out_b.float() * w_b[..., None]) / total.clamp_min(1e-30)[..., None]
    return out, m + torch.log(total)


def _part_mask(hf: Optional[torch.Tensor], a: int, b: int, s0: int, nq: int, window: int, device):
    """(bool mask [B|1, Q, b - a] or None for all allowed, is_causal) of keys [a, b) for queries s0 .. s0 + nq - 1."""
    causal = a >= s0  # the chunk's own part: b - a == nq, query i sees keys j <= i
    structural = None
    if causal:
        structural = torch.ones(nq, b - a, dtype=torch.bool, device=device).tril()
    if window and a <= s0 + nq - 1 - window:  # the last query's window starts after key a
        q_pos = torch.arange(s0, s0 + nq, device=device)[:, None]
        k_pos = torch.arange(a, b, device=device)[None, :]
        inside = k_pos > q_pos - window
        structural = inside if structural is None else structural & inside
    if hf is not None:
        part = hf[:, :, a:b]
        if structural is None:
            if not bool(part.all()):
                return part, False
        elif not bool((part | ~structural).all()):  # the HF mask hides something the structure allows
            return part & structural, False
    if structural is None:
        return None, False
    if causal and not (window and a <= s0 + nq - 1 - window):
        return None, True
    return structural[None], False


def _attend_part(q, k, v, mask: Optional[torch.Tensor], is_causal: bool, scale: float):
    """SDPA of q over one part: (out [B, Hq, Q, D] in q's dtype, lse FP32 [B, Hq, Q], -inf where nothing allowed)."""
    attn_mask = None
    if mask is not None:
        attn_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        attn_mask = attn_mask[:, None]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale or None)
    if mask is not None:
        empty = ~mask.any(-1)[:, None]  # [B|1, 1, Q]
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def attend_split(layer, q: torch.Tensor, mask: Optional[torch.Tensor], scale: float, sliding_window: int):
    """Attention of q [B, Hq, Q, D] (the Q newest positions of ``layer``, keys stored as q expects: rotate q first
    when the layer rotates keys) over the layer's buffer, by parts (module docstring). The output is over the values
    as stored: the caller rotates it back when the layer rotates values (``AdaptiveLayer.attend``).

    mask: bool [B, Q, N] (True = may attend) or None. Returns (out [B, Hq, Q, D] in q's dtype, lse FP32 [B, Hq, Q],
    an empty block-mass tensor), as ``AdaptiveLayer.attend``."""
    buffer = layer.buffer
    n, nq = buffer.seq_len, q.shape[2]
    s0 = n - nq
    e0 = layer.evicted_blocks * buffer.block_size
    if sliding_window:
        e0 = max(e0, s0 - sliding_window + 1)
    e0 = min(max(e0, 0), s0)
    bounds = [(a, min(a + SEGMENT, s0)) for a in range(e0, s0, SEGMENT)] + [(s0, n)]
    out = lse = None
    for a, b in bounds:
        part_mask, is_causal = _part_mask(mask, a, b, s0, nq, sliding_window, q.device)
        k, v = buffer.gather(a, b)
        o, l = _attend_part(q, k, v, part_mask, is_causal, scale)
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
    return out.to(q.dtype), lse, torch.empty(0, device=q.device)
