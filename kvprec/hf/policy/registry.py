"""The policy registry: a policy from its name and arguments, ``"name:arg,key=value"`` (grammar in
kvprec/hf/policy/__init__.py)."""
from __future__ import annotations

import inspect
from typing import Callable, Dict

from ...storage.formats import Tier
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


def _takes_tier(parameter: inspect.Parameter) -> bool:
    """Whether a factory parameter is a tier (annotated ``Tier | str | int``): its text stays text, so a tier in a
    policy string is always a name ("uniform:1" is refused rather than read as tier id 1, FP16)."""
    return "Tier" in str(parameter.annotation)


def _parse(spec: str, arg_text: str) -> tuple[list, dict]:
    """``"a,b,key=value"`` -> (["a", "b"], {"key": "value"}), texts stripped; refuses a key given twice, an empty
    key and a positional argument after a keyword one."""
    args, kwargs = [], {}
    for item in filter(None, (a.strip() for a in arg_text.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if eq and not key:
            raise ValueError(f"policy {spec!r}: {item!r} has no name before '='")
        if eq and key in kwargs:
            raise ValueError(f"policy {spec!r}: {key!r} is given twice")
        if eq:
            kwargs[key] = val.strip()
        elif kwargs:
            raise ValueError(f"policy {spec!r}: positional argument {item!r} after keyword arguments")
        else:
            args.append(item)
    return args, kwargs


def get(spec: "Policy | str") -> Policy:
    """A policy from a Policy (returned as is) or a name with optional arguments, ``"name:a,b,key=value"``.

    Arguments bind to the factory's parameters as in a Python call (a parameter given twice, by position and by
    name or by name twice, is refused); numbers are read as int or float, except for tier parameters, which take
    tier names only.
    """
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
    factory = _FACTORIES[name]
    args, kwargs = _parse(spec, arg_text)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a factory without a signature: plain conversion
        signature = None
    if signature is not None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            accepted = ", ".join(p for p in signature.parameters if p != "self")
            raise ValueError(f"policy {spec!r}: bad arguments ({exc}); {name} takes {accepted}") from None
        for key, text in bound.arguments.items():
            parameter = signature.parameters[key]
            if _takes_tier(parameter):
                if not isinstance(_value(text), str):
                    raise ValueError(f"policy {spec!r}: {key}={text}: a tier in a policy string is a name "
                                     f"({', '.join(str(t) for t in Tier)}), not a number")
                continue
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                bound.arguments[key] = tuple(_value(t) for t in text)
            elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
                bound.arguments[key] = {k: _value(t) for k, t in text.items()}
            else:
                bound.arguments[key] = _value(text)
        args, kwargs = list(bound.args), dict(bound.kwargs)
    else:
        args, kwargs = [_value(a) for a in args], {k: _value(v) for k, v in kwargs.items()}
    try:
        return factory(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"policy {spec!r}: bad arguments ({exc})") from exc
