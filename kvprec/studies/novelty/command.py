"""``kvprec study novelty``: its arguments and settings (the run itself: kvprec/studies/platform/command.py)."""
from __future__ import annotations

import argparse

from ..platform.inputs import PROMPT_SUITE
from .study import DEFAULT_LAYERS, DEFAULT_MODEL, METRICS, STUDY, NoveltyConfig, collect_run, validate

NAME = "novelty"
HELP = "is K/V novelty sparse, bursty and structured in time, and does it mark what matters?"
DESCRIPTION = ("Generates through an FP32 AdaptiveCache with the capture layer, measures the geometric novelty of the "
               "true K/V (cosine, L2, subspace residual, Mahalanobis) and the predictive signals (log-prob, entropy) "
               "per decode step, tests sparsity, burstiness against a Poisson process, temporal structure, trivial "
               "tokens and the entropy link, compares prompt types, and ablates the most / least / random novel "
               "blocks (kvprec/studies/novelty/study.py).")
__all__ = ["NAME", "HELP", "DESCRIPTION", "STUDY", "add_arguments", "config_from_args", "collect"]


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_arguments(q: argparse.ArgumentParser) -> None:
    import torch

    d = NoveltyConfig()
    q.add_argument("--model", action="append", default=None,
                   help=f"a name kvprec.models.loading.load accepts ('tiny', 'smollm2-135m') or a local Hugging Face "
                        f"model directory; repeatable: the report compares models (default: {DEFAULT_MODEL})")
    src = q.add_mutually_exclusive_group()
    src.add_argument("--prompt-type", action="append", default=None, choices=list(PROMPT_SUITE),
                     help="a built-in prompt type (repeatable; default: prose)")
    src.add_argument("--suite", action="store_true", help=f"every built-in prompt type: {', '.join(PROMPT_SUITE)}")
    src.add_argument("--text", default=None, metavar="FILE", help="the file's text as one prompt (type 'file')")
    src.add_argument("--dataset", default=None, metavar="FILE",
                     help='JSON Lines: one {"prompt": "...", "type": "..."} per line')
    q.add_argument("--dataset-limit", type=int, default=None, metavar="N", help="use the first N prompts of --dataset")
    default = " (default: %(default)s)"
    q.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, metavar="N",
                   help="cut a prompt's text to its first N tokens" + default)
    q.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N",
                   help="tokens to generate per prompt" + default)
    q.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                   help="sampling temperature (0: greedy); no top-k / top-p" + default)
    q.add_argument("--seed", type=int, default=d.seed, help="generation seed of the first run (run r: seed + r); also "
                   "seeds the random ablations and the Monte Carlo null" + default)
    q.add_argument("--block-size", type=int, default=d.block_size, help="cache block size (a power of two)" + default)
    q.add_argument("--window", type=int, default=d.window, help="novelty window: positions compared against" + default)
    q.add_argument("--rank", type=int, default=d.rank, help="top-r subspace of the residual metric" + default)
    q.add_argument("--metric", default=d.metric, choices=list(METRICS),
                   help="the primary metric of the verdicts and of the ablation's ranking" + default)
    q.add_argument("--layer", type=int, action="append", default=None,
                   help="capture these layers (repeatable; default: all of a model with at most "
                        f"{DEFAULT_LAYERS} layers, else {DEFAULT_LAYERS} evenly spaced from the first to the last)")
    q.add_argument("--spike-window", type=int, default=d.spike_window,
                   help="trailing steps of the robust z-score" + default)
    q.add_argument("--spike-threshold", type=float, default=d.spike_threshold,
                   help="robust z above which a step is a spike" + default)
    q.add_argument("--bin-size", type=int, default=d.bin_size, help="steps per bin of the dispersion test" + default)
    q.add_argument("--max-lag", type=int, default=d.max_lag, help="autocorrelation lags (Ljung-Box)" + default)
    q.add_argument("--null-reps", type=int, default=d.null_reps,
                   help="Monte Carlo draws of the burstiness null" + default)
    q.add_argument("--no-ablation", action="store_true", help="skip the causal ablation")
    q.add_argument("--ablation-fraction", type=_fraction, action="append", default=None, metavar="F",
                   help="fraction of candidate blocks ablated (repeatable; default 0.1 and 0.25)")
    q.add_argument("--ablation-random", type=int, default=d.ablation_random, metavar="N",
                   help="random selections per fraction" + default)
    q.add_argument("--ablation-tier", default=d.ablation_tier, help="the low tier of the tier ablation" + default)
    q.add_argument("--save-kv", action="store_true", help="also store the captured K/V (float16) in raw.npz")
    q.add_argument("--dtype", default=d.dtype, choices=["float32", "float16", "bfloat16"])
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def config_from_args(args) -> NoveltyConfig:
    d = NoveltyConfig()
    cfg = NoveltyConfig(models=args.model or [DEFAULT_MODEL], prompt_types=args.prompt_type or [], suite=args.suite,
                        text=args.text, dataset=args.dataset, dataset_limit=args.dataset_limit,
                        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                        temperature=args.temperature, seed=args.seed, block_size=args.block_size, window=args.window,
                        rank=args.rank, metric=args.metric, layers=args.layer, spike_window=args.spike_window,
                        spike_threshold=args.spike_threshold, bin_size=args.bin_size, max_lag=args.max_lag,
                        null_reps=args.null_reps, ablation=not args.no_ablation,
                        ablation_fractions=args.ablation_fraction or d.ablation_fractions,
                        ablation_random=args.ablation_random, ablation_tier=args.ablation_tier, save_kv=args.save_kv,
                        dtype=args.dtype, device=args.device)
    validate(cfg)
    return cfg


def collect(cfg: NoveltyConfig, progress):
    return collect_run(cfg, progress)
