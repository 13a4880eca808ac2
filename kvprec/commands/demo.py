"""``kvprec demo``: the adaptive cache on the built-in tiny model (a byte-level Llama trained on Python's standard
library, kvprec/models/tiny.py), on held-out text. For each policy it measures, through the cache
(teacher-forced decoding, kvprec/hf/eval.py): perplexity against an unquantized DynamicCache, top-1 agreement,
effective bits per element from the cache's own byte accounting, and wall time (the default set adds uniform INT2
with rotated keys, kvprec/storage/rotation.py, beside plain INT2); then it generates a
continuation with the unquantized and the default adaptive cache side by side, and prints the default cache's
memory report with its precision map. Every number is computed in the run.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

DEFAULT_POLICIES = ("uniform:int8", "uniform:int4", "sink_window", "attention_mass", "uniform:int2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="weights of a tiny model (default: the ones kvprec ships)")
    p.add_argument("--policy", action="append", default=None,
                   help=f"a policy name (repeatable; default: {', '.join(DEFAULT_POLICIES)})")
    p.add_argument("--prefill", type=int, default=512, help="tokens prefilled into the cache (default 512)")
    p.add_argument("--tokens", type=int, default=256, help="teacher-forced decode steps measured (default 256)")
    p.add_argument("--generate", type=int, default=64, help="tokens generated in the side-by-side (default 64)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--no-curvature", action="store_true",
                   help="skip the curvature policy (calibrated on another held-out file, at uniform INT4's page bytes)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _show(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\n", "\\n")


def run(args) -> int:
    import kvprec
    from kvprec.hf.cache import Int2KeysWarning
    from kvprec.hf.eval import compare
    from kvprec.models import STDLIB_EVAL_FILES, byte_tokens, load_tiny_llama, stdlib_text
    from transformers import DynamicCache

    if args.prefill < 1 or args.tokens < 1 or args.generate < 0:
        raise SystemExit("kvprec demo: --prefill and --tokens must be >= 1, --generate >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_tiny_llama(args.model)
    policies = args.policy or list(DEFAULT_POLICIES)
    for spec in policies:
        kvprec.policy.get(spec)  # unknown names fail here, before any work
    text = stdlib_text(STDLIB_EVAL_FILES[:1])
    tokens = byte_tokens(text[:args.prefill + args.tokens]).unsqueeze(0)
    cfg = model.config
    print(f"kvprec demo: tiny byte-level Llama ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
          f"{cfg.num_key_value_heads} KV heads of dim {cfg.hidden_size // cfg.num_attention_heads}), held-out text "
          f"{STDLIB_EVAL_FILES[0]}: prefill {args.prefill} tokens, {args.tokens} teacher-forced decode steps, "
          f"blocks of {args.block_size}\n")

    caches = {spec: (lambda spec=spec: kvprec.AdaptiveCache(model.config, policy=spec, block_size=args.block_size))
              for spec in policies}
    if args.policy is None:  # what a rotation does for 2-bit keys, on the same tokens
        caches["uniform:int2 rot:orthogonal"] = lambda: kvprec.AdaptiveCache(
            model.config, policy="uniform:int2", block_size=args.block_size, key_rotation="orthogonal")
    if not args.no_curvature:
        # The central claim, tested at equal memory: a curvature map (calibrated on a different held-out file)
        # may spend uniform INT4's page bytes on any mix of INT2..FP16 blocks.
        from kvprec.storage.formats import BlockGeometry, Tier
        from kvprec.hf.policy import Curvature

        head_dim = cfg.hidden_size // cfg.num_attention_heads
        pages = BlockGeometry(args.block_size, head_dim).page_bytes(Tier.INT4)  # the cache's default group
        bits = 8 * pages / (args.block_size * head_dim * 2)
        calib = byte_tokens(stdlib_text(STDLIB_EVAL_FILES[1:2])[:args.prefill + args.tokens])
        curvature = Curvature.calibrate(model, calib, bits_per_element=bits, block_size=args.block_size,
                                        candidates=("int2", "int4", "int8", "fp16"))
        caches[f"curvature@{bits:.2f}b pages"] = lambda: kvprec.AdaptiveCache(model.config, policy=curvature,
                                                                             block_size=args.block_size)
    with warnings.catch_warnings():  # the table shows plain INT2 beside rotated INT2 on purpose: no advice
        warnings.simplefilter("ignore", Int2KeysWarning)
        result = compare(model, tokens, args.prefill, caches)
    print(result.format())

    if args.generate:
        prompt = tokens[:, :args.prefill]
        default = policies[0] if args.policy else "sink_window"
        gen = dict(max_new_tokens=args.generate, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(prompt))
        t0 = time.perf_counter()
        model.set_attn_implementation("sdpa")
        ref = model.generate(prompt, past_key_values=DynamicCache(), **gen)
        t_ref = time.perf_counter() - t0
        cache = kvprec.AdaptiveCache(model.config, policy=default, block_size=args.block_size)
        t0 = time.perf_counter()
        with kvprec.enabled(model):
            new = model.generate(prompt, past_key_values=cache, **gen)
        t_new = time.perf_counter() - t0
        same = int((ref[0, args.prefill:] == new[0, args.prefill:]).sum())
        print(f"\ngreedy continuation of {args.generate} tokens ({same} identical):")
        print(f"  DynamicCache ({t_ref:.2f} s): {_show(bytes(ref[0, args.prefill:].tolist()))}")
        print(f"  {default} ({t_new:.2f} s): {_show(bytes(new[0, args.prefill:].tolist()))}")
        print(f"\nmemory of the {default} cache after generation:\n{cache.memory_report().format()}")
    return 0
