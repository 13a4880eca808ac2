"""Analysis of a novelty-study run: analysis.json from raw.npz and config.json alone (kvprec/studies/novelty/study.py
says what raw.npz holds).

Definitions (formulas of the tests in kvprec/studies/novelty/temporal.py):

* analysed steps of a run: the generated tokens at positions p with window <= p < N - 1 (p has a full novelty window
  and its K/V exist; the last token is never fed);
* normalised novelty of (layer, head) at p: the metric divided by its median over the analysed steps of every run of
  the same model (so heads of different scale weigh alike and levels compare across prompt types); the aggregate
  novelty of a step is the mean over layers and heads of the normalised novelty (per layer: over that layer's heads);
* spikes: steps whose robust z of the aggregate (trailing ``spike_window`` analysed steps) exceeds
  ``spike_threshold``; their times are step indices, so inter-arrival times count decode steps;
* trivial token: a token whose text has no letter or digit (punctuation, whitespace, or empty);
* predictive: entropy H_p of the distribution token p was drawn from, surprisal -log p(x_p), entropy change
  H_p - H_(p-1), and the next entropy H_(p+1) (the distribution computed in the same forward pass as p's K/V);
  correlations are Spearman's, pooled over runs on within-run ranks (so run-level differences do not correlate);
* hypotheses, per model, each with its test statistic and a verdict at alpha = 0.05 (``hypotheses``): runs are
  combined by Stouffer's method (one-sided z of skewness and kurtosis) or Fisher's (p-values of independent runs).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import numpy as np

from . import ablation as abl
from .temporal import (autocorrelation, burstiness, burstiness_null, finite, ljung_box, poisson_tests, shape,
                       spikes)

ALPHA = 0.05
TRIVIAL = re.compile(r"[\W_]*")  # no letter or digit (\W: neither word character; _ counted as punctuation)


def is_trivial(text: str) -> bool:
    return TRIVIAL.fullmatch(text) is not None


# ---------------------------------------------------------------------------------------------------------
# Per run

def n_runs(raw) -> int:
    return len(raw["runs_type"])


def analysed_positions(raw, r: int, window: int) -> np.ndarray:
    n = len(raw[f"r{r}_tokens"])
    return np.arange(max(int(raw[f"r{r}_prompt_length"]), window), n - 1)


def medians(raw, runs: List[int], metric: str, window: int) -> np.ndarray:
    """[L, H] median of ``metric`` over the analysed steps of ``runs`` (NaN where none)."""
    parts = [raw[f"r{r}_{metric}"][:, :, analysed_positions(raw, r, window)] for r in runs]
    parts = [p for p in parts if p.shape[-1]]
    if not parts:
        return np.full(raw[f"r{runs[0]}_{metric}"].shape[:2], np.nan)
    return np.median(np.concatenate(parts, -1).astype(np.float64), axis=-1)


def normalised(raw, r: int, metric: str, med: np.ndarray, window: int) -> np.ndarray:
    """[L, H, n] normalised novelty of run r's analysed steps (heads with a non-positive median: NaN)."""
    x = raw[f"r{r}_{metric}"][:, :, analysed_positions(raw, r, window)].astype(np.float64)
    ok = np.isfinite(med) & (med > 0)
    return np.where(ok[..., None], x / np.where(ok, med, 1.0)[..., None], np.nan)


def _mean_heads(x: np.ndarray, axes) -> np.ndarray:
    finite_ = np.isfinite(x)
    return np.where(finite_, x, 0).sum(axes) / np.maximum(finite_.sum(axes), 1)


def _spearman(x: np.ndarray, y: np.ndarray) -> Dict[str, Optional[float]]:
    from scipy.stats import spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"rho": None, "p": None, "n": int(ok.sum())}
    res = spearmanr(x[ok], y[ok])
    return {"rho": finite(res.statistic), "p": finite(res.pvalue), "n": int(ok.sum())}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Within-series ranks scaled to (0, 1) (average ranks for ties), NaN kept."""
    from scipy.stats import rankdata

    out = np.full(len(x), np.nan)
    ok = np.isfinite(x)
    if ok.any():
        out[ok] = rankdata(x[ok]) / (ok.sum() + 1)
    return out


def temporal_summary(x: np.ndarray, cfg: dict, rng: Optional[np.random.Generator]) -> dict:
    """Shape, spikes, burstiness (with its Monte Carlo null unless ``rng`` is None), Poisson tests and
    autocorrelation of a series."""
    sp = spikes(x, cfg["spike_window"], cfg["spike_threshold"])
    b = burstiness(sp)
    null = burstiness_null(len(sp), len(x), cfg["null_reps"], rng) if rng is not None else np.zeros(0)
    order = np.sort(x)[::-1]
    top = max(1, int(round(0.1 * len(x))))
    mean = float(np.mean(x)) if len(x) else None
    return {"n": int(len(x)), "median": finite(np.median(x)) if len(x) else None, "mean": finite(mean),
            "p90": finite(np.quantile(x, 0.9)) if len(x) else None,
            "top10_share": finite(order[:top].sum() / order.sum()) if len(x) and order.sum() > 0 else None,
            "coasting_share": finite((x < mean).mean()) if len(x) else None,
            "shape": shape(x),
            "spikes": {"count": int(len(sp)), "rate": finite(len(sp) / len(x)) if len(x) else None,
                       "steps": sp.tolist()},
            "burstiness": {"B": finite(b), "null_mean": finite(null.mean()) if len(null) else None,
                           "null_p95": finite(np.quantile(null, 0.95)) if len(null) else None,
                           "mc_p": finite((1 + (null >= b).sum()) / (1 + len(null))) if b is not None and len(null)
                           else None},
            "poisson": poisson_tests(sp, len(x), cfg["bin_size"]),
            "acf": [finite(v) for v in autocorrelation(x, cfg["max_lag"])],
            "ljung_box": ljung_box(x, cfg["max_lag"])}


def predictive(raw, r: int, agg: np.ndarray, pos: np.ndarray) -> dict:
    """Entropy / surprisal of run r at the analysed positions and their correlation with the aggregate novelty."""
    prompt = int(raw[f"r{r}_prompt_length"])
    ent, lp = raw[f"r{r}_entropy"].astype(np.float64), raw[f"r{r}_logprob"].astype(np.float64)
    i = pos - prompt
    h = ent[i]
    series = {"entropy": h, "surprisal": -lp[i],
              "entropy_change": np.where(i >= 1, h - ent[np.maximum(i - 1, 0)], np.nan),
              "next_entropy": ent[i + 1]}
    return {"mean_entropy": finite(h.mean()) if len(h) else None,
            "mean_surprisal": finite(-lp[i].mean()) if len(h) else None,
            "series": series, "correlation": {k: _spearman(agg, v) for k, v in series.items()}}


def ablation_summary(raw, r: int, cfg: dict) -> dict:
    """ΔNLL (mean over the continuation tokens of NLL - baseline NLL) per condition, grouped by (mode, fraction,
    rule); random rules averaged over seeds. Also whether the recorded most / least selections are what the run's
    own novelty gives (recomputed here)."""
    pre = f"r{r}_"
    if pre + "abl_skipped" in raw:
        return {"skipped": str(raw[pre + "abl_skipped"])}
    nll = raw[pre + "abl_nll"]
    base = nll[0]
    modes, rules = raw[pre + "abl_mode"].tolist(), raw[pre + "abl_rule"].tolist()
    fractions, masks = raw[pre + "abl_fraction"].tolist(), raw[pre + "abl_mask"]
    n = len(raw[pre + "tokens"])
    sp = abl.split(n, int(raw[pre + "prompt_length"]), int(cfg["block_size"]), int(cfg["window"]))
    recomputed = None
    if sp is not None and sp.prefix == int(raw[pre + "abl_prefix"]):
        scores = abl.block_novelty(raw[pre + cfg["metric"]], sp, int(cfg["block_size"]))
        per_block = scores.mean(axis=(0, 1))
        recomputed = True
        for c in range(1, len(modes)):
            if rules[c] == "random":
                continue
            s = scores if modes[c] == "tier" else per_block
            k = int(masks[c].sum() if modes[c] == "tier" else masks[c][0, 0].sum())
            want = np.zeros(s.shape, bool)
            want.ravel()[abl.choose(s, k, rules[c], None)] = True
            got = masks[c] if modes[c] == "tier" else masks[c][0, 0]
            recomputed &= bool(np.array_equal(want, got))
    cells = {}
    for c in range(1, len(modes)):
        key = f"{modes[c]}@{fractions[c]:g}"
        cell = cells.setdefault(key, {"mode": modes[c], "fraction": fractions[c], "per_token": {}, "dnll": {}})
        cell["per_token"].setdefault(rules[c], []).append(nll[c] - base)
        items = int(masks[c].sum()) if modes[c] == "tier" else int(masks[c][0, 0].sum())
        cell.setdefault("items", items)
    out = {}
    for key, cell in cells.items():
        per = {rule: np.mean(v, axis=0) for rule, v in cell["per_token"].items()}
        out[key] = {"mode": cell["mode"], "fraction": cell["fraction"], "items": cell["items"],
                    "dnll": {rule: finite(v.mean()) for rule, v in per.items()},
                    "dnll_random_seeds": [finite(np.mean(v)) for v in cell["per_token"].get("random", [])]}
    return {"prefix": int(raw[pre + "abl_prefix"]), "continuation_tokens": int(nll.shape[1]),
            "baseline_nll": finite(base.mean()), "candidate_blocks": int(sp.last - sp.first) if sp else None,
            "selection_recomputed": recomputed, "cells": out}


# ---------------------------------------------------------------------------------------------------------
# Whole run

def analyze(raw: Dict[str, np.ndarray], config: dict) -> dict:
    from scipy import stats

    window = int(config["window"])
    metric = config["metric"]
    metrics = [k[3:] for k in raw if k.startswith("r0_") and k[3:].split("_", 1)[0] in ("key", "value")
               and raw[k].ndim == 3 and k[3:] not in ("keys", "values")]
    models = raw["models"].tolist()
    runs_model = raw["runs_model"].tolist()
    types = raw["runs_type"].tolist()
    rng = np.random.SeedSequence(int(config["seed"]))
    out = {"settings": {k: config[k] for k in ("window", "rank", "metric", "spike_window", "spike_threshold",
                                                "bin_size", "max_lag", "null_reps", "block_size", "temperature",
                                                "max_tokens")},
           "alpha": ALPHA, "metrics": metrics, "models": []}
    for mi, model in enumerate(models):
        runs = [r for r in range(n_runs(raw)) if runs_model[r] == mi]
        meds = {m: medians(raw, runs, m, window) for m in metrics}
        per_run, series = [], {}
        for r in runs:
            pos = analysed_positions(raw, r, window)
            norm = normalised(raw, r, metric, meds[metric], window)
            agg = _mean_heads(norm, (0, 1))
            seeds = rng.spawn(2)
            summary = temporal_summary(agg, config, np.random.default_rng(seeds[0]))
            text = raw[f"r{r}_token_text"]
            tokens_at = [str(text[p]) for p in pos]
            triv = np.array([is_trivial(t) for t in tokens_at], dtype=bool)
            sp = np.array(summary["spikes"]["steps"], dtype=np.int64)
            summary["spikes"]["tokens"] = [tokens_at[i] for i in sp.tolist()]
            summary["spikes"]["positions"] = pos[sp].tolist()
            pred = predictive(raw, r, agg, pos)
            series[r] = {"agg": agg, "pred": pred.pop("series"), "trivial": triv, "spikes": sp}
            layers = _mean_heads(norm, 1)                                       # [L, n]
            per_layer = [temporal_summary(layers[l], config, None) for l in range(len(layers))]
            robustness = {}
            for m in metrics:
                x = _mean_heads(normalised(raw, r, m, meds[m], window), (0, 1))
                t = temporal_summary(x, config, np.random.default_rng(seeds[1].spawn(1)[0]))  # one stream per metric
                robustness[m] = {"skew": t["shape"]["skew"], "kurtosis": t["shape"]["kurtosis"],
                                 "spike_rate": t["spikes"]["rate"], "B": t["burstiness"]["B"],
                                 "B_mc_p": t["burstiness"]["mc_p"], "acf1": t["acf"][0] if t["acf"] else None,
                                 "rho_entropy": _spearman(x, series[r]["pred"]["entropy"])["rho"]}
            heads = norm.shape[:2]
            per_run.append({
                "run": r, "model": model, "type": types[r], "source": str(raw["runs_source"][r]),
                "prompt_tokens": int(raw[f"r{r}_prompt_length"]),
                "generated_tokens": int(len(raw[f"r{r}_tokens"]) - int(raw[f"r{r}_prompt_length"])),
                "analysed_steps": int(len(pos)), "first_position": int(pos[0]) if len(pos) else None,
                "seconds": finite(raw[f"r{r}_seconds"]),
                "layers": raw[f"r{r}_layers"].tolist(), "kv_heads": int(heads[1]),
                "novelty": summary,
                "trivial": {"base_share": finite(triv.mean()) if len(triv) else None,
                            "spikes_on_trivial": int(triv[sp].sum()) if len(sp) else 0, "spikes": int(len(sp))},
                "predictive": pred,
                "per_layer": [{"layer": int(raw[f"r{r}_layers"][l]), "median": t["median"],
                               "skew": t["shape"]["skew"], "kurtosis": t["shape"]["kurtosis"],
                               "spike_rate": t["spikes"]["rate"], "B": t["burstiness"]["B"],
                               "acf1": t["acf"][0] if t["acf"] else None} for l, t in enumerate(per_layer)],
                "metrics": robustness,
                "ablation": ablation_summary(raw, r, config)})
        out["models"].append(_model_summary(raw, model, per_run, series, metrics, stats))
    return out


def _combine(ps: List[Optional[float]], method: str = "fisher") -> Optional[float]:
    from scipy.stats import combine_pvalues

    ps = [p for p in ps if p is not None]
    if not ps:
        return None
    return finite(combine_pvalues(np.clip(ps, 1e-300, 1.0), method=method).pvalue)


def _one_sided(z: Optional[float]) -> Optional[float]:
    from scipy.stats import norm

    return None if z is None else float(norm.sf(z))


def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None]
    return finite(np.mean(v)) if v else None


def _model_summary(raw, model: str, runs: List[dict], series: dict, metrics: List[str], stats) -> dict:
    ids = [x["run"] for x in runs]
    hyp = []
    # H1: sparse -- right-skewed, heavy-tailed per-step novelty
    sk_p = _combine([_one_sided(x["novelty"]["shape"]["skew_z"]) for x in runs], "stouffer")
    ku_p = _combine([_one_sided(x["novelty"]["shape"]["kurtosis_z"]) for x in runs], "stouffer")
    sk, ku = _mean(x["novelty"]["shape"]["skew"] for x in runs), _mean(x["novelty"]["shape"]["kurtosis"] for x in runs)
    ok = [p is not None and p < ALPHA for p in (sk_p, ku_p)]
    hyp.append(_verdict("H1", "Most decode steps coast and a few spike: per-step novelty is right-skewed and "
                        "heavy-tailed", "mean skewness / mean excess kurtosis (Stouffer-combined one-sided p)",
                        {"skew": sk, "kurtosis": ku, "skew_p": sk_p, "kurtosis_p": ku_p,
                         "spike_rate": _mean(x["novelty"]["spikes"]["rate"] for x in runs),
                         "top10_share": _mean(x["novelty"]["top10_share"] for x in runs)},
                        sk_p is not None and ku_p is not None, all(ok), any(ok)))
    # H2: bursty -- spikes cluster beyond a Poisson process
    b_p = _combine([x["novelty"]["burstiness"]["mc_p"] for x in runs])
    d_p = _combine([x["novelty"]["poisson"]["dispersion_p"] for x in runs])
    ks_p = _combine([x["novelty"]["poisson"]["ks_p"] for x in runs])
    b, b0 = _mean(x["novelty"]["burstiness"]["B"] for x in runs), _mean(x["novelty"]["burstiness"]["null_mean"]
                                                                         for x in runs)
    strong = b_p is not None and b_p < ALPHA and b is not None and b0 is not None and b > b0
    hyp.append(_verdict("H2", "Spikes are bursty: they cluster in time beyond a Poisson process",
                        "mean burstiness B vs its null (Fisher-combined Monte Carlo p); dispersion and KS tests",
                        {"B": b, "B_null": b0, "B_p": b_p, "dispersion_p": d_p, "ks_p": ks_p,
                         "runs_with_3_spikes": sum(x["novelty"]["burstiness"]["B"] is not None for x in runs)},
                        b_p is not None, strong, strong or (d_p is not None and d_p < ALPHA)))
    # H3: structured in time -- autocorrelation
    lb_p = _combine([x["novelty"]["ljung_box"]["p"] for x in runs])
    r1 = _mean(x["novelty"]["acf"][0] if x["novelty"]["acf"] else None for x in runs)
    good = lb_p is not None and lb_p < ALPHA and r1 is not None and r1 > 0
    hyp.append(_verdict("H3", "Novelty is structured in time: autocorrelated from step to step",
                        "mean lag-1 autocorrelation (Fisher-combined Ljung-Box p)",
                        {"acf1": r1, "ljung_box_p": lb_p}, lb_p is not None, good, good))
    # H4: spikes on content, not formatting
    k = sum(x["trivial"]["spikes_on_trivial"] for x in runs)
    n = sum(x["trivial"]["spikes"] for x in runs)
    steps = sum(x["novelty"]["n"] for x in runs)
    base = sum((x["trivial"]["base_share"] or 0) * x["novelty"]["n"] for x in runs) / steps if steps else None
    enrich_p = finite(stats.binomtest(k, n, base, alternative="greater").pvalue) if n and base and 0 < base < 1 \
        else None
    enriched = enrich_p is not None and enrich_p < ALPHA
    hyp.append(_verdict("H4", "Spikes mark content (\"thinking turns\"), not trivial tokens (punctuation, "
                        "whitespace)", "share of spikes on trivial tokens vs their share of steps (one-sided "
                        "binomial test for enrichment)",
                        {"spikes": n, "on_trivial": k, "share": finite(k / n) if n else None, "base_share": base,
                         "enrichment_p": enrich_p}, enrich_p is not None and n >= 5, not enriched, not enriched))
    # H5: novelty rises with uncertainty (pooled within-run ranks)
    corr = {}
    for key in ("entropy", "surprisal", "entropy_change", "next_entropy"):
        xs = np.concatenate([_ranks(series[r]["agg"]) for r in ids]) if ids else np.zeros(0)
        ys = np.concatenate([_ranks(series[r]["pred"][key]) for r in ids]) if ids else np.zeros(0)
        corr[key] = _spearman(xs, ys)
    e = corr["entropy"]
    good = e["rho"] is not None and e["rho"] > 0 and e["p"] is not None and e["p"] < ALPHA
    hyp.append(_verdict("H5", "Novelty rises with the model's uncertainty (entropy of the distribution the token was "
                        "drawn from)", "Spearman rho of aggregate novelty and entropy (within-run ranks, pooled)",
                        {"rho": e["rho"], "p": e["p"], "n": e["n"], "rho_surprisal": corr["surprisal"]["rho"],
                         "rho_entropy_change": corr["entropy_change"]["rho"],
                         "rho_next_entropy": corr["next_entropy"]["rho"]}, e["rho"] is not None, good, good))
    # H6: causal -- the most novel blocks matter more than random ones
    cells = _ablation_cells(raw, runs)
    testable = [c for c in cells.values() if c["most_vs_random_p"] is not None]
    wins = [c for c in testable if c["dnll_most"] > c["dnll_random"] and c["most_vs_random_p"] < ALPHA]
    hyp.append(_verdict("H6", "Novelty marks what matters: ablating the most novel blocks raises the continuation's "
                        "NLL more than ablating random ones", "mean dNLL most vs random per (mode, fraction) "
                        "(one-sided Wilcoxon signed-rank over continuation tokens, pooled over runs)",
                        {"cells": len(testable), "cells_most_above_random": len(wins),
                         "dnll_most": _mean(c["dnll_most"] for c in testable),
                         "dnll_random": _mean(c["dnll_random"] for c in testable),
                         "dnll_least": _mean(c["dnll_least"] for c in testable)},
                        bool(testable), len(wins) == len(testable) and bool(testable), bool(wins)))
    # H7: prompt types differ
    by_type = {}
    for x in runs:
        by_type.setdefault(x["type"], []).append(x)
    groups = [np.concatenate([series[x["run"]]["agg"] for x in rs]) for rs in by_type.values()]
    kw = stats.kruskal(*groups) if len(groups) >= 2 and all(len(g) for g in groups) else None
    hyp.append(_verdict("H7", "Novelty differs across prompt types", "Kruskal-Wallis H over the types' per-step "
                        "aggregate novelty", {"types": len(by_type), "H": finite(kw.statistic) if kw else None,
                                              "p": finite(kw.pvalue) if kw else None},
                        kw is not None, kw is not None and kw.pvalue < ALPHA, kw is not None and kw.pvalue < ALPHA))
    return {"model": model, "runs": runs, "hypotheses": hyp, "ablation": cells,
            "by_type": {t: _type_summary(rs, series) for t, rs in by_type.items()},
            "per_layer": _per_layer(runs), "metrics": {m: _metric_summary(runs, m) for m in metrics}}


def _verdict(hid: str, claim: str, statistic: str, values: dict, testable: bool, holds: bool, partly: bool) -> dict:
    verdict = "not testable" if not testable else "holds" if holds else "partly" if partly else "does not hold"
    return {"id": hid, "claim": claim, "statistic": statistic, "values": values, "verdict": verdict}


def _ablation_cells(raw, runs: List[dict]) -> dict:
    """Per (mode, fraction): mean dNLL over the runs' continuation tokens of most / least / random (random: the
    per-token mean over seeds), and the one-sided Wilcoxon signed-rank p of the per-token differences most - random
    (greater) and least - random (less), pooled over runs."""
    from scipy.stats import wilcoxon

    out = {}
    for x in runs:
        a = x["ablation"]
        if "skipped" in a:
            continue
        pre = f"r{x['run']}_"
        nll, rules = raw[pre + "abl_nll"], raw[pre + "abl_rule"].tolist()
        modes, fractions = raw[pre + "abl_mode"].tolist(), raw[pre + "abl_fraction"].tolist()
        for key, cell in a["cells"].items():
            rows = [c for c in range(1, len(modes)) if f"{modes[c]}@{fractions[c]:g}" == key]
            per = {rule: np.mean([nll[c] - nll[0] for c in rows if rules[c] == rule], axis=0)
                   for rule in ("most", "least", "random") if any(rules[c] == rule for c in rows)}
            o = out.setdefault(key, {"mode": cell["mode"], "fraction": cell["fraction"], "runs": 0,
                                     "runs_most_above_random": 0, "diffs": {"most": [], "least": [], "random": []}})
            o["runs"] += 1
            for rule, v in per.items():
                o["diffs"][rule].append(v)
            if "most" in per and "random" in per and per["most"].mean() > per["random"].mean():
                o["runs_most_above_random"] += 1
    for o in out.values():
        d = {rule: np.concatenate(v) if v else np.zeros(0) for rule, v in o.pop("diffs").items()}
        for rule in ("most", "least", "random"):
            o[f"dnll_{rule}"] = finite(d[rule].mean()) if len(d[rule]) else None
        for name, first, alt in (("most_vs_random", "most", "greater"), ("least_vs_random", "least", "less")):
            diff = d[first] - d["random"] if len(d[first]) == len(d["random"]) else np.zeros(0)
            o[f"{name}_p"] = (finite(wilcoxon(diff, alternative=alt).pvalue)
                              if len(diff) >= 5 and np.any(diff != 0) else None)
            o[f"{name}_tokens"] = int(len(diff))
    return dict(sorted(out.items()))


def _type_summary(rs: List[dict], series: dict) -> dict:
    agg = np.concatenate([series[x["run"]]["agg"] for x in rs])
    return {"runs": len(rs), "steps": int(len(agg)), "median_novelty": finite(np.median(agg)) if len(agg) else None,
            "mean_novelty": finite(agg.mean()) if len(agg) else None,
            "spike_rate": _mean(x["novelty"]["spikes"]["rate"] for x in rs),
            "B": _mean(x["novelty"]["burstiness"]["B"] for x in rs),
            "skew": _mean(x["novelty"]["shape"]["skew"] for x in rs),
            "kurtosis": _mean(x["novelty"]["shape"]["kurtosis"] for x in rs),
            "acf1": _mean(x["novelty"]["acf"][0] if x["novelty"]["acf"] else None for x in rs),
            "mean_entropy": _mean(x["predictive"]["mean_entropy"] for x in rs),
            "rho_entropy": _mean(x["predictive"]["correlation"]["entropy"]["rho"] for x in rs)}


def _per_layer(runs: List[dict]) -> List[dict]:
    if not runs:
        return []
    out = []
    for i, row in enumerate(runs[0]["per_layer"]):
        rows = [x["per_layer"][i] for x in runs]
        out.append({"layer": row["layer"], **{k: _mean(r[k] for r in rows)
                                              for k in ("median", "skew", "kurtosis", "spike_rate", "B", "acf1")}})
    return out


def _metric_summary(runs: List[dict], m: str) -> dict:
    rows = [x["metrics"][m] for x in runs]
    return {"skew": _mean(r["skew"] for r in rows), "kurtosis": _mean(r["kurtosis"] for r in rows),
            "spike_rate": _mean(r["spike_rate"] for r in rows), "B": _mean(r["B"] for r in rows),
            "B_p": _combine([r["B_mc_p"] for r in rows]), "acf1": _mean(r["acf1"] for r in rows),
            "rho_entropy": _mean(r["rho_entropy"] for r in rows)}
