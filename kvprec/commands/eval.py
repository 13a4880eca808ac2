"""``kvprec eval --model PATH --text FILE --policy ...``: teacher-forced decoding through the cache (kvprec/hf/eval.py):
perplexity change and top-1 agreement of each policy against an unquantized DynamicCache, with effective
bits per element from the cache's own accounting. ``--windows N`` runs N disjoint windows of the text as one
batch (N times the predictions); ``--bits-per-element B`` wraps every policy in ``policy.budget(policy,
bits_per_element=B)`` (sealed pages at most B bits per element, down to INT2). ``--json`` writes the rows."""
from __future__ import annotations

import argparse
import json

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (built-in) or a local Hugging Face model directory")
    p.add_argument("--text", default=None, help="text file (default for tiny: held-out stdlib files)")
    p.add_argument("--policy", action="append", default=[], help="policy name (repeatable)")
    p.add_argument("--hf-cache", action="append", default=[],
                   help="a stock transformers cache in the same comparison (repeatable): dynamic, quanto:4, quanto:2, "
                        "hqq:4, hqq:2 (QuantizedCache with transformers' defaults)")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--tokens", type=int, default=256, help="teacher-forced decode steps")
    p.add_argument("--windows", type=int, default=1, help="disjoint windows of the text, run as one batch")
    p.add_argument("--bits-per-element", type=float, default=None,
                   help="wrap every policy in a budget of this many bits per element of the sealed pages")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--group-size", type=int, default=None,
                   help="value quantization group along head_dim (default: the largest divisor of head_dim <= 64)")
    p.add_argument("--key-rotation", default="none", choices=["none", "hadamard", "orthogonal"],
                   help="store keys rotated (kvprec/storage/rotation.py); recommended below INT4")
    p.add_argument("--rotation-seed", type=int, default=0, help="seed of the key rotations (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the result rows to this JSON file")


def run(args) -> int:
    import kvprec
    from kvprec.hf.eval import compare, hf_cache, hf_cache_name
    from kvprec.models.loading import load

    if not args.policy and not args.hf_cache:  # before the model loads
        raise SystemExit("kvprec eval: give at least one --policy or --hf-cache")
    loaded = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if args.windows < 1:
        raise SystemExit(f"kvprec eval: --windows must be >= 1, got {args.windows}")

    def make_policy(spec):
        if args.bits_per_element is None:
            return kvprec.policy.get(spec)
        return kvprec.policy.budget(spec, bits_per_element=args.bits_per_element)

    try:
        for spec in args.policy:
            make_policy(spec)
        baselines = {hf_cache_name(spec): hf_cache(spec, loaded.model.config) for spec in args.hf_cache}
    except ValueError as exc:
        raise SystemExit(f"kvprec eval: {exc}") from exc
    if args.text is not None:
        text = open(args.text, encoding="utf-8", errors="replace").read()
    elif loaded.name == "tiny":
        from kvprec.models import STDLIB_EVAL_FILES, stdlib_text

        text = stdlib_text(STDLIB_EVAL_FILES).decode("utf-8", errors="replace")
    else:
        raise SystemExit("kvprec eval: --text FILE is required for a Hugging Face model")
    ids = loaded.encode(text)
    length = args.prefill + args.tokens
    if args.windows == 1:
        ids = ids[:length]
        if len(ids) < args.prefill + 2:
            raise SystemExit(f"kvprec eval: the text has {len(ids)} tokens, fewer than --prefill {args.prefill} + 2")
        tokens = torch.tensor([ids])
    else:
        if len(ids) < args.windows * length:
            raise SystemExit(f"kvprec eval: --windows {args.windows} of --prefill {args.prefill} + --tokens "
                             f"{args.tokens} tokens need {args.windows * length} tokens; the text has {len(ids)}")
        tokens = torch.tensor(ids[:args.windows * length]).view(args.windows, length)
    suffix = "" if args.bits_per_element is None else f" @{args.bits_per_element:g}b"
    rotation = None if args.key_rotation == "none" else args.key_rotation
    suffix += "" if rotation is None else f" rot:{rotation}"
    caches = {spec + suffix: (lambda spec=spec: kvprec.AdaptiveCache(loaded.model.config, policy=make_policy(spec),
                                                                     block_size=args.block_size,
                                                                     group_size=args.group_size,
                                                                     key_rotation=rotation,
                                                                     rotation_seed=args.rotation_seed))
              for spec in args.policy}
    caches.update(baselines)
    result = compare(loaded.model, tokens, args.prefill, caches)
    print(result.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": loaded.name, "prefill": args.prefill, "tokens": tokens.shape[1] - args.prefill,
                       "windows": tokens.shape[0], "bits_per_element_budget": args.bits_per_element,
                       "rows": result.rows()}, f, indent=1)
    return 0
