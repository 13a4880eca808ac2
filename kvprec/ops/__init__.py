"""The one op registry: every kvprec op, its pure-torch reference, and the backends that implement it.

Callers use the functions here (or ``torch.ops.kvprec.*`` for the native kernels directly). Each function
takes ``backend="auto" | "torch" | "cpp" | "cuda" | "triton"``:

* ``torch``  the pure-torch reference (kvprec/ops/reference/): the CPU default and the test oracle;
* ``cpp``    the C++ CPU kernel in the native library (bit-identical to the reference);
* ``cuda``   the CUDA kernel in the native library (built with KVPREC_CUDA, tensors on a GPU);
* ``triton`` a Triton kernel (tensors on a GPU, or any device under TRITON_INTERPRET=1);
* ``auto``   cuda, then triton, then torch, each only after its capability check.

An explicitly requested backend that is unavailable raises a clear error; nothing falls back silently.
:func:`resolve_backend` returns which backend runs, so callers and benchmarks can report it.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import native  # noqa: F401  (registers the fake kernels)
from .reference import quantize as quantize_ref
from ..storage.formats import QuantizedBlock, Tier

from .registry import (BACKENDS, REGISTRY, TRITON_DECODE_HEAD_DIMS, OpEntry, _why_unavailable,  # noqa: F401
                       register, register_triton, resolve_backend)


# ------------------------------------------------------------------------------------------------------
# Storage-format ops

register("quantize_keys", quantize_ref.quantize_keys, native="kvprec::quantize_keys")
register("quantize_values", quantize_ref.quantize_values, native="kvprec::quantize_values")
register("dequantize_keys", quantize_ref.dequantize_keys, native="kvprec::dequantize_keys")
register("dequantize_values", quantize_ref.dequantize_values, native="kvprec::dequantize_values")


def _block_from_native(out, tier: Tier) -> QuantizedBlock:
    codes, scale, zero = out
    return QuantizedBlock(codes, scale, zero) if tier.is_integer else QuantizedBlock(codes)


def _meta_or_empty(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else torch.empty(0, dtype=torch.float16, device=like.device)


def quantize_keys(x: torch.Tensor, tier, *, backend: str = "auto") -> QuantizedBlock:
    """Keys [N, T, D] -> QuantizedBlock (per-channel scale/zero [N, D]). See kvprec.storage.formats for the layout."""
    tier = Tier.parse(tier)
    b = resolve_backend("quantize_keys", backend, x.device)
    if b == "torch":
        return quantize_ref.quantize_keys(x, tier)
    if b == "triton":
        return REGISTRY["quantize_keys"].triton(x, tier)
    return _block_from_native(torch.ops.kvprec.quantize_keys(x, int(tier)), tier)


def quantize_values(x: torch.Tensor, tier, group_size: int, *, backend: str = "auto") -> QuantizedBlock:
    """Values [N, T, D] -> QuantizedBlock (per token and group of ``group_size`` channels)."""
    tier = Tier.parse(tier)
    b = resolve_backend("quantize_values", backend, x.device)
    if b == "torch":
        return quantize_ref.quantize_values(x, tier, group_size)
    if b == "triton":
        return REGISTRY["quantize_values"].triton(x, tier, group_size)
    return _block_from_native(torch.ops.kvprec.quantize_values(x, int(tier), group_size), tier)


def dequantize_keys(q: QuantizedBlock, tier, head_dim: int, dtype: torch.dtype, *,
                    backend: str = "auto") -> torch.Tensor:
    tier = Tier.parse(tier)
    b = resolve_backend("dequantize_keys", backend, q.codes.device)
    if b == "torch":
        return quantize_ref.dequantize_keys(q, tier, head_dim, dtype)
    if b == "triton":
        return REGISTRY["dequantize_keys"].triton(q, tier, head_dim, dtype)
    return torch.ops.kvprec.dequantize_keys(q.codes, _meta_or_empty(q.scale, q.codes), _meta_or_empty(q.zero, q.codes),
                                            int(tier), head_dim, dtype)


def dequantize_values(q: QuantizedBlock, tier, head_dim: int, group_size: int, dtype: torch.dtype, *,
                      backend: str = "auto") -> torch.Tensor:
    tier = Tier.parse(tier)
    b = resolve_backend("dequantize_values", backend, q.codes.device)
    if b == "torch":
        return quantize_ref.dequantize_values(q, tier, head_dim, group_size, dtype)
    if b == "triton":
        return REGISTRY["dequantize_values"].triton(q, tier, head_dim, group_size, dtype)
    return torch.ops.kvprec.dequantize_values(q.codes, _meta_or_empty(q.scale, q.codes),
                                              _meta_or_empty(q.zero, q.codes), int(tier), head_dim, group_size, dtype)


register("quantize_append", quantize_ref.quantize_append, native="kvprec::quantize_append")


def quantize_append(x: torch.Tensor, tier, pages: torch.Tensor, codes: torch.Tensor,
                    scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None, *, keys: bool,
                    group_size: int = 32, amax: Optional[torch.Tensor] = None, check: bool = True,
                    backend: str = "auto") -> torch.Tensor:
    """Quantize whole blocks x [..., T, D] at ``tier`` straight into ``pages`` of a pool, in place; returns amax.

    The op behind the buffer's seal: FP16 read once, codes / scale / zero written once into the pool
    (``codes`` ``[P, T, D*bits/8]`` uint8, ``scale``/``zero`` FP16 keys ``[P, D]``, values ``[P, T, D/G]``; float
    tiers ``codes [P, T, D]`` in the tier dtype, no scale/zero). ``pages`` (int32/int64, shape x.shape[:-2]):
    block i goes to page pages[i]; negative entries skip their block. Pages get exactly what
    :func:`quantize_keys` / :func:`quantize_values` give (see :func:`kvprec.quantize_ref.quantize_append`).

    amax: float32 [1] accumulated as max(amax, max |x|) over the blocks written (a new zero tensor when None);
    pass the same tensor to several calls to check them all with one synchronisation. ``check=True`` does that
    synchronisation now and raises ValueError naming x where the tier's range contract fails (integer tiers:
    finite, |x| <= 65504; fp16 tier from a wider dtype: |x| <= 65504), and for device-held pages >= P; the pages
    named have then been written with unspecified bytes (nothing outside them is touched).

    backend: "torch" (reference), "cpp" (CPU kernel), "cuda", "triton"; "auto" picks cuda, then triton (CUDA
    tensors only), then torch.
    """
    tier = Tier.parse(tier)
    b = resolve_backend("quantize_append", backend, x.device)
    if amax is None:
        amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    if b == "torch":
        quantize_ref.quantize_append(x, tier, pages, codes, scale, zero, amax, keys=keys, group_size=group_size)
    elif b == "triton":
        REGISTRY["quantize_append"].triton(x, tier, pages, codes, scale, zero, amax, keys=keys, group_size=group_size)
    else:
        torch.ops.kvprec.quantize_append(x, pages, codes, scale, zero, amax, int(tier), keys, group_size)
    if check:
        if pages.device.type != "cpu" and pages.numel():
            value, hi = torch.stack([amax.reshape(()).double(), pages.max().double()]).tolist()  # one sync
            if hi >= codes.shape[0]:
                raise ValueError(f"quantize_append: pages holds {int(hi)}, out of range; the pool holds "
                                 f"{codes.shape[0]} pages (those blocks were skipped)")
            amax_host = torch.tensor([value], dtype=torch.float32)
        else:
            amax_host = amax
        quantize_ref.check_append_amax(amax_host, tier, x.dtype, "quantize_append: x")
    return amax


# ------------------------------------------------------------------------------------------------------
# Analysis ops: curvature (kvprec/analysis/curvature.py) and precision mapping (kvprec/analysis/precision.py). Their
# entry points live in those modules; the references registered here are the CPU default and the oracle.
from .reference import curvature as _curvature  # noqa: E402
from .reference import precision as _precision  # noqa: E402

register("attention_curvature", _curvature.attention_curvature_reference, native="kvprec::attention_curvature")
register("curvature_reduce", _curvature.curvature_reduce_reference, native="kvprec::curvature_reduce")
register("curvature_sum_max", _curvature.curvature_sum_max_reference)
register("attention_locality", _curvature.attention_locality_reference, native="kvprec::attention_locality")
register("required_bits", _precision.required_bits_reference, native="kvprec::required_bits")
register("map_tiers", _precision.map_tiers_reference, native="kvprec::map_tiers")
register("tier_errors", _precision.tier_errors_reference, native="kvprec::tier_errors")
register("knapsack_tiers", _precision.knapsack_tiers_reference, native="kvprec::knapsack_tiers")
register("knapsack_min_bytes", _precision.knapsack_min_bytes_reference, native="kvprec::knapsack_min_bytes")


# ------------------------------------------------------------------------------------------------------
# Decode attention over mixed tiers: reference kvprec/ops/reference/decode_attention.py (block by block, FP32),
# Triton kernels kvprec/ops/triton/ (flash-decoding). The Triton launchers of this op and of the format ops are
# attached lazily: importing kvprec must not import triton, so a stand-in imports kvprec.ops.triton (which
# registers the real launchers) on its first call. It is attached only where triton is installed, so that
# resolve_backend says "no Triton kernel" where there is none.
import importlib.util as _importlib_util  # noqa: E402

from .reference import PagedKV  # noqa: E402
from .reference.decode_attention import decode_attention as _decode_attention_reference  # noqa: E402

register("decode_attention", _decode_attention_reference, native="kvprec::decode_attention")

_TRITON_OPS = ("decode_attention", "quantize_keys", "quantize_values", "dequantize_keys", "dequantize_values",
               "quantize_append")


class _LazyTritonLauncher:
    """Imports kvprec.ops.triton on the first call, then forwards to the launcher that import registered."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        from . import triton  # noqa: F401  (registers the launchers, replacing this stand-in)

        launcher = REGISTRY[self.name].triton
        if isinstance(launcher, _LazyTritonLauncher):
            raise RuntimeError(f"{self.name}: kvprec.ops.triton did not register a Triton launcher")
        return launcher(*args, **kwargs)


if _importlib_util.find_spec("triton") is not None:
    for _name in _TRITON_OPS:
        if REGISTRY[_name].triton is None:
            register_triton(_name, _LazyTritonLauncher(_name))


#: head_dim values the CUDA decode kernel is instantiated for (csrc/cuda/decode_attention_kernels.cu).
CUDA_DECODE_HEAD_DIMS = (64, 128, 256)


def cuda_decode_fits(q: torch.Tensor, block_size: int) -> bool:
    """Whether the CUDA decode kernel takes these inputs: float16/bfloat16 q [B, Hq, Q, D] with D in
    CUDA_DECODE_HEAD_DIMS, block_size >= 16 (a power of two, as every buffer's is)."""
    return (q.dim() == 4 and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in CUDA_DECODE_HEAD_DIMS
            and block_size >= 16)


def decode_attention(q: torch.Tensor, paged: PagedKV, *, scale: Optional[float] = None,
                     mask: Optional[torch.Tensor] = None, sliding_window: int = 0, softcap: float = 0.0,
                     block_mass: bool = False, backend: str = "auto"):
    """Attention of q [B, Hq, Q, D] (the Q newest positions, bottom-right causal) over a paged mixed-tier cache.

    GQA without repeating K/V (query head h reads KV head h // (Hq / Hkv)); scores
    s = softcap * tanh(scale * q.k / softcap) (no cap when softcap = 0; scale defaults to 1/sqrt(D)), masked to
    keys t <= p, t > p - sliding_window (when > 0) and ``mask[b, i, t]`` (optional bool [B, Q, N]).
    Returns (out [B, Hq, Q, D] in q's dtype, lse FP32 [B, Hq, Q], block_mass FP32 [B, Hq, Q, NB + (1 if tail)]
    or None): block_mass[j] is the softmax probability of block j (the tail last); rows sum to 1. A query that
    may attend to nothing gets out 0, lse -inf, block mass 0. See kvprec/ops/reference/decode_attention.py.

    backend: "torch" (reference), "cuda" (CUDA flash-decoding kernel, csrc/cuda/decode_attention_kernels.cu:
    float16/bfloat16 q, head_dim 64/128/256, block_size a power of two >= 16), "triton" (flash-decoding kernels;
    CUDA, or CPU under TRITON_INTERPRET=1), "auto" (cuda where built and the inputs fit it, else triton on CUDA
    where installed, else torch).
    """
    b = resolve_backend("decode_attention", backend, q.device)
    kwargs = dict(scale=scale, mask=mask, sliding_window=sliding_window, softcap=softcap, block_mass=block_mass)
    if b == "cuda":
        fits = cuda_decode_fits(q, paged.block_size)
        if backend == "auto" and not fits:  # a capability check, not a fallback: backend="cuda" gets the error
            triton_ok = _why_unavailable(REGISTRY["decode_attention"], "triton", q.device) is None
            b = "triton" if triton_ok else "torch"
        else:
            import math

            from .native import flatten_decode_pools
            from .reference.decode_attention import check_inputs

            check_inputs(q, paged, mask, sliding_window, softcap)
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            out, lse, mass = torch.ops.kvprec.decode_attention(
                q, flatten_decode_pools(paged), paged.tiers, paged.pages, paged.tail_k, paged.tail_v, paged.block_size,
                paged.group_size, scale, mask, int(sliding_window), float(softcap), bool(block_mass))
            return out, lse, (mass if block_mass else None)
    if b == "triton":
        return REGISTRY["decode_attention"].triton(q, paged, **kwargs)
    return _decode_attention_reference(q, paged, **kwargs)


# The Triton curvature reduction (kvprec/ops/triton/curvature.py), attached lazily like the ops above; its entry
# point is kvprec.analysis.curvature.curvature_reduce.
if _importlib_util.find_spec("triton") is not None:
    for _name in ("curvature_reduce", "curvature_sum_max"):
        if REGISTRY[_name].triton is None:
            register_triton(_name, _LazyTritonLauncher(_name))


# ------------------------------------------------------------------------------------------------------
# Novelty reduction: cosine / L2 distance of new keys from the window mean and their residual
# outside the window's top-r subspace. Reference kvprec/analysis/novelty.py (no native kernel); its entry point
# is kvprec.analysis.novelty.novelty. The Triton launcher (kvprec/ops/triton/novelty.py) is attached lazily like
# the ops above.
from .reference import novelty as _novelty  # noqa: E402

register("novelty_reduce", _novelty.novelty_reference)
if _importlib_util.find_spec("triton") is not None and REGISTRY["novelty_reduce"].triton is None:
    register_triton("novelty_reduce", _LazyTritonLauncher("novelty_reduce"))
