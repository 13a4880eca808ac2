"""analysis.json of the recall study: a pure function of raw.npz and config.json (kvprec/studies/recall/study.py
lists the raw arrays).

Per decode step the primary recall of a policy is the mean over the (layer, KV head) rows of the per-row recall
(``recall_mean``); the aggregate-row recall (needed and retained sets of the attention averaged over every layer
and head, ``recall_global``) is reported beside it for the simulated policies.

Hypotheses and how they are decided (bootstrap intervals by step and by sample, kvprec/studies/recall/stats.py):

* H1, "high token entropy marks the steps where a static policy has evicted what the model needs": a strong
  negative correlation between H_t and recall_t. Per policy and budget: "holds" when Spearman rho <= -0.5 and
  both intervals (by step and by sample) lie below 0, "weak" when they lie below 0 but rho > -0.5, "does not
  hold (positive correlation)" when both lie above 0, "does not hold" otherwise.
  The headline is H2O's (the policy the hypothesis names); the others are listed.
* H2, "stronger at smaller budgets": given a negative correlation at the smallest budget (H1 "holds" or "weak"
  there), rho is more negative at the smaller of each adjacent pair of budgets, with both paired intervals of
  rho(small) - rho(large) below 0 for every pair ("holds"), for the extreme pair only ("partly"), or for none
  ("does not hold"); without a negative correlation at the smallest budget H2 does not hold whatever the
  differences (they are reported).
* Entropy-triggered recall "beats the best static policy at equal memory" at a budget when the best ETR row's
  mean NLL is below the best static row's and both intervals of the per-step difference lie below 0; the entropy's
  timing "helps" when that ETR row also beats its random-trigger twin (as many recalls, at random steps) the same
  way.
"""
from __future__ import annotations

import re
from typing import Dict, List

import numpy as np

from .stats import bin_index, bin_labels, correlations, mean_interval

STRONG = -0.5  # Spearman rho at or below which a negative correlation counts as strong


def _key(b: float) -> str:
    return f"{b:g}"


def _list(x) -> list:
    return np.asarray(x, dtype=np.float64).round(6).tolist()


def _mean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def _normal(text: str) -> str:
    """Lower case, articles and punctuation dropped, spaces collapsed (SQuAD-style answer matching)."""
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def recall_views(raw: Dict[str, np.ndarray]):
    """(recall_mean [N, n_pol, n_b], recall_global [N, n_pol, n_b]) from raw "recall" [N, n_pol, n_b, R + 1]."""
    rec = raw["recall"].astype(np.float64)
    return rec[..., :-1].mean(-1), rec[..., -1]


def _below_zero(entry: dict) -> bool:
    """Both bootstrap intervals (by step and by sample) lie below 0: the conservative reading."""
    return all(entry[k][1] is not None and entry[k][1] < 0 for k in ("ci_step", "ci_sample"))


def _h1_verdict(entry: dict) -> str:
    rho = entry["r"]
    if rho is None:
        return "undefined (constant recall)"
    if _below_zero(entry):
        return "holds" if rho <= STRONG else "weak"
    if all(entry[k][0] is not None and entry[k][0] > 0 for k in ("ci_step", "ci_sample")):
        return "does not hold (positive correlation)"
    return "does not hold"


def analyze(raw: Dict[str, np.ndarray], config: dict) -> dict:
    budgets = [float(b) for b in raw["budgets"]]
    policies = [str(p) for p in raw["policies"]]
    edges = [float(e) for e in raw["entropy_edges"]]
    n_boot, seed = int(config.get("bootstrap", 2000)), int(config.get("seed", 0))
    groups = raw["step_sample"]
    entropy = raw["entropy"].astype(np.float64)
    n = entropy.size
    layers, kv_heads = int(raw["model_layers"]), int(raw["model_kv_heads"])
    rmean, rglobal = recall_views(raw)
    bins = bin_index(entropy, edges)
    labels = bin_labels(edges)
    out: dict = {"budgets": budgets, "policies": policies, "entropy_bins": labels, "steps": int(n)}
    if n < 3:
        raise ValueError(f"recall study: {n} decode steps in the run; at least 3 are needed for correlations")

    # ---- overview -----------------------------------------------------------------------------------------
    steps = raw["sample_steps"]
    answers = [[_normal(x) for x in str(a).split(" | ")] for a in raw["sample_answers"]]
    found = [any(x and x in _normal(g) for x in ans) for ans, g in zip(answers, raw["sample_generated"])]
    out["overview"] = {
        "samples": int(steps.size), "steps_per_sample": {"min": int(steps.min()), "mean": float(steps.mean()),
                                                        "max": int(steps.max())},
        "prompt_tokens": {"min": int(raw["sample_prompt_len"].min()), "mean": float(raw["sample_prompt_len"].mean()),
                          "max": int(raw["sample_prompt_len"].max())},
        "entropy": {"mean": float(entropy.mean()), "median": float(np.median(entropy)),
                    "p90": float(np.percentile(entropy, 90))},
        "bin_counts": [int((bins == i).sum()) for i in range(len(labels))],
        "answer_found": int(sum(found)), "oracle_nll": float(raw["nll"].mean()),
        "truncated_samples": int((raw["sample_truncated"] > 0).sum()),
        "seconds": {k[len("seconds_"):]: float(raw[k].sum()) for k in raw if k.startswith("seconds_")},
    }

    # ---- H1, H2: correlations ----------------------------------------------------------------------------
    ys, diffs = {}, []
    for pi, p in enumerate(policies):
        for bi, b in enumerate(budgets):
            ys[f"{p}@{_key(b)}"] = rmean[:, pi, bi]
            if np.isfinite(rglobal[:, pi, bi]).all():
                ys[f"{p}@{_key(b)}:global"] = rglobal[:, pi, bi]
        order = sorted(range(len(budgets)), key=lambda i: budgets[i])
        pairs = list(zip(order[:-1], order[1:]))
        if len(order) > 2:
            pairs.append((order[0], order[-1]))
        diffs += [(f"{p}@{_key(budgets[i])}", f"{p}@{_key(budgets[j])}") for i, j in pairs]
    corr = correlations(entropy, ys, groups, n_boot=n_boot, seed=seed, differences=diffs)
    out["correlations"] = corr

    h1, h2 = {}, {}
    for p in policies:
        h1[p] = {}
        for b in budgets:
            s = corr[f"{p}@{_key(b)}"]["spearman"]
            h1[p][_key(b)] = {"rho": s["r"], "ci": s["ci_sample"], "ci_step": s["ci_step"], "verdict": _h1_verdict(s)}
        order = sorted(budgets)
        adjacent = [corr[f"{p}@{_key(a)} - {p}@{_key(c)}"]["spearman"] for a, c in zip(order[:-1], order[1:])]
        extreme = (corr[f"{p}@{_key(order[0])} - {p}@{_key(order[-1])}"]["spearman"]
                   if len(order) > 2 else (adjacent[0] if adjacent else None))
        if not adjacent:
            verdict = "undefined (one budget)"
        elif h1[p][_key(order[0])]["verdict"] not in ("holds", "weak"):
            verdict = "does not hold (no negative correlation at the smallest budget to be stronger)"
        elif all(_below_zero(d) for d in adjacent):
            verdict = "holds"
        elif extreme is not None and _below_zero(extreme):
            verdict = "partly"
        else:
            verdict = "does not hold"
        h2[p] = {"adjacent": adjacent, "extreme": extreme, "verdict": verdict}
    out["h1"], out["h2"] = h1, h2

    # ---- per layer / head ----------------------------------------------------------------------------------
    from scipy.stats import spearmanr

    rec = raw["recall"].astype(np.float64)[..., :-1].reshape(n, len(policies), len(budgets), layers, kv_heads)
    per_layer_rho = np.full((len(policies), len(budgets), layers), np.nan)
    for pi in range(len(policies)):
        for bi in range(len(budgets)):
            for li in range(layers):
                y = rec[:, pi, bi, li].mean(-1)
                if np.ptp(y) > 0:
                    per_layer_rho[pi, bi, li] = spearmanr(entropy, y).statistic
    out["layers"] = {"mean_recall": _list(rec.mean(0)),  # [n_pol, n_b, L, H_kv]
                     "spearman_rho": _list(per_layer_rho)}  # [n_pol, n_b, L]

    # ---- entropy bins ----------------------------------------------------------------------------------------
    out["bins"] = {p: {_key(b): [mean_interval(rmean[bins == i, pi, bi], groups[bins == i], n_boot=n_boot, seed=seed)
                                 for i in range(len(labels))] for bi, b in enumerate(budgets)}
                   for pi, p in enumerate(policies)}

    # ---- entropy gap ----------------------------------------------------------------------------------------
    gh, gn = raw["gap_entropy"].astype(np.float64), raw["gap_nll"].astype(np.float64)
    gap = {}
    for pi, p in enumerate(policies):
        gap[p] = {}
        for bi, b in enumerate(budgets):
            ok = np.isfinite(gh[:, pi, bi]).all(-1) & np.isfinite(gn[:, pi, bi]).all(-1)
            d_h = gh[ok, pi, bi, 1] - gh[ok, pi, bi, 0]
            d_n = gn[ok, pi, bi, 1] - gn[ok, pi, bi, 0]
            entry = {"steps": int(ok.sum()),
                     "restore_entropy": mean_interval(d_h, groups[ok], n_boot=n_boot, seed=seed),
                     "restore_nll": mean_interval(d_n, groups[ok], n_boot=n_boot, seed=seed),
                     "restricted_entropy_vs_full": _mean(gh[ok, pi, bi, 0] - entropy[ok]),
                     "restricted_nll_vs_full": _mean(gn[ok, pi, bi, 0] - raw["nll"][ok]),
                     "restore_nll_by_bin": [_mean(d_n[bins[ok] == i]) for i in range(len(labels))],
                     "restore_entropy_by_bin": [_mean(d_h[bins[ok] == i]) for i in range(len(labels))]}
            gap[p][_key(b)] = entry
    out["gap"] = gap
    checked = raw["gap_check"][np.isfinite(raw["gap_check"])]
    out["checks"] = {"rerun_max_abs_logit_diff": float(checked.max()) if checked.size else None,
                     "rerun_steps": int(checked.size)}

    # ---- kvprec tiering read as kept ---------------------------------------------------------------------
    if "kvprec" in policies:
        pi = policies.index("kvprec")
        out["kvprec"] = {_key(b): {"recall": float(rmean[:, pi, bi].mean()),
                                   "kept_over_k": float(raw["kept_ratio"][:, bi].mean()),
                                   "nll_vs_full": float((raw["kvprec_nll"][:, bi] - raw["nll"]).mean()),
                                   "resident_bytes_mean": float(raw["sample_kvprec_bytes"][:, bi].mean()),
                                   "full_cache_bytes_mean": float(raw["sample_full_cache_bytes"].mean())}
                         for bi, b in enumerate(budgets)}

    # ---- supporting facts -----------------------------------------------------------------------------------
    with_sf = np.isfinite(raw["needed_in_sf"]).all(-1)
    if with_sf.any():
        out["supporting"] = {
            "steps": int(with_sf.sum()),
            "needed_in_sf": {_key(b): _mean(raw["needed_in_sf"][with_sf, bi]) for bi, b in enumerate(budgets)},
            "sf_share_of_past": _mean(raw["sf_share"][with_sf]),
            "retained_sf": {p: {_key(b): _mean(raw["retained_sf"][with_sf, pi, bi]) for bi, b in enumerate(budgets)}
                            for pi, p in enumerate(policies)}}

    out["etr"] = _etr(raw, config, budgets, groups, n_boot, seed)
    out["verdicts"] = _verdicts(out, config)
    return out


def _etr(raw, config, budgets: List[float], groups, n_boot: int, seed: int) -> dict:
    fractions, kinds, bases = raw["ev_row_fraction"], [str(k) for k in raw["ev_row_kind"]], [
        str(b) for b in raw["ev_row_base"]]
    nll, rec, trig = raw["ev_nll"], raw["ev_recall"], raw["ev_triggered"]
    full = raw["nll"].astype(np.float64)
    triggers_total = int(trig.sum())
    res: dict = {"threshold": float(config.get("etr_threshold", np.nan)),
                 "recall_fraction": float(config.get("etr_fraction", np.nan)),
                 "host_seconds_per_trigger": (float(raw["ev_trigger_seconds"].sum()) / triggers_total
                                              if triggers_total else None),
                 "step_seconds_mean": float(raw["ev_step_seconds"].mean()), "caches": len(kinds), "rows": {}}
    for b in budgets:
        index = {f"{kinds[j]}:{bases[j]}": j for j in range(len(kinds)) if fractions[j] == b}
        rows = {}
        for name, j in index.items():
            t = trig[:, j]
            rows[name] = {"nll": float(nll[:, j].mean()), "nll_vs_full": float((nll[:, j] - full).mean()),
                          "recall": float(rec[:, j].mean()),
                          "recall_on_triggers": float(rec[t, j].mean()) if t.any() else None,
                          "triggers": int(t.sum()), "trigger_rate": float(t.mean()),
                          "scanned_bytes": int(raw["ev_scanned_bytes"][:, j].sum()),
                          "moved_bytes": int(raw["ev_moved_bytes"][:, j].sum())}
        diff = lambda a, c: mean_interval(nll[:, index[a]] - nll[:, index[c]], groups,  # noqa: E731
                                          n_boot=n_boot, seed=seed)
        best_static = min((k for k in rows if k.startswith("static:")), key=lambda k: rows[k]["nll"])
        entry = {"rows": rows, "best_static": best_static}
        etr = [k for k in rows if k.startswith("etr:")]
        if etr:
            best_etr = min(etr, key=lambda k: rows[k]["nll"])
            entry["best_etr"] = best_etr
            entry["best_etr_minus_best_static"] = d = diff(best_etr, best_static)
            entry["etr_minus_static"] = {k[4:]: diff(k, "static:" + k[4:]) for k in etr}
            entry["etr_minus_random"] = {k[4:]: diff(k, "random:" + k[4:]) for k in etr if "random:" + k[4:] in rows}
            entry["recall_gain_over_static"] = {k[4:]: rows[k]["recall"] - rows["static:" + k[4:]]["recall"]
                                                for k in etr}
            entry["beats_best_static"] = bool(d["mean"] < 0 and _below_zero(d))
            timing = entry["etr_minus_random"].get(best_etr[4:])
            entry["entropy_timing_helps"] = None if timing is None else bool(timing["mean"] < 0 and _below_zero(timing))
        res["rows"][_key(b)] = entry
    return res


def _verdicts(a: dict, config: dict) -> dict:
    head = "h2o" if "h2o" in a["policies"] else a["policies"][0]
    smallest = _key(min(a["budgets"]))
    h1 = a["h1"][head][smallest]
    held = {p: sum(v["verdict"] == "holds" for v in a["h1"][p].values()) for p in a["policies"]}
    etr = a["etr"]["rows"]
    weak = {p: sum(v["verdict"] == "weak" for v in a["h1"][p].values()) for p in a["policies"]}
    return {"h1": {"policy": head, "budget": smallest, "rho": h1["rho"], "ci": h1["ci"], "verdict": h1["verdict"],
                   "n": a["steps"], "samples": a["overview"]["samples"], "budgets_holding": held,
                   "budgets_weak": weak},
            "h2": {"policy": head, "verdict": a["h2"][head]["verdict"]},
            "etr": {b: bool(v.get("beats_best_static", False)) for b, v in etr.items()}}
