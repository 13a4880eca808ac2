"""Fake (meta) kernels of every native op, in one place, so that torch.compile and opcheck can trace them.

The schemas are defined next to the C++ kernels (csrc/python/ops_*.cpp, TORCH_LIBRARY_FRAGMENT(kvprec, ...));
each op defined there gets its fake here. python_tests/test_ops_registry.py checks both directions.
"""
from __future__ import annotations

import torch

from ._native import native_available
from .formats import Tier

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


@_fake("kvprec::tier_table")
def _tier_table_fake():
    return torch.empty((len(Tier), 4), dtype=torch.int64)


def registered_fakes() -> dict:
    return dict(_FAKES)


if native_available():
    for _name, _fn in _FAKES.items():
        torch.library.register_fake(_name)(_fn)
