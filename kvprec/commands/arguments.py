"""Checks of command-line arguments shared by the subcommands: argparse types, the device, output paths, policy
strings and their help text.

Every check raises :class:`UsageError` (or argparse's ArgumentTypeError inside a ``type=``) with a message that
names the argument and what it accepts; kvprec/cli.py prints it as one line and exits with status 2. Commands run
these checks before they load a model, so a bad argument costs no time.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch


class UsageError(ValueError):
    """Bad command-line input, found by a command's checks. The message names the argument (``--prefill``) and
    what it accepts. kvprec/cli.py reports it in one line without a traceback; any other exception is a bug and
    keeps its traceback."""


# ---------------------------------------------------------------------------------------------- argparse types
def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; use a whole number >= 1")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; use a whole number >= 0")
    return value


def power_of_two(text: str) -> int:
    """argparse type: a power of two >= 1 (block sizes)."""
    value = _int(text)
    if value < 1 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not accepted; use a power of two (1, 2, 4, ..., e.g. 64)")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not accepted; use a finite number > 0")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


# ------------------------------------------------------------------------------------------------ the device
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str) -> torch.device:
    """``--device``: "cpu", "cuda" or "cuda:N", where this torch build and machine have it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not accepted; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no usable GPU here"
            raise UsageError(f"--device {name}: CUDA is not available (torch {torch.__version__}, {build}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


# ------------------------------------------------------------------------------------------------------ files
def check_input_file(path: Optional[str], flag: str) -> None:
    """An argument naming a file to read: it must exist and be a file."""
    if path is not None and not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise UsageError(f"{flag} {path}: {what}; give a text file")


def check_output_file(path: Optional[str], flag: str) -> None:
    """An argument naming a file to write: not a directory, in a directory that exists."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if not p.resolve().parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {p.resolve().parent} does not exist")


def write_json(path: str, data) -> None:
    """Write ``data`` as JSON to ``path`` whole or not at all: into a temporary file beside it (created with the
    usual permissions), then renamed over ``path``."""
    text = json.dumps(data, indent=1)
    target = Path(path).resolve()
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "x") as f:
            f.write(text)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------- policies
def policy_help(multiple: bool) -> str:
    """Help of ``--policy``: the policy-string grammar, every registered policy with its keys and defaults (read
    from the policy classes, so the text follows them)."""
    from kvprec.hf.policy import registry
    from kvprec.storage.formats import Tier

    lines = ["a policy string NAME[:ARGS]" + (" (repeatable)" if multiple else "") + "; ARGS are comma-separated, "
             "positional in the order shown or key=value:"]
    for name in registry.names():
        params = inspect.signature(registry._FACTORIES[name]).parameters.values()
        args = ",".join(f"{p.name}={p.default}" for p in params if p.default is not inspect.Parameter.empty)
        lines.append(f"  {name}:{args}")
    lines += [
        f"tiers: {', '.join(str(t) for t in Tier)}",
        "uniform: every sealed block at tier",
        "sink_window: the blocks holding one of the first sinks positions or one of the last window positions at "
        "recent, the others at rest",
        "attention_mass: the keep fraction of blocks with the most attention at high, the others at low, ranked "
        "again every 'every' tokens (0: the block size)",
        "budget: --bits-per-element B wraps the policy and demotes blocks until the sealed pages use at most B bits "
        "per element",
        "examples: uniform:int4   sink_window:window=256,rest=int2   attention_mass:keep=0.25",
    ]
    return "\n".join(lines)


def make_policy(spec: str, bits_per_element: Optional[float] = None):
    """The policy of ``--policy spec``, wrapped in a budget when ``--bits-per-element`` is given; a bad string or
    a budget below the floor tier is a UsageError naming the argument."""
    import kvprec

    try:
        policy = kvprec.policy.get(spec)
    except ValueError as exc:
        raise UsageError(f"--policy {spec}: {exc}") from exc
    if bits_per_element is None:
        return policy
    try:
        return kvprec.policy.budget(policy, bits_per_element=bits_per_element)
    except ValueError as exc:
        raise UsageError(f"--bits-per-element {bits_per_element:g}: {exc}") from exc
