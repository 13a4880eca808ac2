"""The simulated eviction policies of the recall study, one file each (formula and paper in each docstring), on the
simulator of base.py. :func:`make` builds one by name; :class:`PolicyOptions` holds the policies' own settings."""
from __future__ import annotations

from dataclasses import dataclass

from .base import EvictionPolicy, PrefillStats, evict_lowest, restrict
from .h2o import H2O
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

POLICIES = {"h2o": H2O, "streaming": StreamingLLM, "tova": TOVA, "snapkv": SnapKV}


@dataclass(frozen=True)
class PolicyOptions:
    """The simulated policies' settings: H2O's recent share of the budget, StreamingLLM's sinks, SnapKV's
    observation window and pooling width."""

    h2o_recent: float = 0.5
    sinks: int = 4
    snapkv_window: int = 32
    snapkv_kernel: int = 5

    def make(self, name: str, rows: int, capacity: int, fraction: float) -> EvictionPolicy:
        own = {"h2o": {"recent": self.h2o_recent}, "streaming": {"sinks": self.sinks},
               "snapkv": {"window": self.snapkv_window, "kernel": self.snapkv_kernel}}
        return make(name, rows, capacity, fraction, **own.get(name, {}))


def make(name: str, rows: int, capacity: int, fraction: float, **options) -> EvictionPolicy:
    """A simulator of policy ``name`` (h2o, streaming, tova, snapkv) for ``rows`` rows of up to ``capacity``
    positions at budget ``fraction``; ``options`` are the policy's own (h2o: recent; streaming: sinks; snapkv:
    window, kernel)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; accepted: {', '.join(POLICIES)}")
    return POLICIES[name](rows, capacity, fraction, **options)


__all__ = ["EvictionPolicy", "PrefillStats", "PolicyOptions", "evict_lowest", "restrict", "make", "POLICIES", "H2O",
           "StreamingLLM", "TOVA", "SnapKV"]
