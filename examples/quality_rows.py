"""Named cache rows on one model and one kind of text, as examples/quality_suite.py measures them: the tuning runs
that chose the suite's rows (README "Quality on a real model").

    python examples/quality_rows.py --model smollm2-135m --kinds code \\
        "uniform:int4|64|none" "uniform:int4|64|orthogonal" hf:hqq:4 --out runs/rows.json

A row is ``policy|block_size|rotation[|value_rotation]`` (a kvprec.policy spec, a power-of-two block size, none /
hadamard / orthogonal key rotation, and optionally the same for values, none if left out) or ``hf:<spec>`` for a
transformers QuantizedCache (kvprec.hf.eval.hf_cache), and is named by its text. The policy
``curvature:bits=B[,candidates=int2+int4]`` is kvprec.policy.Curvature calibrated once per row on the last
``--prefill`` + ``--tokens`` tokens of the ``--calibration-kind`` text (default code, the tuning kind; held out from
every window the suite reads) with a page budget of B bits per element over the calibrated blocks (a multiple-choice
knapsack over layers, KV heads and block positions), then applied unchanged to every kind. ``--policy-file
NAME=FILE`` registers FILE's only ``Policy`` subclass under NAME, e.g. an earlier version of a policy taken with
``git show <commit>:kvprec/hf/policy/attention_mass.py``, to measure a change on the same windows.
The windows are the suite's: ``--windows`` x (``--prefill`` + ``--tokens``) tokens of the kind's text.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import shlex
import sys
from pathlib import Path

import torch

import kvprec
from kvprec.hf.eval import compare, hf_cache
from kvprec.hf.policy import registry
from kvprec.models import load
from quality_suite import KINDS, kind_text, windows

ROTATIONS = {"none": None, "hadamard": "hadamard", "orthogonal": "orthogonal"}


def curvature_policy(spec: str, model, calibration: torch.Tensor, block_size: int):
    """'curvature:bits=B[,candidates=a+b]' -> kvprec.policy.Curvature calibrated on ``calibration`` [1, N]."""
    options = dict(item.partition("=")[::2] for item in spec.partition(":")[2].split(",") if item)
    if set(options) - {"bits", "candidates"} or "bits" not in options:
        raise ValueError(f"row policy {spec!r}: expected curvature:bits=B[,candidates=int2+int4]")
    try:
        bits = float(options["bits"])
    except ValueError:
        raise ValueError(f"row policy {spec!r}: bits={options['bits']!r} is not a number") from None
    candidates = options.get("candidates", "int2+int4").split("+")
    return kvprec.policy.Curvature.calibrate(model, calibration, bits_per_element=bits, candidates=candidates,
                                             block_size=block_size)


def parse_row(text: str, config, curvature=None):
    """'policy|T|rotation[|value_rotation]' or 'hf:spec' -> a cache factory (the row is named by its text).
    ``curvature(spec, block_size)`` builds the policy of a 'curvature:...' row (calibrated once, shared by the
    row's caches)."""
    if text.startswith("hf:"):
        return hf_cache(text[3:], config)
    parts = text.split("|")
    if len(parts) not in (3, 4) or any(r not in ROTATIONS for r in parts[2:]) or not parts[1].isdigit():
        raise ValueError(f"row {text!r}: expected policy|block_size|rotation[|value_rotation] (rotations one of "
                         f"{', '.join(ROTATIONS)}) or hf:<spec>")
    policy, block_size, rotation = parts[0], int(parts[1]), ROTATIONS[parts[2]]
    value_rotation = ROTATIONS[parts[3]] if len(parts) == 4 else None
    if policy.startswith("curvature:"):
        if curvature is None:
            raise ValueError(f"row {text!r}: a curvature row needs the model to calibrate on")
        policy = curvature(policy, block_size)

    def make():
        return kvprec.AdaptiveCache(config, policy=policy, block_size=block_size, key_rotation=rotation,
                                    value_rotation=value_rotation)

    make()  # a bad policy spec or block size fails here, before any pass runs
    return make


def register_file(text: str) -> None:
    """'NAME=FILE': register the Policy subclass defined in FILE under NAME."""
    name, _, path = text.partition("=")
    if not name or not Path(path).is_file():
        raise ValueError(f"--policy-file {text!r}: expected NAME=FILE with an existing FILE")
    spec = importlib.util.spec_from_file_location(f"kvprec.hf.policy._file_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, kvprec.policy.Policy)
               and c.__module__ == module.__name__]
    if len(classes) != 1:
        raise ValueError(f"--policy-file {text!r}: {path} defines {len(classes)} Policy subclasses, expected one")
    registry.register(name, classes[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--kinds", required=True, help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("rows", nargs="+", help="policy|block_size|rotation or hf:spec")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--policy-file", action="append", default=[], help="NAME=FILE (repeatable)")
    p.add_argument("--calibration-kind", default="code", choices=KINDS,
                   help="curvature rows calibrate on the last --prefill + --tokens tokens of this kind's text")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefill-attention", choices=("auto", "block-kernel"), default="auto",
                   help="auto: CPU prefill chunks of >= kvprec.hf.prefill.MIN_QUERIES queries attend through the "
                        "SDPA split (kvprec/hf/prefill.py); block-kernel: every chunk through the block kernel, as "
                        "before the split existed (the same attention to ~1e-6, other rounding)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.prefill_attention == "block-kernel":
        from kvprec.hf import prefill

        prefill.MIN_QUERIES = 2 ** 62  # no chunk is that long: the split never applies
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        p.error(f"--kinds {args.kinds!r}: accepted a comma-separated list of {', '.join(KINDS)}")
    torch.set_num_threads(args.threads)
    loaded = load(args.model)
    try:
        for text in args.policy_file:
            register_file(text)
        def curvature(spec, block_size):
            ids = loaded.encode(kind_text(args.calibration_kind))
            length = args.prefill + args.tokens
            if len(ids) < (args.windows + 1) * length:
                raise ValueError(f"--calibration-kind {args.calibration_kind}: {len(ids)} tokens hold no "
                                 f"{length}-token calibration window after {args.windows} windows")
            return curvature_policy(spec, loaded.model, torch.tensor(ids[-length:])[None], block_size)

        rows = {text: parse_row(text, loaded.model.config, curvature) for text in args.rows}
    except ValueError as exc:
        p.error(str(exc))
    # quoted as a shell reads it, as quality_suite.py records it: row texts hold '|' and spaces
    result = {"command": shlex.join(["python"] + sys.argv), "args": vars(args), "kinds": {}}
    for kind in kinds:
        tokens = windows(loaded.encode, kind_text(kind), args.windows, args.prefill + args.tokens)
        comparison = compare(loaded.model, tokens, args.prefill, rows, progress=True)
        print(f"\n== {kind}\n{comparison.format()}")
        result["kinds"][kind] = comparison.rows()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
