"""kvprec generate --model PATH --policy ... --prompt ...: generate with an AdaptiveCache and print the text, decode
tokens/s, the memory report and the precision map. Long prompts are prefilled in chunks; generation then continues
from the filled cache. Progress bars (prefill chunks, decoded tokens) and the report go to stderr, the text to
stdout. Every argument is checked before the model loads."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from kvprec.models.chat import CHAT_MODES

from .arguments import (UsageError, check_device, check_input_file, make_policy, policy_help, positive_float,
                        positive_int, power_of_two)
from .model_args import (add_model_arguments, add_tp_argument, check_adaptive_cache, check_model_name,
                         check_positions, check_tensor_parallel, encode_without_model, head_dim, launch_world,
                         load_model, model_config, tensor_parallel)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--policy", default="sink_window", metavar="SPEC",
                   help=policy_help(multiple=False) + "\n(default: sink_window)")
    p.add_argument("--bits-per-element", type=positive_float, default=None, metavar="B",
                   help="wrap the policy in a budget of this many bits per element of the sealed pages")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", metavar="TEXT", help="prompt text")
    g.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this file")
    p.add_argument("--chat", default="auto", choices=CHAT_MODES,
                   help="put the prompt through the tokenizer's chat template as one user turn (auto: when the "
                        "model has one, e.g. SmolLM2-135M-Instruct; off: the text as it is)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens to generate (default 64)")
    p.add_argument("--block-size", type=power_of_two, default=64, metavar="T", help="positions per block (default 64)")
    p.add_argument("--shadow", default="none", choices=["none", "cpu"],
                   help="keep a host copy of every sealed block (exact crop, promotion); its bytes are reported")
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "torch", "triton"],
                   help="attention over the cache (see kvprec.AdaptiveCache; auto: the C++ kernel on CPU)")
    p.add_argument("--key-rotation", default="none", choices=["none", "hadamard", "orthogonal"],
                   help="store keys rotated (kvprec/storage/rotation.py); recommended below INT4")
    p.add_argument("--chunk", type=positive_int, default=512, metavar="N",
                   help="prefill chunk size in tokens (default 512)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    add_tp_argument(p, "the text and the memory report of all ranks")


def check_backend(backend: str, device: torch.device, config) -> None:
    """``--backend triton`` where Triton runs (a CUDA device, or TRITON_INTERPRET=1 on CPU) and takes the model's
    head_dim; the other backends run everywhere the cache does."""
    if backend != "triton":
        return
    from kvprec import ops

    try:
        ops.resolve_backend("decode_attention", "triton", device)
    except RuntimeError as exc:
        raise UsageError(f"--backend triton: {exc}; use --backend auto") from exc
    if head_dim(config) not in ops.TRITON_DECODE_HEAD_DIMS:
        raise UsageError(f"--backend triton: the model's head_dim {head_dim(config)} is not one the Triton kernel "
                         f"takes ({', '.join(map(str, ops.TRITON_DECODE_HEAD_DIMS))}); use --backend auto")


def _read_prompt(args) -> str:
    check_input_file(args.prompt_file, "--prompt-file")
    prompt = args.prompt
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8", errors="replace") as f:
            prompt = f.read()
    if not prompt:
        raise UsageError("give a non-empty --prompt TEXT or --prompt-file FILE")
    return prompt


def check_prompt_tokens(config, args, tokens: int) -> None:
    """The prompt's ``tokens`` and --max-new-tokens fit the model's positions, and the prompt has a token."""
    if tokens == 0:
        raise UsageError("the prompt encodes to no tokens; give a longer --prompt or --prompt-file")
    check_positions(config, args.model, tokens + args.max_new_tokens - 1,
                    f"the prompt's {tokens} tokens + --max-new-tokens {args.max_new_tokens} - 1")


def run(args) -> int:
    import kvprec
    from tqdm import tqdm

    from kvprec.hf.distributed import gather_memory_reports, sum_reports
    from kvprec.models.chat import chat_ids, uses_chat

    check_model_name(args.model)
    device = check_device(args.device)
    prompt = _read_prompt(args)
    rotation = None if args.key_rotation == "none" else args.key_rotation
    policy = make_policy(args.policy, args.bits_per_element)
    config, dtype = model_config(args)
    check_adaptive_cache(config, args.model, args.block_size, None, rotation, args.bits_per_element)
    check_backend(args.backend, device, config)
    if args.tp > 1 and launch_world()[1] == 1:  # the ranks could only refuse the prompt each: check it here
        check_tensor_parallel(config, args.tp, args.model)
        check_prompt_tokens(config, args, len(encode_without_model(args.model, prompt, args.chat)))
    elif args.chat == "on":  # refused before the weights load where the tokenizer has no template
        encode_without_model(args.model, prompt, args.chat)
    code = tensor_parallel(args, config)
    if code is not None:
        return code
    rank, world = launch_world()

    loaded = load_model(args, dtype, device, tp_plan="auto" if world > 1 else None)
    model = loaded.model
    try:  # --chat on for a model without a template is refused here
        templated = uses_chat(loaded.tokenizer, args.chat)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    ids = torch.tensor([chat_ids(loaded.tokenizer, prompt) if templated else loaded.encode(prompt)], device=device)
    check_prompt_tokens(config, args, ids.shape[1])
    cache = kvprec.AdaptiveCache(model.config, policy=policy, block_size=args.block_size,
                                 shadow=None if args.shadow == "none" else args.shadow, backend=args.backend,
                                 key_rotation=rotation)
    with kvprec.enabled(model), torch.no_grad():
        t0 = time.perf_counter()
        starts = range(0, ids.shape[1] - 1, args.chunk)
        for s in tqdm(starts, desc="prefill", unit="chunk", disable=len(starts) < 2 or rank > 0, file=sys.stderr):
            e = min(s + args.chunk, ids.shape[1] - 1)
            model(input_ids=ids[:, s:e], past_key_values=cache, use_cache=True)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        with DecodeProgress(args.max_new_tokens, disable=rank > 0) as progress:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                 max_new_tokens=args.max_new_tokens, do_sample=args.sample, streamer=progress,
                                 pad_token_id=getattr(model.generation_config, "pad_token_id", None) or 0)
        t_decode = time.perf_counter() - t0
    reports = gather_memory_reports(cache)  # every rank takes part; [the cache's own] on one process
    report = sum_reports(reports)
    if rank > 0:
        return 0
    new = out[0, ids.shape[1]:].tolist()
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    print(loaded.decode(new[:-1] if new and new[-1] in eos else new))  # the stop token is not text
    print(f"\n[{loaded.name}, {str(dtype).removeprefix('torch.')}] prompt {ids.shape[1]} tokens prefilled in "
          f"{t_prefill:.2f} s; {len(new)} new tokens in {t_decode:.2f} s = {len(new) / t_decode:.1f} tokens/s "
          f"(policy {args.policy}"
          f"{', through the chat template' if templated else ''})", file=sys.stderr)
    if world > 1:
        per_rank = " + ".join(f"{r.resident_bytes:,}" for r in reports)
        print(f"tensor parallel over {world} ranks: resident bytes per rank {per_rank} = {report.resident_bytes:,}, "
              "the total of the report below (all ranks)", file=sys.stderr)
    print(report.format(), file=sys.stderr)
    return 0


class DecodeProgress:
    """A progress bar on stderr over the tokens ``model.generate`` produces, as its ``streamer``: generate puts
    the prompt first, then each new token (batch 1)."""

    def __init__(self, total: int, disable: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="decode", unit="token", file=sys.stderr, disable=disable)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()

    def __enter__(self) -> "DecodeProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
