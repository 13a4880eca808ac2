"""The structure statistics of one capture, as raw arrays (names and shapes below; formulas in stats.py and
similarity.py). L layers, H KV heads, Hq query heads, P context tokens, D channels, N decode steps.

layers      layer_sparsity [2, L, n_thr] (K, V), layer_top10 [2, L], layer_erank / layer_rank90 / layer_norm_mean /
            layer_norm_std / layer_norm_maxratio [2, L, H], sparsity_thresholds [n_thr]
attention   (prefill queries at positions >= first_query over the context) attn_entropy / attn_mass90 /
            attn_sink / attn_recent [L, Hq] (means over those queries), attn_received / attn_recency [L, Hq, P],
            attn_received_window [L, Hq, P] (mean weight from the last `window` queries, which see every position),
            head_output_norm [L, H] (mean ||attention output|| of the group's query heads over the last `window`
            queries), query_window_norms [L, H, D] (channel norms of those queries, per KV head group)
channels    chan_mag / chan_topk_freq [3, L, H, D] (K, V, K rotated as kvprec's key_rotation stores it),
            quant_err [3, 2, 2, L] (kind; per channel / per token; INT4 / INT2)
similarity  sim_adjacent / sim_pairs [2, L, H], sim_head_cos / sim_head_cka [2, L, H, H], sim_layer_cos /
            sim_layer_cka [2, L-1, H], sim_clusters / sim_runs [2, n_tau, L, H], cluster_thresholds [n_tau]
stages      generated_ids / step_logprob / step_entropy [N], context_logprob / context_entropy [P-1],
            step_attn [4, L, Hq, N] (entropy, mass90, sink, recent of every decode query),
            prefill_attn_tail [4, L, Hq, N // 3] (the same of the last N // 3 prefill queries),
            stage_kv [2, 4, L, H, 4] (K/V; stages prefill-tail, early, middle, late; mean token norm, effective
            rank, adjacent cosine, channel outlier ratio of the stage's N // 3 tokens)
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import torch

from ...storage.formats import Tier
from ...storage.rotation import rotate, rotation_matrix
from . import similarity as sim
from . import stats
from .capture import Recorded

STAGES = ("prefill", "early", "middle", "late")
ATTN_METRICS = ("entropy", "mass90", "sink_mass", "recent_mass")
STAGE_KV_METRICS = ("norm", "erank", "adjacent_cosine", "outlier_ratio")


def rotation_kind(head_dim: int) -> str:
    """The key rotation the study compares: Hadamard where head_dim is a power of two, else random orthogonal."""
    return "hadamard" if head_dim & (head_dim - 1) == 0 else "orthogonal"


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def layer_arrays(cap: Recorded) -> Dict[str, np.ndarray]:
    per = {name: [[], []] for name in ("sparsity", "top10_share", "erank", "rank90", "norm_mean", "norm_std",
                                       "norm_max_over_median")}
    for k, v in cap.kv:
        for j, x in enumerate((k, v)):
            for name, value in stats.layer_statistics(x).items():
                per[name][j].append(value)
    out = {"sparsity_thresholds": np.array(stats.SPARSITY_THRESHOLDS)}
    names = {"sparsity": "layer_sparsity", "top10_share": "layer_top10", "erank": "layer_erank",
             "rank90": "layer_rank90", "norm_mean": "layer_norm_mean", "norm_std": "layer_norm_std",
             "norm_max_over_median": "layer_norm_maxratio"}
    for name, key in names.items():
        out[key] = np.stack([np.stack([_np(x) for x in per[name][j]]) for j in range(2)])
    return out


def first_query(context: int) -> int:
    """Prefill queries before this position see too few positions for their statistics to mean much."""
    return min(32, context // 4)


def attention_arrays(cap: Recorded, window: int) -> Dict[str, np.ndarray]:
    """Prefill attention per layer (module docstring); ``window``: the last queries of the prompt (ThinK's
    observation window) for head output norms and query channel norms."""
    p = cap.context.numel()
    start = first_query(p)
    window = min(window, p)
    keys = ("attn_entropy", "attn_mass90", "attn_sink", "attn_recent", "attn_received", "attn_recency",
            "attn_received_window", "head_output_norm", "query_window_norms")
    out = {k: [] for k in keys}
    for q, k, v, call in zip(cap.q, cap.k, cap.v, cap.calls):
        w, o = stats.attention_weights(q, k, v, 0, call.scale, call.sliding_window, call.softcap)
        summary = stats.attention_summary(w[:, start:], start, call.sliding_window)
        for key, name in zip(keys[:4], ATTN_METRICS):
            out[key].append(_np(summary[name].nanmean(-1)))
        out["attn_received"].append(_np(stats.received_attention(w[:, start:], start, call.sliding_window)))
        out["attn_recency"].append(_np(stats.recency_profile(w[:, start:], start)))
        out["attn_received_window"].append(_np(w[:, -window:].double().mean(1)))
        h, group = k.shape[0], q.shape[0] // k.shape[0]
        out["head_output_norm"].append(_np(o[:, -window:].double().norm(dim=-1).mean(-1).reshape(h, group).mean(-1)))
        qn = q[:, -window:].double().pow(2).sum(1).reshape(h, group, -1).sum(1).sqrt()
        out["query_window_norms"].append(_np(qn))
    return {k: np.stack(v) for k, v in out.items()}


def channel_arrays(cap: Recorded, block_size: int, rotation_seed: int) -> Dict[str, np.ndarray]:
    d = cap.k[0].shape[-1]
    kind = rotation_kind(d)
    top = stats.top_k_channels(d)
    mag, freq, qerr = [[], [], []], [[], [], []], np.zeros((3, 2, 2, len(cap.k)))
    for i, (k, v) in enumerate(cap.kv):
        krot = rotate(k.float(), rotation_matrix(kind, d, rotation_seed, i))
        for j, x in enumerate((k, v, krot)):
            mag[j].append(_np(stats.channel_magnitude(x)))
            freq[j].append(_np(stats.top_k_frequency(x, top)))
            if x.shape[1] >= block_size:
                for a, per_channel in enumerate((True, False)):
                    for b, tier in enumerate((Tier.INT4, Tier.INT2)):
                        qerr[j, a, b, i] = stats.quantization_error(x, tier, block_size, per_channel)
            else:
                qerr[j, :, :, i] = np.nan
    return {"chan_mag": np.stack([np.stack(m) for m in mag]), "chan_topk_freq": np.stack([np.stack(f) for f in freq]),
            "quant_err": qerr, "rotation_kind": np.array(kind)}


def similarity_arrays(cap: Recorded, thresholds) -> Dict[str, np.ndarray]:
    n, h = len(cap.k), cap.k[0].shape[0]
    out = {"sim_adjacent": np.zeros((2, n, h)), "sim_pairs": np.zeros((2, n, h)),
           "sim_head_cos": np.zeros((2, n, h, h)), "sim_head_cka": np.zeros((2, n, h, h)),
           "sim_layer_cos": np.zeros((2, max(n - 1, 0), h)), "sim_layer_cka": np.zeros((2, max(n - 1, 0), h)),
           "sim_clusters": np.zeros((2, len(thresholds), n, h)), "sim_runs": np.zeros((2, len(thresholds), n, h)),
           "cluster_thresholds": np.array(thresholds, dtype=np.float64)}
    for j, xs in enumerate((cap.k, cap.v)):
        for i, x in enumerate(xs):
            out["sim_adjacent"][j, i] = _np(sim.adjacent_cosine(x).mean(-1))
            out["sim_pairs"][j, i] = _np(sim.mean_pair_cosine(x))
            cos, cka = sim.head_similarity(x)
            out["sim_head_cos"][j, i], out["sim_head_cka"][j, i] = _np(cos), _np(cka)
            if i + 1 < n:
                cos, cka = sim.cross_layer_similarity(x, xs[i + 1])
                out["sim_layer_cos"][j, i], out["sim_layer_cka"][j, i] = _np(cos), _np(cka)
            for head in range(h):
                cos = sim.cosine_matrix(x[head])
                for a, tau in enumerate(thresholds):
                    out["sim_clusters"][j, a, i, head] = sim.leader_clusters(cos, tau)
            for a, tau in enumerate(thresholds):
                out["sim_runs"][j, a, i] = _np(sim.adjacent_runs(x, tau))
    return out


def stage_arrays(cap: Recorded) -> Dict[str, np.ndarray]:
    """Needs a capture with N >= 3 decode steps."""
    p, steps = cap.context.numel(), cap.generated.numel()
    if steps < 3:
        raise ValueError(f"stages: need at least 3 generated tokens, got {steps}")
    n_s = steps // 3
    if n_s > p:
        raise ValueError(f"stages: {n_s} tokens per stage exceed the {p}-token context")
    step_attn, tail_attn = [], []
    stage_kv = np.zeros((2, len(STAGES), len(cap.k), cap.k[0].shape[0], len(STAGE_KV_METRICS)))
    ranges = [range(p - n_s, p)] + [range(p + s * n_s, p + (s + 1) * n_s) for s in range(3)]
    for i, (q, qs, k, v, call) in enumerate(zip(cap.q, cap.step_q, cap.all_k, cap.all_v, cap.calls)):
        w, _ = stats.attention_weights(qs, k, v, p, call.scale, call.sliding_window, call.softcap)
        summary = stats.attention_summary(w, p, call.sliding_window)
        step_attn.append(np.stack([_np(summary[m]) for m in ATTN_METRICS]))
        w, _ = stats.attention_weights(q[:, p - n_s:], k[:, :p], v[:, :p], p - n_s, call.scale, call.sliding_window,
                                       call.softcap)
        summary = stats.attention_summary(w, p - n_s, call.sliding_window)
        tail_attn.append(np.stack([_np(summary[m]) for m in ATTN_METRICS]))
        for j, x in enumerate((k, v)):
            for s, r in enumerate(ranges):
                xs = x[:, r.start:r.stop]
                mag = stats.channel_magnitude(xs)
                stage_kv[j, s, i, :, 0] = _np(xs.double().norm(dim=-1).mean(-1))
                stage_kv[j, s, i, :, 1] = _np(stats.effective_rank(xs))
                stage_kv[j, s, i, :, 2] = _np(sim.adjacent_cosine(xs).mean(-1))
                stage_kv[j, s, i, :, 3] = _np(mag.amax(-1) / mag.median(-1).values.clamp_min(1e-30))
    return {"generated_ids": _np(cap.generated), "step_logprob": _np(cap.step_logprob),
            "step_entropy": _np(cap.step_entropy), "context_logprob": _np(cap.context_logprob),
            "context_entropy": _np(cap.context_entropy),
            "step_attn": np.stack(step_attn, axis=1), "prefill_attn_tail": np.stack(tail_attn, axis=1),
            "stage_kv": stage_kv}


def observe(cap: Recorded, parts, *, window: int, block_size: int, rotation_seed: int, thresholds,
            progress: Optional[Callable[[str], None]] = None) -> Dict[str, np.ndarray]:
    """The arrays of ``parts`` (a subset of "layers", "attention", "channels", "similarity", "stages")."""
    makers = {"layers": lambda: layer_arrays(cap), "attention": lambda: attention_arrays(cap, window),
              "channels": lambda: channel_arrays(cap, block_size, rotation_seed),
              "similarity": lambda: similarity_arrays(cap, thresholds), "stages": lambda: stage_arrays(cap)}
    out: Dict[str, np.ndarray] = {}
    for part in ("layers", "attention", "channels", "similarity", "stages"):
        if part in parts:
            if progress:
                progress(part)
            out.update(makers[part]())
    return out
