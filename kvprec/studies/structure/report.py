"""report.md of a structure run: every number from analysis.json (``render_report``); definitions in
kvprec/studies/structure/{stats,similarity,tucker,compress,scoring,analysis}.py."""
from __future__ import annotations

from typing import List, Optional

from .observe import ATTN_METRICS, STAGES

FAMILY_TITLE = {"tucker": "Tucker (HOSVD)", "lowrank": "low rank per head (Palu-style)",
                "drop": "channel drop (ThinK-style)"}


def _n(x, fmt="{:.4f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _dnll(r: Optional[dict]) -> str:
    if r is None:
        return "—"
    se = f" ± {r['se']:.4f}" if r.get("se") is not None else ""
    return f"{r['dnll']:+.4f}{se}"


def _ratio(r: Optional[dict]) -> str:
    return "—" if r is None or r.get("ratio") is None else f"{r['ratio']:.2f}x"


def _cells(r: dict) -> List[str]:
    return [_ratio(r), _dnll(r), f"{100 * r['ppl_change']:+.2f}%", f"{r['kl']:.4f}", f"{100 * r['top1']:.1f}%"]


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _header(a: dict, config: dict) -> List[str]:
    info, data = config.get("model_info", {}), config.get("data", {})
    timings = config.get("timings", {})
    lines = [f"# KV structure study: {info.get('name', config.get('model'))}", ""]
    if config.get("command"):
        lines += ["Command:", "", "    " + config["command"], ""]
    lines += [f"Model: {info.get('layers')} layers, {info.get('query_heads')} query / {info.get('kv_heads')} KV heads "
              f"of dim {info.get('head_dim')}. Sample: \"{data.get('sample_title')}\" ({data.get('sample_tokens')} "
              f"tokens; {data.get('text_source')}). Context P = {a['context_tokens']} tokens in the cache, "
              f"continuation C = {a['continuation_tokens']} tokens teacher-forced on top "
              f"({a['continuation_tokens'] - 1} scored predictions)"
              + (f", {data.get('generated_tokens')} greedy decode steps for the stages" if data.get("generated_tokens")
                 else "") + f". Focus: {', '.join(a['focus'])}.",
              f"Threads: {config.get('threads')}; wall time of the measurements "
              f"{_n(timings.get('measure_s'), '{:.1f}')} s"
              f" (capture {_n(timings.get('capture_s'), '{:.1f}')} s, statistics "
              f"{_n(timings.get('statistics_s'), '{:.1f}')} s, {timings.get('scoring_calls', 0)} scored passes "
              f"{_n(timings.get('scoring_s'), '{:.1f}')} s).", ""]
    return lines


def _compressions(a: dict) -> List[str]:
    rows = {r["name"]: r for r in a["variants"]}
    kl_rank = {name: i for i, name in enumerate(a["ranking_by_kl"], 1)}
    lines = ["## Compressions ranked by NLL change per byte saved", "",
             f"Reference: mean NLL {a['reference_nll']:.4f} nats/token with the exact cache; the cache is "
             f"{a['dense_bytes']} bytes at FP16. NLL change = mean over the scored predictions of (NLL with the "
             "compressed context cache - NLL with the exact one), ± its paired standard error; KL = mean divergence "
             "of the next-token distribution from the exact cache's (nats); top-1 = share of predictions whose most "
             "likely token is unchanged. Ranked by NLL change per MiB saved (lower is better); the last column is the "
             "rank by KL per MiB saved, the lower-variance order. Whole-cache compressions only (single-layer sweeps "
             "and single-head prunes have their own sections).", ""]
    table = []
    for i, name in enumerate(a["ranking"], 1):
        r = rows[name]
        table.append([i, name, _ratio(r), f"{100 * r['saved_fraction']:.1f}%", _dnll(r),
                      f"{100 * r['ppl_change']:+.2f}%", _n(r["dnll_per_mib_saved"], "{:+.4f}"), f"{r['kl']:.4f}",
                      f"{100 * r['top1']:.1f}%", _n(r["error_k"], "{:.3f}"), _n(r["error_v"], "{:.3f}"),
                      kl_rank.get(name, "")])
    lines += _table(["#", "compression", "ratio", "saved", "NLL change", "ppl change", "per MiB saved", "KL",
                     "top-1", "K rel. error", "V rel. error", "# by KL"], table)
    return lines + [""]


def _equal_bytes(a: dict) -> List[str]:
    lines = ["## Equal bytes: structure against kvprec's quantized tiers", "",
             "For each target ratio (FP16 bytes / stored bytes): the compressions asked for that ratio, K and V both "
             "compressed (beside them K only and V only: that tensor at the target, the other at FP16, so their "
             "ratio, always the whole cache's, is lower); kvprec at the same bytes: its budget policy mixing two "
             "adjacent tiers (the block of the sink tokens and the newest block kept at the higher one; keys as given "
             "and rotated; the page budget lowered by the block tables and rotation matrices so the total fits) "
             "where kvprec can store that few bytes, and the best uniform tier (by KL) that stores at most those "
             "bytes. kvprec bytes are its memory report's pages (codes, FP16 scales and zeros), block tables and key "
             "rotation matrices (FP32 D x D per layer, fixed per model: at this context they are "
             f"{_n(a.get('rotation_share'), '{:.1%}')} of the dense cache).", ""]
    table = []
    for e in a["equal_bytes"]:
        t = f"{e['target']:g}x"
        for family in ("tucker", "lowrank", "drop"):
            for which in ("kv", "k", "v"):
                r = e["compressions"].get(f"{family}:{which}")
                if r is not None:
                    label = FAMILY_TITLE[family] + ("" if which == "kv" else f", {which.upper()} only")
                    table.append([t, label] + _cells(r))
        for b in e["kvprec_budgets"]:
            table.append([t, f"kvprec budget mix ({b['name']})"] + _cells(b))
        largest = _n(e.get("kvprec_largest_tier_ratio"), "{:.2f}x")
        if not e["kvprec_budgets"]:
            table.append([t, f"kvprec budget mix: none (kvprec's smallest tier stores {largest})"] + ["—"] * 5)
        u = e["kvprec_best_tier"]
        if u:
            table.append([t, f"kvprec best uniform tier ({u['name']})"] + _cells(u))
        else:
            table.append([t, f"kvprec uniform tier: none (the smallest stores {largest})"] + ["—"] * 5)
    lines += _table(["target", "compression", "ratio", "NLL change", "ppl change", "KL", "top-1"], table)
    lines += ["", "Verdicts (best K-and-V compression against the best kvprec entry at the same bytes, each the one "
              "of lowest KL; paired over the scored predictions, a winner only beyond 2 standard errors):", ""]
    for e in a["equal_bytes"]:
        if e["best_structure"] is None and e["best_kvprec"] is None:
            continue
        parts = []
        for key, what, unit in (("by_nll", "NLL", "nats/token"), ("by_kl", "KL", "nats")):
            v = e[key]
            diff = (f" ({what}(structure) - {what}(kvprec) = {v['margin']:+.4f} ± {v['se']:.4f} {unit})"
                    if v["margin"] is not None and v["se"] is not None else "")
            parts.append(f"by {what}: {v['winner']}{diff}")
        lines.append(f"- {e['target']:g}x — {'; '.join(parts)}. Best structure: {e['best_structure'] or 'none'}; "
                     f"best kvprec: {e['best_kvprec'] or 'none at these bytes'}.")
    return lines + [""]


def _tucker(a: dict) -> List[str]:
    t = a["tucker"]
    lines = ["## Tucker decomposition (truncated HOSVD per layer of K and V, heads x tokens x channels)", "",
             "Explicit HOSVD in torch (kvprec/studies/structure/tucker.py): no extra dependency, exact at full rank, "
             "deterministic; the ranks for a target are the pair (r_t, r_d), the same for every layer, with the least "
             "mean reconstruction error among all pairs that compress at least that much (head mode whole).", ""]
    rows = [[c["name"], _n(c["ratio"], "{:.2f}x"), str(c["ranks_k"] or "—"), str(c["ranks_v"] or "—"),
             _n(c["error_k"], "{:.3f}"), _n(c["error_v"], "{:.3f}"), _dnll(c), f"{c['kl']:.4f}"] for c in t["chosen"]]
    lines += _table(["variant", "ratio", "ranks K (H, r_t, r_d)", "ranks V", "K rel. error", "V rel. error",
                     "NLL change", "KL"], rows)
    return lines + [""]


def _sensitivity(a: dict) -> List[str]:
    s = a["sensitivity"]
    if not s["sweeps"]:
        return []
    lines = ["## Layer sensitivity (one layer compressed, the others exact)", ""]
    for label, values in sorted(s["sweeps"].items()):
        d = [v for v in values["dnll"] if v is not None]
        k = [v for v in values["kl"] if v is not None]
        lines.append(f"- {label}: NLL change {min(d):+.4f} .. {max(d):+.4f}, KL {min(k):.4f} .. {max(k):.4f}; "
                     f"most sensitive layers by KL {s['most_sensitive'][label]}")
    for pair, rho in sorted(s["rank_correlation"].items()):
        lines.append(f"- Spearman rank correlation across layers, {pair}: {_n(rho, '{:+.2f}')}")
    return lines + [""]


def _pruning(a: dict) -> List[str]:
    p = a["pruning"]
    lines = ["## Pruning (the cache of chosen layers or KV heads set to zero, stored in 0 bytes)", ""]
    if p["layers"]:
        worst = sorted(p["layers"], key=lambda r: -r["kl"])[:3]
        best = sorted(p["layers"], key=lambda r: r["kl"])[:3]

        def item(r):
            return f"{r['name']} (KL {r['kl']:.4f}, NLL {_dnll(r)})"
        lines.append("- One layer pruned, by KL: most harmful " + ", ".join(map(item, worst)) + "; least harmful "
                     + ", ".join(map(item, best)) + ".")
    if "score_vs_measured_spearman" in p:
        lines.append(f"- One KV head pruned: {p['harmless_heads']} of {sum(len(r) for r in p['head_kl'])} heads "
                     f"move the next-token distribution by a KL of at most 0.001 nats; Spearman(mean attention output "
                     f"norm, measured KL) = {_n(p['score_vs_measured_spearman'], '{:+.2f}')}.")
    rows = [[r["name"], f"{100 * r['saved_fraction']:.1f}%"] + _cells(r)[:-1] for r in p["sets"]]
    if rows:
        lines += [""] + _table(["pruned set", "saved", "ratio", "NLL change", "ppl change", "KL", "top-1"], rows)
        lines.append("")
        lines.append("(structure: the KV heads with the smallest attention output on the last prompt queries; "
                     "measured: those whose single-head prune moved the distribution least (KL) — an oracle; random: "
                     "as many heads drawn with the run's seed.)")
    return lines + [""]


def _layers(a: dict) -> List[str]:
    l = a["layers"]
    lines = ["## Layers", "", "Effective rank = exp(entropy of the normalised singular values) of each head's [T, D] "
             "matrix; rank90 = singular directions holding 90% of the energy; sparsity = entries below 0.1 RMS.", ""]
    rows = []
    for r in l["per_layer"]:
        k, v = r["keys"], r["values"]
        rows.append([r["layer"], f"{k['erank']:.1f}", f"{v['erank']:.1f}", f"{k['rank90']:.1f}", f"{v['rank90']:.1f}",
                     _n(k["sparsity"].get("0.1"), "{:.3f}"), _n(v["sparsity"].get("0.1"), "{:.3f}"),
                     f"{k['norm_mean']:.2f}", f"{v['norm_mean']:.2f}", f"{k['norm_max_over_median']:.1f}",
                     f"{v['norm_max_over_median']:.1f}"])
    lines += _table(["layer", "erank K", "erank V", "rank90 K", "rank90 V", "sparse K", "sparse V", "norm K",
                     "norm V", "max/median norm K", "max/median norm V"], rows)
    lines.append("")
    for kind in ("keys", "values"):
        parts = "; ".join(f"{part} layers erank {d['erank']:.1f}, rank90 {d['rank90']:.1f}"
                          for part, d in l["by_depth"][kind].items())
        lines.append(f"- {kind}: {parts}.")
    return lines + [""]


def _heads(a: dict) -> List[str]:
    h = a["heads"]
    m = h["mean"]
    lines = ["## Heads", "",
             f"Prefill queries at positions >= {h['first_query']}: normalised attention entropy {m['entropy']:.3f} "
             f"(1 = uniform), 90% of the weight on {100 * m['mass90']:.1f}% of the visible positions, sink mass "
             f"{m['sink_mass']:.3f}, mass on the last 32 positions {m['recent_mass']:.3f} (means over layers and query "
             f"heads). {h['sink_heads']} of {h['query_heads']} query heads put more than half their weight on "
             f"positions 0-3; {h['local_heads']} on the last 32.",
             "- sharpest heads: " + ", ".join(f"L{x['layer']}H{x['head']} (entropy {x['entropy']:.3f}, sink "
                                              f"{x['sink_mass']:.2f}, recent {x['recent_mass']:.2f})"
                                              for x in h["sharpest"]),
             "- broadest heads: " + ", ".join(f"L{x['layer']}H{x['head']} ({x['entropy']:.3f})" for x in h["broadest"]),
             "- the KV heads a pruning would remove (smallest attention output on the last prompt queries): "
             + ", ".join(f"{l}:{k}" for l, k in h["prune_candidates"]), ""]
    return lines


def _tokens(a: dict) -> List[str]:
    t = a["tokens"]
    lines = ["## Tokens", "",
             f"Weight the last prompt queries (which see every context position) give each position, mean over "
             f"layers and query heads: position 0 receives {t['position0_received']:.4f} (uniform would be "
             f"{t['uniform']:.5f}, the median position gets {t['median_received']:.5f}); "
             f"{t['positions_over_10x_median']} positions receive more than 10x the median. The most attended "
             "(beside: the mean weight per query that sees the position, over the whole prefill):", ""]
    lines += _table(["position", "token", "received", "x median", "per seeing query"],
                    [[x["position"], repr(x["token"]), f"{x['received']:.4f}", _n(x["over_median"], "{:.1f}"),
                      f"{x['received_per_seeing_query']:.4f}"] for x in t["top_positions"]])
    prof = ", ".join(_n(x, "{:.3f}") for x in t["recency_profile_head"][:8])
    lines += ["", f"Recency profile (mean weight at distance 0, 1, 2, ...): {prof}.", ""]
    return lines


def _channels(a: dict) -> List[str]:
    c = a["channels"]
    lines = ["## Channels: outliers of keys vs values, before and after key rotation", "",
             f"Outlier ratio = max / median over channels of mean |x|; consistency = mean share of tokens in which "
             f"the {c['top_k']} most frequent top-{c['top_k']} channels are among the token's {c['top_k']} largest "
             f"(1: always the same channels; {c['random_consistency']:.3f}: none preferred). Rotation: "
             f"{c['rotation']} (kvprec/storage/rotation.py). Quantization error ||x - x'|| / ||x|| with kvprec's "
             "quantizer per channel within a block (the key layout) or per token (the value layout, one group per "
             "head).", ""]
    rows = []
    for name, d in c["per_kind"].items():
        q = d["quant_error"]
        rows.append([name, f"{d['outlier_ratio_mean']:.2f}", f"{d['outlier_ratio_max']:.2f}",
                     f"{d['consistency_mean']:.3f}", _n(q["per_channel_int4"], "{:.3f}"),
                     _n(q["per_token_int4"], "{:.3f}"), _n(q["per_channel_int2"], "{:.3f}"),
                     _n(q["per_token_int2"], "{:.3f}")])
    lines += _table(["tensor", "outlier ratio (mean)", "(max)", "consistency", "INT4 per channel", "INT4 per token",
                     "INT2 per channel", "INT2 per token"], rows)
    return lines + [""]


def _stages(a: dict) -> List[str]:
    s = a["stages"]
    lines = ["## Generation stages", "",
             f"Prefill = the last {s['tokens_per_stage']} context positions (their queries over the context); early, "
             f"middle, late = thirds of the {s['decode_steps']} greedy decode steps. Means over layers and heads.", ""]
    rows = []
    for stage in STAGES:
        r = s["per_stage"][stage]
        rows.append([stage] + [f"{r[m]:.3f}" for m in ATTN_METRICS]
                    + [f"{r['keys']['norm']:.2f}", f"{r['values']['norm']:.2f}", f"{r['keys']['erank']:.1f}",
                       f"{r['keys']['adjacent_cosine']:.3f}", f"{r['keys']['outlier_ratio']:.2f}",
                       f"{r['token_entropy']:.3f}", f"{r['token_logprob']:.3f}"])
    lines += _table(["stage", "attn entropy", "mass90", "sink", "recent", "K norm", "V norm", "K erank",
                     "K adjacent cos", "K outlier ratio", "token entropy", "log p(token)"], rows)
    return lines + [""]


def _similarity(a: dict) -> List[str]:
    s = a["similarity"]
    lines = ["## Similarity and the compression each redundancy would allow", ""]
    for kind, d in s["per_kind"].items():
        lines.append(f"- {kind}: adjacent tokens cosine {d['adjacent_cosine']:.3f} vs random pairs "
                     f"{d['random_pair_cosine']:.3f}; heads of a layer cosine {_n(d['head_cosine_mean'], '{:.3f}')}, "
                     f"CKA {_n(d['head_cka_mean'], '{:.3f}')} (max {_n(d['head_cka_max'], '{:.3f}')}); same head in "
                     f"adjacent layers cosine {_n(d['cross_layer_cosine_mean'], '{:.3f}')}, CKA "
                     f"{_n(d['cross_layer_cka_mean'], '{:.3f}')}.")
    lines += ["", "Compression allowed by merging entries whose cosine is at least tau (upper bounds: norms and "
              "indices not counted; kvprec/studies/structure/similarity.py):", ""]
    rows = []
    for kind, d in s["per_kind"].items():
        for e in d["allowed"]:
            rows.append([kind, f"{e['tau']:g}", _n(e["token_clusters"], "{:.2f}x"), _n(e["adjacent_runs"], "{:.2f}x"),
                         f"{e['head_merge']:.2f}x", f"{e['layer_merge']:.2f}x"])
    lines += _table(["tensor", "tau", "token clusters", "adjacent runs", "heads merged", "adjacent layers merged"],
                    rows)
    return lines + [""]


def _summary(a: dict) -> List[str]:
    """The main findings, each with its numbers (all from analysis.json)."""
    out = []
    for e in a.get("equal_bytes", []):
        s = e["compressions"].get(f"{e['best_structure'].split()[0]}:kv") if e["best_structure"] else None
        rows = {r["name"]: r for r in a["variants"]}
        k = rows.get(e["best_kvprec"]) if e["best_kvprec"] else None
        if s and k:
            out.append(f"At {e['target']:g}x fewer bytes the best structural compression ({s['name']}, {_ratio(s)}) "
                       f"moves the next-token distribution by KL {s['kl']:.4f} (NLL {_dnll(s)}), kvprec's best "
                       f"({k['name']}, {_ratio(k)}) by KL {k['kl']:.4f} (NLL {_dnll(k)}): by KL "
                       f"{e['by_kl']['winner']}, by NLL {e['by_nll']['winner']}.")
        elif s:
            out.append(f"At {e['target']:g}x only structure reaches the bytes: {s['name']} ({_ratio(s)}), KL "
                       f"{s['kl']:.4f}, NLL {_dnll(s)}; kvprec's smallest tier stores "
                       f"{_n(e.get('kvprec_largest_tier_ratio'), '{:.2f}x')}.")
    if "tucker" in a and a["tucker"]["chosen"]:
        shape = a["tucker"]["shape"]
        full = [c for c in a["tucker"]["chosen"] if c["which"] == "kv" and c["ranks_k"] and c["ranks_k"][2] == shape[2]]
        out.append(f"Tucker: {len(full)} of {sum(c['which'] == 'kv' for c in a['tucker']['chosen'])} target ratios "
                   f"keep all {shape[2]} channels and cut only the token rank: at equal bytes, truncating the token "
                   "mode loses less than truncating channels.")
    if "channels" in a:
        c = a["channels"]["per_kind"]
        out.append(f"Keys have outlier channels (max/median channel magnitude {c['keys']['outlier_ratio_mean']:.1f}, "
                   f"top-channel consistency {c['keys']['consistency_mean']:.2f}) where values have "
                   f"{c['values']['outlier_ratio_mean']:.1f} / {c['values']['consistency_mean']:.2f}; after the key "
                   f"rotation {c['keys_rotated']['outlier_ratio_mean']:.1f} / "
                   f"{c['keys_rotated']['consistency_mean']:.2f}. Per-token INT2 error of keys "
                   f"{c['keys']['quant_error']['per_token_int2']:.3f} -> per channel "
                   f"{c['keys']['quant_error']['per_channel_int2']:.3f}.")
    if "heads" in a:
        h = a["heads"]
        out.append(f"Attention: {h['sink_heads']} of {h['query_heads']} query heads put most of their weight on "
                   f"positions 0-3 (mean sink mass {h['mean']['sink_mass']:.2f}); 90% of a query's weight sits on "
                   f"{100 * h['mean']['mass90']:.1f}% of the positions it sees.")
    if "pruning" in a:
        sets = {r["name"].split("(")[-1].rstrip(")"): r for r in a["pruning"]["sets"] if "(" in r["name"]}
        if "structure" in sets and "random" in sets:
            out.append(f"Pruning the {sets['structure']['name'].split()[1]} KV heads with the smallest attention "
                       f"output costs KL {sets['structure']['kl']:.4f} (NLL {_dnll(sets['structure'])}), as many "
                       f"random heads KL {sets['random']['kl']:.4f} (NLL {_dnll(sets['random'])}).")
    return (["## Summary", ""] + [f"- {x}" for x in out] + [""]) if out else []


def render_report(analysis: dict, config: dict) -> str:
    a = analysis
    lines = _header(a, config) + _summary(a)
    if "variants" in a:
        lines += _equal_bytes(a) + _compressions(a)
        if "tucker" in a:
            lines += _tucker(a)
        lines += _sensitivity(a)
        if "pruning" in a:
            lines += _pruning(a)
    for key, fn in (("layers", _layers), ("heads", _heads), ("tokens", _tokens), ("channels", _channels),
                    ("stages", _stages), ("similarity", _similarity)):
        if key in a:
            lines += fn(a)
    from .plots import PLOT_FOR_SECTION

    plots = [name for key, name in PLOT_FOR_SECTION.items()
             if key in a and (key != "sensitivity" or a["sensitivity"]["sweeps"])]
    if plots:
        lines += ["## Plots", ""] + [f"- plots/{p}" for p in plots]
    return "\n".join(lines).rstrip() + "\n"
