"""report.md and generated.txt of a novelty-study run, from analysis.json (and, for generated.txt, raw.npz) alone."""
from __future__ import annotations

from typing import Dict, List

import numpy as np


def _n(x, fmt=".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _p(x) -> str:
    return "n/a" if x is None else ("< 1e-300" if x == 0 else f"{x:.2g}")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


HYPOTHESIS_DETAIL = {
    "H1": lambda v: (f"skewness {_n(v['skew'])} (p {_p(v['skew_p'])}), excess kurtosis {_n(v['kurtosis'])} "
                     f"(p {_p(v['kurtosis_p'])}); the top 10% of steps hold {_pct(v['top10_share'])} of the novelty "
                     f"(10% if flat); spikes on {_pct(v['spike_rate'])} of steps"),
    "H2": lambda v: (f"B = {_n(v['B'])} vs {_n(v['B_null'])} at random (p {_p(v['B_p'])}; {v['units']} of {v['of']} "
                     f"series with >= 3 spikes); dispersion p {_p(v['dispersion_p'])}; KS vs exponential p "
                     f"{_p(v['ks_p'])}"),
    "H3": lambda v: f"lag-1 autocorrelation {_n(v['acf1'])}; Ljung-Box p {_p(v['ljung_box_p'])}",
    "H4": lambda v: (f"{v['on_trivial']} of {v['spikes']} spikes on trivial tokens ({_pct(v['share'])}) vs "
                     f"{_pct(v['base_share'])} of steps; enrichment p {_p(v['enrichment_p'])}"),
    "H5": lambda v: (f"rho {_n(v['rho'])} (p {_p(v['p'])}, n {v['n']}); with surprisal {_n(v['rho_surprisal'])}"
                     + (f", entropy change {_n(v['rho_entropy_change'])}, next entropy {_n(v['rho_next_entropy'])}"
                        if v.get("rho_entropy_change") is not None else "")),
    "H6": lambda v: (f"most novel above random (p < 0.05) in {v['cells_most_above_random']} of {v['cells']} "
                     f"(mode, fraction) cells; mean dNLL most {_n(v['dnll_most'])}, random {_n(v['dnll_random'])}, "
                     f"least {_n(v['dnll_least'])} nats/token"),
    "H7": lambda v: f"{v['types']} types; H = {_n(v['H'])}, p {_p(v['p'])}",
}


def render_report(a: dict, config: dict) -> str:
    s = a["settings"]
    t = s["temperature"]
    out = ["# KV novelty study", "",
           "Hypothesis under test: the information each decode step adds to the K/V cache is sparse (most steps "
           "coast, a few spike), bursty and structured in time, and the novel K/V are the ones that matter. K/V are "
           "the true post-RoPE keys and values the cache receives (kvprec/studies/platform/capture.py), not hidden "
           "states. Every number below is recomputed from raw.npz by `kvprec study novelty --reanalyze DIR`.", "",
           f"Setup: {len(a['models'])} model(s), generation of up to {s['max_tokens']} tokens "
           + (f"at temperature {t:g}" if t > 0 else "greedy") + f" through an FP32 AdaptiveCache; novelty of "
           f"each position against the {s['window']} positions before it (rank {s['rank']} subspace), normalised "
           f"per (layer, head) by its median and averaged over layers and heads; primary metric `{s['metric']}`; "
           f"spikes: robust z > {s['spike_threshold']:g} over the trailing {s['spike_window']} decode steps; "
           f"alpha {a['alpha']:g}.", ""]
    for m in a["models"]:
        out += _model_section(m, config)
    out += ["## Definitions", "",
            "- Geometric novelty (kvprec/analysis/novelty.py): cosine distance 1 - cos(k, m) and L2 distance "
            "||k - m|| from the window mean m; residual ||k - U U^T k|| / ||k|| outside the window's top-r right "
            "singular subspace U; Mahalanobis distance under the window's Ledoit-Wolf covariance. For keys and "
            "values alike.",
            "- Temporal statistics (kvprec/studies/novelty/temporal.py): robust z over a trailing median / MAD; "
            "Goh-Barabasi burstiness B = (sigma - mu) / (sigma + mu) of spike intervals (Poisson 0, periodic -1); its "
            "null: as many spikes placed uniformly at random among the steps; index of dispersion of spike counts "
            f"per {s['bin_size']} steps (chi-square); KS of intervals against an exponential; Ljung-Box over lags "
            f"1-{s['max_lag']}.",
            "- Causal ablation (kvprec/studies/novelty/ablation.py): the prefix (prompt and first half of the "
            "generated text) in an FP32 cache; the chosen fraction of blocks stored at "
            f"{config.get('ablation_tier', 'int2')} (`tier`, per layer / head / block) or masked out (`drop`, per "
            "block); dNLL: mean change of the teacher-forced NLL of the continuation, nats per token.", "",
            "Plots: `plots/novelty_over_time.png`, `plots/distribution.png`, `plots/inter_arrival.png`, "
            "`plots/novelty_vs_entropy.png`, `plots/by_type.png`, `plots/layers.png`, `plots/ablation.png`. "
            "Generated text: `generated.txt`."]
    return "\n".join(out)


def _model_section(m: dict, config: dict) -> List[str]:
    out = [f"## Model {m['model']}", "", "### Verdicts", "",
           "Each hypothesis is tested on the aggregate novelty (mean over layers and heads, one series per run) and, "
           "where it applies, on every (layer, head) series; it holds if it holds at both levels, partly if at "
           "least partly at one. p-values of the heads are merged by 2 x median, valid however the heads depend on "
           "each other.", "",
           "| | hypothesis | test statistic | aggregate novelty | per (layer, head) | verdict |",
           "|---|---|---|---|---|---|"]
    for h in m["hypotheses"]:
        cells = []
        for level in ("aggregate", "heads"):
            v = h["levels"].get(level)
            cells.append("-" if v is None else f"{HYPOTHESIS_DETAIL[h['id']](v)}: *{h['level_verdicts'][level]}*")
        out.append(f"| {h['id']} | {h['claim']} | {h['statistic']} | {cells[0]} | {cells[1]} | **{h['verdict']}** |")
    out += ["", "### Runs", "",
            "| run | type | prompt + generated tokens | analysed steps | tokens/s | median | skew | kurtosis | "
            "spikes (rate) | B (null) | acf1 | mean entropy | rho(novelty, entropy) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in m["runs"]:
        nv = x["novelty"]
        gen_s = x["seconds"]
        tps = x["generated_tokens"] / gen_s if gen_s else None
        out.append(f"| {x['run']} | {x['type']} | {x['prompt_tokens']} + {x['generated_tokens']} | "
                   f"{x['analysed_steps']} | {_n(tps, '.1f')} | {_n(nv['median'])} | {_n(nv['shape']['skew'])} | "
                   f"{_n(nv['shape']['kurtosis'])} | {nv['spikes']['count']} ({_n(nv['spikes']['rate'], '.3f')}) | "
                   f"{_n(nv['burstiness']['B'])} ({_n(nv['burstiness']['null_mean'])}) | "
                   f"{_n(nv['acf'][0] if nv['acf'] else None)} | {_n(x['predictive']['mean_entropy'])} | "
                   f"{_n(x['predictive']['correlation']['entropy']['rho'])} |")
    out += ["", "Spike tokens per run (the token at each spike, in order):", ""]
    for x in m["runs"]:
        toks = ", ".join(repr(t) for t in x["novelty"]["spikes"]["tokens"][:40])
        out.append(f"- run {x['run']} ({x['type']}): {toks or 'none'}")
    out += ["", "### Across prompt types", "",
            "| type | runs | steps | median novelty | spike rate | B | skew | kurtosis | acf1 | mean entropy | "
            "rho(novelty, entropy) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, v in m["by_type"].items():
        out.append(f"| {t} | {v['runs']} | {v['steps']} | {_n(v['median_novelty'])} | {_n(v['spike_rate'], '.3f')} | "
                   f"{_n(v['B'])} | {_n(v['skew'])} | {_n(v['kurtosis'])} | {_n(v['acf1'])} | "
                   f"{_n(v['mean_entropy'])} | {_n(v['rho_entropy'])} |")
    out += ["", "### Causal ablation", ""]
    if not m["ablation"]:
        reasons = {x["ablation"].get("skipped") for x in m["runs"]}
        out += ["Not measured: " + "; ".join(sorted(r for r in reasons if r)), ""]
    else:
        out += ["| mode @ fraction | runs | dNLL most novel | dNLL random | dNLL least novel | most > random: p "
                "(runs) | least < random: p |", "|---|---|---|---|---|---|---|"]
        for key, c in m["ablation"].items():
            out.append(f"| {key} | {c['runs']} | {_n(c['dnll_most'], '.4g')} | {_n(c['dnll_random'], '.4g')} | "
                       f"{_n(c['dnll_least'], '.4g')} | {_p(c['most_vs_random_p'])} ({c['runs_most_above_random']} of "
                       f"{c['runs']}) | {_p(c['least_vs_random_p'])} |")
        checks = [x["ablation"].get("selection_recomputed") for x in m["runs"] if "skipped" not in x["ablation"]]
        out += ["", f"The recorded most / least novel selections equal those recomputed from raw.npz in "
                f"{sum(bool(c) for c in checks)} of {len(checks)} runs.", ""]
    out += ["### Per layer (primary metric, mean over runs)", "",
            "| layer | median | skew | kurtosis | spike rate | B | acf1 |", "|---|---|---|---|---|---|---|"]
    for row in m["per_layer"]:
        out.append(f"| {row['layer']} | {_n(row['median'])} | {_n(row['skew'])} | {_n(row['kurtosis'])} | "
                   f"{_n(row['spike_rate'], '.3f')} | {_n(row['B'])} | {_n(row['acf1'])} |")
    out += ["", "### Every metric (mean over runs; is the picture the primary metric's alone?)", "",
            "| metric | skew | kurtosis | spike rate | B | B combined p | acf1 | rho(novelty, entropy) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, v in m["metrics"].items():
        out.append(f"| {name} | {_n(v['skew'])} | {_n(v['kurtosis'])} | {_n(v['spike_rate'], '.3f')} | {_n(v['B'])} | "
                   f"{_p(v['B_p'])} | {_n(v['acf1'])} | {_n(v['rho_entropy'])} |")
    out.append("")
    return out


def generated_text(raw: Dict[str, np.ndarray], config: dict) -> Dict[str, str]:
    """generated.txt: per run its model, type, prompt and generated text (decoded from raw.npz's tokens)."""
    lines = []
    models = raw["models"].tolist()
    for r, kind in enumerate(raw["runs_type"].tolist()):
        lines += [f"=== run {r}: {models[int(raw['runs_model'][r])]}, {kind} ({raw['runs_source'][r]}) ===",
                  "--- prompt ---", str(raw[f"r{r}_prompt_text"]), "--- generated ---",
                  str(raw[f"r{r}_generated_text"]), ""]
    return {"generated.txt": "\n".join(lines)}
