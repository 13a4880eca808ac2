"""The arguments every ``kvprec study <name>`` takes, and the one way a study runs from the command line.

A study's command module (kvprec/studies/<name>/command.py) provides::

    NAME, HELP, DESCRIPTION       the subcommand, its one-line help and its description
    add_arguments(parser)         the study's own arguments
    config_from_args(args)        its settings from the arguments, checked (StudyInputError naming the argument)
    collect(settings, progress)   runs the measurements: (raw arrays, config.json's content)
    STUDY                         the rundir.Study that turns raw arrays into analysis, report and plots

and :func:`run_study` does the rest in this order: threads; ``--reanalyze``; the settings and ``--out`` checked
(before a model is loaded or anything is created); collect; the run directory written atomically.
"""
from __future__ import annotations

import argparse
import time

from .progress import Progress
from .rundir import StudyInputError, check_out, reanalyze, write_run


def add_common_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group("run directory (every study)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help=f"run directory (default: runs/{name}-<date>-<time>); refused if a run is there, unless "
                        "--force")
    g.add_argument("--force", action="store_true",
                   help="replace the run at --out (only once the new run is complete; never a directory that is "
                        "not a run)")
    g.add_argument("--reanalyze", default=None, metavar="DIR",
                   help="recompute analysis.json, report.md and plots/ of the run in DIR from its raw.npz and "
                        "config.json; nothing else runs")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines on stderr")


def default_out(name: str) -> str:
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_study(module, args) -> int:
    """Run the study of ``module`` (module docstring) from parsed ``args``; returns the exit status."""
    import torch

    progress = Progress(quiet=getattr(args, "quiet", False))
    if args.threads is not None:
        if args.threads < 1:
            raise StudyInputError(f"--threads {args.threads}: use a whole number >= 1")
        torch.set_num_threads(args.threads)
    if args.reanalyze:
        reanalyze(module.STUDY, args.reanalyze)
        print(f"reanalyzed {args.reanalyze}: analysis.json, report.md, plots/")
        return 0
    settings = module.config_from_args(args)
    out = check_out(args.out or default_out(module.NAME), force=args.force)
    raw, config = module.collect(settings, progress)
    progress.log("analysis, report and plots")
    write_run(module.STUDY, out, config, raw, force=args.force)
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))}) in {progress.elapsed():.1f} s")
    return 0
