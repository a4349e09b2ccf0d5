"""A small registry that picks an adapter for a model, so users can add their own families.

Example:
    >>> from errwrap.adapters import BaseAdapter, register_adapter
    >>> @register_adapter("my-family", lambda m: type(m).__name__ == "MyNet")
    ... class MyNetAdapter(BaseAdapter):
    ...     def forward(self, model, x):
    ...         ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import BaseAdapter, NativeAdapter

__all__ = ["register_adapter", "unregister_adapter", "registered_adapters", "find_adapter"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    name: str
    matches: Callable[[nn.Module], bool]
    factory: Callable[..., BaseAdapter]
    priority: int


_REGISTRY: dict[str, _Entry] = {}


def register_adapter(
    name: str,
    matches: Callable[[nn.Module], bool],
    factory: Callable[..., BaseAdapter] | None = None,
    *,
    priority: int = 0,
) -> Any:
    """Register ``factory(model, **options) -> BaseAdapter`` for models where ``matches(model)``.

    Usable as a decorator on the adapter class (then ``factory`` is the class). Higher
    ``priority`` is tried first; user registrations default to 0, built-ins use -10, so a
    user's adapter wins over a built-in one for the same model.
    """

    def add(f: Callable[..., BaseAdapter]) -> Callable[..., BaseAdapter]:
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


def find_adapter(model: nn.Module, name: str | None = None, **options: Any) -> BaseAdapter:
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
