"""The op table behind kvprec/ops/__init__.py: each op's reference, native name and Triton launcher, and the
capability checks that pick the backend (``resolve_backend``). The Triton launchers (kvprec/ops/triton/) attach
themselves here, so they import this module and never the entry points above it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from .._native import BUILD_HINT, NATIVE_ERROR, cuda_kernels_available, native_available

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
_AUTO_ORDER = ("cuda", "triton", "torch")


@dataclass
class OpEntry:
    """One op: its reference, the native op name (if any) and optional Triton launcher."""

    name: str
    reference: Callable
    native: Optional[str] = None  # "kvprec::<name>" if the native library implements it
    triton: Optional[Callable] = None
    notes: Dict[str, str] = field(default_factory=dict)


REGISTRY: Dict[str, OpEntry] = {}


def register(name: str, reference: Callable, native: Optional[str] = None) -> OpEntry:
    if name in REGISTRY:
        raise ValueError(f"op {name!r} is already registered")
    REGISTRY[name] = OpEntry(name, reference, native)
    return REGISTRY[name]


def register_triton(name: str, launcher: Callable) -> None:
    """Attach a Triton launcher to an op (from kvprec/ops/triton, never at import of triton_kernels)."""
    REGISTRY[name].triton = launcher


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _why_unavailable(entry: OpEntry, backend: str, device: torch.device) -> Optional[str]:
    if backend == "torch":
        return None
    if backend in ("cpp", "cuda"):
        if entry.native is None:
            return "the native library has no kernel for this op"
        if not native_available():
            return f"the native library did not load ({NATIVE_ERROR}); {BUILD_HINT}"
        key = "CPU" if backend == "cpp" else "CUDA"
        if backend == "cpp" and device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device}"
        if backend == "cuda" and (device.type != "cuda" or not cuda_kernels_available()):
            return f"needs CUDA tensors and a build with KVPREC_CUDA (device {device}, CUDA kernels built: " \
                   f"{cuda_kernels_available()})"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(entry.native, key):
            return f"no {key} kernel registered for {entry.native}"
        return None
    if backend == "triton":
        if entry.triton is None:
            return "no Triton kernel is registered for this op"
        if not _triton_usable(device):
            return f"Triton needs a CUDA device or TRITON_INTERPRET=1 (device {device})"
        return None
    return f"unknown backend; accepted {', '.join(BACKENDS)}"


def resolve_backend(name: str, backend: str, device: torch.device) -> str:
    """The backend that will run op ``name`` for tensors on ``device``; raises if ``backend`` cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not accepted; use one of {', '.join(BACKENDS)}")
    entry = REGISTRY[name]
    if backend == "auto":
        for candidate in _AUTO_ORDER:
            # The Triton interpreter is a test tool, orders of magnitude slower than the reference: auto uses
            # Triton on CUDA tensors only; backend="triton" still runs it where TRITON_INTERPRET=1.
            if candidate == "triton" and device.type != "cuda":
                continue
            if _why_unavailable(entry, candidate, device) is None:
                return candidate
        raise RuntimeError(f"{name}: no backend available on {device}")  # torch always is; defensive
    why = _why_unavailable(entry, backend, device)
    if why is not None:
        raise RuntimeError(f"{name}: backend={backend!r} is unavailable: {why}")
    return backend


#: head_dim values the Triton decode kernel is compiled for (kvprec/ops/triton/decode_attention.py checks them).
TRITON_DECODE_HEAD_DIMS = (64, 128, 256)
