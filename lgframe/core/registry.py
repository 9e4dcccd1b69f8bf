"""The constraint registry: names in recipes -> Constraint classes.

Built-in constraints (lgframe.strategies) register when the registry is first
asked; third-party ones through the entry-point group `lgframe.constraints`.
A wrong name gets the list of registered ones, a duplicate name raises naming
both definitions, and a broken or colliding entry point is reported with its
distribution instead of being skipped in silence.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import warnings
from typing import Any

from lgframe.core.constraint import Constraint, ConstraintSpec
from lgframe.errors import LgframeError

_REGISTRY: dict[str, type[Constraint]] = {}
_plugins_loaded = False
BUILTINS = "lgframe.strategies"  # the built-in plugins, one file each (a layer above this one)


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_constraint(cls: type[Constraint]) -> type[Constraint]:
    """Class decorator: makes `cls` available as `constraint: <cls.name>`. A second
    class under a name already taken raises, naming both definitions (re-running
    the same definition, e.g. a reloaded module, replaces it)."""
    if not (isinstance(cls, type) and issubclass(cls, Constraint)):
        raise LgframeError(f"register_constraint: {cls!r} is not a subclass of lgframe's Constraint")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise LgframeError(f"register_constraint: {_where(cls)} has no `name` (the value recipes use: constraint: NAME)")
    old = _REGISTRY.get(name)
    if old is not None and _where(old) != _where(cls):
        raise LgframeError(
            f"constraint name '{name}' is registered twice: by {_where(old)} and by {_where(cls)}; give one of them "
            "another `name`."
        )
    _REGISTRY[name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    # The built-ins import this module, so they are found by name, not imported here.
    importlib.import_module(BUILTINS)
    for ep in importlib.metadata.entry_points(group="lgframe.constraints"):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an unknown distribution"
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break lgframe
            warnings.warn(f"lgframe: constraint plugin '{ep.name}' = {ep.value} (from {dist}) failed to load: {e}",
                          stacklevel=2)
            continue
        if not (isinstance(obj, type) and issubclass(obj, Constraint)):
            warnings.warn(f"lgframe: entry point '{ep.name}' = {ep.value} (from {dist}) is not a Constraint subclass; "
                          "it was not registered", stacklevel=2)
            continue
        name = getattr(obj, "name", ep.name)
        if name in _REGISTRY and _where(_REGISTRY[name]) != _where(obj):
            warnings.warn(f"lgframe: entry point '{ep.name}' = {ep.value} (from {dist}) names constraint '{name}', "
                          f"which {_where(_REGISTRY[name])} already registered; it was not registered", stacklevel=2)
            continue
        register_constraint(obj)


def constraint_names() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def constraint_class(name: str) -> type[Constraint]:
    _load_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise LgframeError(
            f"unknown constraint '{name}'.{hint} Registered constraints: {', '.join(sorted(_REGISTRY))}. "
            "Third-party constraints register through the entry-point group 'lgframe.constraints'."
        )
    return _REGISTRY[name]


def get_constraint(spec: Any) -> Constraint:
    """A constraint from a name, `{name: ..., **options}`, `{name:, options: {}}` or ConstraintSpec."""
    if isinstance(spec, Constraint):
        return spec
    if isinstance(spec, ConstraintSpec):
        return constraint_class(spec.name)(**spec.options)
    if isinstance(spec, str):
        return constraint_class(spec)()
    if hasattr(spec, "items"):
        d = dict(spec.items())
        if "name" not in d:
            raise LgframeError(f"constraint {d} has no `name`; registered: {', '.join(constraint_names())}")
        name = d.pop("name")
        options = dict(d.pop("options", None) or {}) | d
        return constraint_class(name)(**options)
    raise LgframeError(f"constraint must be a name or a mapping with `name`, got {spec!r}")


