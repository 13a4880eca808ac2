"""Analysis and report of a precision-study run (kvprec/studies/precision/study.py): :func:`analyze` computes
analysis.json from raw.npz and config.json alone, :func:`render_report` writes report.md from it, so
``--reanalyze`` reproduces both byte for byte."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from ...storage.formats import Tier
from . import measure as pr
from .heldout import analyze_probes, render_probes

SCORE_METHODS = ("attention", "grad_attn", "gradient", "hessian", "hybrid", "attention_mass")
MEASURES = ("kl", "dlogp", "d_attn")
THRESHOLDS = (0.999, 0.99, 0.95)


# ---------------------------------------------------------------------------------------------------------
# Analysis: raw -> analysis.json (pure function of the arrays and the config)

def _f(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def _groups(n_layers: int) -> Dict[str, List[int]]:
    parts = np.array_split(np.arange(n_layers), 3)
    return {name: [int(i) for i in part] for name, part in zip(("early", "middle", "late"), parts) if len(part)}


def analyze(raw: Dict[str, np.ndarray], config: dict) -> dict:
    t = int(config["block_size"])
    tiers = list(config["tiers"])
    items = raw["items"]
    blocks = {m: pr.block_sums(raw[m], t) for m in SCORE_METHODS}
    measured = {m: raw[f"sens_{m}"] for m in MEASURES}
    corr = pr.rank_correlations(blocks, items, measured, tiers)
    n_layers, hkv, p = raw["attention"].shape
    # within one layer: pooled rho can come from layers differing as a whole; this asks about blocks of one layer
    per_layer = []
    for l in range(n_layers):
        sel = items[:, 0] == l
        if sel.sum() >= 3:
            per_layer.append(pr.rank_correlations(blocks, items[sel], {m: v[sel] for m, v in measured.items()}, tiers))
    within = {m: {tier: {k: (_f(np.mean(vals)) if (vals := [c[m][tier][k] for c in per_layer
                                                             if c[m][tier][k] is not None]) else None)
                         for k in SCORE_METHODS} for tier in tiers} for m in MEASURES}

    # which method ranks best, per measure and tier
    best = {}
    for measure, per_tier in corr.items():
        best[measure] = {}
        for tier, row in per_tier.items():
            valid = {k: v for k, v in row.items() if v is not None}
            best[measure][tier] = max(valid, key=valid.get) if valid else None

    # measured sensitivity summary
    sens = {m: {tier: {"mean": _f(measured[m][:, i].mean()), "median": _f(np.median(measured[m][:, i])),
                       "max": _f(measured[m][:, i].max())} for i, tier in enumerate(tiers)} for m in MEASURES}

    # policy comparison
    ref_ppl = math.exp(float(raw["ref_nll"].mean()))
    rows = []
    for i, name in enumerate(raw["cmp_names"].tolist()):
        ppl = math.exp(float(raw["cmp_nll"][i].mean()))
        rows.append({"cache": name, "family": str(raw["cmp_family"][i]), "target_bits": _f(raw["cmp_target_bits"][i]),
                     "bits_per_element": _f(raw["cmp_bits"][i]), "perplexity": _f(ppl),
                     "ppl_change": _f(ppl / ref_ppl - 1.0),
                     "top1_agreement": _f((raw["cmp_argmax"][i] == raw["ref_argmax"]).mean()),
                     "mean_abs_dnll": _f(np.abs(raw["cmp_nll"][i] - raw["ref_nll"]).mean())})
    # equal-memory verdict per budget: which non-uniform policy has the best agreement, then the lowest |dnll|
    per_budget = {}
    for r in rows:
        if r["family"] == "uniform":
            continue
        per_budget.setdefault(f"{r['target_bits']:g}", []).append(r)
    winners = {b: min(rs, key=lambda r: (-r["top1_agreement"], r["mean_abs_dnll"]))["cache"]
               for b, rs in per_budget.items()}

    # compression at quality thresholds: the cheapest measured cache meeting each
    thresholds = {}
    for th in THRESHOLDS:
        ok = [r for r in rows if r["top1_agreement"] >= th]
        if ok:
            r = min(ok, key=lambda r: r["bits_per_element"])
            thresholds[f"{100 * th:g}"] = {"cache": r["cache"], "bits_per_element": r["bits_per_element"],
                                           "compression_vs_fp16": _f(16.0 / r["bits_per_element"]),
                                           "top1_agreement": r["top1_agreement"], "ppl_change": r["ppl_change"]}
        else:
            thresholds[f"{100 * th:g}"] = None

    # memory table
    memory = []
    for i, name in enumerate(raw["mem_policies"].tolist()):
        for j, n in enumerate(raw["mem_contexts"].tolist()):
            b, e = int(raw["mem_bytes"][i, j]), int(raw["mem_elements"][i, j])
            memory.append({"policy": name, "context": int(n), "bytes": b, "bits_per_element": _f(8.0 * b / e),
                           "compression_vs_fp16": _f(2.0 * e / b)})

    # precision map
    page = raw["map_page_bits"]
    map_tiers = raw["map_tiers"]
    tier_counts = {str(Tier(k)): int((map_tiers == k).sum()) for k in range(len(Tier)) if (map_tiers == k).any()}
    map_layer_bits = [_f(page[map_tiers[l]].mean()) for l in range(n_layers)]

    # layer groups
    groups = {}
    for name, layers in _groups(n_layers).items():
        in_group = np.isin(items[:, 0], layers)
        groups[name] = {
            "layers": layers,
            "curvature_block_mean": {m: _f(blocks[m][layers].mean()) for m in SCORE_METHODS},
            "measured_kl_mean": {tier: (_f(measured["kl"][in_group, i].mean()) if in_group.any() else None)
                                 for i, tier in enumerate(tiers)},
            "recency_share": _f(raw["loc_recency_share"][layers].mean()),
            "recency_uniform": _f(raw["loc_recency_uniform"][layers].mean()),
            "anchor_share": _f(raw["loc_anchor_share"][layers].mean()),
            "cluster_top_share": _f(raw["loc_cluster_top_share"][layers].mean()),
            "map_bits_per_element": _f(page[map_tiers[layers]].mean()),
        }

    # locality per layer and query head, and where the mass sits: first block vs the rest
    anchors = raw["loc_anchors"]
    first_block_share = raw["attention_mass"][..., :t].sum(-1) / raw["attention_mass"].sum(-1)
    locality = {"recency_share": raw["loc_recency_share"].round(12).tolist(),
                "recency_uniform": raw["loc_recency_uniform"].round(12).tolist(),
                "anchor_share": raw["loc_anchor_share"].round(12).tolist(),
                "cluster_top_share": raw["loc_cluster_top_share"].round(12).tolist(),
                "cluster_count": raw["loc_cluster_count"].tolist(),
                "anchor_positions": [[np.flatnonzero(anchors[l, h]).tolist() for h in range(anchors.shape[1])]
                                     for l in range(anchors.shape[0])],
                "first_block_mass_share": first_block_share.round(12).tolist()}

    return {"shape": {"layers": int(n_layers), "kv_heads": int(hkv), "context": int(raw["context"]),
                      "queries": int(raw["queries"]), "blocks": int(p // t), "items": int(len(items))},
            "correlations": corr, "correlations_within_layer": within, "best_method": best, "sensitivity": sens,
            "comparison": {"reference_perplexity": _f(ref_ppl), "eval_prefill": int(raw["eval_prefill"]),
                           "eval_steps": int(raw["ref_nll"].shape[0]), "rows": rows, "best_at_budget": winners},
            "thresholds": thresholds, "memory": memory,
            "precision_map": {"bits_per_element": _f(raw["map_bits_per_element"]), "tier_blocks": tier_counts,
                              "layer_bits_per_element": map_layer_bits},
            "layer_groups": groups, "locality": locality, "probes": analyze_probes(raw, config)}


# ---------------------------------------------------------------------------------------------------------
# Report (from analysis.json only)

def _num(x, fmt=".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _map_blocks(pm: dict, shape: dict, config: dict) -> str:
    """How many blocks the map covers: the probe's context and query positions, the last block(s) holding the
    queries (so more than the shape's context blocks)."""
    total = sum(pm["tier_blocks"].values())
    per_head = total // max(1, shape["layers"] * shape["kv_heads"])
    text = (f"{total} blocks ({shape['layers']} layers x {shape['kv_heads']} KV heads x {per_head} blocks of "
            f"{config['block_size']} positions")
    extra = per_head - shape["blocks"]
    if extra > 0:
        text += (f": the {shape['blocks']} context blocks and {extra} holding the {shape['queries']} query "
                 "positions")
    return text + ")"


def render_report(a: dict, config: dict) -> str:
    s = a["shape"]
    tiers = list(config["tiers"])
    out = [f"# Precision study: {config['model']}", "",
           f"Calibration probe: {s['context']} context tokens in the cache + {s['queries']} query tokens "
           f"({'file ' + config['text'] if config.get('text') else 'built-in prompts: prose, code, mixed, reasoning, transitions'}); "
           f"{s['layers']} layers x {s['kv_heads']} KV heads x {s['blocks']} blocks of {config['block_size']}. "
           "Every number below is recomputed from raw.npz by `kvprec study precision --reanalyze DIR`.", ""]

    out += ["## 1. Does curvature predict measured sensitivity?", "",
            f"Spearman rank correlation between each method's block score (sum over the block's positions) and the "
            f"measured effect of storing that block alone at a tier, over {s['items']} sampled (layer, KV head, "
            "block) items. `kl`: mean KL of the next-token distribution; `dlogp`: mean |change of log p(next "
            "token)|; `d_attn`: mean ||change of the layer's attention output||.", ""]
    for measure in MEASURES:
        out.append(f"**{measure}**")
        out.append("")
        out.append("| tier | " + " | ".join(SCORE_METHODS) + " | best |")
        out.append("|---|" + "---|" * (len(SCORE_METHODS) + 1))
        for tier in tiers:
            row = a["correlations"][measure][tier]
            out.append(f"| {tier} | " + " | ".join(_num(row[m], ".3f") for m in SCORE_METHODS)
                       + f" | {a['best_method'][measure][tier]} |")
        out.append("")
    out += ["**kl, within one layer** (mean over layers of rho over that layer's sampled blocks)", "",
            "| tier | " + " | ".join(SCORE_METHODS) + " |", "|---|" + "---|" * len(SCORE_METHODS)]
    for tier in tiers:
        row = a["correlations_within_layer"]["kl"][tier]
        out.append(f"| {tier} | " + " | ".join(_num(row[m], ".3f") for m in SCORE_METHODS) + " |")
    out.append("")
    kl4 = a["correlations"]["kl"].get("int4") or a["correlations"]["kl"][tiers[0]]
    tier_used = "int4" if "int4" in a["correlations"]["kl"] else tiers[0]
    closed, best = kl4["attention"], a["best_method"]["kl"][tier_used]
    verdict = [f"Verdict (KL at {tier_used}): the closed-form attention curvature (the seed's kappa) has rho = "
               f"{_num(closed, '.3f')}; the best method is `{best}` (rho = {_num(kl4.get(best), '.3f')})."]
    if closed is None or closed < 0.5:
        verdict.append("The closed form does NOT rank blocks by their measured end-to-end effect well (rho < 0.5).")
    elif best != "attention":
        verdict.append(f"The closed form predicts measured sensitivity only partly: `{best}` ranks better.")
    else:
        verdict.append("The closed form ranks best among the methods measured here.")
    mass = kl4.get("attention_mass")
    if closed is not None and mass is not None and mass >= closed:
        verdict.append(f"Plain attention mass (rho = {mass:.3f}) does at least as well as the closed-form curvature: "
                       "the curvature's extra factors add nothing measurable here.")
    wl = a["correlations_within_layer"]["kl"][tier_used]
    wl_valid = {k: v for k, v in wl.items() if v is not None}
    if wl.get("attention") is not None and wl_valid:
        wbest = max(wl_valid, key=wl_valid.get)
        verdict.append(f"Within one layer the closed form has rho = {wl['attention']:.3f} (best within-layer: `{wbest}`, "
                       f"rho = {wl_valid[wbest]:.3f}).")
        if closed is not None and wl["attention"] > closed + 0.05:
            verdict.append("So part of its pooled shortfall is across layers, consistent with a layer-local score "
                           "that does not see how much each layer's attention output matters downstream.")
    verdict.append("The tiers quantize V as well as K, and only K enters the curvature methods. The gradient and "
                   "Hessian scores are taken on the same query tokens the sensitivity is measured with (in-sample for "
                   "those queries); the closed form uses the same queries too, and the precision map carries the "
                   "scores to other text by position only. Section 7 tests every method out of sample.")
    out += [" ".join(verdict), ""]

    out += ["Measured sensitivity per tier (mean / median / max over the sampled blocks):", "",
            "| measure | " + " | ".join(tiers) + " |", "|---|" + "---|" * len(tiers)]
    for m in MEASURES:
        out.append(f"| {m} | " + " | ".join(
            f"{_num(a['sensitivity'][m][t]['mean'])} / {_num(a['sensitivity'][m][t]['median'])} / "
            f"{_num(a['sensitivity'][m][t]['max'])}" for t in tiers) + " |")
    out += ["", "Plots: `plots/curvature_<method>.png` (per layer and head, log scale), `plots/sensitivity.png`.", ""]

    pm = a["precision_map"]
    mode = f"threshold eps={config['eps']}" if config.get("eps") is not None else (
        f"budget {_num(config.get('map_budget_resolved'), '.4g')} bits/element")
    out += ["## 2. Precision map", "",
            f"Mapper ({mode}, candidates {', '.join(config['candidates'])}) on the calibration probe: "
            f"{_num(pm['bits_per_element'], '.3f')} bits/element of pages; {_map_blocks(pm, s, config)}; blocks per "
            "tier: " + ", ".join(f"{k} {v}" for k, v in pm["tier_blocks"].items()) + "; per layer (page bits/element): "
            + ", ".join(f"L{i} {_num(b, '.2f')}" for i, b in enumerate(pm["layer_bits_per_element"]))
            + ". Plot: `plots/precision_map.png`. As a policy: `kvprec.studies.precision.study.curvature_policy(DIR)` "
            f"(an AdaptiveCache with block_size={config['block_size']}, group_size={config['group_size']}).", ""]

    c = a["comparison"]
    out += ["## 3. Policies at equal memory (teacher-forced through the cache)", "",
            f"Reference: unquantized DynamicCache, perplexity {_num(c['reference_perplexity'], '.4f')}; prefill "
            f"{c['eval_prefill']} then {c['eval_steps']} teacher-forced predictions ({config['eval_source']}). "
            "Non-uniform policies are wrapped in `budget(..., bits_per_element=b)`; bits/element is measured by the "
            "cache (pages, scales, zeros, the unsealed tail in the model dtype and the block table).", "",
            "| cache | target bits | bits/el (measured) | ppl | ppl change | top-1 agree | mean abs dNLL |",
            "|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        out.append(f"| {r['cache']} | {_num(r['target_bits'], '.3g')} | {_num(r['bits_per_element'], '.3f')} | "
                   f"{_num(r['perplexity'], '.4f')} | {100 * r['ppl_change']:+.3f}% | "
                   f"{100 * r['top1_agreement']:.2f}% | {_num(r['mean_abs_dnll'], '.4g')} |")
    out += ["", "Best at each budget (top-1 agreement, then mean |dNLL|): "
            + "; ".join(f"{b} bits -> {w}" for b, w in c["best_at_budget"].items()) + "."]
    by_name = {r["cache"]: r for r in c["rows"]}
    u4 = by_name.get("uniform:int4")
    if u4 is not None:
        same = [r for r in c["rows"] if r["family"] != "uniform" and r["target_bits"] == u4["target_bits"]]
        if same:
            out += ["", f"At uniform INT4's page bits ({u4['target_bits']:.3g}): uniform:int4 "
                    f"{u4['bits_per_element']:.3f} bits/el, top-1 {100 * u4['top1_agreement']:.2f}%, mean |dNLL| "
                    f"{u4['mean_abs_dnll']:.4g}; " + "; ".join(
                        f"{r['family']} {r['bits_per_element']:.3f} bits/el, top-1 {100 * r['top1_agreement']:.2f}%, "
                        f"mean |dNLL| {r['mean_abs_dnll']:.4g}" for r in same) + "."]
        worse = [r["cache"] for r in c["rows"] if r["family"] != "uniform"
                 and r["bits_per_element"] >= u4["bits_per_element"] and r["top1_agreement"] < u4["top1_agreement"]]
        if worse:
            out += ["", "Measured here: " + ", ".join(worse) + " use at least uniform INT4's bits yet agree less "
                    "with the reference. Not measured separately, but consistent with how the budget wrapper meets a "
                    "budget: it demotes its least important blocks rung by rung down to INT2."]
    out += ["", "Plot: `plots/pareto.png`.", ""]

    out += ["## 4. Seed tables, measured", "", "### Memory (bytes from AdaptiveCache.memory_report())", "",
            "Filled by appending random K/V of the model's shapes to each layer (the bytes depend only on shapes "
            "and tiers, not on a forward; attention-mass policies see no attention there, so every block counts as "
            "unseen and the budget wrapper decides).", ""]
    ctxs = sorted({m["context"] for m in a["memory"]})
    out.append("| policy | " + " | ".join(f"{n} tokens: bytes (bits/el, x vs FP16)" for n in ctxs) + " |")
    out.append("|---|" + "---|" * len(ctxs))
    pols = list(dict.fromkeys(m["policy"] for m in a["memory"]))
    for pol in pols:
        cells = {m["context"]: m for m in a["memory"] if m["policy"] == pol}
        out.append(f"| {pol} | " + " | ".join(
            f"{cells[n]['bytes']} ({cells[n]['bits_per_element']:.2f}, {cells[n]['compression_vs_fp16']:.2f}x)"
            for n in ctxs) + " |")
    out += ["", "### Compression at quality thresholds (cheapest measured cache meeting each)", "",
            "| top-1 agreement >= | cache | bits/el | compression vs FP16 | top-1 | ppl change |", "|---|---|---|---|---|---|"]
    for th, r in a["thresholds"].items():
        if r is None:
            out.append(f"| {th}% | none of the measured caches | | | | |")
        else:
            out.append(f"| {th}% | {r['cache']} | {r['bits_per_element']:.3f} | {r['compression_vs_fp16']:.2f}x | "
                       f"{100 * r['top1_agreement']:.2f}% | {100 * r['ppl_change']:+.3f}% |")
    n_pred = c["eval_steps"]
    out += ["", f"Resolution: top-1 agreement is measured over {n_pred} predictions, so it moves in steps of "
            f"{100 / n_pred:.3g}%" + ("; with fewer than 1000 predictions the 99.9% row cannot differ from 100%."
                                      if n_pred < 1000 else ".")]
    out += ["", "### Early / middle / late layers", "",
            "| group | layers | " + " | ".join(f"{m} (block mean)" for m in ("attention", "gradient", "hessian"))
            + " | " + " | ".join(f"KL {t}" for t in tiers)
            + " | recency (uniform) | anchor share | top-cluster share | map bits/el |",
            "|---|---|" + "---|" * (3 + len(tiers) + 4)]
    for name, g in a["layer_groups"].items():
        out.append(f"| {name} | {','.join(map(str, g['layers']))} | "
                   + " | ".join(_num(g["curvature_block_mean"][m]) for m in ("attention", "gradient", "hessian"))
                   + " | " + " | ".join(_num(g["measured_kl_mean"][t]) for t in tiers)
                   + f" | {_num(g['recency_share'], '.3f')} ({_num(g['recency_uniform'], '.3f')}) | "
                   f"{_num(g['anchor_share'], '.3f')} | {_num(g['cluster_top_share'], '.3f')} | "
                   f"{_num(g['map_bits_per_element'], '.2f')} |")
    loc = a["locality"]
    out += ["", "## 5. Locality per layer and query head", "",
            f"Recency: attention share within the last {config['locality_window']} positions (uniform attention in "
            "parentheses); anchors: positions that at least 90% of queries weight above 4x uniform (sinks); "
            "first-block share: the attention mass on block 0 per KV head.", "",
            "| layer | recency share per head | anchor share per head | anchor positions per head | top-cluster share | first-block share (KV heads) |",
            "|---|---|---|---|---|---|"]
    for l in range(len(loc["recency_share"])):
        out.append(f"| {l} | " + ", ".join(f"{x:.3f}" for x in loc["recency_share"][l])
                   + f" ({loc['recency_uniform'][l][0]:.3f}) | " + ", ".join(f"{x:.3f}" for x in loc["anchor_share"][l])
                   + " | " + "; ".join(str(p[:6])[1:-1] or "-" for p in loc["anchor_positions"][l])
                   + " | " + ", ".join(f"{x:.3f}" for x in loc["cluster_top_share"][l])
                   + " | " + ", ".join(f"{x:.3f}" for x in loc["first_block_mass_share"][l]) + " |")
    out += ["", "Plot: `plots/locality.png`.", ""]
    out += render_probes(a["probes"], config)
    return "\n".join(out)
