"""Shared pieces of the generated data families (:class:`~errwrap.data.Aerial`,
:class:`~errwrap.data.Cells`): the ``Dataset`` plumbing and a few vectorised numpy helpers.

A family only provides its class names and a ``render(seed, split, index, size)`` function that
returns ``(image (H, W, 3) float32 in [0, 1], label (H, W) int64)`` from those four values alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "GeneratedDataset",
    "SPLITS",
    "check_render_args",
    "make_rng",
    "grid",
    "band_noise",
    "gaussian_blur",
    "rotated_coords",
    "window",
]

SPLITS = {"train": 0, "val": 1, "test": 2}

JointTransform = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]
Render = Callable[[int, str, int, "int | tuple[int, int]"], "tuple[np.ndarray, np.ndarray]"]


def check_render_args(split: str, size: int | tuple[int, int], minimum: int = 16) -> tuple[int, int]:
    """``(H, W)`` from ``size``; a clear error for an unknown split or a too small size."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < minimum or w < minimum:
        raise ValueError(f"size: expected at least {minimum}x{minimum} pixels, got {h}x{w}")
    return h, w


def make_rng(seed: int, split: str, index: int, family: int) -> np.random.Generator:
    """The random stream of one item; ``family`` keeps two families with the same seed apart."""
    return np.random.default_rng([int(seed), SPLITS[split], int(index), 0x5EED, int(family)])


@functools.lru_cache(maxsize=8)
def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only pixel coordinates ``(yy, xx)``, each ``(H, W)`` float32."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def band_noise(rng: np.random.Generator, shape: tuple[int, int], bands: list[tuple[float, float]]) -> list[np.ndarray]:
    """Unit-variance fields of white noise filtered to Gaussian frequency bands ``(centre, width)``
    (cycles per pixel); one FFT of one white-noise image serves all bands."""
    h, w = shape
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    k = np.sqrt(fy * fy + fx * fx)
    fields = []
    for centre, width in bands:
        field = np.fft.irfft2(spectrum * np.exp(-(((k - centre) / width) ** 2)), s=shape)
        field -= field.mean()
        fields.append((field / (field.std() + 1e-8)).astype(np.float32))
    return fields


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an ``(H, W)`` or ``(H, W, C)`` array (edges repeated)."""
    if sigma <= 0:
        return image
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        n = image.shape[axis]
        idx = np.clip(np.arange(-radius, n + radius), 0, n - 1)
        padded = image.take(idx, axis)
        out = np.zeros_like(image)
        for k, tap in enumerate(taps):
            out += tap * padded.take(np.arange(k, k + n), axis)
        image = out
    return image


def rotated_coords(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``(u, v)`` relative to ``(cy, cx)`` along and across the direction ``angle``."""
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(angle), math.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def window(cy: float, cx: float, radius: float, h: int, w: int) -> tuple[slice, slice]:
    """The part of the canvas within ``radius`` of ``(cy, cx)``."""
    y0, y1 = max(0, int(cy - radius)), min(h, int(math.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(cx - radius)), min(w, int(math.ceil(cx + radius)) + 1)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


class GeneratedDataset(Dataset):
    """A dataset whose item ``index`` is ``render(seed, split, index, size)``, as tensors.

    Subclasses set ``class_names``, ``num_classes`` and ``_render``.
    """

    class_names: ClassVar[list[str]] = []
    num_classes: ClassVar[int] = 0
    ignore_index = 255
    _render: ClassVar[staticmethod[[int, str, int, int | tuple[int, int]], tuple[np.ndarray, np.ndarray]]]
    #: smallest side ``size`` may ask for
    min_size: ClassVar[int] = 16

    def __init__(
        self,
        num_images: int,
        size: int | tuple[int, int] = 128,
        seed: int = 0,
        split: str = "train",
        transform: JointTransform | None = None,
        cache: bool = False,
    ) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"num_images: expected a non-negative integer, got {num_images!r}")
        check_render_args(split, size, type(self).min_size)
        self.num_images, self.size, self.seed, self.split = num_images, size, seed, split
        self.transform = transform
        self._cache: dict[int, tuple[Tensor, Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def _draw(self, index: int) -> tuple[Tensor, Tensor]:
        if self._cache is not None and index in self._cache:
            image, label = self._cache[index]
            return image.clone(), label.clone()
        rendered_image, rendered_label = type(self)._render(self.seed, self.split, index, self.size)
        out = torch.from_numpy(rendered_image).permute(2, 0, 1).contiguous(), torch.from_numpy(rendered_label)
        if self._cache is not None:
            self._cache[index] = (out[0].clone(), out[1].clone())
        return out

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {self.num_images}")
        image, label = self._draw(index % self.num_images)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_images={self.num_images}, size={self.size}, seed={self.seed}, "
            f"split={self.split!r})"
        )
