"""Per-prompt-kind probes with calibration and held-out queries for the precision study: collection only (the
analysis and report sections are kvprec/studies/precision/heldout.py).

A probe is one token sequence x[0, W) of a single prompt kind: each built-in prompt (prose, code, mixed,
reasoning, transitions; kvprec.studies.precision.measure.BUILTIN_PROMPTS) is one probe; with ``--text FILE`` the kind is
"file" and the probes are up to ``file_probes`` disjoint consecutive windows of the file. Every probe has the same
context length P (a block multiple, so the sampled (layer, KV head, block) items line up across probes)::

    x[0, P)              the context, in the cache; the sampled blocks are re-tiered here
    x[P, P+Q)            calibration queries: the "cal" scores are computed from x[0, P+Q] alone (targets
                         x[P+1 .. P+Q]), exactly as the main probe's scores
    x[P+Q, P+Q+G)        gap: fed, never scored (G >= 1, so no calibration target is a held-out query's input)
    x[P+Q+G, P+Q+G+H)    held-out queries: later positions, standing in for decode-time queries

Every method's scores (kvprec.studies.precision.measure) are computed from the calibration queries ("cal") and, as the
in-sample ceiling of the held-out set, from the held-out queries ("ho": their own end-to-end log-probabilities,
the rest of the sequence fed unscored). The measured sensitivity is recorded per query for all Q+G+H fed queries
in one pass per (item, tier): attention is causal, so a calibration query's measurement does not depend on the
tokens after it.

Raw arrays (``probe_`` prefix in raw.npz): kinds [K] (str), offsets [K] (token offset of the window in its text),
ids [K, W], context (P), query_positions [Q+G+H], cal_queries [Q], ho_queries [H] (absolute positions), items
[M, 3], ``cal_<method>`` / ``ho_<method>`` [K, L, Hkv, P], ``sens_<measure>`` [K, M, n_tiers, Q+G+H],
``loc_<pattern>`` [K, ...] (locality from the calibration queries); or only ``probe_skipped`` (the reason).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..platform.progress import QUIET, Progress
from . import measure as pr

SCORE_METHODS = ("attention", "grad_attn", "gradient", "hessian", "hybrid", "attention_mass")


class ProbesSkipped(Exception):
    """The probes cannot be built (texts too short for the settings); the message says why and what to change."""


def sources(text_file: Optional[str], encode: Callable[[str], List[int]]) -> List[Tuple[str, List[int]]]:
    """(kind, tokens) of each source text: the built-in prompts by kind, or the file as kind "file"."""
    if text_file:
        return [("file", list(encode(Path(text_file).read_text(encoding="utf-8", errors="replace"))))]
    return [(kind, list(encode(text))) for kind, text in pr.BUILTIN_PROMPTS.items()]


def plan(srcs: Sequence[Tuple[str, List[int]]], *, context: int, queries: int, heldout: int, gap: int,
         block_size: int, file_probes: int) -> Tuple[int, List[Tuple[str, int, List[int]]]]:
    """(P, [(kind, offset, ids of length P+Q+G+H+1)]): P is the largest block multiple <= ``context`` that every
    source holds with its queries; a "file" source gives up to ``file_probes`` disjoint windows, others one."""
    if queries < 1 or heldout < 1 or gap < 1:
        raise ValueError(f"probes: queries {queries}, held-out queries {heldout} and gap {gap} must all be >= 1")
    rest = queries + gap + heldout + 1
    t = block_size
    shortest = min(srcs, key=lambda s: len(s[1]))
    p = min(context // t * t, min((len(ids) - rest) // t * t for _, ids in srcs))
    if p < t:
        raise ProbesSkipped(
            f"the shortest prompt ({shortest[0]}, {len(shortest[1])} tokens) cannot hold one block of {t} context "
            f"tokens plus {queries} calibration queries, a gap of {gap}, {heldout} held-out queries and a target "
            f"({t + rest} tokens); use fewer queries (--queries, --heldout-queries, --heldout-gap) or a longer "
            "--text FILE")
    w = p + rest
    probes = []
    for kind, ids in srcs:
        windows = max(1, min(file_probes, len(ids) // w)) if kind == "file" else 1
        probes += [(kind, j * w, ids[j * w:(j + 1) * w]) for j in range(windows)]
    return p, probes


def _scores(model, ids: torch.Tensor, p: int, scored: int, t: int, hutchinson: int, seed: int,
            query_index: Optional[Sequence[int]] = None):
    """Every method's per-position scores [L, Hkv, P] from the last ``scored`` queries of ``ids[:, :-1]`` (the
    tokens after x[P] before them are fed, unscored: ``query_index`` gives the scored ones' indices after P), and
    the layer inputs they came from."""
    inputs = pr.capture(model, ids[:, :-1], scored, t)
    kappa, mass = (np.stack(x) for x in zip(*[pr.attention_scores(x, p) for x in inputs]))
    out = {"attention": kappa, "attention_mass": mass,
           "grad_attn": np.stack([pr.attention_output_jacobian_norms(x, p) for x in inputs])}
    out["gradient"], out["hessian"] = pr.end_to_end_scores(model, ids, p, hutchinson_samples=hutchinson, seed=seed,
                                                           query_index=query_index)
    out["hybrid"] = pr.hybrid_scores(kappa, out["gradient"])
    return out, inputs


def collect_probes(model, encode, cfg, progress: Progress = QUIET) -> Dict[str, np.ndarray]:
    """The ``probe_*`` raw arrays for a StudyConfig ``cfg`` (module docstring)."""
    if not cfg.per_kind:
        return {"probe_skipped": np.array("disabled (--no-per-kind)")}
    t, nq = cfg.block_size, cfg.queries
    nh = cfg.heldout_queries if cfg.heldout_queries is not None else nq
    gap = cfg.heldout_gap if cfg.heldout_gap is not None else t
    try:
        p, probes = plan(sources(cfg.text, encode), context=cfg.kind_context or cfg.context, queries=nq,
                         heldout=nh, gap=gap, block_size=t, file_probes=cfg.file_probes)
    except ProbesSkipped as e:
        progress.log(f"per-kind / held-out probes skipped: {e}")
        return {"probe_skipped": np.array(str(e))}
    start = time.perf_counter()
    fed = nq + gap + nh
    ho_index = list(range(nq + gap, fed))
    raw: Dict[str, np.ndarray] = {
        "probe_kinds": np.array([k for k, _, _ in probes]), "probe_offsets": np.array([o for _, o, _ in probes]),
        "probe_ids": np.array([ids for _, _, ids in probes], dtype=np.int64), "probe_context": np.array(p),
        "probe_query_positions": np.arange(p, p + fed), "probe_cal_queries": np.arange(p, p + nq),
        "probe_ho_queries": p + np.array(ho_index)}
    per: Dict[str, list] = {}
    items = None
    for i, (kind, _, ids_list) in enumerate(progress.bar(probes, desc="probes")):
        ids = torch.tensor([ids_list])
        cal, inputs = _scores(model, ids[:, :p + nq + 1], p, nq, t, cfg.hutchinson_samples, cfg.seed + 2 * i)
        ho, _ = _scores(model, ids, p, nh, t, cfg.hutchinson_samples, cfg.seed + 2 * i + 1, ho_index)
        if items is None:
            n_layers, hkv = cal["attention"].shape[:2]
            items = pr.sample_items(n_layers, hkv, p // t, cfg.kind_max_items or cfg.max_items, cfg.seed)
        # pr.capture keeps only the last nq queries, and the locality is that of the calibration queries
        loc = pr.locality(inputs, cfg.locality_window)
        sens = pr.measure_sensitivity_per_query(model, ids, p, items, cfg.tiers, t, progress)
        for m in SCORE_METHODS:
            per.setdefault(f"probe_cal_{m}", []).append(cal[m])
            per.setdefault(f"probe_ho_{m}", []).append(ho[m])
        for k, v in loc.items():
            per.setdefault(f"probe_loc_{k}", []).append(v)
        for k, v in sens.items():
            per.setdefault(f"probe_sens_{k}", []).append(v)
        progress.log(f"probe {i} ({kind}): {p} context + {nq} calibration + {gap} gap + {nh} held-out queries, "
            f"{len(items)} blocks x {len(cfg.tiers)} tiers ({time.perf_counter() - start:.1f} s so far)")
    raw["probe_items"] = items
    raw.update({k: np.stack(v) for k, v in per.items()})
    return raw
