"""report.md of an injection run, every number from analysis.json (kvprec/studies/injection/analysis.py)."""
from __future__ import annotations

from typing import List, Optional

CURVE_STEPS = (0, 1, 2, 3, 5, 8, 12, 16, 20)


def _n(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _g(x) -> str:
    """Three significant digits (paired differences of KL span orders of magnitude)."""
    return "–" if x is None else f"{x:.3g}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(c: dict, digits: int = 3, pct: bool = False) -> str:
    if c is None or c.get("value") is None:
        return "–"
    k = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    d = 1 if pct else digits
    if c.get("lo") is None:
        return f"{c['value'] * k:.{d}f}{unit} (n={c['n']})"
    return f"{c['value'] * k:.{d}f}{unit} [{c['lo'] * k:.{d}f}, {c['hi'] * k:.{d}f}]"


def _p(p: Optional[float]) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_report(a: dict, config: dict) -> str:
    lines = [f"# KV-cache injection study: {config['model_info']['name']} on {config['data']['dataset']}", ""]
    lines += _setup(a, config) + _summary(a) + _accuracy(a) + _headline(a, config) + _tests(a) + _curves(a) + _token(a) \
        + _controls(a) + _definitions(config)
    return "\n".join(lines)


def _setup(a: dict, config: dict) -> List[str]:
    t = a["timing"]
    rot = config["key_rotation"]
    return [
        "## Setup", "",
        f"- {a['problems']} {a['kind']} problems ({a['changed_problems']} whose injected version differs, "
        f"{a['control_problems']} controls with the identical text), greedy decoding of up to "
        f"{config['max_new_tokens']} tokens.",
        f"- Conditions per problem: baseline (original text), oracle (injected text from the start), and at each "
        f"injection point N = {', '.join(map(str, a['points']))} generated tokens the injected span spliced into the "
        f"live cache with its blocks at {', '.join(config['tiers'])} (everything else FP32), and noise controls "
        f"({', '.join(config['noise'])} tokens of the injected text's length) spliced the same way at FP32.",
        f"- Cache: kvprec AdaptiveCache, blocks of {config['block_size']} positions, key rotation {rot}; the span "
        "region starts and ends on block boundaries, so exactly the injected positions take the tier.",
        f"- Time: {t['total_s']:.0f} s wall for the problems ({t['per_problem_s']:.1f} s per problem, every "
        f"condition included; {t['cpu_s']:.0f} s of process CPU time, torch threads {config['model_info']['torch_threads']}); the model "
        "load and the analysis come on top.", ""]


def _summary(a: dict) -> List[str]:
    lines = ["## Summary: detection latency and remaining gap per tier of the injected span", "",
             f"Over the {a['changed_problems']} problems whose injected version differs, each problem's mean over the "
             f"injection points {', '.join(map(str, a['points']))}; mean [95% bootstrap CI over problems]. KL is to "
             "the oracle teacher-forced on the condition's own tokens (nats): at the first step after the splice, "
             "beside the original context's on the same tokens; latency and adaptation point in steps since the "
             "splice (over the points where they happened); remaining gap over the last steps, and relative to the "
             "original context's.", ""]
    rows = [[name, _ci(e["kl_at_injection"]), _ci(e["unadapted_at_injection"]), _ci(e["detection_latency"], 2),
             _ci(e["detected"], pct=True), _ci(e["adaptation_point"], 2), _ci(e["remaining_gap"], 4),
             _ci(e["relative_gap"], 3), _ci(e["new_answer"], pct=True)]
            for name, e in a["summary"].items()]
    lines += _table(["injected span", "KL at the splice", "original context's KL", "detection latency", "detected",
                     "adaptation point", "remaining gap", "relative gap", "injected answer given"], rows) + [""]
    oracle = a["accuracy"]["conditions"]["oracle"]["new_answer"]
    lines += ["A KL near 0 says the cache now predicts what a cache that read the injected text from the start "
              "predicts after the same tokens; it does not say the reply changes: the tokens written before the "
              "splice (the old numbers restated) steer both. The last column is the outcome, against the oracle's "
              f"{_ci(oracle, pct=True)} on the same problems.", ""]
    return lines


def _accuracy(a: dict) -> List[str]:
    m = a["accuracy"]["model"]
    lines = ["## Model accuracy", "",
             f"- Baseline on the original problems: {_ci(m['baseline_on_original'], pct=True)}.",
             f"- Oracle on the injected problems (the new context from the start): "
             f"{_ci(m['oracle_on_injected'], pct=True)}.", ""]
    rows = [[cat, str(v["problems"]), _pct(v["baseline_on_original"]), _pct(v["oracle_on_injected"])]
            for cat, v in m["by_category"].items()]
    lines += _table(["category", "problems", "baseline on original", "oracle on injected"], rows) + [""]
    return lines


def _headline(a: dict, config: dict) -> List[str]:
    lines = ["## Adaptation after injection (problems whose injected version differs)", "",
             "Latency, adaptation point and stabilisation: median steps since injection [95% bootstrap CI] over the "
             "problems where they happened, with that share; remaining gap: mean KL to the oracle over the last "
             f"{config['final_window']} steps (nats) and relative to the unadapted gap; answers: share of replies "
             "giving the injected (new) and the original (old) answer.", ""]
    rows = []
    acc = a["accuracy"]["conditions"]
    for key, d in a["derived"].items():
        rows.append([key, f"{_ci(d['detection_latency'], 1)} / {_ci(d['detected'], pct=True)}",
                     f"{_ci(d['adaptation_point'], 1)} / {_ci(d['adapted'], pct=True)}",
                     _ci(d["stabilisation"], 1), _ci(d["remaining_gap"], 4), _ci(d["relative_gap"]),
                     _ci(d["converged"], pct=True), _ci(acc[key]["new_answer"], pct=True),
                     _ci(acc[key]["old_answer"], pct=True)])
    for key in ("baseline", "oracle"):
        rows.append([key, "", "", "", "", "", "", _ci(acc[key]["new_answer"], pct=True),
                     _ci(acc[key]["old_answer"], pct=True)])
    lines += _table(["condition", "detection latency / detected", "adaptation point / adapted", "stabilisation",
                     "remaining gap", "relative gap", "converged", "new answer", "old answer"], rows) + [""]
    return lines


def _tests(a: dict) -> List[str]:
    lines = ["## Paired tests (Wilcoxon signed-rank over problems)", "",
             "Median of the paired difference a - b [95% bootstrap CI], n pairs, W, two-sided p. \"unadapted\": "
             "the original context's own gap to the oracle on the same tokens and steps.", ""]
    rows = [[t["name"], t["measure"], t["a"], t["b"], str(t["n"]),
             f"{_g(t['median_diff'])} [{_g(t['lo'])}, {_g(t['hi'])}]", _n(t["statistic"], 1), _p(t["p"])]
            for t in a["tests"]]
    return lines + _table(["test", "measure", "a", "b", "n", "median a - b", "W", "p"], rows) + [""]


def _curves(a: dict) -> List[str]:
    lines = ["## Adaptation curves", "",
             "Mean KL to the oracle (nats) [95% bootstrap band] against steps since injection; plots/"
             "adaptation_curves.png draws every step.", ""]
    for point, panel in a["curves"].items():
        lines += [f"### Injection after {point} tokens", ""]
        steps = [s for s in CURVE_STEPS if any(s < len(c["mean"]) for c in panel.values())]
        rows = []
        for label, c in panel.items():
            cells = []
            for s in steps:
                if s >= len(c["mean"]) or c["mean"][s] is None:
                    cells.append("–")
                elif c["lo"][s] is None:
                    cells.append(f"{c['mean'][s]:.3f}")
                else:
                    cells.append(f"{c['mean'][s]:.3f} [{c['lo'][s]:.3f}, {c['hi'][s]:.3f}]")
            rows.append([label] + cells)
        lines += _table(["condition"] + [f"s={s}" for s in steps], rows) + [""]
    return lines


def _token(a: dict) -> List[str]:
    lines = ["## Tokens, hidden states and attention after the injection", "",
             "Log ratio: mean over steps of log P(token | new) - log P(token | old) of the tokens the condition "
             "chose (> 0: tokens the new context favours). Cosine: hidden state of the last layer against the "
             "oracle's on the same tokens. Span attention: share of attention on the span's blocks (mean over "
             "layers and heads), beside the oracle's share on its span over the same steps.", ""]
    rows = []
    for key, t in a["token"].items():
        layers = t["attn_span_by_layer"]
        top = sorted(((v, i) for i, v in enumerate(layers) if v is not None), reverse=True)[:3]
        rows.append([key, _ci(t["log_ratio"]), _ci(t["cosine_final"], 4), _ci(t["attn_span"]),
                     _ci(t["attn_span_oracle_same_steps"]), ", ".join(f"L{i} {v:.2f}" for v, i in top) or "–"])
    return lines + _table(["condition", "log ratio", "cosine (last layer)", "span attention",
                           "oracle's span attention", "top layers (span share)"], rows) + [""]


def _controls(a: dict) -> List[str]:
    lines = ["## Controls (identical text injected)", "",
             "The splice replaces the span by the same text: at FP32 the conditions stay the oracle, and what a tier "
             "changes is the tier alone.", ""]
    rows = [[key, str(c["problems"]), _ci(c["post_kl"], 5), _ci(c["remaining_gap"], 5), str(c["exact_zero_kl"])]
            for key, c in a["controls"].items()]
    return lines + _table(["condition", "problems", "mean KL after the splice", "remaining gap",
                           "problems with KL exactly 0"], rows) + [""]


def _definitions(config: dict) -> List[str]:
    return ["## Definitions", "",
            f"- Curves are smoothed by a trailing mean over {config['smooth']} steps before the derived measures.",
            "- Detection latency: the first step where the injected row's KL is below the noise band, the smallest "
            f"noise KL over the controls and the steps s - {config['band_halfwidth']} .. s + "
            f"{config['band_halfwidth']}.",
            f"- Adaptation point: the first step where the KL has closed {config['adapt_fraction']:.0%} of the "
            "unadapted gap (the original context's KL to the oracle on the same tokens); stabilisation: steps from "
            "there until it stays closed.",
            f"- Converged: remaining gap at most {config['converged_kl']} nats.",
            "- Everything in this report is computed from raw.npz and config.json "
            "(`kvprec study injection --reanalyze DIR`); problems.jsonl holds every condition's tokens and per-step "
            "measures, dataset.json the problems in the --dataset format.", ""]
