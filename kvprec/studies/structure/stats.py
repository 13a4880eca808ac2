"""Layer, head, token and channel statistics of a captured cache (pure torch, no model).

Shapes: one layer's keys or values x [H, T, D] (KV heads, tokens, channels); queries q [Hq, Q, D] (Hq a multiple
of H, grouped as transformers' repeat_kv does: query head j reads KV head j // (Hq / H)).

Formulas:

* effective rank of a matrix with singular values s_i (Roy and Vetterli 2007): erank = exp(-sum p_i log p_i),
  p_i = s_i / sum s; a rank-r matrix with r equal singular values has erank r, any rank-r matrix erank <= r;
* energy rank at f: the smallest k with sum_{i<=k} s_i^2 >= f sum s_i^2;
* magnitude sparsity at t: the fraction of entries with |x| < t * RMS(x) (RMS over the layer's tensor), so layers
  of different scale compare; the top-10% energy share: the part of sum x^2 held by the largest 10% of |x|;
* attention of query i at position p_i over the n_i positions it may see (causal, window): normalised entropy
  H_i / log n_i (1 = uniform, 0 = one position), the 90%-mass fraction (fewest positions holding 90% of the
  weight, over n_i), the sink mass (weight on positions 0..3), the recent mass (weight on the last 32 positions
  p_i - 31 .. p_i), the received attention of position t (its weight summed over the queries that see it, over
  their number) and the recency profile (mean weight at distance d = p_i - t over the queries with p_i >= d);
* channel magnitude m_c = mean_t |x_tc|; outlier ratio max_c m_c / median_c m_c; top-k frequency of channel c:
  the fraction of tokens whose k largest |x_tc| include c (k = max(1, D / 16)); a channel set that is the same for
  every token has frequencies 1 on k channels, a random one k / D everywhere;
* quantization error: ||x - deq(quant(x))|| / ||x|| over blocks of B tokens with kvprec's reference quantizer
  (kvprec/ops/reference/quantize.py), per channel within the block (kvprec's key layout) or per token with one
  group of D channels (its value layout, with the group spanning the head).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

from ...ops.reference.attention import attend_dense
from ...ops.reference.quantize import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from ...storage.formats import Tier

SPARSITY_THRESHOLDS = (0.01, 0.05, 0.1, 0.25)
SINK_POSITIONS = 4
RECENT_POSITIONS = 32


# ---- matrices ------------------------------------------------------------------------------------------------

def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised singular values) of each matrix x [..., n, d] (0 for a zero matrix)."""
    s = torch.linalg.svdvals(x.double())
    total = s.sum(-1, keepdim=True)
    p = torch.where(total > 0, s / total.clamp_min(1e-300), torch.zeros_like(s))
    entropy = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy))


def energy_rank(x: torch.Tensor, fraction: float = 0.9) -> torch.Tensor:
    """Smallest k with the top-k singular values holding ``fraction`` of sum s^2, per matrix x [..., n, d]."""
    s2 = torch.linalg.svdvals(x.double()).pow(2)
    cum = s2.cumsum(-1)
    return (cum < fraction * cum[..., -1:]).sum(-1) + 1


def magnitude_sparsity(x: torch.Tensor, thresholds: Sequence[float] = SPARSITY_THRESHOLDS) -> torch.Tensor:
    """FP64 [len(thresholds)]: fraction of entries of x with |x| < t * RMS(x)."""
    a = x.double().abs().flatten()
    rms = a.pow(2).mean().sqrt()
    return torch.stack([(a < t * rms).double().mean() for t in thresholds])


def top_energy_share(x: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of sum x^2 held by the largest ``fraction`` of the entries by magnitude."""
    e = x.double().pow(2).flatten()
    k = max(1, int(round(fraction * e.numel())))
    total = float(e.sum())
    return float(e.topk(k).values.sum()) / total if total > 0 else 0.0


def layer_statistics(x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Statistics of one layer's keys or values x [H, T, D] (module docstring); per-head entries are [H]."""
    norms = x.double().norm(dim=-1)  # [H, T]
    return {
        "sparsity": magnitude_sparsity(x),
        "top10_share": torch.tensor(top_energy_share(x), dtype=torch.float64),
        "erank": effective_rank(x),
        "rank90": energy_rank(x, 0.9).double(),
        "norm_mean": norms.mean(-1),
        "norm_std": norms.std(-1) if norms.shape[-1] > 1 else torch.zeros(norms.shape[0], dtype=torch.float64),
        "norm_max_over_median": norms.amax(-1) / norms.median(-1).values.clamp_min(1e-30),
    }


# ---- attention -----------------------------------------------------------------------------------------------

def attention_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int, scale: float,
                      sliding_window: int = 0, softcap: float = 0.0):
    """Weights [Hq, Q, N] (FP32) and outputs [Hq, Q, D] of queries q [Hq, Q, D] at positions first_position ..
    first_position + Q - 1 over k, v [H, N, D] (position t = index t), as the model's attention computes them
    (causal, sliding window, logit softcap: kvprec/ops/reference/attention.py attend_dense)."""
    n = first_position + q.shape[1]
    if n > k.shape[1]:
        raise ValueError(f"attention_weights: queries reach position {n - 1} but only {k.shape[1]} keys are given")
    out, _, w = attend_dense(q[None].float(), k[None, :, :n].float(), v[None, :, :n].float(), scale=scale,
                             sliding_window=sliding_window, softcap=softcap, causal="bottom_right")
    return w[0], out[0]


def visible_counts(first_position: int, queries: int, sliding_window: int = 0) -> torch.Tensor:
    """n_i, the positions query i may see (int64 [Q])."""
    n = torch.arange(first_position, first_position + queries) + 1
    return n.clamp(max=sliding_window) if sliding_window > 0 else n


def attention_summary(w: torch.Tensor, first_position: int, sliding_window: int = 0) -> Dict[str, torch.Tensor]:
    """Per query head and query (each [Hq, Q]) of weights w [Hq, Q, N] of queries at first_position ..:
    normalised entropy (NaN where n_i = 1), 90%-mass fraction, sink mass, recent mass (module docstring)."""
    w = w.double()
    hq, nq, n = w.shape
    counts = visible_counts(first_position, nq, sliding_window).double()
    logw = torch.where(w > 0, w.clamp_min(1e-300).log(), torch.zeros_like(w))
    entropy = -(w * logw).sum(-1)
    norm_entropy = torch.where(counts > 1, entropy / counts.log().clamp_min(1e-30), torch.full_like(entropy, math.nan))
    sorted_w = w.sort(-1, descending=True).values.cumsum(-1)
    mass90 = ((sorted_w < 0.9).sum(-1) + 1).double() / counts
    pos = torch.arange(first_position, first_position + nq)
    t = torch.arange(n)
    recent = (t[None, :] > pos[:, None] - RECENT_POSITIONS) & (t[None, :] <= pos[:, None])
    return {
        "entropy": norm_entropy,
        "mass90": mass90,
        "sink_mass": w[..., :SINK_POSITIONS].sum(-1),
        "recent_mass": (w * recent).sum(-1),
    }


def received_attention(w: torch.Tensor, first_position: int, sliding_window: int = 0) -> torch.Tensor:
    """[Hq, N]: weight each position receives, summed over the queries that may see it, over their number."""
    hq, nq, n = w.shape
    pos = torch.arange(first_position, first_position + nq)
    t = torch.arange(n)
    sees = t[None, :] <= pos[:, None]
    if sliding_window > 0:
        sees &= t[None, :] > pos[:, None] - sliding_window
    seen_by = sees.sum(0).double()
    return torch.where(seen_by > 0, w.double().sum(1) / seen_by.clamp_min(1), torch.zeros(hq, n, dtype=torch.float64))


def recency_profile(w: torch.Tensor, first_position: int) -> torch.Tensor:
    """[Hq, N]: mean weight at distance d = p_i - t, over the queries with p_i >= d (NaN where none)."""
    hq, nq, n = w.shape
    pos = torch.arange(first_position, first_position + nq)
    d = torch.arange(n)
    t = pos[:, None] - d[None, :]  # [Q, N]: the position at distance d from query i
    valid = t >= 0
    gathered = w.double().gather(2, t.clamp(min=0)[None].expand(hq, -1, -1)) * valid
    count = valid.sum(0).double()
    return torch.where(count > 0, gathered.sum(1) / count.clamp_min(1), torch.full((hq, n), math.nan,
                                                                                  dtype=torch.float64))


# ---- channels ------------------------------------------------------------------------------------------------

def top_k_channels(head_dim: int) -> int:
    return max(1, head_dim // 16)


def channel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """m_c = mean over tokens of |x_tc|: [..., D] of x [..., T, D]."""
    return x.double().abs().mean(-2)


def top_k_frequency(x: torch.Tensor, k: int) -> torch.Tensor:
    """[..., D]: fraction of tokens whose k largest |x_tc| include channel c, for x [..., T, D]."""
    idx = x.abs().topk(k, dim=-1).indices
    hits = torch.zeros_like(x, dtype=torch.float64).scatter_(-1, idx, 1.0)
    return hits.mean(-2)


def quantization_error(x: torch.Tensor, tier: Tier, block_size: int, per_channel: bool) -> float:
    """||x - x'|| / ||x|| for x [H, T, D] quantized in blocks of ``block_size`` tokens (the last partial block
    left out) at ``tier``, per channel within the block or per token (one group of D channels)."""
    h, t, d = x.shape
    blocks = t // block_size
    if blocks == 0:
        raise ValueError(f"quantization_error: {t} tokens hold no block of {block_size}")
    xb = x[:, :blocks * block_size].float().reshape(h * blocks, block_size, d)
    if per_channel:
        back = dequantize_keys(quantize_keys(xb, tier), tier, d, torch.float32)
    else:
        back = dequantize_values(quantize_values(xb, tier, d), tier, d, d, torch.float32)
    norm = float(xb.double().norm())
    return float((xb.double() - back.double()).norm()) / norm if norm > 0 else 0.0
