"""The ``kvprec`` command.

    kvprec info                 what is built and which backend each op runs on this machine
    kvprec demo [options]       the adaptive cache on the built-in tiny model (kvprec/commands/demo.py)
    kvprec generate [options]   generate with an AdaptiveCache: text, tokens/s, memory report, precision map
    kvprec eval [options]       teacher-forced quality through the cache against an unquantized cache
    kvprec study precision      curvature, precision map and measured quality-memory curve (a run directory)
"""
from __future__ import annotations

import argparse
import sys

import torch


def _cmd_info(args) -> int:
    import kvprec
    from kvprec import ops

    print(f"kvprec {kvprec.__version__}  torch {torch.__version__}")
    print(f"native library: {'loaded' if kvprec.native_available() else 'NOT loaded: ' + str(kvprec._native.NATIVE_ERROR)}")
    print(f"CUDA kernels:   {'yes' if kvprec.cuda_kernels_available() else 'no'}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name in sorted(ops.REGISTRY):
        chosen = ", ".join(f"{d.type}: {ops.resolve_backend(name, 'auto', d)}" for d in devices)
        print(f"  {name:24s} auto -> {chosen}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvprec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and which backends run here").set_defaults(fn=_cmd_info)
    from kvprec.commands import demo, eval as eval_cmd, generate, study

    for name, module, help_text in (("demo", demo, "the adaptive cache on the built-in tiny model"),
                                    ("generate", generate, "generate with an AdaptiveCache"),
                                    ("eval", eval_cmd, "teacher-forced quality through the cache"),
                                    ("study", study, "analysis studies writing a run directory")):
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(fn=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: the message names the argument, no traceback
        parser.exit(2, f"kvprec {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
