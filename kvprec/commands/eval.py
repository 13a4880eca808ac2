"""kvprec eval --model PATH --text FILE --policy ...: teacher-forced decoding through the cache (kvprec/hf/eval.py):
perplexity change and top-1 agreement of each policy against an unquantized DynamicCache, with effective bits per
element from the cache's own accounting. --windows N runs N disjoint windows of the text as one batch (N times the
predictions); --bits-per-element B wraps every policy in kvprec.policy.budget(policy, bits_per_element=B) (sealed
pages at most B bits per element, down to INT2). --json writes the rows. --tp N runs it tensor parallel over N
processes (torchrun, as kvprec generate --tp does): the same figures within float rounding. A progress bar on
stderr counts the model calls of every pass. Every argument is checked before the model loads."""
from __future__ import annotations

import argparse

import torch

from .arguments import (UsageError, check_device, check_input_file, check_output_file, make_policy, nonnegative_int,
                        policy_help, positive_float, positive_int, power_of_two, write_json)
from .model_args import (add_model_arguments, add_tp_argument, check_adaptive_cache, check_model_name,
                         check_positions, check_tensor_parallel, encode_without_model, is_tiny, launch_world,
                         load_model, model_config, tensor_parallel)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--text", default=None, metavar="FILE", help="text file (default for tiny: held-out stdlib files)")
    p.add_argument("--policy", action="append", default=[], metavar="SPEC", help=policy_help(multiple=True))
    p.add_argument("--hf-cache", action="append", default=[], metavar="SPEC",
                   help="a stock transformers cache in the same comparison (repeatable): dynamic, quanto:4, "
                        "quanto:2, hqq:4, hqq:2 (QuantizedCache with transformers' defaults)")
    p.add_argument("--prefill", type=positive_int, default=512, metavar="N",
                   help="tokens prefilled into the cache (default 512)")
    p.add_argument("--tokens", type=positive_int, default=256, metavar="N",
                   help="teacher-forced decode steps (default 256)")
    p.add_argument("--windows", type=positive_int, default=1, metavar="N",
                   help="disjoint windows of the text, run as one batch (default 1)")
    p.add_argument("--bits-per-element", type=positive_float, default=None, metavar="B",
                   help="wrap every policy in a budget of this many bits per element of the sealed pages")
    p.add_argument("--block-size", type=power_of_two, default=64, metavar="T", help="positions per block (default 64)")
    p.add_argument("--group-size", type=positive_int, default=None, metavar="G",
                   help="value quantization group along head_dim (default: the largest divisor of head_dim <= 64)")
    p.add_argument("--key-rotation", default="none", choices=["none", "hadamard", "orthogonal"],
                   help="store keys rotated (kvprec/storage/rotation.py); recommended below INT4")
    p.add_argument("--rotation-seed", type=nonnegative_int, default=0, metavar="S",
                   help="seed of the key rotations (default 0)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result rows to this JSON file")
    add_tp_argument(p, "the rows (bits per element of every rank's cache)")


def _read_text(args) -> str:
    if args.text is not None:
        with open(args.text, encoding="utf-8", errors="replace") as f:
            return f.read()
    if is_tiny(args.model):
        from kvprec.models import STDLIB_EVAL_FILES, stdlib_text

        return stdlib_text(STDLIB_EVAL_FILES).decode("utf-8", errors="replace")
    raise UsageError(f"--model {args.model} needs --text FILE (only the tiny model has a default text)")


def _tokens(ids: list, args) -> torch.Tensor:
    """The [windows, prefill + tokens] token ids (one shorter window may end early), or a UsageError saying how
    many tokens the text lacks."""
    length = args.prefill + args.tokens
    text = f"--text {args.text}" if args.text is not None else "the default text"
    if args.windows == 1:
        ids = ids[:length]
        if len(ids) < args.prefill + 2:
            raise UsageError(f"{text} has {len(ids)} tokens, fewer than --prefill {args.prefill} + 2")
        return torch.tensor([ids])
    if len(ids) < args.windows * length:
        raise UsageError(f"--windows {args.windows} of --prefill {args.prefill} + --tokens {args.tokens} tokens need "
                         f"{args.windows * length} tokens; {text} has {len(ids)}")
    return torch.tensor(ids[:args.windows * length]).view(args.windows, length)


def run(args) -> int:
    import kvprec
    from kvprec.hf.eval import compare, hf_cache, hf_cache_name

    if not args.policy and not args.hf_cache:
        raise UsageError("give at least one --policy or --hf-cache")
    check_model_name(args.model)
    device = check_device(args.device)
    check_output_file(args.json, "--json")
    check_input_file(args.text, "--text")
    rotation = None if args.key_rotation == "none" else args.key_rotation
    for spec in args.policy:
        make_policy(spec, args.bits_per_element)
    text = _read_text(args)
    config, dtype = model_config(args)
    if args.policy:
        check_adaptive_cache(config, args.model, args.block_size, args.group_size, rotation, args.bits_per_element)
    for spec in args.hf_cache:
        try:
            hf_cache(spec, config)
        except ValueError as exc:
            raise UsageError(f"--hf-cache {spec}: {exc}") from exc
    tokens = None
    if is_tiny(args.model):  # its tokens are the text's bytes (kvprec/models/loading.py): known before loading
        tokens = _tokens(list(text.encode("utf-8")), args)
    elif args.tp > 1 and launch_world()[1] == 1:  # the ranks could only refuse a short text each: count it here
        check_tensor_parallel(config, args.tp, args.model)
        _tokens(encode_without_model(args.model, text), args)
    check_positions(config, args.model, args.prefill + args.tokens - 1,
                    f"--prefill {args.prefill} + --tokens {args.tokens} - 1")
    code = tensor_parallel(args, config)
    if code is not None:
        return code
    rank, world = launch_world()

    loaded = load_model(args, dtype, device, tp_plan="auto" if world > 1 else None)
    if tokens is None:
        tokens = _tokens(loaded.encode(text), args)
    suffix = "" if args.bits_per_element is None else f" @{args.bits_per_element:g}b"
    suffix += "" if rotation is None else f" rot:{rotation}"
    caches = {spec + suffix: (lambda spec=spec: kvprec.AdaptiveCache(
        loaded.model.config, policy=make_policy(spec, args.bits_per_element), block_size=args.block_size,
        group_size=args.group_size, key_rotation=rotation, rotation_seed=args.rotation_seed))
        for spec in args.policy}
    caches.update({hf_cache_name(spec): hf_cache(spec, loaded.model.config) for spec in args.hf_cache})
    result = compare(loaded.model, tokens, args.prefill, caches, progress=rank == 0)  # collective under TP
    if rank > 0:
        return 0
    if world > 1:
        print(f"tensor parallel over {world} ranks; bits per element of all ranks' caches together")
    print(result.format())
    if args.json:
        write_json(args.json, {"model": loaded.name, "dtype": str(dtype).removeprefix("torch."),
                               "prefill": args.prefill, "tokens": tokens.shape[1] - args.prefill,
                               "windows": tokens.shape[0], "bits_per_element_budget": args.bits_per_element,
                               "tensor_parallel_ranks": world, "rows": result.rows()})
    return 0
