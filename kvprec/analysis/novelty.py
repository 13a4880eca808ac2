"""Key novelty: the dispatching entry point :func:`novelty` and :class:`NoveltyTracker`.

Definitions, shapes and the pure-torch reference: kvprec/ops/reference/novelty.py; the Triton kernel:
kvprec/ops/triton/novelty.py (op "novelty_reduce" in kvprec/ops/__init__.py).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import ops
from ..ops.reference.novelty import (NoveltyResult, _check_finite, _check_tensor, check_inputs,  # noqa: F401
                                    novelty_reference, window_basis)

# ---------------------------------------------------------------------------------------------------------
# Entry point: the reference or the Triton kernel, chosen by the op registry (kvprec/ops/__init__.py).

def _run(name: str, backend: str, device: torch.device) -> str:
    return ops.resolve_backend(name, backend, device)


def novelty(k_new: torch.Tensor, window: torch.Tensor, rank: int, *, backend: str = "auto") -> NoveltyResult:
    """Novelty of k_new [B, H, n, D] against window [B, H, W, D] with a top-``rank`` subspace:
    NoveltyResult(cosine, l2, residual), each FP32 [B, H, n]; see the module docstring.

    backend: "torch" (this module's reference, FP64), "triton" (kvprec/ops/triton/novelty.py: CUDA tensors, or
    CPU under TRITON_INTERPRET=1; FP32), "auto" (triton on CUDA where installed, else the reference). There is no
    native kernel ("cpp" / "cuda" raise). Bad arguments raise ValueError naming the argument."""
    check_inputs("novelty_reduce", k_new, window, rank, finite=False)  # before touching .device
    which = _run("novelty_reduce", backend, k_new.device)
    if which == "triton":
        return NoveltyResult(*ops.REGISTRY["novelty_reduce"].triton(k_new, window, rank))
    return novelty_reference(k_new, window, rank)


class NoveltyTracker:
    """Rolling window of the last ``window`` keys per layer, and the novelty of each new key against it.

    ``observe(layer_idx, k_new)`` with k_new [B, H, n, D]: compares the n keys with the layer's window as it was
    BEFORE this call (all n against the same window, not against each other), then appends them in order and
    keeps the newest ``window`` keys (so n > window keeps only the last ``window`` of k_new). While fewer than
    ``window`` keys have been seen the window holds all of them, and the rank used is min(rank, keys held).

    First call of a layer (nothing held): the window is empty, and the result is that of a window of zeros (mean
    0, empty subspace): cosine 1, l2 = ||k||, residual 1 (0 for a zero key). All values are finite.

    The window is stored in FP32 (exact for FP16 / BF16 / FP32 keys) as [B, H, <= window, D]; B, H, D and the
    device must stay the same per layer (ValueError otherwise; ``reset()`` forgets everything). ``backend`` is
    passed to :func:`novelty`.
    """

    def __init__(self, window: int, rank: int, *, backend: str = "auto"):
        for name, v in (("window", window), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NoveltyTracker: {name} must be a positive integer, got {v!r}")
        if rank > window:
            raise ValueError(f"NoveltyTracker: rank {rank} exceeds window {window}; accepted 1 <= rank <= window")
        if backend not in ops.BACKENDS:
            raise ValueError(f"NoveltyTracker: backend {backend!r} is not accepted; use one of "
                             f"{', '.join(ops.BACKENDS)}")
        self.window = window
        self.rank = rank
        self.backend = backend
        self._keys: Dict[int, torch.Tensor] = {}

    def keys(self, layer_idx: int) -> Optional[torch.Tensor]:
        """The keys held for a layer, oldest first: FP32 [B, H, <= window, D], or None before its first call."""
        return self._keys.get(layer_idx)

    def reset(self) -> None:
        self._keys.clear()

    def observe(self, layer_idx: int, k_new: torch.Tensor) -> NoveltyResult:
        """Novelty of k_new [B, H, n, D] against the layer's window, then roll k_new in (class docstring)."""
        held = self._keys.get(layer_idx)
        if held is None:
            _check_tensor("NoveltyTracker.observe", "k_new", k_new, "[B, H, n, D]")
            _check_finite("NoveltyTracker.observe", "k_new", k_new)
            if k_new.shape[-1] < self.rank:
                raise ValueError(f"NoveltyTracker.observe: rank {self.rank} exceeds head_dim {k_new.shape[-1]}; "
                                 "accepted rank <= head_dim")
            result = self._first(k_new)
            fresh = k_new.float()
        else:
            _check_tensor("NoveltyTracker.observe", "k_new", k_new, "[B, H, n, D]")
            if k_new.shape[:2] != held.shape[:2] or k_new.shape[3] != held.shape[3]:
                raise ValueError(f"NoveltyTracker.observe: k_new {list(k_new.shape)} does not match layer "
                                 f"{layer_idx}'s window {list(held.shape)} in batch, heads or head_dim "
                                 "(reset() to start over)")
            result = novelty(k_new, held, min(self.rank, held.shape[2]), backend=self.backend)
            fresh = torch.cat([held, k_new.float()], dim=2)
        if fresh.shape[2]:
            self._keys[layer_idx] = fresh[:, :, -self.window:].contiguous()
        return result

    @staticmethod
    def _first(k_new: torch.Tensor) -> NoveltyResult:
        knorm = k_new.double().norm(dim=-1)
        ones = torch.ones_like(knorm, dtype=torch.float32)
        return NoveltyResult(ones, knorm.float(), (knorm > 0).float())
