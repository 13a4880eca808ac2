"""``kvprec study injection``: its arguments and settings (the run itself: kvprec/studies/platform/command.py)."""
from __future__ import annotations

import argparse

from ..platform.rundir import StudyInputError
from .study import STUDY, Settings, validate
from .study import collect as collect_run

NAME = "injection"
HELP = "adaptation after new context is spliced into the KV cache mid-generation"
DESCRIPTION = ("Write new context into a live KV cache after N generated tokens (replacing the problem text) and "
               "measure per step the KL to a model that had it from the start, the probability ratio, attention on "
               "the injected span and hidden-state cosine; detection latency, adaptation, remaining gap and answer "
               "accuracy with paired tests, at FP32 and with the span at lower tiers (kvprec/studies/injection/).")
__all__ = ["NAME", "HELP", "DESCRIPTION", "STUDY", "add_arguments", "config_from_args", "collect"]


def _ints(flag: str):
    def parse(text: str):
        try:
            return [int(x) for x in text.split(",") if x.strip() != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted; give whole numbers separated by commas "
                                             f"(e.g. 5,10,15)") from None
    parse.__name__ = flag
    return parse


def _names(text: str):
    return [x.strip().lower() for x in text.split(",") if x.strip()]


def add_arguments(q: argparse.ArgumentParser) -> None:
    d = Settings()
    q.add_argument("--model", default=d.model,
                   help="smollm2-135m (default), 'tiny' (built-in), or a local Hugging Face model directory")
    q.add_argument("--dataset", default=d.dataset,
                   help="builtin-math (MAWPS-style problems, default), builtin-qa (questions and alternative "
                        "questions), or a JSON file in the same format (kvprec/studies/injection/data.py)")
    q.add_argument("--problems", type=int, default=d.problems, help="the first N problems (default 100)")
    q.add_argument("--injection-points", type=_ints("--injection-points"), default=d.injection_points,
                   metavar="N,N,...", help="generated tokens before the splice (default 5,10,15)")
    q.add_argument("--tiers", type=_names, default=d.tiers, metavar="TIER,...",
                   help="tiers of the injected span's blocks (default fp32,int8,int4,int2)")
    q.add_argument("--noise", type=_names, default=d.noise, metavar="KIND,...",
                   help="noise controls: shuffled (the injected tokens permuted, default) and/or random")
    q.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens per reply (default 40)")
    q.add_argument("--block-size", type=int, default=d.block_size, help="positions per cache block (default 16)")
    q.add_argument("--key-rotation", default=d.key_rotation, help="none, hadamard (default) or orthogonal")
    q.add_argument("--seed", type=int, default=d.seed, help="problems, noise and bootstrap seed")
    q.add_argument("--smooth", type=int, default=d.smooth, help="trailing mean of the curves, in steps (default 3)")
    q.add_argument("--band-halfwidth", type=int, default=d.band_halfwidth,
                   help="steps either side in the noise band (default 1)")
    q.add_argument("--adapt-fraction", type=float, default=d.adapt_fraction,
                   help="share of the unadapted gap that marks adaptation (default 0.5)")
    q.add_argument("--final-window", type=int, default=d.final_window,
                   help="last steps of the remaining gap (default 5)")
    q.add_argument("--converged-kl", type=float, default=d.converged_kl,
                   help="remaining gap counted as converged, nats (default 0.1)")
    q.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples (default 2000)")
    q.add_argument("--batch-problems", type=int, default=d.batch_problems,
                   help="problems decoded in one batch when they share the prompt before the span (default 3; the "
                        "results do not depend on it beyond FP32 rounding)")
    q.add_argument("--device", default=d.device, help="cpu (default) or cuda")


def config_from_args(args) -> Settings:
    s = Settings(model=args.model, dataset=args.dataset, problems=args.problems,
                 injection_points=list(args.injection_points), tiers=list(args.tiers), noise=list(args.noise),
                 max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                 key_rotation=str(args.key_rotation).lower(), seed=args.seed, smooth=args.smooth,
                 band_halfwidth=args.band_halfwidth, adapt_fraction=args.adapt_fraction,
                 final_window=args.final_window, converged_kl=args.converged_kl, bootstrap=args.bootstrap,
                 batch_problems=args.batch_problems, device=args.device)
    validate(s)
    return s


def collect(s: Settings, progress):
    try:
        return collect_run(s, progress)
    except FileNotFoundError as exc:  # the model's files (kvprec/models/loading.py names --model)
        raise StudyInputError(str(exc)) from None
