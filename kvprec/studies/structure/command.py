"""``kvprec study structure``: its arguments and settings (the run itself: kvprec/studies/platform/command.py).

    kvprec study structure [--model NAME|DIR] [--focus layers|heads|tokens|channels|stages|similarity|tucker|prune|all]
                           [--text FILE [--sample-index N] | --list-samples] [--prune-layers 0,1,2]
                           [--prune-heads L:H,...] [--out DIR] [--force]
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import fields

from .study import FOCUS, STUDY, StructureConfig, check_config, collect_run, parse_heads, parse_layers

NAME = "structure"
HELP = "KV structure (layers, heads, tokens, channels, stages, similarity, Tucker) and what each compression costs"
DESCRIPTION = ("Sparsity, rank, outliers and similarity of the cache by layer, head, token and channel, through the "
               "generation stages; Tucker (HOSVD), low-rank and channel-drop compressions and pruning, each scored by "
               "the teacher-forced NLL of a continuation and compared at equal bytes with kvprec's quantized tiers "
               "(kvprec/studies/structure/study.py).")
__all__ = ["NAME", "HELP", "DESCRIPTION", "STUDY", "add_arguments", "config_from_args", "collect"]


def _ratios(text: str):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 2,4,8") from None


def add_arguments(q: argparse.ArgumentParser) -> None:
    d = StructureConfig()
    q.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (default), 'tiny', or a local Hugging Face model directory")
    q.add_argument("--focus", action="append", default=None, metavar="PART",
                   help=f"{'|'.join(FOCUS)}|all (repeatable or comma-separated; default all)")
    q.add_argument("--text", default=None, metavar="FILE",
                   help="a WikiText-style file: each ' = Title = ' article is a sample (default: built-in samples)")
    q.add_argument("--sample-index", type=int, default=d.sample_index, metavar="N", help="the sample to use")
    q.add_argument("--list-samples", action="store_true", help="list the samples of --text (or the built-in ones) "
                   "and exit")
    q.add_argument("--context", type=int, default=d.context, help="context tokens in the cache (whole blocks)")
    q.add_argument("--continuation", type=int, default=d.continuation,
                   help="tokens teacher-forced after the context; each compression is scored on them")
    q.add_argument("--generate", type=int, default=d.generate, help="greedy decode steps of the stages part")
    q.add_argument("--block-size", type=int, default=d.block_size, help="block of kvprec's tiers (a power of two)")
    q.add_argument("--ratios", type=_ratios, default=d.ratios, metavar="R,R,...",
                   help="compression ratios of the equal-bytes table (default 2,4,8)")
    q.add_argument("--curve-ratios", type=_ratios, default=d.curve_ratios, metavar="R,R,...",
                   help="further ratios of the tradeoff curve (default 1.5,3,6,12,16)")
    q.add_argument("--sweep-ratio", type=float, default=d.sweep_ratio,
                   help="Tucker ratio of the per-layer sensitivity sweep (default 4)")
    q.add_argument("--prune-layers", type=parse_layers_arg, default=None, metavar="L,L,...",
                   help="also measure pruning the cache of these layers together, e.g. 0,1,2")
    q.add_argument("--prune-heads", type=parse_heads_arg, default=None, metavar="L:H,...",
                   help="also measure pruning these (layer, KV head) caches together, e.g. 3:1,4:0")
    q.add_argument("--prune-fraction", type=float, default=d.prune_fraction,
                   help="share of KV heads in the chosen / random head sets (default 0.1)")
    q.add_argument("--sweep-heads", action=argparse.BooleanOptionalAction, default=d.sweep_heads,
                   help="prune every (layer, KV head) alone: one scored pass each, and the set of those with the "
                        "smallest measured change (default off)")
    q.add_argument("--window", type=int, default=d.window,
                   help="last prompt queries used for ThinK's key scores and head output norms")
    q.add_argument("--cluster-threshold", type=float, action="append", default=None, metavar="COS",
                   help="cosine of the redundancy clustering (repeatable; default 0.9 and 0.95)")
    q.add_argument("--rotation-seed", type=int, default=d.rotation_seed)
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--dtype", default=d.dtype, choices=["float32", "float16", "bfloat16"])
    q.add_argument("--device", default=d.device, help="cpu or cuda")


def parse_layers_arg(text: str):
    try:
        return parse_layers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


def parse_heads_arg(text: str):
    try:
        return parse_heads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


def config_from_args(args) -> StructureConfig:
    from ..platform.inputs import check_device
    from . import inputs

    if args.list_samples:  # a listing, not a run: print it and stop, as --help does
        print(inputs.listing(inputs.samples(args.text)))
        raise SystemExit(0)
    cfg = StructureConfig(model=args.model, focus=args.focus or ["all"], text=args.text,
                          sample_index=args.sample_index, context=args.context, continuation=args.continuation,
                          generate=args.generate, block_size=args.block_size, ratios=args.ratios,
                          curve_ratios=args.curve_ratios, sweep_ratio=args.sweep_ratio,
                          prune_layers=args.prune_layers or [], prune_heads=args.prune_heads or [],
                          prune_fraction=args.prune_fraction, sweep_heads=args.sweep_heads, window=args.window,
                          cluster_thresholds=args.cluster_threshold or [0.9, 0.95], rotation_seed=args.rotation_seed,
                          seed=args.seed, dtype=args.dtype, device=args.device)
    check_config(cfg)
    cfg.command = command_line(cfg)
    check_device(cfg.device)
    inputs.pick(inputs.samples(cfg.text), cfg.sample_index)  # a bad file or index fails before the model loads
    return cfg


def command_line(cfg: StructureConfig) -> str:
    """The command that asks for ``cfg``: `kvprec study structure` with every setting that differs from its default
    and --model always (run-directory options such as --out and --threads are not settings and are left out)."""
    default = StructureConfig()
    words = ["kvprec", "study", NAME, "--model", cfg.model]
    for f in fields(StructureConfig):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if f.name in ("command", "model") or value == base or (f.name == "focus" and value == list(FOCUS)):
            continue
        flag = "--" + {"cluster_thresholds": "cluster-threshold"}.get(f.name, f.name.replace("_", "-"))
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif f.name == "focus":
            words += [flag, ",".join(value)]
        elif f.name == "cluster_thresholds":
            for v in value:
                words += [flag, f"{v:g}"]
        elif f.name == "prune_heads":
            words += [flag, ",".join(f"{a}:{b}" for a, b in value)]
        elif isinstance(value, list):
            words += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def collect(cfg: StructureConfig, progress):
    return collect_run(cfg, progress)
