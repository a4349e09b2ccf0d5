"""Two small registries, so users can add their own families.

* Adapters (:func:`register_adapter`): which adapter runs a model, picked by a predicate.
* Families (:func:`register_family`): how a model family is described as a JSON spec and rebuilt
  from it (:func:`family_spec`, :func:`errwrap.adapters.specs.build_base`). The family modules
  (``smp``, ``torchvision``, ``transformers``, ``deeplab``) each declare a :class:`Family`;
  :mod:`errwrap.adapters.builtin` registers them, so no module imports a family module back.

Example:
    >>> from errwrap.adapters import BaseAdapter, register_adapter
    >>> @register_adapter("my-family", lambda m: type(m).__name__ == "MyNet")
    ... class MyNetAdapter(BaseAdapter):
    ...     def forward(self, model, x):
    ...         ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from .base import Adapter, NativeAdapter

__all__ = [
    "register_adapter",
    "unregister_adapter",
    "registered_adapters",
    "find_adapter",
    "Family",
    "register_family",
    "unregister_family",
    "registered_families",
    "get_family",
    "family_spec",
    "FAMILY_BUILDERS",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    name: str
    matches: Callable[[nn.Module], bool]
    factory: Callable[..., Adapter]
    priority: int


_REGISTRY: dict[str, _Entry] = {}


def register_adapter(
    name: str,
    matches: Callable[[nn.Module], bool],
    factory: Callable[..., Adapter] | None = None,
    *,
    priority: int = 0,
) -> Any:
    """Register ``factory(model, **options) -> Adapter`` for models where ``matches(model)``.

    Usable as a decorator on the adapter class (then ``factory`` is the class). Higher
    ``priority`` is tried first; user registrations default to 0, built-ins use -10, so a
    user's adapter wins over a built-in one for the same model.
    """

    def add(f: Callable[..., Adapter]) -> Callable[..., Adapter]:
        if name in _REGISTRY:
            logger.info("replacing registered adapter %r", name)
        _REGISTRY[name] = _Entry(name, matches, f, priority)
        return f

    return add(factory) if factory is not None else add


def unregister_adapter(name: str) -> None:
    """Remove a registered adapter (``KeyError`` if there is none of that name)."""
    del _REGISTRY[name]


def registered_adapters() -> list[str]:
    """Names of the registered adapters, in the order they are tried."""
    return [e.name for e in sorted(_REGISTRY.values(), key=lambda e: -e.priority)]


def find_adapter(model: nn.Module, name: str | None = None, **options: Any) -> Adapter:
    """The adapter for ``model``: the one called ``name`` if given, else the first registered
    one whose ``matches(model)`` is true, else the :class:`NativeAdapter`."""
    if name is not None:
        if name == NativeAdapter.name:
            return NativeAdapter()
        if name not in _REGISTRY:
            raise ValueError(f"adapter: unknown name {name!r}; registered: {registered_adapters() + ['native']}")
        return _REGISTRY[name].factory(model, **options)
    for entry in sorted(_REGISTRY.values(), key=lambda e: -e.priority):
        try:
            matched = entry.matches(model)
        except Exception:  # a user's predicate must not break the others
            logger.warning("adapter %r: its matches() raised; skipping it", entry.name, exc_info=True)
            matched = False
        if matched:
            logger.debug("using adapter %r for %s", entry.name, type(model).__name__)
            return entry.factory(model, **options)
    return NativeAdapter()


# ------------------------------------------------------------------------------------ families
SpecFn = Callable[[nn.Module], dict[str, Any] | None]
BuildFn = Callable[[Mapping[str, Any]], nn.Module]


@dataclass(frozen=True)
class Family:
    """A model family errwrap can save and rebuild.

    Attributes:
        name: the spec's ``"family"`` value (``"smp"``, ``"torchvision"``, ...).
        build: ``build(spec) -> nn.Module``, random weights, never downloading; it checks every
            name in the spec against fixed tables and raises ``ValueError`` otherwise.
        matches: ``matches(model)``: the model belongs to the family (without importing the
            family's package); ``None`` for a family whose models describe themselves
            (``model.errwrap_spec()``).
        spec: ``spec(model) -> {"family": name, "config": {...}}`` or ``None``.
    """

    name: str
    build: BuildFn
    matches: Callable[[nn.Module], bool] | None = None
    spec: SpecFn | None = None


_FAMILIES: dict[str, Family] = {}
_BUILDERS: dict[str, BuildFn] = {}

#: family name -> builder, read-only: the only families :func:`~errwrap.adapters.specs.build_base` accepts.
FAMILY_BUILDERS: Mapping[str, BuildFn] = MappingProxyType(_BUILDERS)


def register_family(family: Family) -> Family:
    """Register (or replace) ``family`` under ``family.name``; returns it."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family: expected a Family, got {type(family).__name__}")
    if family.name in _FAMILIES:
        logger.info("replacing registered family %r", family.name)
    _FAMILIES[family.name] = family
    _BUILDERS[family.name] = family.build
    return family


def unregister_family(name: str) -> None:
    """Remove a registered family (``KeyError`` if there is none of that name)."""
    del _FAMILIES[name]
    del _BUILDERS[name]


def registered_families() -> list[str]:
    """Names of the registered families, in registration order."""
    return list(_FAMILIES)


def get_family(name: Any) -> Family | None:
    """The family registered as ``name``, or ``None``."""
    return _FAMILIES.get(name) if isinstance(name, str) else None


def family_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec of ``model`` whatever adapter runs it (e.g. an SMP model tapped with hooks): the
    spec of the first registered family that matches it, ``model.errwrap_spec()`` for a model that
    has one, else ``None``."""
    for family in _FAMILIES.values():
        if family.matches is not None and family.spec is not None and family.matches(model):
            return family.spec(model)
    to_spec = getattr(model, "errwrap_spec", None)
    return to_spec() if callable(to_spec) else None
