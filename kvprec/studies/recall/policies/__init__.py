"""The simulated eviction policies of the recall study, one file each (formula and paper in each docstring), on the
simulator of base.py. :func:`make` builds one by name."""
from __future__ import annotations

from .base import EvictionPolicy, PrefillStats, evict_lowest, restrict
from .h2o import H2O
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

POLICIES = {"h2o": H2O, "streaming": StreamingLLM, "tova": TOVA, "snapkv": SnapKV}


def make(name: str, rows: int, capacity: int, fraction: float, **options) -> EvictionPolicy:
    """A simulator of policy ``name`` (h2o, streaming, tova, snapkv) for ``rows`` rows of up to ``capacity``
    positions at budget ``fraction``; ``options`` are the policy's own (h2o: recent; streaming: sinks; snapkv:
    window, kernel)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; accepted: {', '.join(POLICIES)}")
    return POLICIES[name](rows, capacity, fraction, **options)


__all__ = ["EvictionPolicy", "PrefillStats", "evict_lowest", "restrict", "make", "POLICIES", "H2O", "StreamingLLM",
           "TOVA", "SnapKV"]
