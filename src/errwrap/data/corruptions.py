"""``Corrupt``: deterministic image corruptions with a severity, for benchmarks under shift.

Five kinds (:data:`CORRUPTIONS`), each at severities 1 (mild) to 5 (strong), in the spirit of
ImageNet-C (Hendrycks & Dietterich, 2019) but with errwrap's own parameters, chosen so that
severity 3 leaves an image recognisable:

======== ==================================================== ===========================
kind     what it does                                         severity 1 / 3 / 5
======== ==================================================== ===========================
blur     Gaussian blur (sigma scaled with ``min(H, W) / 128``) sigma 0.5 / 1.5 / 3.0 px
fog      blend towards a smooth grey haze (level ~0.6)         haze weight 0.15 / 0.4 / 0.7
noise    additive Gaussian sensor noise                        sigma 0.02 / 0.08 / 0.18
dark     ``gain * x ** gamma`` (less light, crushed shadows)   x0.8 ^1.1 / x0.4 ^1.5 / x0.2 ^2.0
jpeg     JPEG round trip (Pillow, 4:2:0 chroma subsampling)   quality 60 / 20 / 7
======== ==================================================== ===========================

Every result is clamped to ``[0, 1]`` and has the input's shape, dtype and device. The random
parts (the noise, the haze's pattern) depend on ``seed`` and on the image: on ``index`` where one
is given (item ``b`` of a batch uses ``index + b``), otherwise on the image's own bytes, so the
same image is always corrupted the same way and different images differently.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["Corrupt", "CORRUPTIONS"]

#: The kinds of :class:`Corrupt`.
CORRUPTIONS: tuple[str, ...] = ("blur", "fog", "noise", "dark", "jpeg")

_BLUR_SIGMA = (0.5, 1.0, 1.5, 2.0, 3.0)  # px at 128 px
_FOG_WEIGHT = (0.15, 0.25, 0.4, 0.55, 0.7)
_NOISE_SIGMA = (0.02, 0.05, 0.08, 0.12, 0.18)
_DARK_GAIN_GAMMA = ((0.8, 1.1), (0.6, 1.3), (0.4, 1.5), (0.3, 1.7), (0.2, 2.0))
_JPEG_QUALITY = (60, 40, 20, 12, 7)
_HAZE_LEVEL = 0.6


class Corrupt:
    """A deterministic corruption of ``kind`` at ``severity`` (1 mild ... 5 strong).

    Call it on images (``corrupt(image)`` or ``corrupt(images, index=i)``), or pass
    ``corrupt.joint`` as the ``transform=`` of a dataset (it leaves the label unchanged) before
    any ``Normalize``. The table of parameters is in the module docstring.

    Args:
        kind: one of :data:`CORRUPTIONS`: ``"blur"``, ``"fog"``, ``"noise"``, ``"dark"``, ``"jpeg"``.
        severity: 1 to 5.
        seed: seeds the random parts (noise, haze pattern), together with each image.

    Shapes:
        image: ``(C, H, W)`` or ``(B, C, H, W)``, float in ``[0, 1]`` (``C`` = 1 or 3 for
        ``jpeg``) -> the same shape, clamped to ``[0, 1]``.

    Example:
        >>> import torch
        >>> corrupt = Corrupt("fog", severity=3)
        >>> image = torch.rand(3, 32, 32)
        >>> out = corrupt(image)
        >>> out.shape, bool(out.std() < image.std()), torch.equal(out, corrupt(image))
        (torch.Size([3, 32, 32]), True, True)
    """

    def __init__(self, kind: str, severity: int = 3, seed: int = 0) -> None:
        if kind not in CORRUPTIONS:
            raise ValueError(f"kind: expected one of {', '.join(CORRUPTIONS)}, got {kind!r}")
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
            raise ValueError(f"severity: expected an integer from 1 (mild) to 5 (strong), got {severity!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        self.kind, self.severity, self.seed = kind, severity, seed

    def __repr__(self) -> str:
        return f"Corrupt({self.kind!r}, severity={self.severity}, seed={self.seed})"

    def __call__(self, image: Tensor, index: int | None = None) -> Tensor:
        """The corrupted image(s); ``index`` (of the first image) seeds the random parts."""
        batched = _check_image(image, self.kind)
        x = (image if batched else image[None]).float()
        if x.shape[0] == 0:
            return image.clone()
        items = []
        for b in range(x.shape[0]):
            generator = torch.Generator().manual_seed(self._item_seed(x[b], None if index is None else index + b))
            items.append(self._apply(x[b], generator))
        out = torch.stack(items).clamp_(0.0, 1.0).to(image.dtype)
        return out if batched else out[0]

    def joint(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """A joint transform: ``(image, label) -> (corrupted image, label)``."""
        return self(image), label

    # ------------------------------------------------------------------ internals
    def _item_seed(self, image: Tensor, index: int | None) -> int:
        if index is None:
            digest = hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
            key = [1, int.from_bytes(digest, "little")]
        else:
            key = [0, int(index)]
        entropy = [int(self.seed) & 0xFFFFFFFFFFFFFFFF, CORRUPTIONS.index(self.kind), *key]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))

    def _apply(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """One image ``(C, H, W)`` float32."""
        i = self.severity - 1
        if self.kind == "blur":
            return _gaussian_blur(x, _BLUR_SIGMA[i] * min(x.shape[-2:]) / 128.0)
        if self.kind == "fog":
            weight = _FOG_WEIGHT[i]
            return (1.0 - weight) * x + weight * _haze(x.shape[-2:], generator).to(x.device)
        if self.kind == "noise":
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            return x + _NOISE_SIGMA[i] * noise
        if self.kind == "dark":
            gain, gamma = _DARK_GAIN_GAMMA[i]
            return gain * x.clamp(0.0, 1.0) ** gamma
        return _jpeg(x, _JPEG_QUALITY[i])


def _check_image(image: Tensor, kind: str) -> bool:
    """Whether ``image`` is a batch; clear errors for what :class:`Corrupt` cannot take."""
    if not isinstance(image, Tensor) or image.ndim not in (3, 4) or not image.is_floating_point():
        got = (
            f"a {image.dtype} tensor of shape {tuple(image.shape)}"
            if isinstance(image, Tensor)
            else type(image).__name__
        )
        raise ValueError(f"image: expected a float tensor of shape CxHxW or BxCxHxW with values in [0, 1], got {got}")
    if kind == "jpeg" and image.shape[-3] not in (1, 3):
        raise ValueError(f"image: jpeg expects 1 or 3 channels, got {image.shape[-3]} (shape {tuple(image.shape)})")
    if image.numel() and (float(image.min()) < -1e-3 or float(image.max()) > 1 + 1e-3):
        raise ValueError(
            f"image: expected values in [0, 1] (corrupt before Normalize), got [{float(image.min()):.3g}, "
            f"{float(image.max()):.3g}]"
        )
    return image.ndim == 4


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(C, H, W)``, edges repeated."""
    radius = max(1, math.ceil(3.0 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device) / sigma) ** 2)
    taps = taps / taps.sum()
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def _haze(size: torch.Size, generator: torch.Generator) -> Tensor:
    """A smooth grey haze ``(1, H, W)`` around :data:`_HAZE_LEVEL` (random coarse pattern)."""
    coarse = torch.randn(1, 1, 4, 4, generator=generator)
    field = F.interpolate(coarse, size=tuple(size), mode="bicubic", align_corners=False)[0]
    return _HAZE_LEVEL + 0.06 * field.clamp(-2.0, 2.0)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    """A JPEG round trip of ``(C, H, W)`` (``C`` = 1 or 3) with Pillow, 4:2:0 chroma subsampling."""
    pixels = (x.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=2)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        array = np.asarray(decoded, dtype=np.uint8).reshape(pixels.shape)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(device=x.device, dtype=torch.float32) / 255.0
