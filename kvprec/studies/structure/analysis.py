"""analysis.json of a structure run: computed from raw.npz and config.json only (``analyze``).

Compressions: for variant j with per-prediction NLL n_ij and the reference n_i (kvprec/studies/structure/
scoring.py), dNLL_j = mean_i (n_ij - n_i) with paired standard error se_j = std_i(n_ij - n_i) / sqrt(n); the
perplexity change exp(dNLL_j) - 1; the mean KL divergence from the exact cache's next-token distribution and the
top-1 agreement (kvprec/studies/structure/scoring.py); the compression ratio dense FP16 bytes / stored bytes; bytes
saved = dense - stored; and the ranking key, dNLL per MiB saved (every variant compresses the same cache, so this
orders them as dNLL per fraction of the cache saved does), beside the same with KL. The equal-bytes table lists,
per target ratio, each compression's variant asked for that ratio beside kvprec's budget mixes at that ratio (keys as
given, rotated) and the best kvprec uniform tier storing at most that many bytes; its verdicts compare the best
K-and-V compression with the best of kvprec's entries by the paired difference of their per-prediction NLL and of
their KL (a winner only beyond 2 standard errors).
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional

import numpy as np

from .compress import lowest_heads, prune_count
from .observe import ATTN_METRICS, STAGE_KV_METRICS, STAGES, first_query
from .similarity import greedy_merge_count

KINDS = ("keys", "values")
MIB = 1024.0 * 1024.0
COMPRESSION_FAMILIES = ("tucker", "lowrank", "drop")


def _f(x) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else x


def _thirds(n: int):
    a, b = n // 3, 2 * n // 3
    return {"early": slice(0, max(a, 1)), "middle": slice(a, max(b, a + 1)), "late": slice(b, n)}


def _spearman(a, b) -> Optional[float]:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return _f(spearmanr(a[ok], b[ok]).statistic)


# ---- layers --------------------------------------------------------------------------------------------------

def layers(raw) -> dict:
    thr = raw["sparsity_thresholds"]
    per_layer = []
    for i in range(raw["layer_erank"].shape[1]):
        row = {"layer": i}
        for j, kind in enumerate(KINDS):
            row[kind] = {"erank": float(raw["layer_erank"][j, i].mean()),
                         "rank90": float(raw["layer_rank90"][j, i].mean()),
                         "sparsity": {f"{t:g}": float(raw["layer_sparsity"][j, i, a]) for a, t in enumerate(thr)},
                         "top10_energy_share": float(raw["layer_top10"][j, i]),
                         "norm_mean": float(raw["layer_norm_mean"][j, i].mean()),
                         "norm_cv": float((raw["layer_norm_std"][j, i] / raw["layer_norm_mean"][j, i]).mean()),
                         "norm_max_over_median": float(raw["layer_norm_maxratio"][j, i].max())}
        per_layer.append(row)
    n = len(per_layer)
    summary = {}
    for kind in KINDS:
        summary[kind] = {}
        for part, s in _thirds(n).items():
            rows = per_layer[s]
            summary[kind][part] = {"erank": float(np.mean([r[kind]["erank"] for r in rows])),
                                   "rank90": float(np.mean([r[kind]["rank90"] for r in rows])),
                                   "sparsity_0.1": float(np.mean([r[kind]["sparsity"]["0.1"] for r in rows]))
                                   if "0.1" in rows[0][kind]["sparsity"] else None,
                                   "norm_mean": float(np.mean([r[kind]["norm_mean"] for r in rows]))}
    return {"per_layer": per_layer, "by_depth": summary}


# ---- heads and tokens ----------------------------------------------------------------------------------------

def heads(raw, config) -> dict:
    ent, m90, sink, recent = (raw[k] for k in ("attn_entropy", "attn_mass90", "attn_sink", "attn_recent"))
    n_layers, hq = ent.shape
    flat = [(float(ent[l, h]), l, h) for l in range(n_layers) for h in range(hq)]
    count = prune_count(config["prune_fraction"], raw["head_output_norm"].size)
    return {
        "per_layer": [{"layer": l, "entropy": float(ent[l].mean()), "mass90": float(m90[l].mean()),
                       "sink_mass": float(sink[l].mean()), "recent_mass": float(recent[l].mean())}
                      for l in range(n_layers)],
        "mean": {"entropy": float(ent.mean()), "mass90": float(m90.mean()), "sink_mass": float(sink.mean()),
                 "recent_mass": float(recent.mean())},
        "sharpest": [{"layer": l, "head": h, "entropy": e, "sink_mass": float(sink[l, h]),
                      "recent_mass": float(recent[l, h])} for e, l, h in sorted(flat)[:5]],
        "broadest": [{"layer": l, "head": h, "entropy": e} for e, l, h in sorted(flat, reverse=True)[:5]],
        "sink_heads": int((sink > 0.5).sum()), "local_heads": int((recent > 0.5).sum()), "query_heads": int(ent.size),
        "prune_candidates": [list(x) for x in lowest_heads(raw["head_output_norm"], count)],
        "first_query": first_query(len(raw["context_ids"])),
    }


def tokens(raw) -> dict:
    """Importance of a position: the mean weight the last prompt queries (which see every position) give it
    (attn_received_window), and the weight per query that sees it over the whole prefill (attn_received)."""
    window = raw["attn_received_window"].mean((0, 1))  # [P]
    seen = raw["attn_received"].mean((0, 1))
    p = window.shape[-1]
    names = raw["context_tokens"] if "context_tokens" in raw else np.array([""] * p)
    top = np.argsort(-window, kind="stable")[:8]
    profile = np.nanmean(raw["attn_recency"], axis=(0, 1))
    median = float(np.median(window))
    return {
        "top_positions": [{"position": int(t), "token": str(names[t]), "received": float(window[t]),
                           "received_per_seeing_query": float(seen[t]),
                           "over_median": float(window[t] / median) if median > 0 else None} for t in top],
        "position0_received": float(window[0]), "median_received": median, "uniform": 1.0 / p,
        "positions_over_10x_median": int((window > 10 * median).sum()) if median > 0 else None,
        "recency_profile_head": [_f(x) for x in profile[:16]],
        "recent_mass": float(raw["attn_recent"].mean()), "sink_mass": float(raw["attn_sink"].mean()),
    }


# ---- channels ------------------------------------------------------------------------------------------------

def consistency(freq: np.ndarray, k: int) -> np.ndarray:
    """[..]: mean frequency of the k most frequent top-k channels (1: the same k channels are largest in every
    token; k / D: no preferred channel)."""
    return np.sort(freq, axis=-1)[..., -k:].mean(-1)


def channels(raw) -> dict:
    mag, freq, qerr = raw["chan_mag"], raw["chan_topk_freq"], raw["quant_err"]
    d = mag.shape[-1]
    k = max(1, d // 16)
    names = ("keys", "values", "keys_rotated")
    ratio = mag.max(-1) / np.maximum(np.median(mag, -1), 1e-30)  # [3, L, H]
    cons = consistency(freq, k)
    out = {"top_k": k, "random_consistency": k / d, "rotation": str(raw["rotation_kind"]) if "rotation_kind" in raw
           else None, "per_kind": {}}
    for j, name in enumerate(names):
        out["per_kind"][name] = {
            "outlier_ratio_mean": float(ratio[j].mean()), "outlier_ratio_max": float(ratio[j].max()),
            "consistency_mean": float(cons[j].mean()),
            "quant_error": {f"{axis}_{tier}": _f(np.nanmean(qerr[j, a, b]))
                            for a, axis in enumerate(("per_channel", "per_token"))
                            for b, tier in enumerate(("int4", "int2"))},
            "per_layer_outlier_ratio": [float(x) for x in ratio[j].mean(-1)],
            "per_layer_consistency": [float(x) for x in cons[j].mean(-1)],
        }
    return out


# ---- stages --------------------------------------------------------------------------------------------------

def stages(raw) -> dict:
    step = raw["step_attn"]        # [4, L, Hq, N]
    tail = raw["prefill_attn_tail"]  # [4, L, Hq, n_s]
    kv = raw["stage_kv"]           # [2, 4, L, H, 4]
    n = step.shape[-1]
    n_s = tail.shape[-1]
    slices = [slice(s * n_s, (s + 1) * n_s) for s in range(3)]
    out = {"tokens_per_stage": n_s, "per_stage": {}}
    ctx_lp, ctx_ent = raw["context_logprob"], raw["context_entropy"]
    for s, stage in enumerate(STAGES):
        attn = tail if s == 0 else step[..., slices[s - 1]]
        row = {m: float(np.nanmean(attn[a])) for a, m in enumerate(ATTN_METRICS)}
        row["per_layer"] = {m: [float(x) for x in np.nanmean(attn[a], axis=(1, 2))] for a, m in enumerate(ATTN_METRICS)}
        for j, kind in enumerate(KINDS):
            row[kind] = {m: float(kv[j, s, ..., b].mean()) for b, m in enumerate(STAGE_KV_METRICS)}
            row[kind]["per_layer"] = {m: [float(x) for x in kv[j, s, ..., b].mean(-1)]
                                      for b, m in enumerate(STAGE_KV_METRICS)}
        if s == 0:
            row["token_logprob"], row["token_entropy"] = float(ctx_lp[-n_s:].mean()), float(ctx_ent[-n_s:].mean())
        else:
            row["token_logprob"] = float(raw["step_logprob"][slices[s - 1]].mean())
            row["token_entropy"] = float(raw["step_entropy"][slices[s - 1]].mean())
        out["per_stage"][stage] = row
    out["decode_steps"] = int(n)
    return out


# ---- similarity ----------------------------------------------------------------------------------------------

def _layer_pairs(sim_layer_cos: np.ndarray, tau: float) -> int:
    """(layer, head) entries a MiniCache-style merge removes: per head, walk up the layers and pair layer l with
    l + 1 when their token-wise cosine >= tau and neither is paired yet; each pair stores one."""
    removed = 0
    for h in range(sim_layer_cos.shape[1]):
        l = 0
        while l < sim_layer_cos.shape[0]:
            if sim_layer_cos[l, h] >= tau:
                removed += 1
                l += 2
            else:
                l += 1
    return removed


def similarity(raw, config) -> dict:
    taus = raw["cluster_thresholds"]
    p = len(raw["context_ids"]) if "context_ids" in raw else None
    n_layers, h = raw["sim_adjacent"].shape[1:]
    out = {"thresholds": [float(t) for t in taus], "per_kind": {}}
    for j, kind in enumerate(KINDS):
        hc, hk = raw["sim_head_cos"][j], raw["sim_head_cka"][j]
        off = ~np.eye(h, dtype=bool)
        row = {"adjacent_cosine": float(raw["sim_adjacent"][j].mean()),
               "random_pair_cosine": float(raw["sim_pairs"][j].mean()),
               "per_layer_adjacent": [float(x) for x in raw["sim_adjacent"][j].mean(-1)],
               "per_layer_pairs": [float(x) for x in raw["sim_pairs"][j].mean(-1)],
               "head_cosine_mean": float(hc[:, off].mean()) if h > 1 else None,
               "head_cka_mean": float(hk[:, off].mean()) if h > 1 else None,
               "head_cka_max": float(hk[:, off].max()) if h > 1 else None,
               "cross_layer_cosine_mean": float(raw["sim_layer_cos"][j].mean()) if n_layers > 1 else None,
               "cross_layer_cka_mean": float(raw["sim_layer_cka"][j].mean()) if n_layers > 1 else None,
               "per_layer_cross_cosine": [float(x) for x in raw["sim_layer_cos"][j].mean(-1)],
               "per_layer_cross_cka": [float(x) for x in raw["sim_layer_cka"][j].mean(-1)],
               "allowed": []}
        total_tokens = p * n_layers * h if p else None
        for a, tau in enumerate(taus):
            clusters = raw["sim_clusters"][j, a]
            runs = raw["sim_runs"][j, a]
            kept_heads = sum(greedy_merge_count(hc[l], float(tau)) for l in range(n_layers))
            removed = _layer_pairs(raw["sim_layer_cos"][j], float(tau)) if n_layers > 1 else 0
            row["allowed"].append({
                "tau": float(tau),
                "token_clusters": float(total_tokens / clusters.sum()) if total_tokens else None,
                "adjacent_runs": float(total_tokens / runs.sum()) if total_tokens else None,
                "head_merge": float(n_layers * h / kept_heads),
                "layer_merge": float(n_layers * h / (n_layers * h - removed)),
                "per_layer_kept_fraction": [float(x) for x in clusters.sum(-1) / (p * h)] if p else None})
        out["per_kind"][kind] = row
    return out


# ---- compressions --------------------------------------------------------------------------------------------

def _mean_se(x: np.ndarray):
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def variants(raw) -> List[dict]:
    ref = raw["ref_nll"]
    dense = int(raw["dense_bytes"])
    rows = []
    for j, name in enumerate(raw["var_name"]):
        d, se = _mean_se(raw["var_nll"][j] - ref)
        kl, kl_se = _mean_se(raw["var_kl"][j])
        stored = int(raw["var_bytes"][j])
        saved = dense - stored
        rows.append({
            "name": str(name), "family": str(raw["var_family"][j]), "which": str(raw["var_which"][j]),
            "target": _f(raw["var_target"][j]), "layer": int(raw["var_layer"][j]),
            "bytes": stored, "ratio": dense / stored if stored else None, "saved_fraction": saved / dense,
            "dnll": d, "se": se, "ppl_change": math.exp(d) - 1.0, "kl": kl, "kl_se": kl_se,
            "top1": float(raw["var_top1"][j].mean()),
            "dnll_per_mib_saved": d / (saved / MIB) if saved > 0 else None,
            "kl_per_mib_saved": kl / (saved / MIB) if saved > 0 else None,
            "error_k": float(raw["var_error_k"][j]), "error_v": float(raw["var_error_v"][j]),
            "resident_bytes": int(raw["var_resident_bytes"][j]) if raw["var_resident_bytes"][j] >= 0 else None,
            "params": json.loads(str(raw["var_params"][j])),
        })
    return rows


def ranking(rows: List[dict], key: str = "dnll_per_mib_saved") -> List[dict]:
    """Whole-cache compressions (no single-layer sweep rows, no single-head prunes) that save bytes, by ``key``
    (NLL or KL change per MiB saved), lowest first."""
    keep = [r for r in rows if r["layer"] == -1 and r["family"] != "prune_head" and r[key] is not None]
    return sorted(keep, key=lambda r: (r[key], r["name"]))


def _verdict(raw, index, a: Optional[dict], b: Optional[dict], array: str) -> dict:
    """Paired comparison of variants a (structure) and b (kvprec) on ``array`` (var_nll or var_kl): the mean
    difference a - b, its standard error, and who is lower beyond 2 standard errors."""
    if a is None or b is None:
        winner = ("structure (kvprec cannot store this few bytes)" if a else
                  ("low precision (no compression asked for this ratio)" if b else None))
        return {"margin": None, "se": None, "winner": winner}
    margin, se = _mean_se(raw[array][index[a["name"]]] - raw[array][index[b["name"]]])
    if se is not None and abs(margin) <= 2 * se:
        winner = "neither (within 2 standard errors)"
    else:
        winner = "low precision" if margin > 0 else "structure"
    return {"margin": margin, "se": se, "winner": winner}


def equal_bytes(rows: List[dict], ratios, raw) -> List[dict]:
    """Per target ratio: the compressions asked for it, kvprec's budget mixes at it, the best kvprec uniform tier
    storing at most those bytes, and two verdicts (NLL change and KL) between the best K-and-V compression and the
    best kvprec entry, each entry chosen by its mean KL (the lower-variance measure)."""
    index = {str(n): j for j, n in enumerate(raw["var_name"])}
    table = []
    whole = [r for r in rows if r["layer"] == -1]
    uniform = [r for r in whole if r["family"] == "tier"]
    for target in ratios:
        entry = {"target": float(target), "compressions": {}, "kvprec_budgets": [], "kvprec_best_tier": None}
        for family in COMPRESSION_FAMILIES:
            for which in ("kv", "k", "v"):
                match = [r for r in whole if r["family"] == family and r["which"] == which
                         and r["target"] is not None and abs(r["target"] - target) < 1e-9]
                if match:
                    entry["compressions"][f"{family}:{which}"] = match[0]
        entry["kvprec_budgets"] = [r for r in whole if r["family"] == "budget" and r["target"] is not None
                                   and abs(r["target"] - target) < 1e-9]
        fits = [r for r in uniform if r["ratio"] is not None and r["ratio"] >= target * (1 - 1e-9)]
        entry["kvprec_best_tier"] = min(fits, key=lambda r: r["kl"]) if fits else None
        entry["kvprec_largest_tier_ratio"] = max((r["ratio"] for r in uniform), default=None)
        kv = [entry["compressions"][f"{f}:kv"] for f in COMPRESSION_FAMILIES if f"{f}:kv" in entry["compressions"]]
        best_structure = min(kv, key=lambda r: r["kl"]) if kv else None
        kvprec = entry["kvprec_budgets"] + ([entry["kvprec_best_tier"]] if entry["kvprec_best_tier"] else [])
        best_kvprec = min(kvprec, key=lambda r: r["kl"]) if kvprec else None
        entry["best_structure"] = best_structure["name"] if best_structure else None
        entry["best_kvprec"] = best_kvprec["name"] if best_kvprec else None
        entry["by_nll"] = _verdict(raw, index, best_structure, best_kvprec, "var_nll")
        entry["by_kl"] = _verdict(raw, index, best_structure, best_kvprec, "var_kl")
        table.append(entry)
    return table


def sensitivity(rows: List[dict], n_layers: int) -> dict:
    """Per-layer NLL change and KL of each single-layer sweep (families with one row per layer)."""
    sweeps: Dict[str, Dict[str, List[Optional[float]]]] = {}
    for r in rows:
        if r["layer"] >= 0 and r["family"] in ("tucker", "tier", "prune_layer"):
            label = r["name"].rsplit(" layer ", 1)[0]
            entry = sweeps.setdefault(label, {"dnll": [None] * n_layers, "kl": [None] * n_layers})
            entry["dnll"][r["layer"]], entry["kl"][r["layer"]] = r["dnll"], r["kl"]
    out = {"sweeps": sweeps, "most_sensitive": {}, "rank_correlation": {}}
    for label, values in sweeps.items():
        order = sorted((v, i) for i, v in enumerate(values["kl"]) if v is not None)
        out["most_sensitive"][label] = [i for _, i in order[::-1][:3]]
    labels = sorted(sweeps)
    for a in range(len(labels)):
        for b in range(a + 1, len(labels)):
            out["rank_correlation"][f"{labels[a]} | {labels[b]}"] = _spearman(
                [np.nan if v is None else v for v in sweeps[labels[a]]["kl"]],
                [np.nan if v is None else v for v in sweeps[labels[b]]["kl"]])
    return out


def pruning(rows: List[dict], raw) -> dict:
    out = {"layers": [r for r in rows if r["family"] == "prune_layer"],
           "sets": [r for r in rows if r["family"] == "prune"]}
    single = [r for r in rows if r["family"] == "prune_head"]
    if single and "head_output_norm" in raw:
        scores = raw["head_output_norm"]
        measured, kl = np.full(scores.shape, np.nan), np.full(scores.shape, np.nan)
        for r in single:
            layer, head = (int(x) for x in r["name"].rsplit(" ", 1)[1].split(":"))
            measured[layer, head], kl[layer, head] = r["dnll"], r["kl"]
        out["head_dnll"] = [[_f(x) for x in row] for row in measured]
        out["head_kl"] = [[_f(x) for x in row] for row in kl]
        out["score_vs_measured_spearman"] = _spearman(scores, kl)
        out["harmless_heads"] = int((kl <= 0.001).sum())
    return out


def pareto_front(numbers: np.ndarray, error: np.ndarray, dense: int) -> List[dict]:
    """The rank pairs no other pair beats in both stored numbers and error: [{ratio, error}] by ratio."""
    order = np.lexsort((error.ravel(), numbers.ravel()))
    front, best = [], math.inf
    for idx in order:
        e = float(error.ravel()[idx])
        if e < best - 1e-12:
            best = e
            front.append({"ratio": dense / float(numbers.ravel()[idx]), "error": e})
    return sorted(front, key=lambda p: p["ratio"])


def tucker(raw, rows: List[dict]) -> dict:
    dense = int(np.prod(raw["tucker_shape"]))
    out = {"shape": [int(x) for x in raw["tucker_shape"]], "chosen": [],
           "front": {kind: pareto_front(raw["tucker_numbers"], raw["tucker_error"][j], dense)
                     for j, kind in enumerate(KINDS)}}
    for r in rows:
        if r["family"] == "tucker" and r["layer"] == -1:
            out["chosen"].append({"name": r["name"], "which": r["which"], "target": r["target"], "ratio": r["ratio"],
                                  "ranks_k": r["params"].get("ranks_k"), "ranks_v": r["params"].get("ranks_v"),
                                  "error_k": r["error_k"], "error_v": r["error_v"], "dnll": r["dnll"], "se": r["se"],
                                  "kl": r["kl"]})
    return out


def analyze(raw: Dict[str, np.ndarray], config: dict) -> dict:
    out: Dict[str, object] = {"model": config.get("model_info", {}).get("name"),
                              "context_tokens": int(len(raw["context_ids"])),
                              "continuation_tokens": int(len(raw["continuation_ids"])),
                              "focus": list(config["focus"])}
    if "layer_erank" in raw:
        out["layers"] = layers(raw)
    if "attn_entropy" in raw:
        out["heads"] = heads(raw, config)
        out["tokens"] = tokens(raw)
    if "chan_mag" in raw:
        out["channels"] = channels(raw)
    if "stage_kv" in raw:
        out["stages"] = stages(raw)
    if "sim_adjacent" in raw:
        out["similarity"] = similarity(raw, config)
    if "var_nll" in raw:
        rows = variants(raw)
        out["reference_nll"] = float(raw["ref_nll"].mean())
        out["dense_bytes"] = int(raw["dense_bytes"])
        out["variants"] = rows
        out["ranking"] = [r["name"] for r in ranking(rows)]
        out["ranking_by_kl"] = [r["name"] for r in ranking(rows, "kl_per_mib_saved")]
        rotation = [r["params"]["rotation_bytes"] for r in rows if r["params"].get("rotation_bytes")]
        out["rotation_share"] = rotation[0] / out["dense_bytes"] if rotation else None
        out["equal_bytes"] = equal_bytes(rows, config["ratios"], raw)
        n_layers = int(config.get("model_info", {}).get("layers", 0))
        out["sensitivity"] = sensitivity(rows, n_layers)
        if "tucker_error" in raw:
            out["tucker"] = tucker(raw, rows)
        if any(r["family"].startswith("prune") for r in rows):
            out["pruning"] = pruning(rows, raw)
    return out
