"""The KV structure study: what the cache looks like (layers, heads, tokens, channels, generation stages,
similarity, Tucker structure) next to what each compression that structure suggests does to the model's output
(teacher-forced NLL of a continuation), compared at equal bytes with kvprec's quantized tiers.

A run writes one directory on the platform's contract (kvprec/studies/platform/rundir.py)::

    config.json     settings, model facts, the sample, versions, timings
    raw.npz         every measurement (kvprec/studies/structure/observe.py and effects.py name the arrays)
    analysis.json   computed from raw.npz and config.json only (analysis.analyze)
    report.md       every number from analysis.json (report.render_report)
    plots/*.png     from raw.npz and analysis.json (plots.make_plots)
    generated.txt   the greedy continuation of the stages part

``reanalyze(DIR)`` recomputes everything after raw.npz from raw.npz and config.json.

Focus parts: layers, heads, tokens, channels, stages, similarity, tucker, prune, or all. The text is the
context x[0..P) (its prefill is captured: kvprec/studies/structure/capture.py) followed by the continuation
x[P..P+C) that every compression is scored on (kvprec/studies/structure/scoring.py); "stages" also decodes N
greedy tokens after the context.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..platform.progress import QUIET, Progress
from ..platform.rundir import Study, StudyInputError, run_config, write_run
from ..platform.rundir import reanalyze as platform_reanalyze
from .analysis import analyze
from .plots import make_plots
from .report import render_report

FOCUS = ("layers", "heads", "tokens", "channels", "stages", "similarity", "tucker", "prune")


@dataclass
class StructureConfig:
    model: str = "smollm2-135m"
    focus: List[str] = field(default_factory=lambda: ["all"])
    text: Optional[str] = None            # WikiText-style file; None: the built-in samples
    sample_index: int = 0
    context: int = 512                    # P (rounded down to whole blocks)
    continuation: int = 128               # C: teacher-forced tokens after the context (C - 1 predictions scored)
    generate: int = 96                    # N: greedy decode steps of the stages part
    block_size: int = 64                  # kvprec tiers' block
    ratios: List[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])   # the equal-bytes table
    curve_ratios: List[float] = field(default_factory=lambda: [1.5, 3.0, 6.0, 12.0, 16.0])
    sweep_ratio: float = 4.0              # per-layer Tucker sensitivity
    prune_layers: List[int] = field(default_factory=list)
    prune_heads: List[Tuple[int, int]] = field(default_factory=list)
    prune_fraction: float = 0.1           # share of KV heads in the chosen / measured / random head sets
    sweep_heads: bool = False             # prune every (layer, KV head) alone (L x H more scored passes)
    window: int = 32                      # last prompt queries: ThinK's observation window, head output norms
    cluster_thresholds: List[float] = field(default_factory=lambda: [0.9, 0.95])
    rotation_seed: int = 0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    command: Optional[str] = None         # the command line that asked for the run (recorded in config.json)


def parse_focus(values: Sequence[str]) -> List[str]:
    """Focus names from ``values`` (each may be comma-separated); "all" expands to every part."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        raise StudyInputError(f"--focus: give one or more of {'|'.join(FOCUS)}|all")
    bad = [n for n in names if n not in FOCUS + ("all",)]
    if bad:
        raise StudyInputError(f"--focus: {', '.join(map(repr, bad))} not accepted; use {'|'.join(FOCUS)}|all")
    return list(FOCUS) if "all" in names else [f for f in FOCUS if f in names]


def parse_layers(text: str) -> List[int]:
    """'0,1,2' -> [0, 1, 2]."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StudyInputError(f"--prune-layers: {text!r} is not a comma-separated list of layer indices, "
                              "e.g. 0,1,2") from None
    if not out:
        raise StudyInputError("--prune-layers: give at least one layer index, e.g. 0,1,2")
    return out


def parse_heads(text: str) -> List[Tuple[int, int]]:
    """'3:1,4:0' -> [(3, 1), (4, 0)] (layer, KV head)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        layer, sep, head = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(layer), int(head)))
        except ValueError:
            raise StudyInputError(f"--prune-heads: {item!r} is not LAYER:KV_HEAD (e.g. 3:1,4:0)") from None
    if not out:
        raise StudyInputError("--prune-heads: give at least one LAYER:KV_HEAD pair, e.g. 3:1")
    return out


def check_config(cfg: StructureConfig) -> None:
    """Refuse bad settings before anything is loaded or written (each message names the argument)."""
    cfg.focus = parse_focus(cfg.focus)
    for name, value, low in (("--context", cfg.context, 2), ("--continuation", cfg.continuation, 2),
                             ("--block-size", cfg.block_size, 1), ("--window", cfg.window, 1),
                             ("--sample-index", cfg.sample_index, 0), ("--generate", cfg.generate, 0)):
        if int(value) != value or value < low:
            raise StudyInputError(f"{name}: {value} is not accepted; it must be an integer >= {low}")
    if cfg.block_size & (cfg.block_size - 1):
        raise StudyInputError(f"--block-size: {cfg.block_size} is not a power of two")
    if cfg.context < cfg.block_size:
        raise StudyInputError(f"--context: {cfg.context} tokens hold no whole block of --block-size {cfg.block_size}")
    if "stages" in cfg.focus and cfg.generate < 3:
        raise StudyInputError(f"--generate: {cfg.generate} is not accepted with --focus stages; it needs >= 3 tokens "
                         "(early, middle, late)")
    if "stages" in cfg.focus and cfg.generate // 3 > cfg.context - cfg.context % cfg.block_size:
        raise StudyInputError(f"--generate: {cfg.generate} steps make stages of {cfg.generate // 3} tokens, more than "
                         f"the {cfg.context}-token context; lower --generate")
    for name, values in (("--ratios", cfg.ratios), ("--curve-ratios", cfg.curve_ratios)):
        if any(not (r > 1.0 and math.isfinite(r)) for r in values):
            raise StudyInputError(f"{name}: {values} not accepted; every compression ratio must be a number > 1")
    if not cfg.ratios:
        raise StudyInputError("--ratios: give at least one compression ratio > 1")
    if not (cfg.sweep_ratio > 1.0 and math.isfinite(cfg.sweep_ratio)):
        raise StudyInputError(f"--sweep-ratio: {cfg.sweep_ratio} is not accepted; it must be > 1")
    if not 0.0 < cfg.prune_fraction < 1.0:
        raise StudyInputError(f"--prune-fraction: {cfg.prune_fraction} is not accepted; use a number in (0, 1)")
    if any(not 0.0 < t < 1.0 for t in cfg.cluster_thresholds) or not cfg.cluster_thresholds:
        raise StudyInputError(f"--cluster-threshold: {cfg.cluster_thresholds} not accepted; cosines in (0, 1)")
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise StudyInputError(f"--dtype: {cfg.dtype!r} is not accepted; use float32, float16 or bfloat16")


def check_model_fit(cfg: StructureConfig, n_layers: int, n_heads: int) -> None:
    """The prune sets name layers and KV heads the model has."""
    for layer in cfg.prune_layers:
        if not 0 <= layer < n_layers:
            raise StudyInputError(f"--prune-layers: layer {layer} is not in 0..{n_layers - 1} "
                                  f"(the model has {n_layers})")
    for layer, head in cfg.prune_heads:
        if not 0 <= layer < n_layers or not 0 <= head < n_heads:
            raise StudyInputError(f"--prune-heads: {layer}:{head} is not a layer in 0..{n_layers - 1} and KV head in "
                             f"0..{n_heads - 1}")


def observe_parts(focus: Sequence[str]) -> List[str]:
    parts = set()
    if "layers" in focus:
        parts.add("layers")
    if {"heads", "tokens", "channels", "prune"} & set(focus):
        parts.add("attention")
    for name in ("channels", "similarity", "stages"):
        if name in focus:
            parts.add(name)
    return sorted(parts)


# ---------------------------------------------------------------------------------------------------------
# Collection

def measure(cfg: StructureConfig, loaded, sample, progress: Progress = QUIET):
    """(raw arrays, facts) of one run (module docstring)."""
    from . import effects as ef
    from .capture import capture
    from .compress import TuckerCache
    from .observe import observe

    model = loaded.model
    ids = torch.tensor(loaded.encode(sample.text), dtype=torch.long)
    p = cfg.context - cfg.context % cfg.block_size
    need = p + cfg.continuation
    if ids.numel() < need:
        raise StudyInputError(f"--sample-index {cfg.sample_index}: the sample has {ids.numel()} tokens; the run needs "
                              f"--context {p} + --continuation {cfg.continuation} = {need} (pick a longer sample "
                              "with --list-samples, or lower the two)")
    context, continuation = ids[:p], ids[p:need]
    text_cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(text_cfg, "num_hidden_layers", None)
    heads = getattr(text_cfg, "num_key_value_heads", None) or getattr(text_cfg, "num_attention_heads", None)
    if layers and heads:  # before the capture; checked again on the captured shapes
        check_model_fit(cfg, layers, heads)
    steps = cfg.generate if "stages" in cfg.focus else 0
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    progress.log(f"capture: prefill of {p} tokens" + (f", {steps} greedy decode steps" if steps else ""))
    bar = progress.counter(steps + 1, "decode steps") if steps else None
    cap = capture(model, context, generate=steps, block_size=cfg.block_size,
                  on_step=(lambda: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    timings["capture_s"] = time.perf_counter() - start
    n_layers, n_heads = len(cap.k), cap.k[0].shape[0]
    check_model_fit(cfg, n_layers, n_heads)

    start = time.perf_counter()
    parts = observe_parts(cfg.focus)
    progress.log(f"statistics: {', '.join(parts)}")
    bar = progress.counter(len(parts), "statistics")
    raw = observe(cap, parts, window=cfg.window, block_size=cfg.block_size, rotation_seed=cfg.rotation_seed,
                  thresholds=cfg.cluster_thresholds, progress=lambda part: bar.update(1))
    bar.close()
    timings["statistics_s"] = time.perf_counter() - start

    if {"tucker", "channels", "prune"} & set(cfg.focus):
        start = time.perf_counter()
        targets = len(ef.compression_targets(cfg.ratios, cfg.curve_ratios))
        total = 1 + ef.tier_calls(n_layers, "tucker" in cfg.focus, len(cfg.ratios))
        total += ef.tucker_calls(len(cfg.ratios), targets, n_layers) if "tucker" in cfg.focus else 0
        total += ef.channel_calls(len(cfg.ratios), targets) if "channels" in cfg.focus else 0
        total += (ef.prune_calls(n_layers, n_heads, cfg.sweep_heads, True,
                                 int(bool(cfg.prune_layers)) + int(bool(cfg.prune_heads)))
                  if "prune" in cfg.focus else 0)
        progress.log(f"scoring: about {total} teacher-forced passes of {continuation.numel()} tokens")
        bar = progress.counter(total, "scored compressions")
        fx = ef.Effects(model, cap.kv, continuation, progress=lambda: bar.update(1))
        bar.update(1)
        if "tucker" in cfg.focus:
            raw.update(ef.tucker_variants(fx, TuckerCache(cap.kv), cfg.ratios, cfg.curve_ratios, cfg.sweep_ratio))
        if "channels" in cfg.focus:
            norms = [torch.from_numpy(x) for x in raw["query_window_norms"]]
            ef.channel_variants(fx, norms, cfg.ratios, cfg.curve_ratios)
        ef.tier_variants(fx, cfg.block_size, cfg.ratios, cfg.rotation_seed, sweep="tucker" in cfg.focus)
        if "prune" in cfg.focus:
            ef.prune_variants(fx, raw["head_output_norm"], cfg.prune_layers, cfg.prune_heads, cfg.prune_fraction,
                              cfg.seed, cfg.sweep_heads)
        bar.close()
        raw.update(fx.arrays())
        timings["scoring_s"] = time.perf_counter() - start
        timings["scoring_calls"] = fx.scorer.calls

    raw["context_ids"] = context.numpy()
    raw["continuation_ids"] = continuation.numpy()
    raw["context_tokens"] = np.array([loaded.decode([int(t)]) for t in context], dtype=str)
    if steps:
        raw["generated_text"] = np.array(loaded.decode(cap.generated.tolist()), dtype=str)
    model_info = {"name": loaded.name, "argument": cfg.model, "dtype": cfg.dtype, "layers": n_layers,
                  "kv_heads": n_heads, "query_heads": cap.q[0].shape[0], "head_dim": cap.k[0].shape[-1],
                  "attention_calls": [asdict(c) for c in cap.calls]}
    data = {"text_source": cfg.text or "built-in samples", "sample_index": cfg.sample_index,
            "sample_title": sample.title, "sample_tokens": int(ids.numel()), "context_tokens": p,
            "continuation_tokens": int(continuation.numel()), "generated_tokens": steps}
    return raw, model_info, data, timings


def load_inputs(cfg: StructureConfig):
    """(loaded model, sample), the settings checked first."""
    from ..platform.inputs import load_model
    from . import inputs

    check_config(cfg)
    sample = inputs.pick(inputs.samples(cfg.text), cfg.sample_index)
    return load_model(cfg.model, cfg.dtype, cfg.device), sample


def collect_run(cfg: StructureConfig, progress: Progress = QUIET, loaded=None):
    """(raw arrays, config.json's content) of one run: ``loaded`` (a kvprec.models.loading.LoadedModel) or the
    model ``cfg.model`` names."""
    from . import inputs

    check_config(cfg)
    if loaded is None:
        loaded, sample = load_inputs(cfg)
    else:
        sample = inputs.pick(inputs.samples(cfg.text), cfg.sample_index)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    raw, model_info, data, timings = measure(cfg, loaded, sample, progress)
    timings["measure_s"] = time.perf_counter() - start
    settings = asdict(cfg)
    settings["prune_heads"] = [list(x) for x in cfg.prune_heads]
    settings.update({"timings": timings, "threads": torch.get_num_threads()})
    config = run_config("structure", settings, model=model_info, data=data,
                        seeds={"seed": cfg.seed, "rotation_seed": cfg.rotation_seed})
    return raw, config


def derived_files(raw, config) -> Dict[str, str]:
    """generated.txt: the greedy continuation of the stages part."""
    return {"generated.txt": str(raw["generated_text"]) + "\n"} if "generated_text" in raw else {}


STUDY = Study("structure", analyze, render_report, make_plots, derived_files)


def run(cfg: StructureConfig, out, progress: Progress = QUIET, force: bool = False, loaded=None) -> dict:
    """Measure and write the run directory ``out`` (module docstring); returns the analysis."""
    from ..platform.rundir import check_out

    check_config(cfg)
    check_out(out, force=force)
    raw, config = collect_run(cfg, progress, loaded)
    return write_run(STUDY, out, config, raw, force=force)


def reanalyze(run_dir) -> dict:
    """Recompute analysis.json, report.md, plots/ and generated.txt of a run directory from its raw.npz and
    config.json."""
    return platform_reanalyze(STUDY, run_dir)
