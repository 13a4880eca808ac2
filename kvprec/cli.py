"""The kvprec command.

    kvprec info                 what is built, what attends in an AdaptiveCache and which backend each op runs
    kvprec demo [options]       a demonstration of the adaptive cache (kvprec/commands/demo.py)
    kvprec generate [options]   generate with an AdaptiveCache: text, tokens/s, memory report, precision map
    kvprec eval [options]       teacher-forced quality through the cache against an unquantized cache
    kvprec study precision      curvature, precision map and measured quality-memory curve (a run directory)

Bad input ends with one line on stderr naming the argument and what it accepts, and exit status 2.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
import warnings

import torch

from kvprec.commands.arguments import UsageError

#: Exceptions that mean bad input rather than a bug in kvprec, reported in one line without a traceback:
#: UsageError, raised by the commands' checks of their arguments (kvprec/commands/arguments.py), and
#: FileNotFoundError, a path an argument names that does not exist (kvprec/models/ raises it, with what to install
#: or pass, for a model it cannot find). Anything else keeps its traceback: a ValueError from deep inside a run is
#: a bug to see, not input to blame.
BAD_INPUT = (UsageError, FileNotFoundError)
#: For the commands whose checks still raise ValueError (or let the lower layers' ValueError through) instead of
#: UsageError: every ValueError counts as bad input there, bugs included.
BAD_INPUT_ANY_VALUE_ERROR = BAD_INPUT + (ValueError,)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the program, the argument and what it accepts, and where the options are
    listed (the usage of a subcommand spans many lines and buries the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def plain(text: str) -> str:
    """Text without the reStructuredText markup of docstrings (``code``, :func:`name`), for a terminal."""
    return re.sub(r":\w+:`~?([^`]*)`", r"\1", text).replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help as plain text: descriptions as written (module docstrings, without their markup), and each argument's
    help with its own line breaks kept (the policy grammar is a list) and each line wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain(text), width, indent)

    def _split_lines(self, text: str, width: int) -> list:
        return [wrapped for line in plain(text).splitlines()
                for wrapped in textwrap.wrap(line, width, subsequent_indent="  " if line.startswith("  ") else "")]


def cache_backends() -> list:
    """(where, backend) pairs: the attention an ``AdaptiveCache(backend="auto")`` runs, asked of the cache itself
    (AdaptiveCache.attention_backend) for queries on each device here. On CUDA it depends on the dtype and the
    head_dim, so each case is listed."""
    import kvprec
    from kvprec.models import tiny_llama_config
    from kvprec.ops import CUDA_DECODE_HEAD_DIMS, TRITON_DECODE_HEAD_DIMS

    cache = kvprec.AdaptiveCache(tiny_llama_config())
    cases = [("cpu", torch.float32, 128)]
    if torch.cuda.is_available():
        dims = sorted(set(CUDA_DECODE_HEAD_DIMS) | set(TRITON_DECODE_HEAD_DIMS))
        other = next(d for d in range(32, 1024, 16) if d not in dims)  # e.g. the tiny model's 32
        cases += [("cuda", dtype, d) for dtype in (torch.bfloat16, torch.float16, torch.float32)
                  for d in (dims[0], other)]
    rows = []
    with warnings.catch_warnings():  # the slow-path warning of CUDA tensors without kernels: the row says it
        warnings.simplefilter("ignore")
        for device, dtype, head_dim in cases:
            q = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device)
            where = "cpu" if device == "cpu" else f"cuda {str(dtype).removeprefix('torch.')} head_dim {head_dim}"
            rows.append((where, cache.attention_backend(q)))
    return rows


def cpu_isa() -> str:
    """The instruction-set path the C++ CPU kernels run (kvprec._native.cpu_isa: chosen when the library loaded,
    or forced by KVPREC_CPU_ISA), or why there is none: KVPREC_CPU_ISA names a path this CPU or build cannot run
    (then every CPU kernel call fails with that reason)."""
    from kvprec import _native

    try:
        return f"{_native.cpu_isa()} (of the C++ CPU kernels; the environment variable KVPREC_CPU_ISA forces one)"
    except RuntimeError as exc:
        return f"none, the CPU kernels refuse to run: {exc}"


BACKEND_MEANING = {"cpp": "the C++ kernel of the native library, block by block",
                   "cuda": "the CUDA flash-decoding kernel over the packed tiers",
                   "triton": "the Triton flash-decoding kernel",
                   "torch": "the pure-torch reference"}


def _cmd_info(args) -> int:
    import kvprec
    from kvprec import ops

    print(f"kvprec {kvprec.__version__}  torch {torch.__version__}")
    native = "loaded" if kvprec.native_available() else f"NOT loaded: {kvprec._native.NATIVE_ERROR}"
    print(f"native library: {native}")
    print(f"CUDA kernels:   {'yes' if kvprec.cuda_kernels_available() else 'no'}")
    if kvprec.native_available():
        print(f"CPU ISA path:   {cpu_isa()}")
        print('AdaptiveCache attention (backend="auto"), what decoding through the cache runs:')
        for where, backend in cache_backends():
            note = BACKEND_MEANING[backend]
            if where != "cpu" and backend == "cpp":
                note = "CPU kernels over device pages, copied back every step: slow"
            print(f"  {where:32s} {backend} ({note})")
    else:
        print("AdaptiveCache: unavailable (it needs the native library)")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print('kvprec.ops entry points, each called with backend="auto" (not the cache\'s choice above):')
    for name in sorted(ops.REGISTRY):
        chosen = ", ".join(f"{d.type}: {ops.resolve_backend(name, 'auto', d)}" for d in devices)
        print(f"  {name:24s} auto -> {chosen}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kvprec", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what is built and which backends run here",
                          description="What is built, the attention an AdaptiveCache runs on each device here, and "
                                      "the backend each kvprec.ops entry point picks.", formatter_class=HelpFormatter)
    info.set_defaults(fn=_cmd_info, bad_input=BAD_INPUT)
    from kvprec.commands import demo, eval as eval_cmd, generate, study

    for name, module, help_text, bad_input in (
            ("demo", demo, "a demonstration of the adaptive cache", BAD_INPUT_ANY_VALUE_ERROR),
            ("generate", generate, "generate with an AdaptiveCache", BAD_INPUT),
            ("eval", eval_cmd, "teacher-forced quality through the cache", BAD_INPUT),
            ("study", study, "analysis studies writing a run directory", BAD_INPUT_ANY_VALUE_ERROR)):
        p = sub.add_parser(name, help=help_text, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(fn=module.run, bad_input=bad_input)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command relaunches itself with (generate --tp)
    try:
        return args.fn(args)
    except args.bad_input as exc:  # the message names the argument; exit status 2 as for argparse's own errors
        message = f"kvprec {args.command}: error: {exc}"
        print(message, file=sys.stderr)
        stop = SystemExit(message)  # str() is the message (tests match it); the status is 2
        stop.code = 2
        raise stop from None


if __name__ == "__main__":
    sys.exit(main())
