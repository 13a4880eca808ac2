"""``kvprec study recall``: its arguments and settings (the run itself: kvprec/studies/platform/command.py).

    kvprec study recall [--model NAME|DIR] [--dataset FILE|builtin] [--budgets 0.1,0.2,0.3] [--max-samples N]
                        [--max-new-tokens N] [--etr-threshold NATS] [--out DIR] [--force]
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

from ...models.chat import CHAT_MODES
from ..platform.rundir import Study, run_config
from .analysis import analyze
from .oracle import SIMULATED
from .plots import make_plots
from .report import render_report, step_logs
from .study import RecallSettings, collect as collect_raw

NAME = "recall"
HELP = "token entropy vs the recall of KV eviction policies, and entropy-triggered recall"
DESCRIPTION = ("An oracle run with the full cache simulates H2O, StreamingLLM, TOVA, SnapKV and kvprec's tiering; per "
               "decode step the token entropy and each policy's recall of the positions the step attends to, their "
               "correlation with bootstrap intervals per budget, the entropy gap (the step re-run with the missed "
               "positions restored), and caches that really evict with and without entropy-triggered recall from a "
               "host shadow, at equal device memory (kvprec/studies/recall/study.py).")
STUDY = Study(NAME, analyze, render_report, make_plots, derived_files=step_logs)
__all__ = ["NAME", "HELP", "DESCRIPTION", "STUDY", "add_arguments", "config_from_args", "collect"]


def _floats(text: str):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.1,0.2,0.3") \
            from None


def _names(text: str):
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(q: argparse.ArgumentParser) -> None:
    d = RecallSettings()
    q.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (default), 'tiny', or a local Hugging Face model directory (Llama, Qwen, "
                        "Gemma families without sliding windows)")
    q.add_argument("--dataset", default=d.dataset, metavar="FILE|builtin",
                   help="'builtin' (an invented multi-hop sample, offline) or a .jsonl / .json file of LongBench, "
                        "HotpotQA or MuSiQue records")
    q.add_argument("--max-samples", type=int, default=None, metavar="N", help="the first N samples (default all)")
    q.add_argument("--budgets", type=_floats, default=d.budgets, metavar="B,B,...",
                   help="budgets as fractions of the sequence (default 0.1,0.2,0.3)")
    q.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="greedy decode steps per sample")
    q.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="longer prompts lose the middle of their passages (default 2048)")
    q.add_argument("--chat", default=d.chat, choices=CHAT_MODES,
                   help="chat template for instruct models (auto: when the tokenizer has one)")
    q.add_argument("--prompt-style", default=d.prompt_style, choices=["reason", "answer"],
                   help="reason: ask for step-by-step reasoning (longer answers); answer: LongBench's wording")
    q.add_argument("--entropy-bins", type=_floats, default=d.entropy_bins, metavar="E,E,...",
                   help="bin edges in nats (default 1.0,2.5: low < 1.0, medium, high > 2.5)")
    q.add_argument("--block-size", type=int, default=d.block_size, help="block of kvprec's tiers (a power of two)")
    q.add_argument("--kvprec-policy", default=d.kvprec_policy,
                   help="kvprec's tiering, {budget} replaced by each budget fraction; kept = INT8 and above")
    q.add_argument("--h2o-recent", type=float, default=d.h2o_recent, help="H2O's recent window, share of the budget")
    q.add_argument("--sinks", type=int, default=d.sinks, help="StreamingLLM's attention sinks")
    q.add_argument("--snapkv-window", type=int, default=d.snapkv_window, help="SnapKV's observation window")
    q.add_argument("--snapkv-kernel", type=int, default=d.snapkv_kernel, help="SnapKV's pooling width (odd)")
    q.add_argument("--gap-every", type=int, default=d.gap_every,
                   help="re-run every N-th decode step for the entropy gap (0: never)")
    q.add_argument("--etr-threshold", type=float, default=d.etr_threshold,
                   help="entropy-triggered recall fires when the previous entropy exceeds this (nats)")
    q.add_argument("--etr-fraction", type=float, default=d.etr_fraction,
                   help="share of the budget that recall slots take once recall fired")
    q.add_argument("--etr-bases", type=_names, default=d.etr_bases, metavar="B,B,...",
                   help="base policies of the recall rows, per budget: best-nll (lowest NLL of the entropy gap's "
                        "restricted re-runs), best-recall (highest oracle recall), or of "
                        f"{', '.join(SIMULATED)} (default best-nll,best-recall)")
    q.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples")
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--dtype", default=d.dtype, choices=["float32", "float16", "bfloat16"])
    q.add_argument("--device", default=d.device, help="cpu or cuda")


def config_from_args(args) -> RecallSettings:
    from ..platform.inputs import check_device
    from .data import load_dataset

    settings = RecallSettings(model=args.model, dataset=args.dataset, max_samples=args.max_samples,
                              budgets=args.budgets, max_new_tokens=args.max_new_tokens,
                              max_prompt_tokens=args.max_prompt_tokens, chat=args.chat, prompt_style=args.prompt_style,
                              entropy_bins=args.entropy_bins, block_size=args.block_size,
                              kvprec_policy=args.kvprec_policy, h2o_recent=args.h2o_recent, sinks=args.sinks,
                              snapkv_window=args.snapkv_window, snapkv_kernel=args.snapkv_kernel,
                              gap_every=args.gap_every, etr_threshold=args.etr_threshold,
                              etr_fraction=args.etr_fraction, etr_bases=args.etr_bases, bootstrap=args.bootstrap,
                              seed=args.seed, dtype=args.dtype, device=args.device)
    settings.check()
    check_device(settings.device)
    load_dataset(settings.dataset, settings.max_samples)  # a bad file fails here, before a model is loaded
    return settings


def collect(settings: RecallSettings, progress):
    """(raw arrays, config.json's content) of one run."""
    import torch

    from ..platform.inputs import load_model, tokenizer_of

    loaded = load_model(settings.model, settings.dtype, settings.device)
    torch.manual_seed(settings.seed)
    raw = collect_raw(settings, loaded, tokenizer_of(loaded), progress)
    config = run_config(NAME, asdict(settings),
                        model={"name": loaded.name, "argument": settings.model, "dtype": settings.dtype,
                               "device": settings.device},
                        data={"dataset": settings.dataset, "samples": int(raw["sample_steps"].size),
                              "decode_steps": int(raw["entropy"].size)},
                        seeds={"seed": settings.seed})
    config["threads"] = torch.get_num_threads()
    return raw, config
