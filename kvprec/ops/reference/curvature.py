"""Attention curvature and locality patterns: the pure-torch reference (the oracle of csrc/core/curvature.cpp).

For one query q [D] over keys K [N, D] and values V [N, Dv] with softmax scale s (0 means 1/sqrt(D))::

    s_t = s q.K_t,   a = softmax(s_.),   o = sum_t a_t v_t
    d o / d s_t     = a_t (v_t - o)                   (softmax derivative d a_u/d s_t = a_u (delta_ut - a_t))
    d^2 o / d s_t^2 = a_t (1 - 2 a_t) (v_t - o)
    J_t = d o / d K_t     = s a_t (v_t - o) q^T                          ||J_t|| = s a_t ||v_t - o|| ||q||
    H_t = d^2 o / d K_t^2 = s^2 a_t (1 - 2 a_t) (v_t - o) (x) q (x) q     ||H_t|| = s^2 a_t |1 - 2 a_t| ||v_t - o|| ||q||^2
    kappa_t = a_t ||J_t|| ||H_t|| = s^3 a_t^3 |1 - 2 a_t| ||v_t - o||^2 ||q||^3

(docs/design.md, "Precision policy"; checked against torch.autograd in python_tests/test_curvature.py.)

Shapes: q [Hq, Q, D] or [B, Hq, Q, D]; k [Hkv, N, D], v [Hkv, N, Dv] with q's rank and batch. GQA: query head h
reads KV head h // (Hq // Hkv). causal: query i sits at position p_i = N - Q + i and sees t <= p_i (Q <= N).
Arithmetic in FP64; results FP32, or FP64 when every input is FP64. The entry points (kvprec/analysis/curvature.py) take ``backend``: "auto" on CPU
runs this reference (direct differences, simple and slow); "cpp" runs the native kernel (chunked, one fused pass).

Locality patterns (definitions in csrc/include/kvprec/curvature.h, repeated here), with n_i the positions query i
sees (causal p_i + 1, else N):

* recency_share[h]   = (1/Q) sum_i sum_{t in (p_i - w, p_i]} a_it, and recency_uniform the same for uniform
  attention (StreamingLLM's local window, arXiv:2309.17453);
* anchors: t is an anchor iff #{i : a_it > k / n_i} >= f Q (attention sinks, StreamingLLM; heavy hitters, H2O
  arXiv:2306.14048); anchor_share[h] = (1/Q) sum_i sum_{t anchor} a_it;
* clusters: per KV head, leader clustering of keys in position order by cosine >= tau (a key joins the
  earliest-created cluster whose leader is most similar, else leads a new one); cluster_top_share[h] = the mass
  (1/Q) sum_i sum_{t in c} a_it of the top_clusters heaviest clusters.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch


class CurvatureResult(NamedTuple):
    kappa: torch.Tensor      # [B?, Hq, Q, N]
    attn: torch.Tensor       # a_t
    jac_norm: torch.Tensor   # ||d o / d K_t||
    hess_norm: torch.Tensor  # ||d^2 o / d K_t^2||


class LocalityPatterns(NamedTuple):
    recency_share: torch.Tensor      # [B?, Hq] FP64
    recency_uniform: torch.Tensor    # [B?, Hq] FP64
    anchor_mask: torch.Tensor        # [B?, Hq, N] bool
    anchor_share: torch.Tensor       # [B?, Hq] FP64
    cluster_id: torch.Tensor         # [B?, Hkv, N] int64
    cluster_count: torch.Tensor      # [B?, Hkv] int64
    cluster_top_share: torch.Tensor  # [B?, Hq] FP64


REDUCTIONS = ("mean", "max", "sum")


def resolve_scale(scale: float, head_dim: int) -> float:
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"scale: {scale} is not accepted; use a positive softmax scale, or 0 for 1/sqrt(head_dim)")
    return 1.0 / math.sqrt(head_dim) if scale == 0.0 else float(scale)


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be a floating tensor (float32, float64, float16, bfloat16), got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} contains non-finite values")


def check_inputs(op: str, q, k, v, scale: float, causal: bool):
    """Checks the arguments without copying them; returns (batched, G, resolved scale, reference output dtype).
    Shared by the reference and the Triton launcher (kvprec/ops/triton/curvature.py), so both raise the same
    errors."""
    _check_float(op, "q", q)
    _check_float(op, "k", k)
    if q.dim() not in (3, 4):
        raise ValueError(f"{op}: q must be [Hq, Q, D] or [B, Hq, Q, D], got shape {list(q.shape)}")
    if k.dim() != q.dim():
        raise ValueError(f"{op}: k must have q's rank ({q.dim()}): [Hkv, N, D] or [B, Hkv, N, D], got shape "
                         f"{list(k.shape)}")
    batched = q.dim() == 4
    q4 = q if batched else q.unsqueeze(0)
    k4 = k if batched else k.unsqueeze(0)
    b, hq, nq, d = q4.shape
    _, hkv, n, dk = k4.shape
    if k4.shape[0] != b:
        raise ValueError(f"{op}: k has batch {k4.shape[0]} but q has batch {b}")
    if dk != d:
        raise ValueError(f"{op}: k has head_dim {dk} but q has head_dim {d}")
    if min(b, hq, nq, d, hkv, n) < 1:
        raise ValueError(f"{op}: empty input: q {list(q.shape)}, k {list(k.shape)}")
    if hq % hkv:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of KV heads ({hkv}) for GQA")
    if causal and nq > n:
        raise ValueError(f"{op}: causal alignment puts query i at position N - Q + i, so it needs Q <= N; got "
                         f"Q={nq}, N={n}")
    dtypes = [q.dtype, k.dtype]
    if v is not None:
        _check_float(op, "v", v)
        if v.dim() != q.dim():
            raise ValueError(f"{op}: v must be [Hkv, N, Dv] (or [B, Hkv, N, Dv]) like k, got shape {list(v.shape)}")
        v4 = v if batched else v.unsqueeze(0)
        if tuple(v4.shape[:3]) != (b, hkv, n):
            raise ValueError(f"{op}: v must match k in batch, heads and positions; k {list(k.shape)}, v {list(v.shape)}")
        dtypes.append(v.dtype)
    out_dtype = torch.float64 if all(t == torch.float64 for t in dtypes) else torch.float32
    return batched, hq // hkv, resolve_scale(scale, d), out_dtype


def _prepare(op: str, q, k, v, scale: float, causal: bool):
    """Checks the arguments; returns 4-D FP64 q, k, v (v may be None), batched flag, G, scale and output dtype."""
    batched, g, s, out_dtype = check_inputs(op, q, k, v, scale, causal)

    def four(x):
        return None if x is None else (x if batched else x.unsqueeze(0)).double()
    return four(q), four(k), four(v), batched, g, s, out_dtype


def _attention(q4, k4, g: int, scale: float, causal: bool) -> torch.Tensor:
    """Attention weights [B, Hq, Q, N] in FP64, GQA by repeating KV heads (the reference may be simple)."""
    kr = k4.repeat_interleave(g, dim=1)
    s = scale * q4 @ kr.transpose(-1, -2)
    nq, n = q4.shape[2], k4.shape[2]
    if causal:
        pos = torch.arange(n - nq, n, device=q4.device).unsqueeze(1)
        s = s.masked_fill(torch.arange(n, device=q4.device).unsqueeze(0) > pos, float("-inf"))
    return torch.softmax(s, dim=-1)


def _visible(nq: int, n: int, causal: bool, device) -> torch.Tensor:
    """bool [Q, N]: query i sees position t."""
    if not causal:
        return torch.ones(nq, n, dtype=torch.bool, device=device)
    return torch.arange(n, device=device).unsqueeze(0) <= torch.arange(n - nq, n, device=device).unsqueeze(1)


def _closed_form(op: str, q, k, v, scale: float, causal: bool):
    """The closed form in FP64 on 4-D tensors: (CurvatureResult of [B, Hq, Q, N], batched, output dtype)."""
    q4, k4, v4, batched, g, s, out_dtype = _prepare(op, q, k, v, scale, causal)
    a = _attention(q4, k4, g, s, causal)
    vr = v4.repeat_interleave(g, dim=1)                                   # [B, Hq, N, Dv]
    o = a @ vr                                                            # [B, Hq, Q, Dv]
    # ||v_t - o_i|| as a direct difference (no cancellation: the oracle for the native expansion), in chunks of
    # queries so the [B, Hq, C, N, Dv] difference stays near 2^24 elements.
    b, hq, nq, n = a.shape
    step = max(1, (1 << 24) // max(1, b * hq * n * vr.shape[-1]))
    dist = torch.cat([(vr.unsqueeze(2) - o[:, :, i:i + step].unsqueeze(3)).norm(dim=-1)
                      for i in range(0, nq, step)], dim=2)                   # [B, Hq, Q, N]
    qn = q4.norm(dim=-1, keepdim=True)
    jac = s * a * dist * qn
    hess = s * s * a * (1 - 2 * a).abs() * dist * qn ** 2
    kappa = a * jac * hess
    return CurvatureResult(kappa, a, jac, hess), batched, out_dtype


def attention_curvature_reference(q, k, v, scale: float = 0.0, causal: bool = True) -> CurvatureResult:
    """kappa, a, ||J||, ||H|| per query head, query and position: each [B?, Hq, Q, N]."""
    r, batched, out_dtype = _closed_form("attention_curvature", q, k, v, scale, causal)

    def out(x):
        x = x.to(out_dtype)
        return x if batched else x.squeeze(0)
    return CurvatureResult(*(out(x) for x in r))


def _reduce_blocks(position: torch.Tensor, block_size: int, reduce: str) -> torch.Tensor:
    """[..., N] -> [..., ceil(N / T)] by mean (over the positions present), max or sum within each block."""
    if block_size < 1:
        raise ValueError(f"block_size: {block_size} is not accepted; use a positive number of positions")
    _check_reduce("block_reduce", reduce)
    n = position.shape[-1]
    nb = -(-n // block_size)
    fill = float("-inf") if reduce == "max" else 0.0
    x = torch.nn.functional.pad(position.double(), (0, nb * block_size - n), value=fill)
    x = x.reshape(*position.shape[:-1], nb, block_size)
    if reduce == "max":
        return x.amax(-1)
    total = x.sum(-1)
    if reduce == "sum":
        return total
    counts = torch.full((nb,), float(block_size), dtype=torch.float64, device=x.device)
    counts[-1] = n - (nb - 1) * block_size
    return total / counts


block_reduce = _reduce_blocks  # public name; the functions below take a parameter of that name


def _check_reduce(what: str, reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"{what}: {reduce!r} is not a reduction; accepted mean, max, sum")


def curvature_reduce_reference(q, k, v, scale: float = 0.0, causal: bool = True, block_size: int = 64,
                               query_reduce: str = "mean", block_reduce: str = "max") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per KV head and position, over the group's query heads and the queries that see each position:
    position [B?, Hkv, N] FP64; then per block: block [B?, Hkv, ceil(N / T)]. See kvprec/curvature.h."""
    _check_reduce("query_reduce", query_reduce)
    _check_reduce("block_reduce", block_reduce)
    if block_size < 1:
        raise ValueError(f"curvature_reduce: block_size {block_size} is not accepted; use a positive size")
    kappa = _closed_form("curvature_reduce", q, k, v, scale, causal)[0].kappa
    pos = _query_reduce(kappa, k.shape[-3], causal, query_reduce)
    if q.dim() == 3:
        pos = pos.squeeze(0)
    return pos, _reduce_blocks(pos, block_size, block_reduce)


def _query_reduce(kappa: torch.Tensor, hkv: int, causal: bool, how: str) -> torch.Tensor:
    """kappa [B, Hq, Q, N] -> [B, Hkv, N]: mean, max or sum over the group's query heads and the queries (the mean
    over those that see each position)."""
    b, hq, nq, n = kappa.shape
    kg = kappa.reshape(b, hkv, hq // hkv, nq, n)
    if how == "max":
        return kg.amax(dim=(2, 3))
    pos = kg.sum(dim=(2, 3))
    if how == "mean":
        seen = _visible(nq, n, causal, kappa.device).sum(0).double() * (hq // hkv)
        pos = pos / seen.clamp_min(1.0)
    return pos


def curvature_sum_max_reference(q, k, v, scale: float = 0.0, causal: bool = True
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both position statistics calibration needs, from one computation of kappa: (sum, max) over the group's
    query heads and the queries that see each position, FP64 [B?, Hkv, N] each (curvature_reduce's position with
    query_reduce "sum" and "max")."""
    kappa = _closed_form("curvature_sum_max", q, k, v, scale, causal)[0].kappa
    out = [_query_reduce(kappa, k.shape[-3], causal, how) for how in ("sum", "max")]
    return tuple(x.squeeze(0) if q.dim() == 3 else x for x in out)


def leader_clusters(keys: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, int]:
    """Leader clustering of keys [N, D] by cosine similarity: cluster ids int64 [N] (in order of creation), count."""
    if keys.dim() != 2:
        raise ValueError(f"leader_clusters: keys must be [N, D], got shape {list(keys.shape)}")
    x = keys.double().cpu()  # a sequential scan
    norm = x.norm(dim=-1, keepdim=True)
    x = torch.where(norm > 0, x / norm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(x))
    ids = torch.empty(x.shape[0], dtype=torch.int64)
    leaders = []
    for t in range(x.shape[0]):
        if leaders:
            cos = x[leaders] @ x[t]
            best = int(torch.argmax(cos))  # first maximum: the earliest cluster wins ties
            if float(cos[best]) >= threshold:
                ids[t] = best
                continue
        ids[t] = len(leaders)
        leaders.append(t)
    return ids, len(leaders)


def _check_locality(window, anchor_factor, anchor_fraction, cluster_threshold, top_clusters) -> None:
    if window < 1:
        raise ValueError(f"window: {window} is not accepted; use >= 1 positions")
    if not (math.isfinite(anchor_factor) and anchor_factor > 0):
        raise ValueError(f"anchor_factor: {anchor_factor} is not accepted; use a positive multiple of the uniform "
                         "weight (default 4)")
    if not (0.0 < anchor_fraction <= 1.0):
        raise ValueError(f"anchor_fraction: {anchor_fraction} is not accepted; use a fraction of queries in (0, 1] "
                         "(default 0.9)")
    if not (-1.0 <= cluster_threshold <= 1.0):
        raise ValueError(f"cluster_threshold: {cluster_threshold} is not accepted; use a cosine similarity in [-1, 1] "
                         "(default 0.8)")
    if top_clusters < 1:
        raise ValueError(f"top_clusters: {top_clusters} is not accepted; use >= 1")


def attention_locality_reference(q, k, scale: float = 0.0, causal: bool = True, window: int = 64,
                                 anchor_factor: float = 4.0, anchor_fraction: float = 0.9,
                                 cluster_threshold: float = 0.8, top_clusters: int = 4) -> LocalityPatterns:
    """Recency, anchors and key clusters per head (definitions in the module docstring)."""
    _check_locality(window, anchor_factor, anchor_fraction, cluster_threshold, top_clusters)
    q4, k4, _, batched, g, s, _ = _prepare("attention_locality", q, k, None, scale, causal)
    a = _attention(q4, k4, g, s, causal)                          # [B, Hq, Q, N]
    b, hq, nq, n = a.shape
    dev = a.device
    p = torch.arange(n - nq, n, dtype=torch.float64, device=dev).unsqueeze(1)  # [Q, 1]
    t = torch.arange(n, dtype=torch.float64, device=dev).unsqueeze(0)          # [1, N]
    n_vis = p + 1 if causal else torch.full_like(p, float(n))
    in_window = ((t <= p) & (t > p - window)).double()
    recency = (a * in_window).sum(dim=(-1, -2)) / nq
    uniform = float((torch.minimum(p + 1, torch.full_like(p, float(window))) / n_vis).sum()) / nq
    hits = (a > anchor_factor / n_vis).sum(dim=-2).double()       # [B, Hq, N]
    anchor = hits >= anchor_fraction * nq
    colsum = a.sum(dim=-2)                                          # [B, Hq, N]
    anchor_share = (colsum * anchor).sum(-1) / nq
    hkv = k4.shape[1]
    ids = torch.empty(b, hkv, n, dtype=torch.int64, device=dev)
    counts = torch.empty(b, hkv, dtype=torch.int64, device=dev)
    top = torch.empty(b, hq, dtype=torch.float64, device=dev)
    for bi in range(b):
        for h in range(hkv):
            cid, count = leader_clusters(k4[bi, h], cluster_threshold)
            cid = cid.to(dev)
            ids[bi, h], counts[bi, h] = cid, count
            for gi in range(g):
                mass = torch.zeros(count, dtype=torch.float64, device=dev).index_add_(0, cid, colsum[bi, h * g + gi]) / nq
                top[bi, h * g + gi] = mass.topk(min(top_clusters, count)).values.sum()

    def sq(x):
        return x if batched else x.squeeze(0)
    return LocalityPatterns(sq(recency), sq(torch.full((b, hq), uniform, dtype=torch.float64, device=dev)), sq(anchor),
                            sq(anchor_share), sq(ids), sq(counts), sq(top))
