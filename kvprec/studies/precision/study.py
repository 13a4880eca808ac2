"""The precision study (``kvprec study precision``): measured curvature, the precision map, and the measured
quality-memory curve of an HF decoder.

A run writes one directory (the contract of every study: kvprec/studies/platform/rundir.py)::

    config.json     the settings (and the model name, token counts, versions)
    raw.npz         every measurement: per-position scores of each curvature method, locality, the sampled
                    blocks and their measured sensitivity per tier, the per-kind probes (``probe_*``: scores from
                    calibration and held-out queries, sensitivity per query), the precision map, the policy
                    comparison rows and the memory table
    analysis.json   computed from raw.npz and config.json only (kvprec/studies/precision/report.py)
    report.md       every number from analysis.json (report.py)
    plots/*.png     from raw.npz and analysis.json (kvprec/studies/precision/plots.py)

``kvprec study precision --reanalyze DIR`` recomputes analysis.json, report.md and plots from raw.npz; the
result is byte-identical to the run's (tested).

What is measured (formulas in kvprec/studies/precision/measure.py):

1. curvature of real attention on a calibration probe (context P tokens in the cache, Q query tokens on top) by
   the closed form (``attention``), autograd of the attention output (``grad_attn``) and of the next-token
   log-probabilities (``gradient``), Hutchinson's Hessian diagonal (``hessian``), their ``hybrid``, and the
   attention mass baseline; locality (recency, anchors/sinks, key clusters) per layer and head;
2. the precision map of the mapper (Curvature.calibrate, budget or threshold mode) on the same probe;
3. per sampled (layer, KV head, block) and tier, the change of that layer's attention output and of the
   next-token distribution when that block alone is stored at the tier; Spearman rho of each method vs it;
4. teacher-forced quality (kvprec.hf.eval.compare) of uniform INT2/4/8 and, at each bits-per-element budget, the
   curvature policy, attention mass and sink+window, each wrapped in ``budget(..., bits_per_element=b)`` so the
   sealed pages of every layer obey the same budget; the measured effective bits come from the cache's own
   accounting (tail and block table included);
5. per prompt kind (each built-in prompt, or windows of --text FILE) with calibration and held-out queries: every
   method's scores and the measured sensitivity per query, so the rank correlations can be taken per kind and out
   of sample (held-out queries at later positions, held-out prompts of other kinds): kvprec/studies/precision/
   probes.py collects, kvprec/studies/precision/heldout.py analyses (report sections 6 and 7);
6. memory at the requested context lengths from ``AdaptiveCache.memory_report()``, filled by appending random
   K/V of the model's shapes to each layer (no model forward: the bytes depend only on shapes and tiers);
   compression at top-1 agreement thresholds; early / middle / late layer patterns.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ...storage.formats import BlockGeometry, Tier
from ..platform.inputs import check_device
from ..platform.progress import QUIET, Progress
from ..platform.rundir import StudyInputError, Study, check_out, load_raw, run_config, write_run
from ..platform.rundir import reanalyze as rundir_reanalyze
from . import measure as pr
from .plots import make_plots
from .probes import collect_probes
from .report import analyze, render_report


@dataclass
class StudyConfig:
    model: str = "tiny"
    text: Optional[str] = None          # calibration text file (default: the built-in prompts)
    eval_text: Optional[str] = None     # quality-harness text (default: held-out stdlib files for tiny, else text)
    context: int = 256                  # P: calibration context in the cache (rounded down to a block multiple)
    queries: int = 16                   # Q: query tokens on top of it
    block_size: int = 16
    group_size: Optional[int] = None    # value group; None: formats.default_group_size(head_dim)
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
    # per-prompt-kind probes and held-out validation (kvprec/studies/precision/probes.py)
    per_kind: bool = True
    kind_context: Optional[int] = None      # P of every probe (rounded down to a block multiple); None: context
    heldout_queries: Optional[int] = None   # H held-out queries per probe; None: queries
    heldout_gap: Optional[int] = None       # G tokens between calibration and held-out queries; None: block_size
    kind_max_items: Optional[int] = None    # sampled items per probe; None: max_items
    file_probes: int = 3                    # with --text FILE: disjoint windows of the file (kind "file")


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
        from ...models import STDLIB_EVAL_FILES, stdlib_text

        return calib, stdlib_text(STDLIB_EVAL_FILES).decode("utf-8", errors="replace"), "held-out stdlib files"
    return calib, calib, "the calibration text (in-sample)"


def _policies(model, calib_ids, cfg: StudyConfig, bits: float, geometry) -> Dict[str, object]:
    from ...hf.policy import AttentionMass, Curvature, SinkWindow, budget

    curv = Curvature.calibrate(model, calib_ids, mode="budget", bits_per_element=bits, candidates=cfg.candidates,
                               block_size=cfg.block_size, group_size=cfg.group_size)
    return {"curvature": budget(curv, bits_per_element=bits),
            "attention_mass": budget(AttentionMass(keep=0.5, high="fp16", low="int4"), bits_per_element=bits),
            "sink_window": budget(SinkWindow(sinks=4, window=cfg.sink_window, rest="int4", recent="fp16"),
                                  bits_per_element=bits)}


def _memory_bytes(model, policy, cfg: StudyConfig, context: int, seed: int):
    """(resident bytes, elements) of an AdaptiveCache after appending ``context`` random K/V per layer."""
    from ...hf.cache import AdaptiveCache, text_config

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


def collect(cfg: StudyConfig, loaded, progress: Progress = QUIET) -> Dict[str, np.ndarray]:
    """Run every measurement; returns the raw arrays (saved as raw.npz)."""
    from ...hf.eval import compare
    from ...hf.policy import Curvature, Uniform
    from ...hf.cache import AdaptiveCache

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
    progress.log(f"curvature: {len(inputs)} layers x {kappa.shape[1]} KV heads x {p} positions "
        f"({time.perf_counter() - start:.1f} s)")
    loc = pr.locality(inputs, cfg.locality_window)
    raw.update({f"loc_{k}": v for k, v in loc.items()})

    start = time.perf_counter()
    items = pr.sample_items(kappa.shape[0], kappa.shape[1], p // t, cfg.max_items, cfg.seed)
    sens = pr.measure_sensitivity(model, probe, p, items, cfg.tiers, t, progress=progress)
    raw["items"] = items
    raw.update({f"sens_{k}": v for k, v in sens.items()})
    progress.log(f"sensitivity: {len(items)} blocks x {len(cfg.tiers)} tiers ({time.perf_counter() - start:.1f} s)")
    raw.update(collect_probes(model, loaded.encode, cfg, progress))

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
    # one prediction per entry (the eval batch's rows, here one, flattened): the raw layout of earlier runs
    raw["cmp_nll"] = np.stack([result.results[r["cache"]].nll.reshape(-1).double().numpy() for r in rows[1:]])
    raw["cmp_argmax"] = np.stack([result.results[r["cache"]].argmax.reshape(-1).numpy() for r in rows[1:]])
    raw["ref_nll"] = result.reference.nll.reshape(-1).double().numpy()
    raw["ref_argmax"] = result.reference.argmax.reshape(-1).numpy()
    raw["eval_prefill"] = np.array(prefill)
    progress.log(f"quality: {len(factories)} caches, prefill {prefill} + {ev.shape[1] - prefill} steps "
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
# Run directory (kvprec/studies/platform/rundir.py)

STUDY = Study("precision", analyze, render_report, make_plots)


def validate(cfg: StudyConfig) -> None:
    """Refuse settings the study cannot run, naming the command-line argument, before a model is loaded."""
    def positive(flag, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StudyInputError(f"{flag} {value}: use a whole number >= 1")

    t = cfg.block_size
    if isinstance(t, bool) or not isinstance(t, int) or t < 1 or t & (t - 1):
        raise StudyInputError(f"--block-size {t}: use a power of two >= 1 (e.g. 16)")
    for flag, value in (("--context", cfg.context), ("--queries", cfg.queries), ("--max-items", cfg.max_items),
                        ("--hutchinson", cfg.hutchinson_samples), ("--prefill", cfg.prefill),
                        ("--steps", cfg.steps), ("--file-probes", cfg.file_probes),
                        ("--locality-window", cfg.locality_window), ("--sink-window", cfg.sink_window)):
        positive(flag, value)
    for flag, value in (("--kind-context", cfg.kind_context), ("--heldout-queries", cfg.heldout_queries),
                        ("--heldout-gap", cfg.heldout_gap), ("--kind-items", cfg.kind_max_items),
                        ("--group-size", cfg.group_size)):
        if value is not None:
            positive(flag, value)
    if cfg.context < t:
        raise StudyInputError(f"--context {cfg.context}: the calibration context needs at least one block "
                              f"(--block-size {t})")
    for n in cfg.memory_contexts:
        positive("--memory-context", n)
    for flag, values in (("--budget", cfg.budgets or []), ("--map-budget", [] if cfg.map_budget is None else
                                                           [cfg.map_budget]), ("--eps", [] if cfg.eps is None
                                                                               else [cfg.eps])):
        for v in values:
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise StudyInputError(f"{flag} {v}: use a finite number > 0")
    for flag, names in (("tiers", cfg.tiers), ("candidates", cfg.candidates)):
        for name in names:
            try:
                Tier.parse(name)
            except ValueError as exc:
                raise StudyInputError(f"{flag}: {exc}") from None
    for flag, path in (("--text", cfg.text), ("--eval-text", cfg.eval_text)):
        if path is not None and not Path(path).is_file():
            raise StudyInputError(f"{flag} {path}: no such file; give a text file")
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise StudyInputError(f"--dtype {cfg.dtype}: use float32, float16 or bfloat16")
    check_device(cfg.device)


def collect_run(cfg: StudyConfig, progress: Progress = QUIET, loaded=None):
    """(raw arrays, config.json's content) of one run: ``loaded`` (a kvprec.models.loading.LoadedModel) or the model
    ``cfg.model`` names."""
    from ...models.loading import load

    validate(cfg)
    if loaded is None:
        loaded = load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    raw = collect(cfg, loaded, progress)
    g = BlockGeometry(cfg.block_size, int(raw_head_dim(loaded.model)), cfg.group_size)
    settings = asdict(cfg)
    settings.update({"eval_source": _texts(cfg, loaded.name)[2], "model_name": loaded.name, "torch": torch.__version__,
                     "collect_seconds": round(time.perf_counter() - start, 2),
                     "map_budget_resolved": cfg.map_budget if cfg.map_budget is not None else page_bits(g, "int4"),
                     "budgets_resolved": cfg.budgets or default_budgets(g)})
    config = run_config("precision", settings, model={"name": loaded.name, "argument": cfg.model, "dtype": cfg.dtype},
                        data={"calibration": cfg.text or "built-in prompts", "eval": settings["eval_source"]},
                        seeds={"seed": cfg.seed})
    return raw, config


def run(cfg: StudyConfig, out_dir, loaded=None, progress: Progress = QUIET, force: bool = False) -> dict:
    """Collect everything for ``cfg`` and write the run directory ``out_dir`` (atomically; an existing run only with
    ``force``); returns analysis.json's content."""
    check_out(out_dir, force=force)
    raw, config = collect_run(cfg, progress, loaded)
    return write_run(STUDY, out_dir, config, raw, force=force)


def raw_head_dim(model) -> int:
    from ...hf.cache import text_config

    tc = text_config(model.config)
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def curvature_policy(run_dir):
    """The run's precision map as a :class:`~kvprec.policy.Curvature` policy for an AdaptiveCache built with the
    run's block_size and group_size (the map of section 2 of the report, rebuilt from raw.npz)."""
    from ...analysis.analyzer import PrecisionMap
    from ...hf.policy import Curvature

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
    return rundir_reanalyze(STUDY, run_dir)
