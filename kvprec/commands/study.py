"""``kvprec study <name>``: analysis studies, each writing one run directory (config.json, raw.npz, analysis.json,
report.md, plots/; kvprec/studies/platform/rundir.py). Every number in a report is recomputed from the raw data
by ``--reanalyze DIR``.

    kvprec study precision [--model NAME|DIR] [--text FILE] [--budget BITS ...] [--eps EPS] [--out DIR] [--force]
    kvprec study structure [--model NAME|DIR] [--focus PART] [--text FILE --sample-index N] [--out DIR] [--force]
    kvprec study novelty [--model NAME|DIR ...] [--prompt-type TYPE | --suite | --text FILE | --dataset FILE]
                         [--max-tokens N] [--temperature T] [--out DIR] [--force]
    kvprec study recall [--model NAME|DIR] [--dataset FILE|builtin] [--budgets 0.1,0.2,0.3] [--out DIR] [--force]
    kvprec study injection [--model NAME|DIR] [--dataset FILE|builtin-math|builtin-qa] [--injection-points 5,10,15]
                           [--tiers fp32,int8,int4,int2] [--problems N] [--out DIR] [--force]
    kvprec study <name> --reanalyze DIR

A study is one module kvprec/studies/<name>/command.py (its arguments, settings and collection); adding one is
adding it to STUDIES.
"""
from __future__ import annotations

import argparse

from kvprec.commands.arguments import UsageError
from kvprec.studies.injection import command as injection
from kvprec.studies.novelty import command as novelty
from kvprec.studies.platform.command import add_common_arguments, run_study
from kvprec.studies.platform.rundir import StudyInputError
from kvprec.studies.precision import command as precision
from kvprec.studies.recall import command as recall
from kvprec.studies.structure import command as structure

STUDIES = {module.NAME: module for module in (precision, structure, novelty, recall, injection)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study", required=True, metavar="{" + ",".join(STUDIES) + "}")
    for name, module in STUDIES.items():
        q = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=p.formatter_class)
        module.add_arguments(q)
        add_common_arguments(q, name)


def run(args) -> int:
    try:
        return run_study(STUDIES[args.study], args)
    except StudyInputError as exc:  # bad input, found before the study ran: one line, no traceback
        raise UsageError(str(exc)) from None
