"""Joint image/label transforms for segmentation.

Every transform is a callable ``(image, label) -> (image, label)`` on tensors: image ``(3, H, W)``
float, label ``(H, W)`` int64. Geometric transforms move both the same way; labels are only
ever resized with nearest-neighbour sampling and padded with ``ignore_index``, so they stay
integers with valid values. Random transforms take an optional ``torch.Generator`` (``None``:
the global torch RNG), which makes a pipeline repeatable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Resize",
    "RandomScale",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "Normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

JointTransform = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


def _check_pair(image: Tensor, label: Tensor) -> None:
    if not isinstance(image, Tensor) or image.ndim != 3 or not image.is_floating_point():
        raise ValueError(
            f"image: expected a float tensor of shape CxHxW, got {getattr(image, 'shape', type(image).__name__)}"
        )
    if not isinstance(label, Tensor) or label.ndim != 2 or label.shape != image.shape[-2:]:
        raise ValueError(
            f"label: expected a tensor of shape {tuple(image.shape[-2:])} (the image's HxW), got "
            f"{getattr(label, 'shape', type(label).__name__)}"
        )


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _resize_pair(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    if tuple(image.shape[-2:]) == size:
        return image, label
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(label.dtype)
    return image, label


class Compose:
    """Apply joint transforms in order."""

    def __init__(self, transforms: Sequence[JointTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        for t in self.transforms:
            image, label = t(image, label)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class Resize:
    """Resize to ``size`` (``(H, W)`` or one int for both sides): bilinear image, nearest label."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"size: expected positive sides, got {size}")

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        _check_pair(image, label)
        return _resize_pair(image, label, self.size)


class RandomScale:
    """Rescale both sides by a factor drawn uniformly from ``[min_scale, max_scale]``."""

    def __init__(
        self, min_scale: float = 0.5, max_scale: float = 2.0, generator: torch.Generator | None = None
    ) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"scales: expected 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale, self.generator = min_scale, max_scale, generator

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        _check_pair(image, label)
        scale = _uniform(self.min_scale, self.max_scale, self.generator)
        h, w = image.shape[-2:]
        return _resize_pair(image, label, (max(1, round(h * scale)), max(1, round(w * scale))))


class RandomCrop:
    """Crop ``size`` at a random place; images smaller than ``size`` are padded first (image with
    ``fill``, a value or one per channel; label with ``ignore_index``)."""

    def __init__(
        self,
        size: int | tuple[int, int],
        fill: float | Sequence[float] = 0.0,
        ignore_index: int = 255,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"size: expected positive sides, got {size}")
        self.fill, self.ignore_index, self.generator = fill, ignore_index, generator

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        _check_pair(image, label)
        th, tw = self.size
        h, w = image.shape[-2:]
        if h < th or w < tw:
            ph, pw = max(0, th - h), max(0, tw - w)
            fill = torch.as_tensor(self.fill, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
            padded = fill.expand(image.shape[0], h + ph, w + pw).clone()
            padded[:, :h, :w] = image
            padded_label = label.new_full((h + ph, w + pw), self.ignore_index)
            padded_label[:h, :w] = label
            image, label, h, w = padded, padded_label, h + ph, w + pw
        top = int(torch.randint(0, h - th + 1, (), generator=self.generator))
        left = int(torch.randint(0, w - tw + 1, (), generator=self.generator))
        return image[:, top : top + th, left : left + tw], label[top : top + th, left : left + tw]


class RandomHorizontalFlip:
    """Flip image and label left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        self.p, self.generator = p, generator

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        _check_pair(image, label)
        if float(torch.rand((), generator=self.generator)) < self.p:
            return image.flip(-1), label.flip(-1)
        return image, label


class ColorJitter:
    """Random brightness, contrast and saturation (image only, before :class:`Normalize`; the
    result is clamped to ``[0, 1]``). Each factor is drawn from ``[1 - x, 1 + x]``."""

    def __init__(
        self,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1), got {value}")
        self.brightness, self.contrast, self.saturation, self.generator = brightness, contrast, saturation, generator

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        _check_pair(image, label)
        b = _uniform(1 - self.brightness, 1 + self.brightness, self.generator)
        c = _uniform(1 - self.contrast, 1 + self.contrast, self.generator)
        s = _uniform(1 - self.saturation, 1 + self.saturation, self.generator)
        image = image * b
        gray = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]) if image.shape[0] == 3 else image.mean(0)
        image = (image - gray.mean()) * c + gray.mean()
        if image.shape[0] == 3:
            gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
            image = (image - gray) * s + gray
        return image.clamp(0.0, 1.0), label


class Normalize:
    """``(image - mean) / std`` per channel (ImageNet statistics by default); label unchanged."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if any(s <= 0 for s in std):
            raise ValueError(f"std: expected positive values, got {tuple(std)}")
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        _check_pair(image, label)
        if image.shape[0] != len(self.mean):
            raise ValueError(f"image: expected {len(self.mean)} channels for this Normalize, got {image.shape[0]}")
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        return (image - mean) / std, label
