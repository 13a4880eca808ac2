"""Checks of the arguments of the cache and the policies: a bad value is refused with a ValueError that names the
argument and what it accepts, never coerced (``True`` is not tier 1, ``12.5`` is not a window of 12 tokens).

The construction checks of :class:`~kvprec.hf.cache.AdaptiveCache` (:func:`check_cache_arguments`,
:func:`check_model_geometry`) run before anything is allocated; the ones that need the model's head_dim run when
the config is known (at construction, or when ``kvprec.enable(model)`` binds an ``AdaptiveCache()`` to the model).
Nothing here imports transformers: the policies use it too.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from ..storage.formats import BlockGeometry, Tier

#: The largest block accepted. The tail (the block being filled, in the model dtype) is allocated whole at a
#: layer's first update, 2 * B * H_kv * block_size * head_dim elements per layer whatever the sequence length, and a
#: policy decides per block: beyond this a short generation pays for a huge tail (block_size=2**20 allocated GBs
#: for 13 tokens) and the precision map is too coarse to mean much.
MAX_BLOCK_SIZE = 1024

BACKENDS = ("auto", "cpp", "torch", "triton", "cuda")


def whole_number(value, what: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``; bools, floats (even 12.0), strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: {value!r} is not accepted; expected a whole number >= {minimum}")
    return int(value)


def real_number(value, what: str) -> float:
    """``value`` as a float; ints and floats are accepted, bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: {value!r} is not accepted; expected a number")
    return float(value)


def tier(value, what: str) -> Tier:
    """A Tier, its name ("int4") or its id (0..5); a bool is refused (``True`` would be tier 1, FP16). Other bad
    values get :meth:`Tier.parse`'s message ("tier: 'int9' is not a tier; accepted ...")."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a tier; use a name ({', '.join(str(t) for t in Tier)}) or Tier.X")
    return Tier.parse(value)


def triton_unusable() -> Optional[str]:
    """Why the Triton kernel cannot run here (None when it can): it needs the triton package and a CUDA device, or
    TRITON_INTERPRET=1 (its CPU interpreter, a test tool)."""
    import torch

    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "there is no CUDA device (and TRITON_INTERPRET=1, Triton's CPU interpreter, is not set)"
    return None


def check_cache_arguments(block_size, group_size, shadow, backend, evict_sliding, rotation_seed) -> None:
    """What AdaptiveCache can check without the model: types, ranges, and whether the backend can run here."""
    from .._native import cuda_kernels_available

    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"AdaptiveCache: block_size {block_size!r} is not accepted; expected a power of two "
                         f"from 1 to {MAX_BLOCK_SIZE} (an int)")
    if block_size <= 0 or block_size & (block_size - 1) or block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"AdaptiveCache: block_size {block_size} is not accepted; expected a power of two from 1 to "
                         f"{MAX_BLOCK_SIZE} (each layer allocates a whole block of tail in the model dtype at its "
                         "first update)")
    if group_size is not None:
        whole_number(group_size, "AdaptiveCache: group_size", 1)
    if shadow not in (None, "cpu"):
        raise ValueError(f"AdaptiveCache: shadow must be None or 'cpu' (a host copy), got {shadow!r}")
    if backend not in BACKENDS:
        raise ValueError(f"AdaptiveCache: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "cuda" and not cuda_kernels_available():
        raise ValueError("AdaptiveCache: backend 'cuda' needs the CUDA kernels (build with KVPREC_CUDA=ON against "
                         "a CUDA torch) and a GPU; use backend='auto', 'triton' or 'cpp'")
    if backend == "triton" and (why := triton_unusable()) is not None:
        raise ValueError(f"AdaptiveCache: backend 'triton' cannot run here: {why}; use backend='auto' or 'cpp'")
    if not isinstance(evict_sliding, bool):
        raise ValueError(f"AdaptiveCache: evict_sliding must be True or False, got {evict_sliding!r}")
    whole_number(rotation_seed, "AdaptiveCache: rotation_seed")


def config_head_dim(config) -> Optional[int]:
    """head_dim of a decoder text config: ``head_dim`` where set, else hidden_size / num_attention_heads (GPT-2's
    n_embd / n_head through its attribute map); None when the config says neither."""
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def check_model_geometry(head_dim: int, block_size: int, group_size: Optional[int], key_rotation: Optional[str],
                         backend: str, policy, where: str = "AdaptiveCache",
                         value_rotation: Optional[str] = None) -> BlockGeometry:
    """What needs the model's head_dim: the block geometry (group_size must divide head_dim), the Hadamard
    rotations of keys and values (head_dim a power of two), the Triton kernel's head_dims, and the policy's own
    check (a budget below what the floor tier's pages take at this geometry). ``where`` starts the messages.
    Returns the geometry."""
    try:
        geometry = BlockGeometry(block_size, head_dim, group_size)
    except ValueError as exc:
        raise ValueError(f"{where} (head_dim {head_dim}): {exc}") from None
    for argument, kind in (("key_rotation", key_rotation), ("value_rotation", value_rotation)):
        if kind == "hadamard" and head_dim & (head_dim - 1):
            raise ValueError(f"{where}: {argument}='hadamard': head_dim {head_dim} is not a power of two; use "
                             f"{argument}='orthogonal', which takes any head_dim")
    if backend == "triton":
        from ..ops import TRITON_DECODE_HEAD_DIMS

        if head_dim not in TRITON_DECODE_HEAD_DIMS:
            raise ValueError(f"{where}: backend 'triton' takes head_dim {', '.join(map(str, TRITON_DECODE_HEAD_DIMS))}"
                             f", not {head_dim}; use backend='auto' or 'cpp'")
    policy.check_geometry(geometry)
    return geometry
