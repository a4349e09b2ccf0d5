"""Photometric augmentation of a training batch, for the heads to learn how the base fails when the
light changes.

The heads learn where the base is wrong from the base's own mistakes on the training images. On
those images the base sees one kind of light only, so under a darker or washed-out image the
heads meet features they never saw and fall below the base's own max-softmax (docs/benchmarks.md,
section 4). :class:`PhotometricAugment` changes gain, gamma, contrast and saturation of a share
of the images in each batch, in pixel space (the batch is un-normalised with the wrapper's
``preprocessing``, changed, and normalised again), so the heads also see the base fail under
other light. It does not blur, add noise or compress: those shifts stay unseen by training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _distributed
from .._utils import user_stacklevel

__all__ = ["AUGMENTS", "PhotometricAugment", "build_augment"]

#: The values of ``finetune(augment=...)``.
AUGMENTS: tuple[str | None, ...] = ("photometric", None)


def _log_uniform(low: float, high: float, n: int, generator: torch.Generator) -> Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).float()


class PhotometricAugment:
    """Random gain, gamma, contrast and saturation of each image of a normalised batch with
    probability ``p``, computed as ``gain * x ** gamma`` on pixels in ``[0, 1]``, then a blend
    towards the image's mean grey (contrast) and towards each pixel's grey (saturation).

    Each factor is drawn log-uniformly from its range. At their darkest the defaults are
    ``0.6 * x ** 1.3``, and at their flattest they keep 0.75 of the contrast: as far as
    ``Corrupt("dark", 2)`` and about ``Corrupt("fog", 2)`` go, short of severity 3, at which the
    quality benchmark tests, so that its shifted cells stay shifts the heads never trained on.

    Args:
        mean: per-channel mean of the batch's normalisation (``x_norm = (x - mean) / std``).
        std: per-channel standard deviation of the normalisation.
        p: probability that an image is changed.
        gain: range of the multiplicative gain.
        gamma: range of the gamma.
        contrast: range of the contrast factor (1: unchanged).
        saturation: range of the saturation factor (1: unchanged; 3-channel images only).

    Shapes:
        images ``(B, C, H, W)`` -> ``(B, C, H, W)``, same dtype.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        p: float = 0.5,
        gain: tuple[float, float] = (0.6, 1.25),
        gamma: tuple[float, float] = (0.75, 1.3),
        contrast: tuple[float, float] = (0.75, 1.3),
        saturation: tuple[float, float] = (0.6, 1.4),
    ) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean, std: expected as many values, std positive; got {tuple(mean)}, {tuple(std)}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        for name, (low, high) in (("gain", gain), ("gamma", gamma), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 < low <= high:
                raise ValueError(f"{name}: expected a range 0 < low <= high, got ({low}, {high})")
        self.mean, self.std, self.p = tuple(float(v) for v in mean), tuple(float(v) for v in std), float(p)
        self.gain, self.gamma, self.contrast, self.saturation = gain, gamma, contrast, saturation

    def __repr__(self) -> str:
        return (
            f"PhotometricAugment(p={self.p}, gain={self.gain}, gamma={self.gamma}, "
            f"contrast={self.contrast}, saturation={self.saturation})"
        )

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(
                f"images: expected (B, {len(self.mean)}, H, W) for this normalisation, got {tuple(images.shape)}"
            )
        n = images.shape[0]
        chosen = torch.rand(n, generator=generator) < self.p
        factors = [_log_uniform(*r, n, generator) for r in (self.gain, self.gamma, self.contrast, self.saturation)]
        if not bool(chosen.any()):
            return images
        idx = chosen.nonzero()[:, 0]
        gain, gamma, contrast, saturation = (f[idx].view(-1, 1, 1, 1).to(images.device) for f in factors)
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        x = (images[idx].float() * std + mean).clamp(0.0, 1.0)
        x = gain * x.pow(gamma)
        grey_mean = _grey(x).mean(dim=(2, 3), keepdim=True)
        x = grey_mean + contrast * (x - grey_mean)
        if x.shape[1] == 3:
            grey = _grey(x)
            x = grey + saturation * (x - grey)
        out = images.clone()
        out[idx] = ((x.clamp(0.0, 1.0) - mean) / std).to(images.dtype)
        return out


def _grey(x: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)`` of RGB images, the channel mean of others."""
    if x.shape[1] == 3:
        return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x.mean(dim=1, keepdim=True)


def build_augment(augment: str | None, wrapper: Any, images: Tensor) -> PhotometricAugment | None:
    """The augmentation ``finetune(augment=...)`` names, for the wrapper's normalisation.

    The normalisation is ``wrapper.preprocessing`` (recorded from the loader's ``Normalize``);
    without one, images already in ``[0, 1]`` are taken as they are. Otherwise the pixel values
    are guessed from ``images``, the first batch (of every rank): each channel's range there is
    read as ``[0, 1]`` (a ``UserWarning`` says so and with which statistics; ``finetune`` keeps
    them in its checkpoints, so a resumed run reads pixels as the run it continues).
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment: expected one of {AUGMENTS}, got {augment!r}")
    if augment is None:
        return None
    pre = getattr(wrapper, "preprocessing", None)
    channels = images.shape[1]
    if pre is not None and len(pre["mean"]) == channels:
        return PhotometricAugment(pre["mean"], pre["std"])
    flat = images.detach().float().transpose(0, 1).reshape(channels, -1)
    ranges = _distributed.gather_objects((flat.amin(dim=1).tolist(), flat.amax(dim=1).tolist()))
    low = torch.tensor([min(r[0][c] for r in ranges) for c in range(channels)])  # every rank decides the same
    high = torch.tensor([max(r[1][c] for r in ranges) for c in range(channels)])
    if float(low.min()) >= 0.0 and float(high.max()) <= 1.0:
        return PhotometricAugment([0.0] * channels, [1.0] * channels)
    if bool((high - low <= 0).any()):
        warnings.warn(
            "finetune: augment='photometric' needs the images' normalisation, but wrapper.preprocessing is None "
            "and a channel of the first batch is constant; training without augmentation. Set "
            "wrapper.preprocessing = {'mean': [...], 'std': [...]} or pass augment=None to silence this",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        return None
    # pixel = (x - low) / (high - low): the normalisation x = (pixel - mean) / std with these statistics
    std_t = 1.0 / (high - low)
    mean, std = [float(v) for v in -low * std_t], [float(v) for v in std_t]
    warnings.warn(
        "finetune: augment='photometric' needs the images' normalisation, but wrapper.preprocessing is None and "
        f"the images are not in [0, 1]; guessed from the first batch's range: mean={[round(v, 3) for v in mean]}, "
        f"std={[round(v, 3) for v in std]} (each channel's minimum and maximum read as 0 and 1). Set "
        "wrapper.preprocessing = {'mean': [...], 'std': [...]} (or normalise with errwrap.data.Normalize or "
        "torchvision's, which finetune records), or pass augment=None",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
    return PhotometricAugment(mean, std)
