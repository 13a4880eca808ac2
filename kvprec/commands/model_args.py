"""``--model``, ``--dtype`` and ``--device`` of the commands that load a model, and the checks that need the model's
config but not its weights: the dtype ``--dtype auto`` resolves to, the cache geometry at the model's head_dim, a
budget's floor, and the number of positions the model has.

The config is read without the weights (kvprec/models/loading.py loads those): for ``tiny`` (or a ``.safetensors``
file of the tiny model) from the JSON beside the weights, for SmolLM2 from its converted checkpoint (converted
first if needed, as loading it would), for a Hugging Face directory from its config.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch

from .arguments import UsageError, default_device, positive_int

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    from kvprec.models import smollm2

    p.add_argument("--model", default="tiny", metavar="PATH",
                   help=f"'tiny' (the built-in model, the default), {smollm2.NAME!r} (SmolLM2-135M-Instruct from the "
                        f"{smollm2.PACKAGE} package) or a local Hugging Face model directory (nothing is downloaded)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="dtype of the weights and the cache's tail; auto (default): the dtype the model's config "
                        "names (dtype / torch_dtype), float32 where it names none (the tiny model)")
    p.add_argument("--device", default=default_device(), metavar="DEVICE",
                   help=f"cpu, cuda or cuda:N (default here: {default_device()})")


def is_tiny(model: str) -> bool:
    """Whether ``--model`` names the built-in tiny model or a .safetensors file of it (as kvprec/models/loading.py
    decides)."""
    return model == "tiny" or model.endswith(".safetensors")


def check_model_name(model: str) -> None:
    """``--model`` names something loadable: tiny, an existing .safetensors file, SmolLM2 or a directory (what is
    in the directory is checked when its config is read)."""
    from kvprec.models import smollm2

    if is_tiny(model):
        from kvprec.models.tiny import WEIGHTS

        if not (WEIGHTS if model == "tiny" else Path(model)).is_file():
            raise UsageError(f"--model {model}: no such file (tiny model weights: train them with "
                             "`python examples/train_tiny_model.py --out <path>`)")
    elif model != smollm2.NAME and not Path(model).is_dir():
        raise UsageError(f"--model: {model!r} is neither 'tiny', {smollm2.NAME!r}, a .safetensors file of the tiny "
                         "model, nor a local Hugging Face model directory (nothing is downloaded)")


def read_config(model: str):
    """The config of ``--model`` without loading its weights; a UsageError names what ``--model`` accepts (a
    FileNotFoundError from kvprec/models/smollm2.py says what to install)."""
    from kvprec.models import smollm2

    check_model_name(model)
    if is_tiny(model):
        from kvprec.models.tiny import WEIGHTS, tiny_llama_config

        meta = (WEIGHTS if model == "tiny" else Path(model)).with_suffix(".json")  # as load_tiny_llama reads it
        return tiny_llama_config(**(json.loads(meta.read_text())["config"] if meta.exists() else {}))
    directory = smollm2.checkpoint() if model == smollm2.NAME else Path(model)  # converts SmolLM2 once
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:  # no config.json, or a model type transformers does not know
        raise UsageError(f"--model {model}: not a Hugging Face model directory ({exc})") from exc


def load_model(args, dtype: torch.dtype, device: torch.device, tp_plan=None):
    """kvprec.models.load(--model) in ``dtype`` on ``device`` (sharded by ``tp_plan`` under torchrun); the ValueError
    it raises for a directory it cannot load (its documented refusal, naming --model) is bad input."""
    from kvprec.models.loading import load

    try:
        return load(args.model, dtype=dtype, device=str(device), tp_plan=tp_plan)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def head_dim(config) -> int:
    from kvprec.hf.cache import text_config

    text = text_config(config)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def resolve_dtype(choice: str, config, model: str) -> torch.dtype:
    """``--dtype``: an explicit name, or for "auto" the dtype the config names (transformers reads ``dtype`` and
    the older ``torch_dtype`` key into ``config.dtype``); a config that names none gets float32, the dtype
    transformers builds such a model in and the one the tiny model is built in."""
    if choice != "auto":
        return DTYPES[choice]
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype is None:
        return torch.float32
    if dtype not in DTYPES.values():
        raise UsageError(f"--dtype auto: the config of --model {model} names {dtype}, which kvprec does not run; "
                         f"give --dtype {', '.join(DTYPES)}")
    return dtype


def model_config(args) -> tuple:
    """(config, dtype) of ``--model`` and ``--dtype``, before the weights load. Run the checks that need no model
    first: for SmolLM2 this may convert the checkpoint (once)."""
    config = read_config(args.model)
    return config, resolve_dtype(args.dtype, config, args.model)


def check_adaptive_cache(config, model: str, block_size: int, group_size: Optional[int] = None,
                         key_rotation: Optional[str] = None, bits_per_element: Optional[float] = None) -> None:
    """What an AdaptiveCache for this model needs of the arguments: a supported family, ``--group-size`` dividing
    head_dim, a head_dim ``--key-rotation`` takes, and a ``--bits-per-element`` budget at or above the bits per
    element of its floor tier's pages (INT2 codes plus their FP16 scales and zeros at this geometry)."""
    from kvprec.hf.cache import check_supported
    from kvprec.storage.formats import BlockGeometry, Tier
    from kvprec.storage.rotation import rotation_matrix

    try:
        check_supported(config)
    except ValueError as exc:
        raise UsageError(f"--model {model}: {exc}") from exc
    d = head_dim(config)
    if group_size is not None and (group_size < 1 or d % group_size):
        divisors = ", ".join(str(g) for g in range(1, d + 1) if d % g == 0)
        raise UsageError(f"--group-size {group_size}: must divide the model's head_dim {d}; accepted {divisors}")
    try:
        geometry = BlockGeometry(block_size, d, group_size)
    except ValueError as exc:  # the block size is checked by its argparse type: the model's head_dim is refused
        raise UsageError(f"--model {model}: {exc}") from exc
    if key_rotation is not None:
        try:
            rotation_matrix(key_rotation, d)
        except ValueError as exc:
            raise UsageError(f"--key-rotation {key_rotation}: {exc}") from exc
    if bits_per_element is not None:
        floor = 8 * geometry.page_bytes(Tier.INT2) / (2 * block_size * d)
        if bits_per_element < floor:
            raise UsageError(f"--bits-per-element {bits_per_element:g}: below {floor:g}, the bits per element of "
                             f"the floor tier's pages (int2 with its scales and zeros at --block-size {block_size}, "
                             f"head_dim {d}, group {geometry.group_size}); use at least {floor:g}")


def check_positions(config, model: str, positions: int, what: str) -> None:
    """Refuse ``positions`` beyond the model's ``max_position_embeddings`` (where the config states one): past it a
    model with learned positions fails and a rotary one runs where it was never trained. ``what`` says which
    arguments add up to ``positions``."""
    from kvprec.hf.cache import text_config

    limit = getattr(text_config(config), "max_position_embeddings", None)
    if limit is not None and positions > limit:
        raise UsageError(f"{what} = {positions} positions, beyond the {limit} of --model {model} "
                         "(max_position_embeddings)")


# ----------------------------------------------------------------------------------------- tensor parallelism
def add_tp_argument(p: argparse.ArgumentParser, prints: str) -> None:
    """``--tp N`` of a command that loads a model; ``prints`` says what rank 0 prints."""
    p.add_argument("--tp", type=positive_int, default=1, metavar="N",
                   help=f"tensor parallel over N processes on this machine: relaunches itself under torchrun (gloo on "
                        f"CPU); each rank caches its share of the KV heads, rank 0 prints {prints} (default 1). Under "
                        "torchrun already, the launch's ranks are used.")


def launch_world() -> tuple:
    """(rank, world size) of this process in a ``torchrun`` launch (its RANK / WORLD_SIZE); (0, 1) outside one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_tensor_parallel(config, ranks: int, model: str, flag: str = "--tp") -> None:
    """Tensor parallelism over ``ranks`` processes: a Hugging Face checkpoint (transformers shards it at load),
    whose attention and KV heads split evenly over the ranks. ``flag`` names where ``ranks`` came from."""
    from kvprec.hf.cache import text_config

    what = f"{flag} {ranks}"
    if is_tiny(model):
        raise UsageError(f"{what}: --model {model} is not a Hugging Face checkpoint, which tensor parallelism "
                         "loads sharded; use a local Hugging Face model directory (examples/export_tiny_hf.py saves "
                         "the tiny model as one)")
    text = text_config(config)
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if heads % ranks or kv_heads % ranks:
        fits = [n for n in range(2, kv_heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise UsageError(f"{what}: the model's {heads} attention heads and {kv_heads} KV heads do not split "
                         f"evenly over {ranks} ranks; accepted: {', '.join(map(str, fits)) or 'none (1 only)'}")


def tensor_parallel(args, config) -> Optional[int]:
    """After a command's checks, before its model loads: the exit code of the command relaunched under torchrun
    when ``--tp N`` (N > 1) was given outside a launch (it has finished), else None: this process runs, a rank of a
    launch (its model loads sharded; :func:`launch_world`) or the only process. The heads must split over the
    ranks either way."""
    world = launch_world()[1]
    if world > 1:
        check_tensor_parallel(config, world, args.model, flag="torchrun's WORLD_SIZE")
        return None
    if args.tp > 1:
        check_tensor_parallel(config, args.tp, args.model)
        return launch_tensor_parallel(args)
    return None


def encode_without_model(model: str, text: str, chat: str = "off") -> list:
    """The token ids of ``text`` for ``--model``, from its tokenizer alone (the weights are not loaded): what a
    command checks before it launches ranks that would each refuse the same text. ``chat``: as --chat
    (kvprec/models/chat.py)."""
    from kvprec.models import smollm2
    from kvprec.models.chat import prompt_token_ids

    if is_tiny(model):
        tokenizer, encode = None, lambda s: list(s.encode("utf-8"))  # bytes (kvprec/models/loading.py)
    else:
        from transformers import AutoTokenizer

        directory = smollm2.checkpoint() if model == smollm2.NAME else Path(model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"--model {model}: no tokenizer transformers can load offline ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0]})") from exc
        encode = lambda s: tokenizer(s)["input_ids"]  # noqa: E731
    try:
        return prompt_token_ids(tokenizer, encode, text, chat)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def launch_tensor_parallel(args) -> int:
    """Run this same command under ``torchrun --nproc-per-node N`` (without --tp) and return its exit code."""
    import subprocess
    import sys

    keep, skip = [], False
    for a in list(getattr(args, "argv", None) or sys.argv[1:]):  # drop "--tp N" / "--tp=N": torchrun's ranks now
        if skip:
            skip = False
        elif a == "--tp":
            skip = True
        elif not a.startswith("--tp="):
            keep.append(a)
    # --standalone: a free local port for the rendezvous, so that two launches on one machine do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.tp), "-m",
           "kvprec.cli", *keep]
    return subprocess.run(cmd).returncode
