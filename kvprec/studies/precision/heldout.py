"""Per-prompt-kind analysis and held-out validation of the precision study: analysis.json's ``probes`` entry from
the ``probe_*`` arrays of raw.npz (collected by kvprec/studies/precision/probes.py, layout there), and report.md's
sections 6 and 7 from it.

Correlations are Spearman rho over the sampled (layer, KV head, block) items of one probe, between a block score
(sum over the block's positions) and a measured sensitivity (mean over a set of queries), in five settings::

    in_sample        scores from the probe's calibration queries  vs  sensitivity at those queries
    heldout_queries  scores from the probe's calibration queries  vs  sensitivity at its held-out (later) queries
    heldout_prompt   scores calibrated on the other probes        vs  sensitivity at the probe's calibration queries
    heldout_both     scores calibrated on the other probes        vs  sensitivity at the probe's held-out queries
    ceiling          scores from the probe's held-out queries     vs  sensitivity at those queries (in-sample)

"Calibrated on the other probes" (:func:`cross_sets`): the probes of every other kind (the built-in prompts), or,
where all probes share one kind (windows of a --text file), the other windows. Their block scores are each divided
by their mean over all (layer, head, block) and averaged: a score carried to the new text by position only, as
the precision map carries it. Summaries are means over probes of the per-probe rho (None entries skipped).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from . import measure as pr
from .probes import SCORE_METHODS

MEASURES = ("kl", "dlogp", "d_attn")
SETTINGS = ("in_sample", "heldout_queries", "heldout_prompt", "heldout_both", "ceiling")
SETTING_TITLES = {"in_sample": "in-sample", "heldout_queries": "held-out queries",
                  "heldout_prompt": "held-out prompt", "heldout_both": "held-out prompt + queries",
                  "ceiling": "ceiling (scores from the held-out queries)"}
LOCALITY = ("recency_share", "recency_uniform", "anchor_share", "sink_at_0", "anchors_per_head",
            "cluster_top_share", "cluster_count", "first_block_mass_share")
PREDICTS = 0.5  # rho below this: "does not predict" (the threshold of report section 1)

OLD_RUN = ("not in this run's raw.npz: the run predates the per-kind and held-out collection; rerun "
           "`kvprec study precision` to get sections 6 and 7")


def _f(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(vals) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return _f(np.mean(vals)) if vals else None


def cross_sets(kinds: List[str]) -> np.ndarray:
    """bool [K, K]: row i marks the probes whose calibration scores predict probe i out of sample: every probe of
    another kind, or, where there is no other kind, every other probe. Never probe i itself."""
    k = len(kinds)
    out = np.zeros((k, k), dtype=bool)
    for i in range(k):
        other_kind = [j for j in range(k) if kinds[j] != kinds[i]]
        for j in (other_kind or [j for j in range(k) if j != i]):
            out[i, j] = True
    return out


def cross_scores(blocks: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """[K, ...] block scores -> [K, ...]: per probe i, the mean over sets[i] of each probe's scores divided by their
    mean (NaN where sets[i] is empty)."""
    norm = blocks / np.maximum(blocks.reshape(len(blocks), -1).mean(1), np.finfo(float).tiny).reshape(
        -1, *[1] * (blocks.ndim - 1))
    out = np.full(blocks.shape, np.nan)
    for i in range(len(blocks)):
        if sets[i].any():
            out[i] = norm[sets[i]].mean(0)
    return out


def query_columns(raw: Dict[str, np.ndarray]):
    """Column indices into the sensitivity arrays' last axis of the calibration and the held-out queries."""
    pos = raw["probe_query_positions"].tolist()
    return [pos.index(int(x)) for x in raw["probe_cal_queries"]], [pos.index(int(x)) for x in raw["probe_ho_queries"]]


def _locality(raw, i: int, t: int) -> Dict[str, float]:
    mass = raw["probe_cal_attention_mass"][i]
    anchors = raw["probe_loc_anchors"][i]  # [L, Hq, N]
    return {"recency_share": float(raw["probe_loc_recency_share"][i].mean()),
            "recency_uniform": float(raw["probe_loc_recency_uniform"][i].mean()),
            "anchor_share": float(raw["probe_loc_anchor_share"][i].mean()),
            "sink_at_0": float(anchors[..., 0].mean()),
            "anchors_per_head": float(anchors.sum(-1).mean()),
            "cluster_top_share": float(raw["probe_loc_cluster_top_share"][i].mean()),
            "cluster_count": float(raw["probe_loc_cluster_count"][i].mean()),
            "first_block_mass_share": float((mass[..., :t].sum(-1) / mass.sum(-1)).mean())}


def analyze_probes(raw: Dict[str, np.ndarray], config: dict) -> dict:
    """analysis.json's ``probes`` (module docstring); ``{"skipped": reason}`` where the run has no probes."""
    if "probe_kinds" not in raw:
        return {"skipped": str(raw["probe_skipped"]) if "probe_skipped" in raw else OLD_RUN}
    t = int(config["block_size"])
    tiers = list(config["tiers"])
    kinds = [str(k) for k in raw["probe_kinds"].tolist()]
    items = raw["probe_items"]
    cal_cols, ho_cols = query_columns(raw)
    cal = {m: pr.block_sums(raw[f"probe_cal_{m}"], t) for m in SCORE_METHODS}
    ho = {m: pr.block_sums(raw[f"probe_ho_{m}"], t) for m in SCORE_METHODS}
    sets = cross_sets(kinds)
    cross = {m: cross_scores(cal[m], sets) for m in SCORE_METHODS}
    sens_cal = {s: raw[f"probe_sens_{s}"][..., cal_cols].mean(-1) for s in MEASURES}
    sens_ho = {s: raw[f"probe_sens_{s}"][..., ho_cols].mean(-1) for s in MEASURES}
    pairs = {"in_sample": (cal, sens_cal), "heldout_queries": (cal, sens_ho), "heldout_prompt": (cross, sens_cal),
             "heldout_both": (cross, sens_ho), "ceiling": (ho, sens_ho)}

    empty = {s: {tier: {m: None for m in SCORE_METHODS} for tier in tiers} for s in MEASURES}
    layers = sorted(set(items[:, 0].tolist()))

    def rho(scores, sens, i, sel):
        return pr.rank_correlations({m: scores[m][i] for m in SCORE_METHODS}, items[sel],
                                    {s: sens[s][i][sel] for s in MEASURES}, tiers)

    per_probe = []
    for i, kind in enumerate(kinds):
        corr, within = {}, {}
        for name, (scores, sens) in pairs.items():
            if name in ("heldout_prompt", "heldout_both") and not sets[i].any():  # a single probe: no other one
                corr[name] = within[name] = empty
                continue
            corr[name] = rho(scores, sens, i, slice(None))
            # within one layer (mean over layers of rho over that layer's items): block ranking, not layer ranking
            parts = [rho(scores, sens, i, items[:, 0] == l) for l in layers if (items[:, 0] == l).sum() >= 3]
            within[name] = {s: {tier: {m: _mean(c[s][tier][m] for c in parts) for m in SCORE_METHODS}
                                for tier in tiers} for s in MEASURES}
        per_probe.append({"kind": kind, "offset": int(raw["probe_offsets"][i]),
                          "calibrated_on": np.flatnonzero(sets[i]).tolist(), "correlations": corr,
                          "correlations_within_layer": within,
                          "locality": _locality(raw, i, t),
                          "sensitivity_mean": {s: {tier: _f(sens_cal[s][i][:, ti].mean()) for ti, tier in
                                                   enumerate(tiers)} for s in MEASURES}})

    def summary(probes: List[int], key: str = "correlations"):
        return {name: {s: {tier: {m: _mean(per_probe[i][key][name][s][tier][m] for i in probes)
                                  for m in SCORE_METHODS} for tier in tiers} for s in MEASURES} for name in SETTINGS}

    order = list(dict.fromkeys(kinds))
    per_kind = {}
    for kind in order:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        per_kind[kind] = {"probes": idx, "correlations": summary(idx),
                          "locality": {k: _mean(per_probe[i]["locality"][k] for i in idx) for k in LOCALITY},
                          "sensitivity_mean": {s: {tier: _mean(per_probe[i]["sensitivity_mean"][s][tier] for i in idx)
                                                   for tier in tiers} for s in MEASURES}}

    # does the in-sample rho depend on the kind? range over kinds vs the sampling noise of a Spearman rho over M
    # items (Fisher z standard error 1.03 / sqrt(M - 3), Fieller et al. 1957; a difference of two: sqrt(2) times)
    m_items = len(items)
    noise = 2 * math.sqrt(2) * 1.03 / math.sqrt(m_items - 3) if m_items > 3 else None
    dependence = {}
    for s in MEASURES:
        dependence[s] = {}
        for tier in tiers:
            dependence[s][tier] = {}
            for m in SCORE_METHODS:
                vals = {k: per_kind[k]["correlations"]["in_sample"][s][tier][m] for k in order}
                vals = {k: v for k, v in vals.items() if v is not None}
                if len(vals) < 2:
                    dependence[s][tier][m] = None
                    continue
                lo, hi = min(vals, key=vals.get), max(vals, key=vals.get)
                dz = math.atanh(min(vals[hi], 0.9999)) - math.atanh(max(vals[lo], -0.9999))
                dependence[s][tier][m] = {"min": vals[lo], "min_kind": lo, "max": vals[hi], "max_kind": hi,
                                          "fisher_z_range": _f(dz), "noise_z": _f(noise),
                                          "depends_on_kind": bool(noise is not None and dz > noise)}

    everything = list(range(len(kinds)))
    return {"kinds": order, "n_probes": len(kinds), "context": int(raw["probe_context"]), "items": int(m_items),
            "calibration_queries": raw["probe_cal_queries"].tolist(),
            "heldout_queries": raw["probe_ho_queries"].tolist(), "overall": summary(everything),
            "overall_within_layer": summary(everything, "correlations_within_layer"), "per_kind": per_kind,
            "kind_dependence": dependence, "per_probe": per_probe}


# ---------------------------------------------------------------------------------------------------------
# Report sections 6 and 7 (from analysis.json's ``probes`` only)

def _num(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def report_tier(tiers: List[str]) -> str:
    return "int4" if "int4" in tiers else tiers[0]


def render_probes(a: dict, config: dict) -> List[str]:
    tiers = list(config["tiers"])
    tier = report_tier(tiers)
    if "skipped" in a:
        return ["## 6. Per prompt kind", "", f"Not measured: {a['skipped']}.", "",
                "## 7. Held-out validation", "", "Not measured (see section 6).", ""]
    kinds = a["kinds"]
    file_run = kinds == ["file"]
    q, h = a["calibration_queries"], a["heldout_queries"]
    probes_desc = (f"{a['n_probes']} disjoint windows of the file (kind `file`)" if file_run else
                   f"one probe per built-in prompt kind ({', '.join(kinds)})")
    out = ["## 6. Per prompt kind", "",
           f"Probes: {probes_desc}; each holds {a['context']} context tokens in the cache, calibration queries at "
           f"positions {q[0]}..{q[-1]} and held-out queries at {h[0]}..{h[-1]} (section 7); the same {a['items']} "
           "(layer, KV head, block) items are measured on every probe. Spearman rho of each method's block score "
           "from the probe's calibration queries vs the measured effect at those queries (in-sample, as in "
           f"section 1), at {tier}; every tier is in analysis.json (`probes`).", ""]
    for s in MEASURES:
        out += [f"**{s}**", "", "| kind | " + " | ".join(SCORE_METHODS) + " | best |",
                "|---|" + "---|" * (len(SCORE_METHODS) + 1)]
        for k in kinds:
            row = a["per_kind"][k]["correlations"]["in_sample"][s][tier]
            valid = {m: v for m, v in row.items() if v is not None}
            out.append(f"| {k} | " + " | ".join(_num(row[m]) for m in SCORE_METHODS)
                       + f" | {max(valid, key=valid.get) if valid else 'n/a'} |")
        out.append("")
    dep = a["kind_dependence"]["kl"][tier]
    if file_run:
        out += ["One kind only (`file`): whether predictive power depends on the kind of text is not tested by this "
                "run (run without --text for the built-in kinds).", ""]
    else:
        parts, varying = [], []
        for m in SCORE_METHODS:
            d = dep[m]
            if d is None:
                continue
            parts.append(f"`{m}` {d['min']:.3f} ({d['min_kind']}) to {d['max']:.3f} ({d['max_kind']})")
            if d["depends_on_kind"]:
                varying.append(m)
        noise = next((d["noise_z"] for d in dep.values() if d is not None), None)
        text = ["Range over kinds (KL): " + "; ".join(parts) + "."]
        text.append(f"A range counts as depending on the kind where its Fisher-z width exceeds {_num(noise, '.2f')} "
                    f"(twice the standard error of a difference of two Spearman rho over {a['items']} items; the "
                    "items are the same positions on every probe, so this is a rough yardstick, not a test).")
        if varying:
            text.append("By that yardstick the predictive power of " + ", ".join(f"`{m}`" for m in varying)
                        + " depends on the kind of text.")
            if "attention" in varying:
                text.append(f"The closed form ranks worst on {dep['attention']['min_kind']} and best on "
                            f"{dep['attention']['max_kind']}.")
        else:
            text.append("By that yardstick no method's predictive power measurably depends on the kind of text here.")
        out += [" ".join(text), ""]

    out += [f"Locality per kind (calibration queries; means over layers and heads; the recency window is "
            f"{config['locality_window']} positions, uniform attention in parentheses; sinks: heads whose anchors "
            "include position 0; anchors: positions at least 90% of queries weight above 4x uniform).", "",
            f"| kind | recency share | anchor share | heads with a sink at 0 | anchors per head | top-cluster share | "
            f"key clusters per KV head | first-block mass share | mean KL at {tier} |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k in kinds:
        lc = a["per_kind"][k]["locality"]
        kl = a["per_kind"][k]["sensitivity_mean"]["kl"][tier]
        out.append(f"| {k} | {_num(lc['recency_share'])} ({_num(lc['recency_uniform'])}) | {_num(lc['anchor_share'])} "
                   f"| {_num(lc['sink_at_0'], '.2f')} | {_num(lc['anchors_per_head'], '.2f')} | "
                   f"{_num(lc['cluster_top_share'])} | {_num(lc['cluster_count'], '.1f')} | "
                   f"{_num(lc['first_block_mass_share'])} | {_num(kl, '.3g')} |")
    out += ["", "Plot: `plots/kinds.png`.", ""]

    other = "the other windows of the file" if file_run else "the probes of the other kinds"
    out += ["## 7. Held-out validation: does curvature from calibration predict sensitivity out of sample?", "",
            f"Scores are calibrated on queries {q[0]}..{q[-1]} of each probe and tested against the sensitivity "
            f"measured with held-out queries {h[0]}..{h[-1]} (later positions of the same prompt, after a gap: "
            f"decode-time stand-ins), and against prompts not used for calibration ({other}; their scores carried "
            "over by (layer, head, block) position, as the precision map carries them). Columns: "
            "in-sample (calibration queries vs themselves); held-out queries; held-out prompt (other prompts' "
            "scores vs this prompt's calibration queries); held-out prompt + queries (both); ceiling (scores "
            f"recomputed from the held-out queries themselves, in-sample for them). Mean over the {a['n_probes']} "
            f"probes of the per-probe rho, at {tier}.", ""]
    for s in MEASURES:
        out += [f"**{s}**", "", "| method | " + " | ".join(SETTING_TITLES[x] for x in SETTINGS) + " |",
                "|---|" + "---|" * len(SETTINGS)]
        for m in SCORE_METHODS:
            out.append(f"| {m} | " + " | ".join(_num(a["overall"][x][s][tier][m]) for x in SETTINGS) + " |")
        out.append("")
    out += ["**kl, within one layer** (per probe, the mean over layers of rho over that layer's items; then the "
            "mean over probes): does the score rank blocks, not just layers?", "",
            "| method | " + " | ".join(SETTING_TITLES[x] for x in SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for m in SCORE_METHODS:
        out.append(f"| {m} | " + " | ".join(_num(a["overall_within_layer"][x]["kl"][tier][m]) for x in SETTINGS) + " |")
    out.append("")
    out += ["**kl per kind** (in-sample / held-out queries / held-out prompt + queries)", "",
            "| kind | " + " | ".join(SCORE_METHODS) + " |", "|---|" + "---|" * len(SCORE_METHODS)]
    for k in kinds:
        c = a["per_kind"][k]["correlations"]
        out.append(f"| {k} | " + " | ".join(
            f"{_num(c['in_sample']['kl'][tier][m], '.2f')} / {_num(c['heldout_queries']['kl'][tier][m], '.2f')} / "
            f"{_num(c['heldout_both']['kl'][tier][m], '.2f')}" for m in SCORE_METHODS) + " |")
    out += ["", _heldout_verdict(a, tier, file_run), "", "Plot: `plots/heldout.png`.", ""]
    return out


def _heldout_verdict(a: dict, tier: str, file_run: bool) -> str:
    o = a["overall"]
    ins, hq, hb = (o[x]["kl"][tier] for x in ("in_sample", "heldout_queries", "heldout_both"))
    key = "heldout_both" if any(v is not None for v in hb.values()) else "heldout_queries"
    held = o[key]["kl"][tier]
    label = SETTING_TITLES[key]
    text = [f"Verdict (KL at {tier}, {label}): " + "; ".join(
        f"`{m}` {_num(ins[m])} -> {_num(held[m])}" for m in SCORE_METHODS) + "."]
    fails = [m for m in SCORE_METHODS if held[m] is None or held[m] < PREDICTS]
    keeps = [m for m in SCORE_METHODS if m not in fails]
    if fails:
        text.append(", ".join(f"`{m}`" for m in fails) + (" does" if len(fails) == 1 else " do")
                    + f" NOT predict measured sensitivity out of sample (rho < {PREDICTS} or undefined).")
    if keeps:
        text.append(", ".join(f"`{m}`" for m in keeps) + (" keeps" if len(keeps) == 1 else " keep")
                    + f" rho >= {PREDICTS} out of sample.")
    valid = {m: v for m, v in held.items() if v is not None}
    if valid:
        best = max(valid, key=valid.get)
        vin = {m: v for m, v in ins.items() if v is not None}
        best_in = max(vin, key=vin.get) if vin else None
        text.append(f"Best out of sample: `{best}` ({valid[best]:.3f})"
                    + ("; it is also the best in-sample." if best == best_in else
                       f"; in-sample the best was `{best_in}`."))
        if "attention" in valid and "attention_mass" in valid and valid["attention_mass"] >= valid["attention"]:
            text.append(f"Out of sample plain attention mass ({valid['attention_mass']:.3f}) does at least as well as "
                        f"the closed-form curvature ({valid['attention']:.3f}).")
    drops = {m: ins[m] - hq[m] for m in SCORE_METHODS if ins[m] is not None and hq[m] is not None}
    if drops:
        worst = max(drops, key=drops.get)
        text.append("Moving from the calibration queries to later queries of the same prompt changes rho by "
                    + ", ".join(f"{round(-d, 3) + 0.0:+.3f} (`{m}`)" for m, d in drops.items())
                    + f"; the largest loss is `{worst}`'s.")
    wl = a["overall_within_layer"][key]["kl"][tier]
    wl_fails = [m for m in SCORE_METHODS if wl[m] is None or wl[m] < PREDICTS]
    if wl_fails:
        text.append("Within one layer (blocks of the same layer only), " + ", ".join(f"`{m}`" for m in wl_fails)
                    + f" fall{'s' if len(wl_fails) == 1 else ''} below rho {PREDICTS} out of sample.")
    else:
        text.append(f"Within one layer every method keeps rho >= {PREDICTS} out of sample.")
    if not file_run:
        text.append("The held-out-prompt scores know nothing of the new text beyond (layer, head, block) position: "
                    "what transfers is the model's structure (layers, sinks, recency), which is also all a "
                    "precision map calibrated offline can carry.")
    return " ".join(text)
