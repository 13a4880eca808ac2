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
            seeds = rng.spawn(2)  # the aggregate's null; the heads' and the metrics' nulls
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
            per_head = _head_units(norm, raw[f"r{r}_layers"], series[r], config, seeds[1])
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
                "metrics": robustness, "heads": per_head,
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
    heads = [h for x in runs for h in x["heads"]]
    hyp = []
    # H1: sparse -- right-skewed, heavy-tailed, concentrated per-step novelty
    agg = {"skew": _mean(x["novelty"]["shape"]["skew"] for x in runs),
           "kurtosis": _mean(x["novelty"]["shape"]["kurtosis"] for x in runs),
           "skew_p": _combine([_one_sided(x["novelty"]["shape"]["skew_z"]) for x in runs], "stouffer"),
           "kurtosis_p": _combine([_one_sided(x["novelty"]["shape"]["kurtosis_z"]) for x in runs], "stouffer"),
           "top10_share": _mean(x["novelty"]["top10_share"] for x in runs),
           "spike_rate": _mean(x["novelty"]["spikes"]["rate"] for x in runs)}
    per = {"skew": _mean(h["skew"] for h in heads), "kurtosis": _mean(h["kurtosis"] for h in heads),
           "skew_p": merge_dependent([h["skew_p"] for h in heads]),
           "kurtosis_p": merge_dependent([h["kurtosis_p"] for h in heads]),
           "top10_share": _mean(h["top10_share"] for h in heads), "spike_rate": _mean(h["spike_rate"] for h in heads)}
    hyp.append(_two_levels("H1", "Most decode steps coast and a few spike: per-step novelty is right-skewed, "
                           "heavy-tailed and concentrated", "skewness and excess kurtosis > 0 (one-sided tests; "
                           "runs combined by Stouffer, heads by 2 x median p); the top 10% of steps hold >= 20% of "
                           "the novelty", agg, per, _sparse))
    # H2: bursty -- spikes cluster beyond a Poisson process
    agg = {"B": _mean(x["novelty"]["burstiness"]["B"] for x in runs),
           "B_null": _mean(x["novelty"]["burstiness"]["null_mean"] for x in runs),
           "B_p": _combine([x["novelty"]["burstiness"]["mc_p"] for x in runs]),
           "dispersion_p": _combine([x["novelty"]["poisson"]["dispersion_p"] for x in runs]),
           "ks_p": _combine([x["novelty"]["poisson"]["ks_p"] for x in runs]),
           "units": sum(x["novelty"]["burstiness"]["B"] is not None for x in runs), "of": len(runs)}
    per = {"B": _mean(h["B"] for h in heads), "B_null": _mean(h["B_null"] for h in heads),
           "B_p": merge_dependent([h["B_p"] for h in heads]),
           "dispersion_p": merge_dependent([h["dispersion_p"] for h in heads]),
           "ks_p": merge_dependent([h["ks_p"] for h in heads]),
           "units": sum(h["B"] is not None for h in heads), "of": len(heads)}
    hyp.append(_two_levels("H2", "Spikes are bursty: they cluster in time beyond a Poisson process",
                           "burstiness B of spike intervals vs its null, as many spikes placed at random (Monte Carlo "
                           "p; runs combined by Fisher, heads by 2 x median p)", agg, per, _bursty))
    # H3: structured in time -- autocorrelation
    agg = {"acf1": _mean(x["novelty"]["acf"][0] if x["novelty"]["acf"] else None for x in runs),
           "ljung_box_p": _combine([x["novelty"]["ljung_box"]["p"] for x in runs])}
    per = {"acf1": _mean(h["acf1"] for h in heads), "ljung_box_p": merge_dependent([h["ljung_box_p"] for h in heads])}
    hyp.append(_two_levels("H3", "Novelty is structured in time: autocorrelated from step to step",
                           "lag-1 autocorrelation, Ljung-Box p (runs combined by Fisher, heads by 2 x median p)",
                           agg, per, _structured))
    # H4: spikes on content, not formatting (pooled counts; treating spikes as independent makes the enrichment
    # test liberal, so "not enriched" is the harder verdict to reach)
    steps = sum(x["novelty"]["n"] for x in runs)
    base = sum((x["trivial"]["base_share"] or 0) * x["novelty"]["n"] for x in runs) / steps if steps else None
    agg = _enrichment(sum(x["trivial"]["spikes_on_trivial"] for x in runs), sum(x["trivial"]["spikes"] for x in runs),
                      base, stats)
    per = _enrichment(sum(h["trivial_spikes"] for h in heads), sum(h["spikes"] for h in heads), base, stats)
    hyp.append(_two_levels("H4", "Spikes mark content (\"thinking turns\"), not trivial tokens (punctuation, "
                           "whitespace)", "share of spikes on trivial tokens vs their share of steps (one-sided "
                           "binomial test for enrichment, spikes pooled)", agg, per, _content))
    # H5: novelty rises with uncertainty (pooled within-run ranks; per head: one-sided Spearman p per head)
    corr = {}
    for key in ("entropy", "surprisal", "entropy_change", "next_entropy"):
        xs = np.concatenate([_ranks(series[r]["agg"]) for r in ids]) if ids else np.zeros(0)
        ys = np.concatenate([_ranks(series[r]["pred"][key]) for r in ids]) if ids else np.zeros(0)
        corr[key] = _spearman(xs, ys)
    agg = {"rho": corr["entropy"]["rho"], "p": _positive(corr["entropy"]), "n": corr["entropy"]["n"],
           "rho_surprisal": corr["surprisal"]["rho"], "rho_entropy_change": corr["entropy_change"]["rho"],
           "rho_next_entropy": corr["next_entropy"]["rho"]}
    per = {"rho": _mean(h["rho_entropy"] for h in heads), "p": merge_dependent([h["rho_entropy_p"] for h in heads]),
           "n": len(heads), "rho_surprisal": _mean(h["rho_surprisal"] for h in heads),
           "rho_entropy_change": None, "rho_next_entropy": None}
    hyp.append(_two_levels("H5", "Novelty rises with the model's uncertainty (entropy of the distribution the token "
                           "was drawn from)", "Spearman rho with entropy, one-sided (aggregate: within-run ranks "
                           "pooled; heads: 2 x median p)", agg, per, _uncertain))
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


def _word(testable: bool, holds: bool, partly: bool) -> str:
    return "not testable" if not testable else "holds" if holds else "partly" if partly else "does not hold"


def _verdict(hid: str, claim: str, statistic: str, values: dict, testable: bool, holds: bool, partly: bool) -> dict:
    """A hypothesis tested at one level (the whole run)."""
    return {"id": hid, "claim": claim, "statistic": statistic, "levels": {"aggregate": values},
            "level_verdicts": {"aggregate": _word(testable, holds, partly)}, "verdict": _word(testable, holds, partly)}


def _two_levels(hid: str, claim: str, statistic: str, agg: dict, per: dict, rule) -> dict:
    """A hypothesis tested on the aggregate novelty and on every (layer, head) series: ``rule(values)`` gives
    (testable, holds, partly) per level; it holds if it holds at both levels, partly if at least partly at one."""
    words = {name: _word(*rule(v)) for name, v in (("aggregate", agg), ("heads", per))}
    tested = [w for w in words.values() if w != "not testable"]
    if not tested:
        verdict = "not testable"
    elif len(tested) == 2 and all(w == "holds" for w in tested):
        verdict = "holds"
    elif any(w in ("holds", "partly") for w in tested):
        verdict = "partly"
    else:
        verdict = "does not hold"
    return {"id": hid, "claim": claim, "statistic": statistic, "levels": {"aggregate": agg, "heads": per},
            "level_verdicts": words, "verdict": verdict}


def _significant(p: Optional[float]) -> bool:
    return p is not None and p < ALPHA


def _sparse(v: dict):
    tests = [_significant(v["skew_p"]), _significant(v["kurtosis_p"])]
    testable = v["skew_p"] is not None and v["kurtosis_p"] is not None
    concentrated = v["top10_share"] is not None and v["top10_share"] >= 0.2
    return testable, all(tests) and concentrated, any(tests)


def _bursty(v: dict):
    above = v["B"] is not None and v["B_null"] is not None and v["B"] > v["B_null"]
    return v["B_p"] is not None, _significant(v["B_p"]) and above, _significant(v["dispersion_p"])


def _structured(v: dict):
    good = _significant(v["ljung_box_p"]) and v["acf1"] is not None and v["acf1"] > 0
    return v["ljung_box_p"] is not None, good, good


def _content(v: dict):
    testable = v["enrichment_p"] is not None and v["spikes"] >= 5
    return testable, not _significant(v["enrichment_p"]), not _significant(v["enrichment_p"])


def _uncertain(v: dict):
    good = _significant(v["p"]) and v["rho"] is not None and v["rho"] > 0
    return v["p"] is not None, good, good


def _enrichment(k: int, n: int, base: Optional[float], stats) -> dict:
    p = finite(stats.binomtest(k, n, base, alternative="greater").pvalue) if n and base and 0 < base < 1 else None
    return {"spikes": n, "on_trivial": k, "share": finite(k / n) if n else None, "base_share": base,
            "enrichment_p": p}


def _positive(c: dict) -> Optional[float]:
    """One-sided p of rho > 0 from a two-sided Spearman result."""
    if c["rho"] is None or c["p"] is None:
        return None
    return c["p"] / 2 if c["rho"] > 0 else 1 - c["p"] / 2


def merge_dependent(ps: List[Optional[float]]) -> Optional[float]:
    """min(1, 2 x median) of the p-values: a valid p-value whatever their dependence (Rueschendorf 1982; Meinshausen,
    Meier and Buehlmann 2009, the quantile rule at 1/2) -- the heads of one run see the same tokens, so their tests are
    not independent. Small when at least half of the heads are significant at half the level."""
    ps = [p for p in ps if p is not None]
    return finite(min(1.0, 2 * float(np.median(ps)))) if ps else None


def _head_units(norm: np.ndarray, layers: np.ndarray, s: dict, config: dict, seed) -> List[dict]:
    """Per (layer, head) series of a run: the temporal statistics the hypotheses read, in the units of the heads."""
    from scipy import stats

    out = []
    rngs = seed.spawn(norm.shape[0] * norm.shape[1])
    base = float(s["trivial"].mean()) if len(s["trivial"]) else None
    for i, (l, h) in enumerate(np.ndindex(*norm.shape[:2])):
        x = norm[l, h]
        if not np.isfinite(x).all() or not len(x):
            continue
        t = temporal_summary(x, config, np.random.default_rng(rngs[i]))
        sp = np.array(t["spikes"]["steps"], dtype=np.int64)
        rho, sur = _spearman(x, s["pred"]["entropy"]), _spearman(x, s["pred"]["surprisal"])
        k = int(s["trivial"][sp].sum()) if len(sp) else 0
        out.append({"layer": int(layers[l]), "head": int(h), "skew": t["shape"]["skew"],
                    "kurtosis": t["shape"]["kurtosis"], "skew_p": _one_sided(t["shape"]["skew_z"]),
                    "kurtosis_p": _one_sided(t["shape"]["kurtosis_z"]), "top10_share": t["top10_share"],
                    "spikes": int(len(sp)), "spike_steps": sp.tolist(), "spike_rate": t["spikes"]["rate"],
                    "B": t["burstiness"]["B"],
                    "B_null": t["burstiness"]["null_mean"], "B_p": t["burstiness"]["mc_p"],
                    "dispersion_p": t["poisson"]["dispersion_p"], "ks_p": t["poisson"]["ks_p"],
                    "acf1": t["acf"][0] if t["acf"] else None, "ljung_box_p": t["ljung_box"]["p"],
                    "rho_entropy": rho["rho"], "rho_entropy_p": _positive(rho), "rho_surprisal": sur["rho"],
                    "trivial_spikes": k,
                    "trivial_p": finite(stats.binomtest(k, len(sp), base, alternative="greater").pvalue)
                    if len(sp) and base and 0 < base < 1 else None})
    return out


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
