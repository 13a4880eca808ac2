"""Per-layer sensitivity of a model's KV cache to a lower tier, measured on held-out text: the input of the
``layer_tiers`` policy (kvprec/hf/policy/layer_tiers.py).

    python examples/layer_sensitivity.py --model smollm2-135m --kind code \\
        --out examples/results/layer_sensitivity_smollm2_code.json

One teacher-forced pass (kvprec.hf.eval.compare) with every layer at ``--high`` (the baseline), then one per layer l
with layer l alone at ``--low``; sensitivity_l = mean NLL(l at low) - mean NLL(baseline), in nats per prediction.
The text is the last ``--windows`` x (``--prefill`` + ``--tokens``) tokens of the kind's text, which no window of
examples/quality_suite.py reads (those are its first tokens; the script refuses a text too short to keep them
apart for ``--suite-windows``). The JSON lists the layers from most to least sensitive and, for each count k of
layers kept at ``--high``, the ``layer_tiers`` policy string that keeps the k most sensitive.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kvprec
from kvprec.hf.eval import compare
from kvprec.models import load
from quality_suite import KINDS, kind_text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--kind", default="code", choices=KINDS)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--suite-windows", type=int, default=8,
                   help="windows of --suite-length tokens at the text's start that must stay unread")
    p.add_argument("--suite-length", type=int, default=2176)
    p.add_argument("--high", default="int4")
    p.add_argument("--low", default="int2")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--key-rotation", default="orthogonal", choices=["none", "hadamard", "orthogonal"])
    p.add_argument("--value-rotation", default="orthogonal", choices=["none", "hadamard", "orthogonal"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    for name in ("windows", "prefill", "tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    loaded = load(args.model)
    config = loaded.model.config
    ids = loaded.encode(kind_text(args.kind))
    length = args.prefill + args.tokens
    if len(ids) < args.windows * length + args.suite_windows * args.suite_length:
        p.error(f"--kind {args.kind}: {len(ids)} tokens cannot hold {args.windows} x {length} calibration tokens "
                f"after {args.suite_windows} x {args.suite_length} suite tokens")
    tokens = torch.tensor(ids[len(ids) - args.windows * length:]).view(args.windows, length)
    layers = config.get_text_config(decoder=True).num_hidden_layers
    rotations = {"key_rotation": None if args.key_rotation == "none" else args.key_rotation,
                 "value_rotation": None if args.value_rotation == "none" else args.value_rotation}

    def cache(low_layers):
        keep = "+".join(str(i) for i in range(layers) if i not in low_layers)
        try:
            return kvprec.AdaptiveCache(config, policy=f"layer_tiers:layers={keep},high={args.high},low={args.low}",
                                        block_size=args.block_size, **rotations)
        except ValueError as exc:
            p.error(str(exc))

    cache(())  # bad tiers or block size fail before any pass
    rows = {"baseline": lambda: cache(())}
    rows.update({f"layer {i}": (lambda i=i: cache((i,))) for i in range(layers)})
    comparison = compare(loaded.model, tokens, args.prefill, rows, progress=True)
    base = comparison.results["baseline"].mean_nll
    sensitivity = [comparison.results[f"layer {i}"].mean_nll - base for i in range(layers)]
    order = sorted(range(layers), key=lambda i: -sensitivity[i])
    result = {"command": " ".join(["python"] + sys.argv), "args": vars(args),
              "reference_nll": comparison.reference.mean_nll, "baseline_nll": base,
              "baseline_ppl_change": comparison.ppl_change("baseline"),
              "sensitivity_nats": sensitivity, "most_sensitive_first": order,
              "policies": {k: f"layer_tiers:layers={'+'.join(map(str, sorted(order[:k])))},high={args.high},"
                              f"low={args.low}" for k in range(layers + 1)}}
    print(comparison.format())
    print("most sensitive first:", order)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
