"""Precision policies: how the tier of each sealed KV block is chosen (one file per policy).

Look a policy up by name with :func:`get`: ``"name"`` or ``"name:arg,arg,key=value"``, e.g. ``"uniform:int4"``,
``"sink_window:sinks=4,window=256,rest=int4,recent=fp16"``, ``"attention_mass:keep=0.25"``. Arguments bind to the
policy's parameters as in a Python call (positional first, a parameter given twice is refused); tiers are names
(``fp32 fp16 bf16 int8 int4 int2``, never ids), token counts whole numbers, ``keep`` a fraction. The budget wrapper
takes a policy object or name: ``budget("attention_mass", bits_per_element=4)``. New policies join with
:func:`register`. The curvature policy needs a calibration run, so it has no name form: build it with
``Curvature.calibrate(model, input_ids, bits_per_element=...)`` (it can be wrapped by ``budget(...)`` as well).
"""
from __future__ import annotations

from .attention_mass import AttentionMass, attention_mass
from .base import AttentionStats, Policy, SealStats, demote_to
from .budget import Budget, BudgetError, budget
from .curvature import Curvature
from .sink_window import SinkWindow, sink_window
from .uniform import Uniform, uniform
from .registry import get, names, register

__all__ = ["Policy", "SealStats", "AttentionStats", "demote_to", "get", "register", "names", "Uniform", "uniform",
           "SinkWindow", "sink_window", "AttentionMass", "attention_mass", "Budget", "BudgetError", "budget",
           "Curvature"]
