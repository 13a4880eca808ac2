"""analysis.json of an injection run: a pure function of raw.npz and config.json (kvprec/studies/platform/rundir.py).

Conditions are keyed ``baseline``, ``oracle``, ``injection:<tier>@<N>`` and ``noise-<kind>@<N>``. Adaptation is
measured on the problems whose injected version differs (every category but "control"); the controls, where the
injected span is the original one, give the floor (what the splice and the tier alone change).

* accuracy        the model on the original problems (baseline) and on the injected ones (oracle), each condition's
                  share of replies with the injected answer and with the original answer;
* derived         per condition the measures of kvprec/studies/injection/derived.py with bootstrap intervals over
                  problems (latencies and points over the problems where they happened, beside that share);
* tests           Wilcoxon signed-rank tests paired by problem: injection against noise, each tier against FP32,
                  injection against leaving the original context (the unadapted gap), injection points against each
                  other;
* curves          mean KL to the oracle against steps since injection per condition with a 95% bootstrap band, and
                  the baseline's (no injection) on the same axis;
* token           per condition the log probability ratio P(token | new) / P(token | old), the hidden-state cosine
                  to the oracle per layer, the attention share on the span per layer (the oracle's own share on the
                  same steps beside it);
* controls        the same measures on the control problems.
"""
from __future__ import annotations

import warnings
from typing import Dict, List

import numpy as np

from .answers import matches
from .derived import Definitions, derived
from .stats import bootstrap_ci, curve_band, paired_test

MEASURES = ("detection_latency", "adaptation_point", "stabilisation", "remaining_gap", "relative_gap", "converged")
#: per row as well: the final window's unadapted gap, means over the steps after the injection, the first step's KL
EXTRA = ("unadapted_gap", "post_kl", "post_log_ratio", "kl_at_injection", "unadapted_at_injection")


def row_keys(raw) -> List[str]:
    keys = []
    for cond, point, tier in zip(raw["row_condition"], raw["row_point"], raw["row_tier"]):
        cond, point = str(cond), int(point)
        if point < 0:
            keys.append(cond)
        elif cond == "injection":
            keys.append(f"injection:{tier}@{point}")
        else:
            keys.append(f"{cond}@{point}")
    return keys


def _is_noise(key: str) -> bool:
    return key.startswith("noise")


def definitions(config: dict) -> Definitions:
    return Definitions(smooth=config["smooth"], band_halfwidth=config["band_halfwidth"],
                       fraction=config["adapt_fraction"], window=config["final_window"],
                       converged_kl=config["converged_kl"])


def _post(raw, name: str, p: int, r: int, point: int) -> np.ndarray:
    """Row r's values of ``name`` on its valid steps from ``point`` on (steps since injection)."""
    valid = raw["valid"][p, r]
    values = raw[name][p, r].astype(np.float64)
    return values[point:][valid[point:]]


def _per_row_measures(raw, config: dict) -> Dict[str, np.ndarray]:
    """{measure: [P, R]} for every row with an injection point (NaN elsewhere)."""
    d = definitions(config)
    n_p, n_r = raw["valid"].shape[:2]
    points = raw["row_point"]
    noise_rows = {int(pt): [r for r in range(n_r) if str(raw["row_condition"][r]).startswith("noise") and
                            int(points[r]) == int(pt)] for pt in set(points.tolist())}
    out = {m: np.full((n_p, n_r), np.nan) for m in MEASURES + EXTRA}
    for p in range(n_p):
        for r in range(n_r):
            point = int(points[r])
            if point < 0:
                continue
            kl, unadapted = _post(raw, "kl", p, r, point), _post(raw, "kl_unadapted", p, r, point)
            noise = [] if _is_noise(str(raw["row_condition"][r])) else [_post(raw, "kl", p, q, point) for q in noise_rows[point]]
            for name, value in derived(kl, unadapted, noise, d).items():
                if name in out:
                    out[name][p, r] = value
            if kl.size:
                tail = slice(max(0, kl.size - d.window), kl.size)
                out["unadapted_gap"][p, r] = unadapted[tail].mean()
                out["post_kl"][p, r] = kl.mean()
                out["post_log_ratio"][p, r] = _post(raw, "log_ratio", p, r, point).mean()
                out["kl_at_injection"][p, r], out["unadapted_at_injection"][p, r] = kl[0], unadapted[0]
    return out


def _answers(raw, kind: str) -> Dict[str, np.ndarray]:
    """{"new": [P, R], "old": [P, R]} 1.0 where the reply gives the injected / original answer."""
    n_p, n_r = raw["reply"].shape
    new, old = np.zeros((n_p, n_r)), np.zeros((n_p, n_r))
    for p in range(n_p):
        for r in range(n_r):
            reply = str(raw["reply"][p, r])
            new[p, r] = matches(kind, reply, str(raw["injected_answer"][p]))
            old[p, r] = matches(kind, reply, str(raw["original_answer"][p]))
    return {"new": new, "old": old}


def analyze(raw: Dict[str, np.ndarray], config: dict) -> dict:
    kind = config["data"]["kind"]
    keys = row_keys(raw)
    boot = dict(n_boot=int(config["bootstrap"]), seed=int(config["seed"]))
    control = raw["category"] == "control"
    changed = ~control
    measures = _per_row_measures(raw, config)
    answers = _answers(raw, kind)
    base, oracle = keys.index("baseline"), keys.index("oracle")
    points = sorted({int(p) for p in raw["row_point"] if p >= 0})

    accuracy = {"model": {"baseline_on_original": bootstrap_ci(answers["old"][:, base], **boot),
                          "oracle_on_injected": bootstrap_ci(answers["new"][:, oracle], **boot),
                          "by_category": {}},
                "conditions": {}}
    for cat in sorted(set(raw["category"].tolist())):
        m = raw["category"] == cat
        accuracy["model"]["by_category"][cat] = {
            "problems": int(m.sum()),
            "baseline_on_original": bootstrap_ci(answers["old"][m, base], **boot)["value"],
            "oracle_on_injected": bootstrap_ci(answers["new"][m, oracle], **boot)["value"]}
    for r, key in enumerate(keys):
        accuracy["conditions"][key] = {"new_answer": bootstrap_ci(answers["new"][changed, r], **boot),
                                       "old_answer": bootstrap_ci(answers["old"][changed, r], **boot)}

    derived_out, controls = {}, {}
    for r, key in enumerate(keys):
        if int(raw["row_point"][r]) < 0:
            continue
        entry = {}
        for name in MEASURES + EXTRA:
            stat = np.median if name in ("detection_latency", "adaptation_point", "stabilisation") else np.mean
            entry[name] = bootstrap_ci(measures[name][changed, r], stat, **boot)
        entry["statistic"] = {"detection_latency": "median", "adaptation_point": "median", "stabilisation": "median"}
        for name, share in (("detection_latency", "detected"), ("adaptation_point", "adapted"),
                            ("stabilisation", "stabilised")):
            happened = np.isfinite(measures[name][changed, r]).astype(float)
            # a noise control is what detection is measured against: it has no detection of its own
            entry[share] = bootstrap_ci([] if name == "detection_latency" and _is_noise(key) else happened, **boot)
        derived_out[key] = entry
        controls[key] = {"post_kl": bootstrap_ci(measures["post_kl"][control, r], **boot),
                         "remaining_gap": bootstrap_ci(measures["remaining_gap"][control, r], **boot),
                         "exact_zero_kl": int(np.sum(measures["post_kl"][control, r] == 0.0)),
                         "problems": int(control.sum())}

    return {"problems": int(len(raw["category"])), "changed_problems": int(changed.sum()),
            "control_problems": int(control.sum()), "kind": kind, "conditions": keys, "points": points,
            "timing": {"total_s": float(raw["seconds"].sum()), "per_problem_s": float(raw["seconds"].mean()),
                       "cpu_s": float(raw["cpu_seconds"].sum())},
            "accuracy": accuracy, "derived": derived_out, "controls": controls,
            "summary": _summary(keys, measures, answers, changed, boot),
            "tests": _tests(raw, keys, measures, changed, points, boot),
            "curves": _curves(raw, keys, changed, points, boot),
            "token": _token(raw, keys, changed, points, boot)}


def _summary(keys, measures, answers, changed, boot) -> dict:
    """Per injected condition (tier, or noise kind) over all injection points: each problem's mean over the points
    (of those where the measure exists), with bootstrap intervals over problems."""
    groups: Dict[str, List[int]] = {}
    for r, key in enumerate(keys):
        if "@" in key:
            groups.setdefault(key.split("@")[0], []).append(r)
    out = {}
    with warnings.catch_warnings():  # a problem with no value at any point: nanmean warns, the result is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, rows in groups.items():
            entry = {"points": len(rows)}
            for measure in ("kl_at_injection", "unadapted_at_injection", "detection_latency", "adaptation_point",
                            "remaining_gap", "relative_gap"):
                entry[measure] = bootstrap_ci(np.nanmean(measures[measure][changed][:, rows], axis=1), **boot)
            detected = np.isfinite(measures["detection_latency"][changed][:, rows]).mean(1)
            entry["detected"] = bootstrap_ci([] if _is_noise(name) else detected, **boot)
            entry["new_answer"] = bootstrap_ci(answers["new"][changed][:, rows].mean(1), **boot)
            out[name] = entry
    return out


def _tests(raw, keys, measures, changed, points, boot) -> List[dict]:
    tests = []

    def add(name, measure, a_key, b_key, a, b):
        tests.append({"name": name, "measure": measure, "a": a_key, "b": b_key, **paired_test(a, b, **boot)})

    def col(key, measure):
        return measures[measure][changed, keys.index(key)]

    tiers = [k.split(":")[1].split("@")[0] for k in keys if k.startswith("injection:") and k.endswith(f"@{points[0]}")]
    reference = "fp32" if "fp32" in tiers else tiers[0]
    noise = sorted({k.split("@")[0] for k in keys if k.startswith("noise")})
    for n in points:
        ref = f"injection:{reference}@{n}"
        for kind in noise:
            add("injection vs noise", "remaining_gap", ref, f"{kind}@{n}", col(ref, "remaining_gap"),
                col(f"{kind}@{n}", "remaining_gap"))
        for tier in tiers:
            key = f"injection:{tier}@{n}"
            add("injected context vs original context", "remaining_gap", key, "unadapted", col(key, "remaining_gap"),
                col(key, "unadapted_gap"))
            if tier != reference:
                add("tier vs " + reference, "remaining_gap", key, ref, col(key, "remaining_gap"),
                    col(ref, "remaining_gap"))
                add("tier vs " + reference, "post_kl", key, ref, col(key, "post_kl"), col(ref, "post_kl"))
    for tier in tiers:
        for i, a in enumerate(points):
            for b in points[i + 1:]:
                ka, kb = f"injection:{tier}@{a}", f"injection:{tier}@{b}"
                for measure in ("remaining_gap", "detection_latency", "adaptation_point"):
                    add("injection points", measure, ka, kb, col(ka, measure), col(kb, measure))
    return tests


def _curves(raw, keys, changed, points, boot) -> dict:
    """Mean KL to the oracle per step since injection (non-control problems), per point and condition."""
    m = raw["kl"].shape[-1]
    out = {}
    idx = np.flatnonzero(changed)
    for n in points:
        horizon = m - n
        panel = {}
        sources = [(k, r, "kl") for r, k in enumerate(keys) if k.endswith(f"@{n}")]
        sources += [("baseline (no injection)", keys.index("baseline"), "kl")]
        ref = next((r for r, k in enumerate(keys) if k.startswith("injection:") and k.endswith(f"@{n}")), None)
        if ref is not None:
            sources += [(f"unadapted ({keys[ref].split('@')[0]} stream)", ref, "kl_unadapted")]
        for label, r, name in sources:
            values = np.full((idx.size, horizon), np.nan)
            for j, p in enumerate(idx):
                post = _post(raw, name, p, r, n)
                values[j, :post.size] = post
            panel[label] = curve_band(values, **boot)
        out[str(n)] = panel
    return out


def _token(raw, keys, changed, points, boot) -> dict:
    """Log ratio, hidden-state cosine and attention share on the span after the injection, per condition."""
    out = {}
    oracle = keys.index("oracle")
    idx = np.flatnonzero(changed)
    for r, key in enumerate(keys):
        n = int(raw["row_point"][r])
        start = max(n, 0)
        ratio, cos_final, span, span_oracle = [], [], [], []
        cos_layers, span_layers = [], []
        for p in idx:
            valid = raw["valid"][p, r, start:]
            if not valid.any():
                continue
            ratio.append(raw["log_ratio"][p, r, start:][valid].mean())
            cos = raw["cosine"][p, r, start:][valid].astype(np.float64)        # [steps, L + 1]
            cos_final.append(cos[:, -1].mean())
            cos_layers.append(cos.mean(0))
            att = raw["attn_span"][p, r, start:][valid].astype(np.float64)      # [steps, L]
            att_o = raw["attn_span"][p, oracle, start:][raw["valid"][p, oracle, start:]].astype(np.float64)
            if np.isfinite(att).any():
                span.append(np.nanmean(att))
                span_layers.append(np.nanmean(att, 0))
            if np.isfinite(att_o).any():
                span_oracle.append(np.nanmean(att_o))
        with warnings.catch_warnings():  # layers without a value: nanmean warns, the result is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out[key] = {"log_ratio": bootstrap_ci(ratio, **boot), "cosine_final": bootstrap_ci(cos_final, **boot),
                        "cosine_by_layer": _list(np.nanmean(cos_layers, 0)) if cos_layers else [],
                        "attn_span": bootstrap_ci(span, **boot),
                        "attn_span_by_layer": _list(np.nanmean(span_layers, 0)) if span_layers else [],
                        "attn_span_oracle_same_steps": bootstrap_ci(span_oracle, **boot)}
    return out


def _list(x) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, dtype=np.float64)]


def derived_files(raw: Dict[str, np.ndarray], config: dict) -> Dict[str, str]:
    """problems.jsonl (one JSON object per problem: texts, answers, each condition's reply, per-step token,
    attention and causal measures, and its derived measures) and dataset.json (the problems, in the format
    ``--dataset`` reads)."""
    import json

    from .data import to_json, ProblemSet, Problem, Version

    keys = row_keys(raw)
    measures = _per_row_measures(raw, config)
    answers = _answers(raw, config["data"]["kind"])
    lines = []
    for p in range(len(raw["category"])):
        rows = []
        for r, key in enumerate(keys):
            valid = raw["valid"][p, r]
            steps = [{"t": int(t), "token": str(raw["token_text"][p, r, t]),
                      "kl": _num(raw["kl"][p, r, t]), "kl_unadapted": _num(raw["kl_unadapted"][p, r, t]),
                      "log_ratio": _num(raw["log_ratio"][p, r, t]), "logprob": _num(raw["logprob"][p, r, t]),
                      "entropy": _num(raw["entropy"][p, r, t]),
                      "cosine_final": _num(raw["cosine"][p, r, t, -1]),
                      "attn_span": _num(np.nanmean(raw["attn_span"][p, r, t].astype(np.float64))
                                        if np.isfinite(raw["attn_span"][p, r, t].astype(np.float64)).any() else None),
                      "attn_pre": _num(np.nanmean(raw["attn_pre"][p, r, t].astype(np.float64))
                                       if np.isfinite(raw["attn_pre"][p, r, t].astype(np.float64)).any() else None)}
                     for t in np.flatnonzero(valid)]
            rows.append({"condition": key, "point": int(raw["row_point"][r]), "tier": str(raw["row_tier"][r]),
                         "reply": str(raw["reply"][p, r]), "gives_injected_answer": bool(answers["new"][p, r]),
                         "gives_original_answer": bool(answers["old"][p, r]),
                         "summary": {m: _num(measures[m][p, r]) for m in measures}, "steps": steps})
        lines.append(json.dumps({"id": str(raw["problem_id"][p]), "category": str(raw["category"][p]),
                                 "context": str(raw["context"][p]),
                                 "original": {"text": str(raw["original_text"][p]),
                                              "answer": str(raw["original_answer"][p])},
                                 "injected": {"text": str(raw["injected_text"][p]),
                                              "answer": str(raw["injected_answer"][p])},
                                 "conditions": rows}, sort_keys=True))
    data = config["data"]
    problems = ProblemSet(data["kind"], [Problem(str(raw["problem_id"][p]), str(raw["category"][p]),
                                                 Version(str(raw["original_text"][p]), str(raw["original_answer"][p])),
                                                 Version(str(raw["injected_text"][p]), str(raw["injected_answer"][p])),
                                                 str(raw["context"][p])) for p in range(len(raw["category"]))],
                          data.get("instruction", ""), tuple((e["question"], e["reply"]) for e in data["examples"]))
    return {"problems.jsonl": "\n".join(lines) + "\n", "dataset.json": json.dumps(to_json(problems), indent=1) + "\n"}


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None
