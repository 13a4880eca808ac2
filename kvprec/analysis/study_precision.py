"""The precision study (``kvprec study precision``): measured curvature, the precision map, and the measured
quality-memory curve of an HF decoder.

A run writes one directory::

    config.json     the settings (and the model name, token counts, versions)
    raw.npz         every measurement: per-position scores of each curvature method, locality, the sampled
                    blocks and their measured sensitivity per tier, the precision map, the policy comparison
                    rows and the memory table
    analysis.json   computed from raw.npz and config.json only (:func:`analyze`)
    report.md       every number from analysis.json (:func:`render_report`)
    plots/*.png     from raw.npz and analysis.json (:func:`make_plots`)

``kvprec study precision --reanalyze DIR`` recomputes analysis.json, report.md and plots from raw.npz; the
result is byte-identical to the run's (tested).

What is measured (formulas in kvprec/analysis/precision.py):

1. curvature of real attention on a calibration probe (context P tokens in the cache, Q query tokens on top) by
   the closed form (``attention``), autograd of the attention output (``grad_attn``) and of the next-token
   log-probabilities (``gradient``), Hutchinson's Hessian diagonal (``hessian``), their ``hybrid``, and the
   attention mass baseline; locality (recency, anchors/sinks, key clusters) per layer and head;
2. the precision map of the mapper (Curvature.calibrate, budget or threshold mode) on the same probe;
3. per sampled (layer, KV head, block) and tier, the change of that layer's attention output and of the
   next-token distribution when that block alone is stored at the tier; Spearman rho of each method vs it;
4. teacher-forced quality (kvprec.eval.compare) of uniform INT2/4/8 and, at each bits-per-element budget, the
   curvature policy, attention mass and sink+window, each wrapped in ``budget(..., bits_per_element=b)`` so the
   sealed pages of every layer obey the same budget; the measured effective bits come from the cache's own
   accounting (tail and block table included);
5. memory at the requested context lengths from ``AdaptiveCache.memory_report()``, filled by appending random
   K/V of the model's shapes to each layer (no model forward: the bytes depend only on shapes and tiers);
   compression at top-1 agreement thresholds; early / middle / late layer patterns.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..formats import BlockGeometry, Tier
from . import precision as pr

SCORE_METHODS = ("attention", "grad_attn", "gradient", "hessian", "hybrid", "attention_mass")
MEASURES = ("kl", "dlogp", "d_attn")
THRESHOLDS = (0.999, 0.99, 0.95)


@dataclass
class StudyConfig:
    model: str = "tiny"
    text: Optional[str] = None          # calibration text file (default: the built-in prompts)
    eval_text: Optional[str] = None     # quality-harness text (default: held-out stdlib files for tiny, else text)
    context: int = 256                  # P: calibration context in the cache (rounded down to a block multiple)
    queries: int = 16                   # Q: query tokens on top of it
    block_size: int = 16
    group_size: int = 32
    tiers: List[str] = field(default_factory=lambda: ["int2", "int4", "int8"])
    max_items: int = 128                # sampled (layer, KV head, block) items for measured sensitivity
    hutchinson_samples: int = 32
    seed: int = 0
    budgets: Optional[List[float]] = None   # bits/element of the comparison; None: midpoints and INT4's page bits
    map_budget: Optional[float] = None      # bits/element of the reported precision map; None: INT4's page bits
    eps: Optional[float] = None             # threshold-mode map instead of a budget
    candidates: List[str] = field(default_factory=lambda: ["int2", "int4", "int8", "fp16"])
    prefill: int = 256                  # quality harness: prefill and teacher-forced steps
    steps: int = 128
    sink_window: int = 64               # sink+window policy: window tokens (4 sinks)
    locality_window: int = 64
    memory_contexts: List[int] = field(default_factory=lambda: [512, 2048, 8192])
    dtype: str = "float32"
    device: str = "cpu"


def page_bits(geometry: BlockGeometry, tier) -> float:
    """Bits per element of one page of ``tier`` (K and V data plus FP16 scales and zeros)."""
    return 8.0 * geometry.page_bytes(Tier.parse(tier)) / (geometry.block_size * geometry.head_dim * 2)


def default_budgets(geometry: BlockGeometry) -> List[float]:
    b2, b4, b8 = (page_bits(geometry, t) for t in ("int2", "int4", "int8"))
    return [round((b2 + b4) / 2, 4), round(b4, 4), round((b4 + b8) / 2, 4)]


# ---------------------------------------------------------------------------------------------------------
# Collection

def _texts(cfg: StudyConfig, name: str):
    calib = Path(cfg.text).read_text(encoding="utf-8", errors="replace") if cfg.text else pr.builtin_text()
    if cfg.eval_text:
        return calib, Path(cfg.eval_text).read_text(encoding="utf-8", errors="replace"), "eval_text file"
    if name == "tiny":
        from ..models import STDLIB_EVAL_FILES, stdlib_text

        return calib, stdlib_text(STDLIB_EVAL_FILES).decode("utf-8", errors="replace"), "held-out stdlib files"
    return calib, calib, "the calibration text (in-sample)"


def _policies(model, calib_ids, cfg: StudyConfig, bits: float, geometry) -> Dict[str, object]:
    from ..policy import AttentionMass, Curvature, SinkWindow, budget

    curv = Curvature.calibrate(model, calib_ids, mode="budget", bits_per_element=bits, candidates=cfg.candidates,
                               block_size=cfg.block_size, group_size=cfg.group_size)
    return {"curvature": budget(curv, bits_per_element=bits),
            "attention_mass": budget(AttentionMass(keep=0.5, high="fp16", low="int4"), bits_per_element=bits),
            "sink_window": budget(SinkWindow(sinks=4, window=cfg.sink_window, rest="int4", recent="fp16"),
                                  bits_per_element=bits)}


def _memory_bytes(model, policy, cfg: StudyConfig, context: int, seed: int):
    """(resident bytes, elements) of an AdaptiveCache after appending ``context`` random K/V per layer."""
    from ..cache import AdaptiveCache, text_config

    tc = text_config(model.config)
    hkv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    d = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    dtype = getattr(torch, cfg.dtype)
    cache = AdaptiveCache(model.config, policy=policy, block_size=cfg.block_size, group_size=cfg.group_size)
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gathered-tensor path warns that it is slow; it is one call per layer
        for layer in cache.layers:
            k = torch.randn(1, hkv, context, d, generator=g).to(dtype)
            v = torch.randn(1, hkv, context, d, generator=g).to(dtype)
            layer.update(k, v)
    rep = cache.memory_report()
    return rep.resident_bytes, int(rep.elements.sum())


def collect(cfg: StudyConfig, loaded, log=print) -> Dict[str, np.ndarray]:
    """Run every measurement; returns the raw arrays (saved as raw.npz)."""
    from ..eval import compare
    from ..policy import Curvature, Uniform
    from ..cache import AdaptiveCache

    model, t = loaded.model, cfg.block_size
    calib_text, eval_text, _ = _texts(cfg, loaded.name)
    calib = torch.tensor([loaded.encode(calib_text)])
    nq = cfg.queries
    p = min(cfg.context, (calib.shape[1] - nq - 1) // t * t)
    if p < t:
        raise ValueError(f"study precision: the calibration text has {calib.shape[1]} tokens; it needs at least "
                         f"block_size + queries + 1 = {t + nq + 1}")
    probe = calib[:, :p + nq + 1]
    raw: Dict[str, np.ndarray] = {"context": np.array(p), "queries": np.array(nq)}

    start = time.perf_counter()
    inputs = pr.capture(model, probe[:, :p + nq], nq, t)
    kappa, mass = (np.stack(x) for x in zip(*[pr.attention_scores(x, p) for x in inputs]))
    raw["attention"], raw["attention_mass"] = kappa, mass
    raw["grad_attn"] = np.stack([pr.attention_output_jacobian_norms(x, p) for x in inputs])
    raw["gradient"], raw["hessian"] = pr.end_to_end_scores(model, probe, p, hutchinson_samples=cfg.hutchinson_samples,
                                                           seed=cfg.seed)
    raw["hybrid"] = pr.hybrid_scores(kappa, raw["gradient"])
    log(f"curvature: {len(inputs)} layers x {kappa.shape[1]} KV heads x {p} positions "
        f"({time.perf_counter() - start:.1f} s)")
    loc = pr.locality(inputs, cfg.locality_window)
    raw.update({f"loc_{k}": v for k, v in loc.items()})

    start = time.perf_counter()
    items = pr.sample_items(kappa.shape[0], kappa.shape[1], p // t, cfg.max_items, cfg.seed)
    sens = pr.measure_sensitivity(model, probe, p, items, cfg.tiers, t)
    raw["items"] = items
    raw.update({f"sens_{k}": v for k, v in sens.items()})
    log(f"sensitivity: {len(items)} blocks x {len(cfg.tiers)} tiers ({time.perf_counter() - start:.1f} s)")

    geometry = BlockGeometry(t, inputs[0].k.shape[-1], cfg.group_size)
    map_bits = cfg.map_budget if cfg.map_budget is not None else page_bits(geometry, "int4")
    calib_ids = probe[:, :p + nq]
    if cfg.eps is not None:
        cmap = Curvature.calibrate(model, calib_ids, mode="threshold", eps=cfg.eps, candidates=cfg.candidates,
                                   block_size=t, group_size=cfg.group_size).map
    else:
        cmap = Curvature.calibrate(model, calib_ids, mode="budget", bits_per_element=map_bits,
                                   candidates=cfg.candidates, block_size=t, group_size=cfg.group_size).map
    raw["map_tiers"] = np.stack([x.numpy() for x in cmap.tiers]).astype(np.int64)
    raw["map_kappa_sum"] = np.stack([x.numpy() for x in cmap.kappa_sum])
    raw["map_kappa_max"] = np.stack([x.numpy() for x in cmap.kappa_max])
    raw["map_default_tiers"] = np.stack([x.numpy() for x in cmap.default_tiers]).astype(np.int64)
    raw["map_geometry"] = np.array([geometry.block_size, geometry.head_dim, geometry.group_size], dtype=np.int64)
    raw["map_mode"] = np.array(cmap.mode)
    raw["map_page_bytes"] = np.array(cmap.page_bytes, dtype=np.int64)
    raw["map_predicted_error"] = np.array(cmap.predicted_error)
    raw["map_markdown"] = np.array(cmap.markdown)
    raw["map_page_bits"] = np.array([page_bits(geometry, tier) for tier in Tier])
    raw["map_bits_per_element"] = np.array(cmap.bits_per_element)

    # quality vs memory
    start = time.perf_counter()
    budgets = cfg.budgets or default_budgets(geometry)
    ev = torch.tensor([loaded.encode(eval_text)])
    prefill = min(cfg.prefill, ev.shape[1] - 2)
    ev = ev[:, :prefill + cfg.steps]
    factories, family, target = {}, [], []
    for tier in ("int8", "int4", "int2"):
        factories[f"uniform:{tier}"] = (lambda tier=tier: AdaptiveCache(model.config, policy=Uniform(tier),
                                                                         block_size=t, group_size=cfg.group_size))
        family.append("uniform")
        target.append(page_bits(geometry, tier))
    for bits in budgets:
        for name, pol in _policies(model, calib_ids, cfg, bits, geometry).items():
            factories[f"{name}@{bits:g}"] = (lambda pol=pol: AdaptiveCache(model.config, policy=pol,
                                                                            block_size=t, group_size=cfg.group_size))
            family.append(name)
            target.append(bits)
    result = compare(model, ev, prefill, factories)
    rows = result.rows()
    raw["cmp_names"] = np.array([r["cache"] for r in rows[1:]])
    raw["cmp_family"] = np.array(family)
    raw["cmp_target_bits"] = np.array(target)
    raw["cmp_bits"] = np.array([r["bits_per_element"] for r in rows[1:]])
    raw["cmp_ppl"] = np.array([r["perplexity"] for r in rows[1:]])
    raw["cmp_nll"] = np.stack([result.results[r["cache"]].nll.double().numpy() for r in rows[1:]])
    raw["cmp_argmax"] = np.stack([result.results[r["cache"]].argmax.numpy() for r in rows[1:]])
    raw["ref_nll"] = result.reference.nll.double().numpy()
    raw["ref_argmax"] = result.reference.argmax.numpy()
    raw["eval_prefill"] = np.array(prefill)
    log(f"quality: {len(factories)} caches, prefill {prefill} + {ev.shape[1] - prefill} steps "
        f"({time.perf_counter() - start:.1f} s)")

    # memory at context lengths
    mem_policies = {"uniform:fp16": Uniform("fp16"), "uniform:int8": Uniform("int8"), "uniform:int4": Uniform("int4"),
                    "uniform:int2": Uniform("int2"),
                    "sink_window(4 sinks, window 128, int4)": "sink_window"}
    b4 = page_bits(geometry, "int4")
    for name, pol in _policies(model, calib_ids, cfg, b4, geometry).items():
        mem_policies[f"{name}@{b4:g}"] = pol
    mem = np.zeros((len(mem_policies), len(cfg.memory_contexts)), dtype=np.int64)
    elements = np.zeros_like(mem)
    for i, pol in enumerate(mem_policies.values()):
        for j, n in enumerate(cfg.memory_contexts):
            mem[i, j], elements[i, j] = _memory_bytes(model, pol, cfg, n, cfg.seed)
    raw["mem_policies"] = np.array(list(mem_policies))
    raw["mem_contexts"] = np.array(cfg.memory_contexts, dtype=np.int64)
    raw["mem_bytes"], raw["mem_elements"] = mem, elements
    return raw


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
            "layer_groups": groups, "locality": locality}


# ---------------------------------------------------------------------------------------------------------
# Report (from analysis.json only)

def _num(x, fmt=".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


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
                   "scores to other text by position only.")
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
            f"{_num(pm['bits_per_element'], '.3f')} bits/element of pages; blocks per tier: "
            + ", ".join(f"{k} {v}" for k, v in pm["tier_blocks"].items()) + "; per layer (page bits/element): "
            + ", ".join(f"L{i} {_num(b, '.2f')}" for i, b in enumerate(pm["layer_bits_per_element"]))
            + ". Plot: `plots/precision_map.png`. As a policy: `kvprec.analysis.study_precision.curvature_policy(DIR)` "
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
            f"{100 / n_pred:.3g}%" + (f"; with fewer than 1000 predictions the 99.9% row cannot differ from 100%."
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
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Plots

def make_plots(raw: Dict[str, np.ndarray], a: dict, config: dict, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    n_layers, hkv, p = raw["attention"].shape
    labels = [f"L{l}h{h}" for l in range(n_layers) for h in range(hkv)]
    for m in SCORE_METHODS:
        x = raw[m].reshape(n_layers * hkv, p)
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.5))
        im = ax.imshow(np.log10(np.maximum(x, 1e-30)), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("cached position")
        ax.set_title(f"{m}: log10 score per (layer, KV head) and position")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"curvature_{m}.png", dpi=80)
        plt.close(fig)
        written.append(f"curvature_{m}.png")

    tiers = raw["map_tiers"]
    bits = raw["map_page_bits"][tiers].reshape(n_layers * hkv, -1)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.5))
    im = ax.imshow(bits, aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("block")
    ax.set_title(f"precision map: page bits/element ({a['precision_map']['bits_per_element']:.3f} overall)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "precision_map.png", dpi=80)
    plt.close(fig)
    written.append("precision_map.png")

    rows = a["comparison"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for fam in dict.fromkeys(r["family"] for r in rows):
        rs = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["bits_per_element"])
        xs = [r["bits_per_element"] for r in rs]
        axes[0].plot(xs, [100 * r["ppl_change"] for r in rs], "o-", label=fam)
        axes[1].plot(xs, [100 * r["top1_agreement"] for r in rs], "o-", label=fam)
    axes[0].set_ylabel("perplexity change (%)")
    axes[1].set_ylabel("top-1 agreement (%)")
    for ax in axes:
        ax.set_xlabel("effective bits/element (measured)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=80)
    plt.close(fig)
    written.append("pareto.png")

    loc = a["locality"]
    keys = ("recency_share", "anchor_share", "cluster_top_share")
    hq = len(loc["recency_share"][0])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    xs = np.arange(n_layers)
    for ax, k in zip(axes, keys):
        vals = np.array(loc[k])
        for h in range(hq):
            ax.bar(xs + h / (hq + 1), vals[:, h], width=1 / (hq + 1), label=f"q-head {h}")
        if k == "recency_share":
            ax.plot(xs + 0.4, np.array(loc["recency_uniform"])[:, 0], "k_", markersize=20, label="uniform")
        ax.set_xticks(xs + 0.4, [f"L{l}" for l in xs])
        ax.set_title(k)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "locality.png", dpi=80)
    plt.close(fig)
    written.append("locality.png")

    items = raw["items"]
    idx = tuple(items.T)
    tier_names = list(config["tiers"])
    ti = tier_names.index("int4") if "int4" in tier_names else 0
    y = raw["sens_kl"][:, ti]
    fig, axes = plt.subplots(1, len(SCORE_METHODS), figsize=(3 * len(SCORE_METHODS), 3))
    for ax, m in zip(axes, SCORE_METHODS):
        x = pr.block_sums(raw[m], int(config["block_size"]))[idx]
        ax.loglog(np.maximum(x, 1e-30), np.maximum(y, 1e-30), ".")
        rho = a["correlations"]["kl"][tier_names[ti]][m]
        ax.set_title(f"{m}\nrho={_num(rho, '.2f')}", fontsize=9)
        ax.set_xlabel("block score")
    axes[0].set_ylabel(f"measured KL at {tier_names[ti]}")
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=80)
    plt.close(fig)
    written.append("sensitivity.png")
    return written


# ---------------------------------------------------------------------------------------------------------
# Run directory

def _write_outputs(raw: Dict[str, np.ndarray], config: dict, out: Path) -> dict:
    a = analyze(raw, config)
    (out / "analysis.json").write_text(json.dumps(a, indent=1, sort_keys=True) + "\n")
    (out / "report.md").write_text(render_report(a, config) + "\n")
    make_plots(raw, a, config, out / "plots")
    return a


def load_raw(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def run(cfg: StudyConfig, out_dir, loaded=None, log=print) -> dict:
    """Collect everything for ``cfg`` (``loaded``: a kvprec.loading.LoadedModel, else loaded from cfg.model) and
    write the run directory; returns analysis.json's content."""
    from ..loading import load

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if loaded is None:
        loaded = load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    raw = collect(cfg, loaded, log)
    config = asdict(cfg)
    config.update({"eval_source": _texts(cfg, loaded.name)[2], "model_name": loaded.name,
                   "torch": torch.__version__, "collect_seconds": round(time.perf_counter() - start, 2)})
    head_dim = int(raw_head_dim(loaded.model))
    g = BlockGeometry(cfg.block_size, head_dim, cfg.group_size)
    config["map_budget_resolved"] = cfg.map_budget if cfg.map_budget is not None else page_bits(g, "int4")
    config["budgets_resolved"] = cfg.budgets or default_budgets(g)
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(out / "raw.npz", **raw)
    return _write_outputs(load_raw(out / "raw.npz"), config, out)


def raw_head_dim(model) -> int:
    from ..cache import text_config

    tc = text_config(model.config)
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def curvature_policy(run_dir):
    """The run's precision map as a :class:`~kvprec.policy.Curvature` policy for an AdaptiveCache built with the
    run's block_size and group_size (the map of section 2 of the report, rebuilt from raw.npz)."""
    from ..analyzer import PrecisionMap
    from ..policy import Curvature

    raw = load_raw(Path(run_dir) / "raw.npz")
    t, d, g = (int(x) for x in raw["map_geometry"])

    def per_layer(x, dtype):
        return [torch.from_numpy(np.ascontiguousarray(x[i])).to(dtype) for i in range(x.shape[0])]
    pmap = PrecisionMap(BlockGeometry(t, d, g), str(raw["map_mode"]), per_layer(raw["map_tiers"], torch.int8),
                        per_layer(raw["map_kappa_max"], torch.float64), per_layer(raw["map_kappa_sum"], torch.float64),
                        per_layer(raw["map_default_tiers"], torch.int8), int(raw["map_page_bytes"]),
                        float(raw["map_bits_per_element"]), float(raw["map_predicted_error"]), True, 0.0, [],
                        str(raw["map_markdown"]))
    return Curvature(pmap)


def reanalyze(run_dir) -> dict:
    """Recompute analysis.json, report.md and plots of ``run_dir`` from its raw.npz and config.json."""
    out = Path(run_dir)
    config = json.loads((out / "config.json").read_text())
    return _write_outputs(load_raw(out / "raw.npz"), config, out)
