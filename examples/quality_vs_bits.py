"""Quality against memory on a trained model: uniform tiers and budgeted adaptive policies, teacher-forced through
the cache (kvprec.hf.eval), against the README's quality targets (perplexity change and top-1 agreement).

    python examples/quality_vs_bits.py --model examples/models/small_llama_stdlib.safetensors \\
        --windows 8 --prefill 512 --tokens 512 --group-size 64 --out runs/quality_small.json

Every cache runs in one comparison (one reference pass): uniform INT8 / INT4 / INT2, then, for each budget in
``--budgets`` (bits per element of the sealed pages, metadata included, down to INT2), the budget wrapper around
uniform INT4 (newest blocks kept longest), sink_window (4 sinks and the last 128 positions first) and
attention_mass (the most attended blocks first), and the curvature map calibrated at that budget on training text
(``--no-curvature`` skips it). The table gives both bit counts (whole cache, and sealed pages
alone: the tail is one model-dtype block per row and head whatever the policy, so it weighs ~16 T / context bits
at short contexts), perplexity change and top-1 agreement over windows x tokens predictions, and which of the
targets each row meets (rows are held to a target by their measured page bits): uniform INT4 within +0.5% and
>= 97%; <= 3.0 bits within +1.5% and >= 95%; <= 2.6 bits within +5%. ``--extra`` adds unbudgeted policy specs.
Every cache runs once per ``--key-rotations`` kind (default: none, hadamard, orthogonal; kvprec/storage/rotation.py): the
rotated rows are the ones that reach the 3.0 and 2.6-bit targets. ``--hf-caches`` adds transformers'
QuantizedCache (quanto / hqq, 4 and 2 bits, groups of 64, the last 128 tokens in the model dtype) where installed;
their bits count every tensor they hold (kvprec.hf.eval.held_bits_per_element), and they are held to no target.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kvprec
from kvprec.hf.eval import compare, hf_cache, hf_cache_name
from kvprec.models.loading import load


def curvature_policies(model, encode, budgets, block_size, group_size, windows=4, length=1024):
    """The curvature map (kvprec.policy.Curvature) at each budget, calibrated on ``windows`` x ``length`` tokens of
    the training text (disjoint from the evaluation text), tiers INT2 / INT4 / INT8 / FP16."""
    from kvprec.models import STDLIB_TRAIN_FILES, stdlib_text
    from kvprec.hf.policy.curvature import Curvature

    ids = encode(stdlib_text(STDLIB_TRAIN_FILES).decode("utf-8", errors="replace"))[:windows * length]
    calib = torch.tensor(ids).view(windows, length)
    return {f"curvature @{b:g}b": Curvature.calibrate(model, calib, bits_per_element=b, block_size=block_size,
                                                       group_size=group_size,
                                                       candidates=("int2", "int4", "int8", "fp16"))
            for b in budgets}


def caches(config, budgets, block_size, group_size, extra=(), calibrated=None, key_rotation=None):
    """The caches to compare, by row name; with ``key_rotation`` every name ends in " rot:<kind>"."""
    def make(policy):
        return lambda: kvprec.AdaptiveCache(config, policy=policy, block_size=block_size, group_size=group_size,
                                            key_rotation=key_rotation)

    out = {f"uniform:{t}": make(f"uniform:{t}") for t in ("int8", "int4", "int2")}
    out.update({spec: make(spec) for spec in extra})
    inner = {"uniform:int4": "uniform:int4", "sink_window": "sink_window:sinks=4,window=128,rest=int4",
             "attention_mass": "attention_mass:keep=0.5,high=int8,low=int4"}
    for bits in budgets:
        for name, spec in inner.items():
            out[f"{name} @{bits:g}b"] = make(kvprec.policy.budget(spec, bits_per_element=bits))
    out.update({name: make(policy) for name, policy in (calibrated or {}).items()})
    return out if key_rotation is None else {f"{name} rot:{key_rotation}": f for name, f in out.items()}


def verdict(row):
    """Which target the row is held to (by its measured page bits; uniform INT4 by name), and whether it meets
    it. Rows above 3.0 page bits other than uniform INT4 are held to none."""
    ppl, top1, bits = row["ppl_change"], row["top1_agreement"], row["page_bits_per_element"]
    if bits is None:  # a stock transformers cache (no pages): shown for comparison, held to no target
        return "-", None
    if row["cache"].split(" rot:")[0] == "uniform:int4":
        return "int4: <= +0.5%, >= 97%", ppl <= 0.005 and top1 >= 0.97
    if bits <= 2.6:
        return "<= 2.6 bits: <= +5%", ppl <= 0.05
    if bits <= 3.0:
        return "<= 3.0 bits: <= +1.5%, >= 95%", ppl <= 0.015 and top1 >= 0.95
    return "-", None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained tiny-model .safetensors (examples/train_tiny_model.py)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--budgets", type=float, nargs="*", default=[3.0, 2.6])
    p.add_argument("--extra", nargs="*", default=["sink_window:sinks=0,window=192,rest=int2,recent=int4"],
                   help="more policy specs, unbudgeted (default: the last 192 positions at INT4, the rest INT2)")
    p.add_argument("--key-rotations", nargs="+", default=["none", "hadamard", "orthogonal"],
                   choices=["none", "hadamard", "orthogonal"],
                   help="run every cache once per key rotation (kvprec/storage/rotation.py); 'none' stores keys as given")
    p.add_argument("--no-curvature", action="store_true", help="skip the calibrated curvature map rows")
    p.add_argument("--hf-caches", nargs="*", default=["quanto:4", "quanto:2", "hqq:4", "hqq:2"],
                   help="transformers QuantizedCache rows for comparison (kvprec.hf.eval.hf_cache specs); a backend "
                        "whose package is not installed is skipped with a note")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the rows (and the command's arguments) as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvprec.models import STDLIB_EVAL_FILES, stdlib_text

    loaded = load(args.model)
    ids = loaded.encode(stdlib_text(STDLIB_EVAL_FILES).decode("utf-8", errors="replace"))
    length = args.prefill + args.tokens
    if len(ids) < args.windows * length:
        raise SystemExit(f"{args.windows} windows of {length} tokens need {args.windows * length}; the held-out "
                         f"text has {len(ids)}")
    tokens = torch.tensor(ids[:args.windows * length]).view(args.windows, length)
    # A budget below INT2's own page bits (data + FP16 scales and zeros) cannot be met by any policy: say so.
    cfg = loaded.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    geometry = kvprec.BlockGeometry(args.block_size, head_dim, args.group_size)
    floor = geometry.page_bytes(kvprec.Tier.INT2) * 8 / (args.block_size * head_dim * 2)
    budgets = [b for b in args.budgets if b >= floor]
    for b in sorted(set(args.budgets) - set(budgets)):
        print(f"budget {b:g} bits: below INT2's {floor:.3f} bits per element at head_dim {head_dim}, block_size "
              f"{args.block_size}, group_size {args.group_size} (FP16 scale and zero per channel per block for keys, "
              f"per group per token for values): no policy can meet it; skipped")
    calibrated = None if args.no_curvature else curvature_policies(loaded.model, loaded.encode, budgets,
                                                                    args.block_size, args.group_size)
    every = {}
    for rotation in args.key_rotations:
        every.update(caches(cfg, budgets, args.block_size, args.group_size, args.extra, calibrated,
                            None if rotation == "none" else rotation))
    for spec in args.hf_caches:
        try:
            every[hf_cache_name(spec)] = hf_cache(spec, cfg)
        except ValueError as exc:
            print(f"skipped: {exc}")
    result = compare(loaded.model, tokens, args.prefill, every)
    rows = result.rows()
    print(result.format())
    print(f"\n{'cache':34s} {'target':32s} met")
    for row in rows[1:]:
        target, ok = verdict(row)
        row["target"], row["meets_target"] = target, ok
        print(f"{row['cache']:34s} {target:32s} {'-' if ok is None else ('yes' if ok else 'NO')}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "predictions": int(result.reference.nll.numel()),
                                              "reference_perplexity": result.reference.perplexity, "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
