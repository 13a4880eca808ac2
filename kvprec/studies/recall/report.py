"""report.md of the recall study (every number from analysis.json) and the per-budget step logs (from raw.npz)."""
from __future__ import annotations

import json
from typing import Dict, List, Optional

import numpy as np

from .analysis import recall_views


def _f(x: Optional[float], digits: int = 3, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(ci: List[Optional[float]], digits: int = 3) -> str:
    return "n/a" if ci[0] is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _p(p: Optional[float]) -> str:
    return "n/a" if p is None else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_report(a: dict, config: dict) -> str:
    ov, budgets, policies = a["overview"], a["budgets"], a["policies"]
    v = a["verdicts"]
    small = f"{min(budgets):g}"
    model = config.get("model_info", {}).get("name", config.get("model"))
    lines = [f"# Recall study: token entropy vs eviction recall ({model})", "",
             f"Dataset `{config.get('dataset')}`: {ov['samples']} samples, {a['steps']} decode steps "
             f"({ov['steps_per_sample']['min']}-{ov['steps_per_sample']['max']} per sample), prompts of "
             f"{ov['prompt_tokens']['min']}-{ov['prompt_tokens']['max']} tokens; budgets "
             f"{', '.join(f'{b:g}' for b in budgets)} of the sequence; prompt style `{config.get('prompt_style')}`, "
             f"chat `{config.get('chat')}`. Greedy answers containing a reference answer: {ov['answer_found']} of "
             f"{ov['samples']}.", "",
             "Intervals are 95% percentile bootstrap intervals: `sample` resamples whole generations (the cluster "
             "bootstrap: honest about the dependence between the steps of one generation, coarse with few samples), "
             "`step` resamples decode steps (ignores that dependence). A verdict needs both intervals on the same "
             "side of 0. p-values are scipy's and assume independent steps."
             + (f" With {ov['samples']} samples the cluster bootstrap has few distinct resamples: read its "
                "intervals as rough." if ov["samples"] < 10 else ""), "",
             "## Verdicts", ""]
    h1 = v["h1"]
    corr = a["correlations"][f"{h1['policy']}@{h1['budget']}"]
    lines += [f"**H1** (high token entropy marks the steps where {h1['policy'].upper()} has evicted what the model "
              f"needs: a strong negative correlation, rho <= -0.5): **{h1['verdict']}**. At budget {h1['budget']}, "
              f"Spearman rho = {_f(h1['rho'], sign=True)} (95% CI by sample {_ci(h1['ci'])}, by step "
              f"{_ci(corr['spearman']['ci_step'])}, p = {_p(corr['spearman']['p'])}), "
              f"Pearson r = {_f(corr['pearson']['r'], sign=True)} (CI {_ci(corr['pearson']['ci_sample'])}, "
              f"p = {_p(corr['pearson']['p'])}); n = {h1['n']} steps from {h1['samples']} samples. "
              + _aggregate_sentence(a, h1["policy"], h1["budget"])
              + "Budgets where it holds (weak), per policy: " + ", ".join(
                  f"{p} {n} ({h1['budgets_weak'][p]}) of {len(budgets)}" for p, n in h1["budgets_holding"].items())
              + ". Every policy and budget: section 1.", ""]
    h2 = a["h2"][v["h2"]["policy"]]
    lines += [f"**H2** (the correlation is stronger at smaller budgets, {v['h2']['policy'].upper()}): "
              f"**{v['h2']['verdict']}**. " + "; ".join(
                  f"rho({pair}) difference {_f(d['diff'], sign=True)} (CI by sample {_ci(d['ci_sample'])}, by step "
                  f"{_ci(d['ci_step'])})"
                  for pair, d in zip(_pairs(budgets), h2["adjacent"])) + ".", ""]
    etr_lines = []
    for b, entry in a["etr"]["rows"].items():
        if "best_etr" not in entry:
            continue
        d = entry["best_etr_minus_best_static"]
        line = (f"budget {b}: best ETR `{entry['best_etr']}` vs best static `{entry['best_static']}`: NLL difference "
                f"{_f(d['mean'], 4, True)} nats/token (CI by sample {_ci(d['ci_sample'], 4)}, by step "
                f"{_ci(d['ci_step'], 4)}) -> {'**beats it**' if entry['beats_best_static'] else 'does not beat it'}")
        r = entry["etr_minus_random"].get(entry["best_etr"][4:])
        if r is not None:
            line += (f"; against the same number of recalls at random steps {_f(r['mean'], 4, True)} (CI by sample "
                     f"{_ci(r['ci_sample'], 4)}, by step {_ci(r['ci_step'], 4)}): the entropy's timing "
                     + ("helps" if entry["entropy_timing_helps"] else "is not shown to matter"))
        etr_lines.append(line)
    lines += ["**Entropy-triggered recall** at equal device memory (threshold "
              f"{a['etr']['threshold']:g} nats, {100 * a['etr']['recall_fraction']:g}% of the budget recalled): "
              + "; ".join(etr_lines) + ".", ""]

    lines += ["## 1. Correlation of token entropy with recall", "",
              "Recall per step: the mean over (layer, KV head) of |needed and retained| / K. `global`: needed and "
              "retained sets of the attention averaged over all layers and heads (one set per step).", "",
              "| policy | budget | Pearson r | CI (sample) | p | Spearman rho | CI (sample) | CI (step) | p | H1 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in policies:
        for b in budgets:
            for suffix in ("", ":global"):
                key = f"{p}@{b:g}{suffix}"
                if key not in a["correlations"]:
                    continue
                c = a["correlations"][key]
                verdict = a["h1"][p][f"{b:g}"]["verdict"] if not suffix else ""
                lines.append(f"| {p}{' (global)' if suffix else ''} | {b:g} | {_f(c['pearson']['r'], sign=True)} | "
                             f"{_ci(c['pearson']['ci_sample'])} | {_p(c['pearson']['p'])} | "
                             f"{_f(c['spearman']['r'], sign=True)} | {_ci(c['spearman']['ci_sample'])} | "
                             f"{_ci(c['spearman']['ci_step'])} | {_p(c['spearman']['p'])} | {verdict} |")
    lines += ["", "## 2. Budget dependence (H2)", "",
              "Paired bootstrap of rho(smaller budget) - rho(larger budget) over the same steps: negative means the "
              "correlation is more negative at the smaller budget.", "",
              "| policy | pair | difference | CI (sample) | CI (step) | H2 |", "|---|---|---|---|---|---|"]
    for p in policies:
        h = a["h2"][p]
        pairs = list(zip(_pairs(budgets), h["adjacent"]))
        if len(budgets) > 2 and h["extreme"] is not None:
            pairs.append((f"{min(budgets):g} - {max(budgets):g}", h["extreme"]))
        for pair, d in pairs:
            lines.append(f"| {p} | {pair} | {_f(d['diff'], sign=True)} | {_ci(d['ci_sample'])} | "
                         f"{_ci(d['ci_step'])} | {h['verdict']} |")

    labels = a["entropy_bins"]
    lines += ["", "## 3. Mean recall per entropy bin", "",
              "Steps per bin: " + ", ".join(f"{lab} {n}" for lab, n in zip(labels, ov["bin_counts"]))
              + f" (entropy mean {ov['entropy']['mean']:.2f}, median {ov['entropy']['median']:.2f}, 90th percentile "
              f"{ov['entropy']['p90']:.2f} nats). Cells: mean [CI by sample].", "",
              "| policy | budget | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for p in policies:
        for b in budgets:
            cells = [f"{_f(e['mean'])} {_ci(e['ci_sample'], 2)}" for e in a["bins"][p][f"{b:g}"]]
            lines.append(f"| {p} | {b:g} | " + " | ".join(cells) + " |")

    lines += ["", "## 4. Per layer", "",
              f"At budget {small}: mean recall over the run (averaged over KV heads) and Spearman rho of entropy vs "
              "that layer's recall (point estimates; per-head means are in analysis.json `layers.mean_recall`).", "",
              "| layer | " + " | ".join(f"{p} recall | {p} rho" for p in policies) + " |",
              "|---|" + "---|---|" * len(policies)]
    bi = budgets.index(min(budgets))
    mean_recall, rho = np.array(a["layers"]["mean_recall"]), np.array(a["layers"]["spearman_rho"])
    for li in range(mean_recall.shape[2]):
        cells = []
        for pi in range(len(policies)):
            r = rho[pi, bi, li]
            cells += [f"{mean_recall[pi, bi, li].mean():.3f}", "n/a" if not np.isfinite(r) else f"{r:+.2f}"]
        lines.append(f"| {li} | " + " | ".join(cells) + " |")

    lines += ["", "## 5. Entropy gap: the step re-run with the missed positions restored", "",
              "Per step the query is run once attending only to the policy's retained set and once with the missed "
              "needed positions added back (earlier K/V from the full cache). Restore: restored minus restricted "
              "(negative = restoring lowers the entropy / NLL of the oracle's next token). Restricted vs full: "
              "restricted minus the full cache.", "",
              "| policy | budget | steps | restore dH | CI (sample) | restore dNLL | CI (sample) | restricted - full "
              "H | restricted - full NLL | restore dNLL by bin |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in policies:
        for b in budgets:
            g = a["gap"][p][f"{b:g}"]
            by_bin = " / ".join(_f(x, 3, True) for x in g["restore_nll_by_bin"])
            lines.append(f"| {p} | {b:g} | {g['steps']} | {_f(g['restore_entropy']['mean'], 3, True)} | "
                         f"{_ci(g['restore_entropy']['ci_sample'])} | {_f(g['restore_nll']['mean'], 3, True)} | "
                         f"{_ci(g['restore_nll']['ci_sample'])} | {_f(g['restricted_entropy_vs_full'], 3, True)} | "
                         f"{_f(g['restricted_nll_vs_full'], 3, True)} | {by_bin} |")
    ch = a["checks"]
    lines += ["", f"Check: the unrestricted re-run reproduces the oracle's logits within "
              f"{_f(ch['rerun_max_abs_logit_diff'], 6)} (max abs over {ch['rerun_steps']} steps)."]

    e = a["etr"]
    host = e["host_seconds_per_trigger"]
    lines += ["", "## 6. Entropy-triggered recall (caches that really evict, teacher-forced on the oracle's tokens)",
              "", f"{e['caches']} caches decode together (one batch, the random-trigger ones in a second). Every one "
              "holds K(n) positions per layer and KV head "
              "(equal device memory); after a full prefill they compress the prompt and evict while decoding. "
              f"`etr`: recall when the row's previous entropy exceeds {e['threshold']:g} nats; `random`: the same "
              "recall at random steps, as many per sample as its `etr` row fired. Host CPU time of scoring and "
              f"selection: {_f(None if host is None else host * 1e3, 2)} ms per triggered row (all layers); a batched "
              f"step takes {e['step_seconds_mean']:.2f} CPU s on average (torch threads: "
              f"{config.get('threads') or 'default'}).",
              ""]
    for b, entry in e["rows"].items():
        lines += [f"Budget {b} (best static: `{entry['best_static']}`):", "",
                  "| row | NLL | NLL - full | recall | recall on triggered steps | triggers | bytes moved | bytes "
                  "scanned | moved per trigger |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in entry["rows"].items():
            per = _bytes(r["moved_bytes"] / r["triggers"]) if r["triggers"] else "-"
            lines.append(f"| {name} | {r['nll']:.4f} | {r['nll_vs_full']:+.4f} | {r['recall']:.3f} | "
                         f"{_f(r['recall_on_triggers'])} | {r['triggers']} | {_bytes(r['moved_bytes'])} | "
                         f"{_bytes(r['scanned_bytes'])} | {per} |")
        if "etr_minus_static" in entry:
            lines += ["", "ETR minus its static base, mean NLL per step [CI by sample]: " + "; ".join(
                f"{base} {_f(d['mean'], 4, True)} {_ci(d['ci_sample'], 4)}"
                for base, d in entry["etr_minus_static"].items()) + "."]
        if entry.get("etr_minus_random"):
            lines += ["ETR minus random trigger: " + "; ".join(
                f"{base} {_f(d['mean'], 4, True)} {_ci(d['ci_sample'], 4)}"
                for base, d in entry["etr_minus_random"].items()) + "."]
        if "recall_gain_over_static" in entry:
            lines += ["Recall gain of ETR over its static base (mean over steps): " + "; ".join(
                f"{base} {g:+.3f}" for base, g in entry["recall_gain_over_static"].items()) + "."]
        lines.append("")

    if "kvprec" in a:
        lines += ["## 7. kvprec's tiering read as kept (INT8 and above)", "",
                  f"Policy `{config.get('kvprec_policy')}`; the cache also serves the model (its INT4 blocks are "
                  "attended too), so its NLL is that of a tiered cache, not of an evicting one.", "",
                  "| budget | recall | kept / K | NLL - full | resident bytes | full-cache bytes (FP) |",
                  "|---|---|---|---|---|---|"]
        for b, k in a["kvprec"].items():
            lines.append(f"| {b} | {k['recall']:.3f} | {k['kept_over_k']:.2f} | {k['nll_vs_full']:+.4f} | "
                         f"{_bytes(k['resident_bytes_mean'])} | {_bytes(k['full_cache_bytes_mean'])} |")
        lines.append("")
    if "supporting" in a:
        s = a["supporting"]
        lines += ["## 8. Supporting facts", "",
                  f"Over {s['steps']} steps of samples with supporting facts, the supporting-fact positions are "
                  f"{100 * s['sf_share_of_past']:.1f}% of the past positions; share of the needed set inside them: "
                  + ", ".join(f"{100 * x:.1f}% at {b}" for b, x in s["needed_in_sf"].items()) + ".", "",
                  "| policy | " + " | ".join(f"retained at {b:g}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for p in policies:
            lines.append(f"| {p} | " + " | ".join(_f(s["retained_sf"][p][f"{b:g}"]) for b in budgets) + " |")
        lines.append("")
    lines += ["## 9. Run", "", "CPU seconds per phase (all samples): " + ", ".join(
        f"{k} {v:.1f}" for k, v in ov["seconds"].items()) + f". Samples cut in the middle of their passages: "
        f"{ov['truncated_samples']}. Full-cache NLL of its own greedy tokens: {ov['oracle_nll']:.4f} nats."]
    return "\n".join(lines)


def _aggregate_sentence(a: dict, policy: str, budget: str) -> str:
    g = a["correlations"].get(f"{policy}@{budget}:global")
    if g is None:
        return ""
    s = g["spearman"]
    return (f"With one set for all layers and heads (needed and retained sets of the attention averaged over them), "
            f"rho = {_f(s['r'], sign=True)} (CI by sample {_ci(s['ci_sample'])}, by step {_ci(s['ci_step'])}). ")


def _pairs(budgets: List[float]) -> List[str]:
    order = sorted(budgets)
    return [f"{a:g} - {b:g}" for a, b in zip(order[:-1], order[1:])]


def step_logs(raw: Dict[str, np.ndarray], config: dict) -> Dict[str, str]:
    """``steps_b<budget>.jsonl`` per budget: one JSON line per decode step with its sample, position, token,
    entropy, NLL and each policy's recall (mean over layers and KV heads, and the aggregate row)."""
    budgets = [float(b) for b in raw["budgets"]]
    policies = [str(p) for p in raw["policies"]]
    rmean, rglobal = recall_views(raw)
    files = {}
    for bi, b in enumerate(budgets):
        lines = []
        for i in range(raw["entropy"].size):
            row = {"sample": int(raw["step_sample"][i]), "step": int(raw["step_index"][i]),
                   "position": int(raw["step_position"][i]), "token": str(raw["token_text"][i]),
                   "entropy": round(float(raw["entropy"][i]), 6), "nll": round(float(raw["nll"][i]), 6),
                   "k": int(raw["budget_k"][i, bi]),
                   "recall": {p: round(float(rmean[i, pi, bi]), 6) for pi, p in enumerate(policies)},
                   "recall_global": {p: round(float(rglobal[i, pi, bi]), 6) for pi, p in enumerate(policies)
                                     if np.isfinite(rglobal[i, pi, bi])}}
            lines.append(json.dumps(row, sort_keys=True))
        files[f"steps_b{b:g}.jsonl"] = "\n".join(lines) + "\n"
    return files
