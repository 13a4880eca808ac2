"""The policy registry: a policy from its name and arguments, ``"name:arg,key=value"`` (grammar in
kvprec/hf/policy/__init__.py)."""
from __future__ import annotations

from typing import Callable, Dict

from .attention_mass import AttentionMass
from .base import Policy
from .sink_window import SinkWindow
from .uniform import Uniform

_FACTORIES: Dict[str, Callable[..., Policy]] = {
    "uniform": Uniform,
    "sink_window": SinkWindow,
    "attention_mass": AttentionMass,
}


def register(name: str, factory: Callable[..., Policy]) -> None:
    """Make ``get(name + ":args")`` call ``factory(*args, **kwargs)``."""
    if name in _FACTORIES or name in ("budget", "curvature"):
        raise ValueError(f"policy name {name!r} is already taken")
    _FACTORIES[name] = factory


def names() -> list[str]:
    return sorted(_FACTORIES)


def _value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def get(spec: "Policy | str") -> Policy:
    """A policy from a Policy (returned as is) or a name with optional arguments, ``"name:a,b,key=value"``."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"policy: expected a kvprec.policy.Policy or a name such as 'uniform:int4', got "
                        f"{type(spec).__name__}")
    name, _, arg_text = spec.partition(":")
    name = name.strip()
    if name == "budget":
        raise ValueError("policy 'budget' wraps another policy: use kvprec.policy.budget(policy, bytes=... or "
                         "bits_per_element=...)")
    if name == "curvature":
        raise ValueError("policy 'curvature' needs a calibration run, so it cannot be made from a name: use "
                         "kvprec.policy.Curvature.calibrate(model, input_ids, bits_per_element=... or mode=...)")
    if name not in _FACTORIES:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(names())} (and budget(...))")
    args, kwargs = [], {}
    for item in filter(None, (a.strip() for a in arg_text.split(","))):
        key, eq, val = item.partition("=")
        if eq:
            kwargs[key.strip()] = _value(val.strip())
        elif kwargs:
            raise ValueError(f"policy {spec!r}: positional argument {item!r} after keyword arguments")
        else:
            args.append(_value(item))
    try:
        return _FACTORIES[name](*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"policy {spec!r}: bad arguments ({exc})") from exc
