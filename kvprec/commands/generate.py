"""``kvprec generate --model PATH --policy ... --prompt ...``: generate with an AdaptiveCache and print the text,
decode tokens/s, the memory report and the precision map. Long prompts are prefilled in chunks with a
progress bar; generation then continues from the filled cache."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (built-in) or a local Hugging Face model directory")
    p.add_argument("--policy", default="sink_window", help="policy name, e.g. uniform:int4 (see kvprec.policy)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--shadow", default="none", choices=["none", "cpu"],
                   help="keep a host copy of every sealed block (exact crop, promotion); its bytes are reported")
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "torch", "triton"],
                   help="attention over the cache (see kvprec.AdaptiveCache)")
    p.add_argument("--key-rotation", default="none", choices=["none", "hadamard", "orthogonal"],
                   help="store keys rotated (kvprec/storage/rotation.py); recommended below INT4")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size (tokens)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")


def run(args) -> int:
    import kvprec
    from kvprec.models.loading import load

    if args.max_new_tokens < 1 or args.chunk < 1:
        raise SystemExit("kvprec generate: --max-new-tokens and --chunk must be >= 1")
    prompt = args.prompt if args.prompt is not None else (open(args.prompt_file).read() if args.prompt_file else None)
    if not prompt:
        raise SystemExit("kvprec generate: give --prompt TEXT or --prompt-file FILE")
    loaded = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    model = loaded.model
    ids = torch.tensor([loaded.encode(prompt)], device=args.device)
    cache = kvprec.AdaptiveCache(model.config, policy=args.policy, block_size=args.block_size,
                                 shadow=None if args.shadow == "none" else args.shadow, backend=args.backend,
                                 key_rotation=None if args.key_rotation == "none" else args.key_rotation)
    from tqdm import tqdm

    with kvprec.enabled(model), torch.no_grad():
        t0 = time.perf_counter()
        starts = range(0, ids.shape[1] - 1, args.chunk)
        for s in tqdm(starts, desc="prefill", unit="chunk", disable=len(starts) < 2, file=sys.stderr):
            e = min(s + args.chunk, ids.shape[1] - 1)
            model(input_ids=ids[:, s:e], past_key_values=cache, use_cache=True)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             pad_token_id=getattr(model.generation_config, "pad_token_id", None) or 0)
        t_decode = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    print(loaded.decode(new))
    print(f"\n[{loaded.name}] prompt {ids.shape[1]} tokens prefilled in {t_prefill:.2f} s; {len(new)} new tokens in "
          f"{t_decode:.2f} s = {len(new) / t_decode:.1f} tokens/s (policy {args.policy})", file=sys.stderr)
    print(cache.memory_report().format(), file=sys.stderr)
    return 0
