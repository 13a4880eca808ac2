"""``kvprec study precision``: its arguments and settings (the run itself: kvprec/studies/platform/command.py)."""
from __future__ import annotations

import argparse

from .study import STUDY, StudyConfig, collect_run, validate

NAME = "precision"
HELP = "curvature by four methods, precision map, measured quality-memory curve"
DESCRIPTION = ("Measured curvature (closed form, autograd, Hutchinson Hessian, hybrid), locality, the precision map, "
               "per-block measured sensitivity and its rank correlation with each method, policies at equal memory, "
               "memory and compression tables (kvprec/studies/precision/study.py).")
__all__ = ["NAME", "HELP", "DESCRIPTION", "STUDY", "add_arguments", "config_from_args", "collect"]


def add_arguments(q: argparse.ArgumentParser) -> None:
    import torch

    q.add_argument("--model", default="tiny",
                   help="'tiny' (built-in), a name kvprec.models.loading.load accepts, or a local Hugging Face model "
                        "directory")
    q.add_argument("--text", default=None, help="calibration text file (default: built-in prompts)")
    q.add_argument("--eval-text", default=None,
                   help="text for the quality harness (default: held-out stdlib files for tiny, else --text)")
    q.add_argument("--budget", type=float, action="append", default=None,
                   help="bits/element budget of the policy comparison (repeatable; default: INT4's page bits and "
                        "the midpoints to INT2 and INT8)")
    q.add_argument("--map-budget", type=float, default=None, help="bits/element of the reported precision map "
                   "(default: INT4's page bits)")
    q.add_argument("--eps", type=float, default=None, help="threshold-mode precision map at this eps instead")
    q.add_argument("--context", type=int, default=256, help="calibration context tokens in the cache")
    q.add_argument("--queries", type=int, default=16, help="query tokens fed on top of the context")
    q.add_argument("--block-size", type=int, default=16, help="positions per block (a power of two)")
    q.add_argument("--group-size", type=int, default=None,
                   help="value quantization group (default: the largest divisor of head_dim <= 64)")
    q.add_argument("--max-items", type=int, default=128, help="sampled (layer, head, block) items for sensitivity")
    q.add_argument("--hutchinson", type=int, default=32, help="Hutchinson samples")
    q.add_argument("--prefill", type=int, default=256, help="quality harness prefill")
    q.add_argument("--steps", type=int, default=128, help="quality harness teacher-forced steps")
    q.add_argument("--memory-context", type=int, action="append", default=None,
                   help="context lengths of the memory table (repeatable; default 512, 2048, 8192)")
    q.add_argument("--no-per-kind", action="store_true",
                   help="skip the per-prompt-kind probes and the held-out validation (report sections 6 and 7)")
    q.add_argument("--kind-context", type=int, default=None,
                   help="context tokens of every per-kind probe (default: --context, capped by the shortest prompt)")
    q.add_argument("--heldout-queries", type=int, default=None,
                   help="held-out queries per probe, after the calibration queries (default: --queries)")
    q.add_argument("--heldout-gap", type=int, default=None,
                   help="tokens between calibration and held-out queries (default: --block-size)")
    q.add_argument("--kind-items", type=int, default=None,
                   help="sampled (layer, head, block) items per probe (default: --max-items)")
    q.add_argument("--file-probes", type=int, default=3,
                   help="with --text: disjoint windows of the file used as probes (kind 'file')")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def config_from_args(args) -> StudyConfig:
    cfg = StudyConfig(model=args.model, text=args.text, eval_text=args.eval_text, context=args.context,
                      queries=args.queries, block_size=args.block_size, group_size=args.group_size,
                      max_items=args.max_items, hutchinson_samples=args.hutchinson, seed=args.seed,
                      budgets=args.budget, map_budget=args.map_budget, eps=args.eps, prefill=args.prefill,
                      steps=args.steps, memory_contexts=args.memory_context or [512, 2048, 8192],
                      dtype=args.dtype, device=args.device, per_kind=not args.no_per_kind,
                      kind_context=args.kind_context, heldout_queries=args.heldout_queries,
                      heldout_gap=args.heldout_gap, kind_max_items=args.kind_items, file_probes=args.file_probes)
    validate(cfg)
    return cfg


def collect(cfg: StudyConfig, progress):
    return collect_run(cfg, progress)
