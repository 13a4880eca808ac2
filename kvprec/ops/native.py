"""Fake (meta) kernels of every native op, in one place, so that torch.compile and opcheck can trace them.

The schemas are defined next to the C++ kernels (csrc/python/ops_*.cpp, TORCH_LIBRARY_FRAGMENT(kvprec, ...));
each op defined there gets its fake here. python_tests/test_ops_registry.py checks both directions.
"""
from __future__ import annotations

import torch

from .._native import native_available
from ..storage.formats import Tier

_FAKES = {}


def _fake(name):
    def wrap(fn):
        _FAKES[name] = fn
        return fn
    return wrap


def _metadata(x: torch.Tensor, shape):
    return torch.empty(shape, dtype=torch.float16, device=x.device)


@_fake("kvprec::quantize_keys")
def _quantize_keys_fake(x, tier):
    t = Tier.parse(tier)
    torch._check(x.dim() == 3, lambda: "quantize_keys: x must be [N, T, D]")
    n, tt, d = x.shape
    if not t.is_integer:
        return x.new_empty((n, tt, d), dtype=t.float_dtype), _metadata(x, (0,)), _metadata(x, (0,))
    return (x.new_empty((n, tt, d * t.bits // 8), dtype=torch.uint8), _metadata(x, (n, d)), _metadata(x, (n, d)))


@_fake("kvprec::quantize_values")
def _quantize_values_fake(x, tier, group_size):
    t = Tier.parse(tier)
    torch._check(x.dim() == 3, lambda: "quantize_values: x must be [N, T, D]")
    n, tt, d = x.shape
    if not t.is_integer:
        return x.new_empty((n, tt, d), dtype=t.float_dtype), _metadata(x, (0,)), _metadata(x, (0,))
    torch._check(d % group_size == 0, lambda: f"quantize_values: group_size {group_size} must divide head_dim {d}")
    g = d // group_size
    return (x.new_empty((n, tt, d * t.bits // 8), dtype=torch.uint8), _metadata(x, (n, tt, g)),
            _metadata(x, (n, tt, g)))


@_fake("kvprec::dequantize_keys")
def _dequantize_keys_fake(codes, scale, zero, tier, head_dim, dtype):
    return codes.new_empty((codes.shape[0], codes.shape[1], head_dim), dtype=dtype)


@_fake("kvprec::dequantize_values")
def _dequantize_values_fake(codes, scale, zero, tier, head_dim, group_size, dtype):
    return codes.new_empty((codes.shape[0], codes.shape[1], head_dim), dtype=dtype)


@_fake("kvprec::quantize_append")
def _quantize_append_fake(x, pages, codes, scale, zero, amax, tier, keys, group_size):
    # In place (codes, scale, zero, amax): nothing to return; the shape contract is what can be checked here.
    Tier.parse(tier)
    torch._check(3 <= x.dim() <= 5, lambda: "quantize_append: x must be [..., T, D] with 1 to 3 leading dims")
    torch._check(tuple(pages.shape) == tuple(x.shape[:-2]),
                 lambda: "quantize_append: pages must have shape x.shape[:-2]")
    torch._check(codes.dim() == 3 and codes.shape[1] == x.shape[-2],
                 lambda: "quantize_append: codes must be a [P, T, width] pool")
    return None


@_fake("kvprec::tier_table")
def _tier_table_fake():
    return torch.empty((len(Tier), 4), dtype=torch.int64)


# ------------------------------------------------------------------------------------------------------
# Analysis ops (csrc/python/ops_analysis.cpp): curvature and precision mapping

def _curvature_dtype(*xs):
    return torch.float64 if all(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_attention_ranks(op, q, k):
    torch._check(q.dim() in (3, 4), lambda: f"{op}: q must be [Hq, Q, D] or [B, Hq, Q, D]")
    torch._check(k.dim() == q.dim(), lambda: f"{op}: k must have q's rank")
    torch._check(q.shape[-3] % k.shape[-3] == 0, lambda: f"{op}: query heads must be a multiple of KV heads")


@_fake("kvprec::attention_curvature")
def _attention_curvature_fake(q, k, v, scale, causal):
    _check_attention_ranks("attention_curvature", q, k)
    shape = (*q.shape[:-1], k.shape[-2])
    dtype = _curvature_dtype(q, k, v)
    return tuple(q.new_empty(shape, dtype=dtype) for _ in range(4))


@_fake("kvprec::curvature_reduce")
def _curvature_reduce_fake(q, k, v, scale, causal, block_size, query_reduce="mean", block_reduce="max"):
    _check_attention_ranks("curvature_reduce", q, k)
    torch._check(block_size >= 1, lambda: "curvature_reduce: block_size must be >= 1")
    n = k.shape[-2]
    return (q.new_empty(k.shape[:-1], dtype=torch.float64),
            q.new_empty((*k.shape[:-2], (n + block_size - 1) // block_size), dtype=torch.float64))


@_fake("kvprec::attention_locality")
def _attention_locality_fake(q, k, scale, causal, window=64, anchor_factor=4.0, anchor_fraction=0.9,
                             cluster_threshold=0.8, top_clusters=4):
    _check_attention_ranks("attention_locality", q, k)
    heads = q.shape[:-2]
    f64 = torch.float64
    return (q.new_empty(heads, dtype=f64), q.new_empty(heads, dtype=f64),
            q.new_empty((*heads, k.shape[-2]), dtype=torch.bool), q.new_empty(heads, dtype=f64),
            q.new_empty(k.shape[:-1], dtype=torch.int64), q.new_empty(k.shape[:-2], dtype=torch.int64),
            q.new_empty(heads, dtype=f64))


@_fake("kvprec::required_bits")
def _required_bits_fake(kappa, c, head_dim, eps):
    return kappa.new_empty(kappa.shape, dtype=torch.float64)


@_fake("kvprec::map_tiers")
def _map_tiers_fake(bits, candidates, block_size, head_dim, group_size):
    return bits.new_empty(bits.shape, dtype=torch.int8)


@_fake("kvprec::tier_errors")
def _tier_errors_fake(kappa, candidates, c, head_dim):
    return kappa.new_empty((*kappa.shape, len(candidates)), dtype=torch.float64)


def _knapsack_fake(op, errors):
    torch._check(errors.dim() == 2, lambda: f"{op}: errors must be [items, choices]")
    return errors.new_empty((errors.shape[0],), dtype=torch.int64), errors.new_empty((4,), dtype=torch.float64)


@_fake("kvprec::knapsack_tiers")
def _knapsack_tiers_fake(errors, costs, budget, method="auto"):
    return _knapsack_fake("knapsack_tiers", errors)


@_fake("kvprec::knapsack_min_bytes")
def _knapsack_min_bytes_fake(errors, costs, max_error, method="auto"):
    return _knapsack_fake("knapsack_min_bytes", errors)


# ------------------------------------------------------------------------------------------------------
# Attention over the paged cache (csrc/python/ops_attention.cpp)

#: The ``Tensor?[] pools`` argument of kvprec::decode_attention: tier by tier, the float tiers' (k, v) and the
#: integer tiers' (k, k_scale, k_zero, v, v_scale, v_zero), given as indices into a PagedKV pool tuple
#: (k, k_scale, k_zero, v, v_scale, v_zero). 24 slots; the CUDA glue (csrc/cuda/decode_attention_cuda.cpp) reads
#: this order, and so does the Triton launcher's kernel signature.
DECODE_POOL_SLOTS = ((Tier.FP32, (0, 3)), (Tier.FP16, (0, 3)), (Tier.BF16, (0, 3)),
                     (Tier.INT8, (0, 1, 2, 3, 4, 5)), (Tier.INT4, (0, 1, 2, 3, 4, 5)), (Tier.INT2, (0, 1, 2, 3, 4, 5)))
DECODE_POOL_COUNT = sum(len(slots) for _, slots in DECODE_POOL_SLOTS)


def flatten_decode_pools(paged) -> list:
    """``paged.pools`` (a :class:`kvprec.ops.reference.PagedKV`'s {tier: pool tuple}) as the flat slot list of
    DECODE_POOL_SLOTS, None where a tier has no pool; each tensor contiguous (a no-op for the buffer's pools)."""
    flat = []
    for tier, slots in DECODE_POOL_SLOTS:
        pool = paged.pools.get(tier)
        flat += [None if pool is None or pool[i] is None else pool[i].contiguous() for i in slots]
    return flat


@_fake("kvprec::decode_attention")
def _decode_attention_fake(q, pools, tiers, pages, tail_k, tail_v, block_size, group_size, scale, mask,
                           sliding_window, softcap, block_mass, num_splits=0):
    torch._check(q.dim() == 4, lambda: f"decode_attention: q must be [B, Hq, Q, D], got {tuple(q.shape)}")
    torch._check(len(pools) == DECODE_POOL_COUNT,
                 lambda: f"decode_attention: pools must hold {DECODE_POOL_COUNT} slots (DECODE_POOL_SLOTS)")
    torch._check(tiers.dim() == 3 and tail_k.dim() == 4,
                 lambda: "decode_attention: tiers must be [B, Hkv, NB] and tail_k [B, Hkv, TL, D]")
    b, hq, nq, d = q.shape
    f32 = dict(dtype=torch.float32)
    if block_mass:
        nbt = tiers.shape[2] + (1 if tail_k.shape[2] > 0 else 0)
        mass = q.new_empty((b, hq, nq, nbt), **f32)
    else:
        mass = q.new_empty((0,), **f32)
    return q.new_empty((b, hq, nq, d)), q.new_empty((b, hq, nq), **f32), mass


def registered_fakes() -> dict:
    return dict(_FAKES)


if native_available():
    for _name, _fn in _FAKES.items():
        torch.library.register_fake(_name)(_fn)
