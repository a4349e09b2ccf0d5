"""Features as data: what the construction probe saw, and the pure rule that picks the defaults.

An adapter returns named feature maps; :func:`feature_info` describes them (channels, stride,
spatial size, the module that produced them when known) as a list of :class:`FeatureInfo`, in the
adapter's order. :func:`choose_default_features` then picks the features that feed the detail head
(low-level) and the error head (high-level) from that list and the adapter's preference alone: the
same list and preference always give the same answer, whatever ran before.

Example:
    >>> import torch
    >>> infos = feature_info({"a": torch.zeros(1, 8, 16, 16), "b": torch.zeros(1, 32, 4, 4)}, (64, 64))
    >>> [(f.name, f.channels, f.stride) for f in infos]
    [('a', 8, 4), ('b', 32, 16)]
    >>> choose_default_features(infos, (None, None))
    ('a', 'b')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from torch import Tensor

__all__ = ["FeatureInfo", "FeaturePair", "feature_info", "feature_stride", "choose_default_features"]

#: ``(low_level, high_level)`` feature names; ``None`` leaves that one to the fallback rule.
FeaturePair = tuple[str | None, str | None]


class FeatureInfo(NamedTuple):
    """One feature map of a base output, as seen in the probe pass.

    Attributes:
        name: the feature's key in :attr:`BaseOutput.features`.
        channels: ``C`` of the ``(B, C, h, w)`` map.
        stride: the input size over the map size, rounded (``max`` over height and width, at least 1).
        size: the map's ``(h, w)`` for the probe input.
        module: name of the module of the base whose output it is, when the adapter knows it.
    """

    name: str
    channels: int
    stride: int
    size: tuple[int, int]
    module: str | None = None


def feature_stride(size: Sequence[int], input_size: Sequence[int]) -> int:
    """``max(H / h, W / w)`` rounded, at least 1: how much coarser a ``(h, w)`` map is than an
    ``(H, W)`` input."""
    return max(1, round(max(input_size[0] / size[0], input_size[1] / size[1])))


def feature_info(
    features: Mapping[str, Tensor],
    input_size: Sequence[int],
    module_of: Callable[[str], str | None] | None = None,
) -> list[FeatureInfo]:
    """Describe named ``(B, C, h, w)`` feature maps produced for an input of ``input_size``
    ``(H, W)``, in their order; ``module_of(name)`` gives the producing module's name, if known."""
    infos = []
    for name, f in features.items():
        size = (int(f.shape[-2]), int(f.shape[-1]))
        module = module_of(name) if module_of is not None else None
        infos.append(FeatureInfo(name, int(f.shape[1]), feature_stride(size, input_size), size, module))
    return infos


def choose_default_features(features: Sequence[FeatureInfo], preferred: FeaturePair) -> tuple[str, str]:
    """The default ``(low_level, high_level)`` feature names: the adapter's ``preferred`` names
    where they are features; otherwise low-level is the finest map (largest ``h * w``, the first
    of equals) and high-level the last one.

    Raises:
        ValueError: ``features`` is empty.
    """
    if not features:
        raise ValueError("choose_default_features: expected at least one feature, got none")
    names = [f.name for f in features]
    low, high = preferred
    if low not in names:
        low = max(features, key=lambda f: f.size[0] * f.size[1]).name
    if high not in names:
        high = names[-1]
    return low, high
