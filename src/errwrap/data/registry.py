"""The generated data families by name: :data:`GENERATED` and :func:`generated`."""

from __future__ import annotations

from typing import Any

from ._generated import GeneratedDataset
from .aerial import Aerial
from .cells import Cells
from .scenes import Scenes

__all__ = ["GENERATED", "generated"]

#: Every generated family by name (the CLI's ``--data NAME[:N]``).
GENERATED: dict[str, type[GeneratedDataset]] = {"scenes": Scenes, "aerial": Aerial, "cells": Cells}


def generated(name: str, num_images: int, **kwargs: Any) -> GeneratedDataset:
    """The generated dataset ``name`` of ``num_images`` images.

    Args:
        name: a key of :data:`GENERATED`: ``"scenes"``, ``"aerial"`` or ``"cells"``.
        num_images: length of the dataset.
        **kwargs: the family's other arguments (``size``, ``seed``, ``split``, ``transform``, ``cache``).

    Example:
        >>> ds = generated("cells", 2, size=32, split="val")
        >>> type(ds).__name__, len(ds), ds.num_classes
        ('Cells', 2, 3)
    """
    if name not in GENERATED:
        raise ValueError(f"name: expected one of {', '.join(GENERATED)}, got {name!r}")
    return GENERATED[name](num_images, **kwargs)
