"""``Cells``: generated microscopy-like images (3 classes: background, cell, boundary).

Each image is drawn from ``(seed, split, index)`` alone with vectorised numpy. What makes it
hard, and different in character from :class:`~errwrap.data.Scenes` and
:class:`~errwrap.data.Aerial`:

- **no colour at all**: grey images (a faint per-image tint) stored as 3 channels; classes differ
  by intensity, shape and context only, and the intensity of a class changes across the image;
- **touching and overlapping cells** of varied size (radius about 3-20 px at 128 px), often in
  clusters; the ``boundary`` class (1 or 2 px, one per image) separates a cell from the
  background *and* from the cells it touches, where the image shows only a faint valley, so the
  boundary between two cells is a thin, low-contrast structure;
- **low contrast and uneven illumination**: dim cells beside bright ones, a low-frequency
  illumination field and a vignette that make a dim cell darker than bright background;
  fluorescence-like (bright cells on a dark ground) or bright-field-like (dark cells on a light
  ground) per image;
- **blur and Poisson-like noise**: an optical blur of 0.6-1.6 px and shot noise at 60-400
  photons for the brightest level, plus small specks of debris that are background.
"""

from __future__ import annotations

import math

import numpy as np

from ._generated import (
    GeneratedDataset,
    band_noise,
    check_render_args,
    gaussian_blur,
    grid,
    make_rng,
    rotated_coords,
    window,
)

__all__ = ["Cells", "CELL_CLASSES", "render_cells"]

#: Class names of :class:`Cells`, in label order.
CELL_CLASSES: tuple[str, ...] = (
    "background",  # 0 the ground, with debris specks
    "cell",        # 1 the inside of a cell
    "boundary",    # 2 the 1-2 px rim of a cell, towards the background and towards touching cells
)
BACKGROUND, CELL, BOUNDARY = range(len(CELL_CLASSES))


def _instances(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell instances: the id of each pixel's cell (-1 for background), the normalised radius
    ``f`` of that cell there (``f < 1`` inside), and each cell's brightness."""
    yy, xx = grid(h, w)
    scale = min(h, w) / 128.0
    n = int(rng.integers(6, 30))
    mean_r = rng.uniform(5.0, 11.0) * scale
    radii = np.clip(mean_r * rng.lognormal(0.0, 0.35, n), 3.0 * scale, 20.0 * scale)
    if rng.random() < 0.6:  # clustered: cells crowd around a few points and touch
        hubs = rng.uniform(0.15, 0.85, (int(rng.integers(1, 4)), 2)) * (h, w)
        centres = (
            hubs[rng.integers(len(hubs), size=n)]
            + rng.normal(0.0, 1.0, (n, 2)) * 1.6 * radii[:, None] * math.sqrt(n / len(hubs)) * 0.5
        )
    else:
        centres = rng.uniform(0, 1, (n, 2)) * (h, w)
    fmin = np.full((h, w), np.inf, dtype=np.float32)
    inst = np.full((h, w), -1, dtype=np.int64)
    for k in range(n):
        cy, cx, r = float(centres[k, 0]), float(centres[k, 1]), float(radii[k])
        box = window(cy, cx, 1.6 * r + 2, h, w)
        if box[0].stop <= box[0].start or box[1].stop <= box[1].start:
            continue
        u, v = rotated_coords(yy[box], xx[box], cy, cx, rng.uniform(0, math.pi))
        aspect = rng.uniform(1.0, 1.5)
        rho = np.sqrt((u / aspect) ** 2 + (v * aspect) ** 2)
        theta = np.arctan2(v, u)
        radius = np.full_like(theta, r)
        for harmonic in (2, 3, 5):
            radius *= 1.0 + rng.uniform(0.0, 0.08) * np.cos(harmonic * theta + rng.uniform(0, 2 * math.pi))
        f = rho / radius
        closer = f < fmin[box]
        fmin[box] = np.where(closer, f, fmin[box])
        inst[box] = np.where(closer, k, inst[box])
    inst[fmin >= 1.0] = -1
    brightness = rng.uniform(0.45, 1.0, n).astype(np.float32)
    return inst, fmin, brightness


def _boundary(inst: np.ndarray, width: int) -> np.ndarray:
    """Rim pixels of the cells: ``width`` px towards the background; towards a touching cell,
    ``width`` px on the side of the cell with the larger id only (so the rim stays ``width`` thin)."""
    h, w = inst.shape
    padded = np.pad(inst, 1, mode="edge")
    rim = np.zeros_like(inst, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        other = padded[dy:dy + h, dx:dx + w]
        rim |= (inst >= 0) & (other != inst) & ((other < 0) | (other < inst))
    for _ in range(width - 1):  # grow by one pixel, inside the same cell only
        grown = np.zeros_like(rim)
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            grown |= np.roll(rim, (dy, dx), (0, 1)) & (np.roll(inst, (dy, dx), (0, 1)) == inst)
        rim |= grown & (inst >= 0)
    return rim


def render_cells(seed: int, split: str, index: int, size: int | tuple[int, int] = 128) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: image ``(H, W, 3)`` float32 in ``[0, 1]`` and labels ``(H, W)`` int64.

    The result depends on ``(seed, split, index, size)`` only.
    """
    h, w = check_render_args(split, size)
    rng = make_rng(seed, split, index, family=2)
    yy, xx = grid(h, w)
    scale = min(h, w) / 128.0
    low, mid = band_noise(rng, (h, w), [(0.0, 0.012), (0.12, 0.05)])
    inst, fmin, brightness = _instances(rng, h, w)
    rim = _boundary(inst, int(rng.integers(1, 3)))
    label = np.where(inst >= 0, CELL, BACKGROUND).astype(np.int64)
    label[rim] = BOUNDARY

    # Cell signal: a flat top that falls off towards the rim, a brighter nucleus-like core, a
    # granular texture; a faint valley where two cells touch.
    inside = inst >= 0
    b = np.where(inside, brightness[np.maximum(inst, 0)], 0.0).astype(np.float32)
    f = np.where(inside, fmin, 1.0)
    profile = np.clip(1.0 - f * f, 0.0, 1.0) ** 0.35
    signal = b * (profile * (1.0 + 0.12 * mid) + 0.25 * (f < rng.uniform(0.3, 0.5)))
    padded = np.pad(inst, 1, mode="edge")
    contact = np.zeros_like(inside)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        other = padded[dy:dy + h, dx:dx + w]
        contact |= inside & (other >= 0) & (other != inst)
    signal = np.where(contact, signal * rng.uniform(0.7, 0.9), signal)

    # Debris: specks of a pixel or two on the background.
    for _ in range(int(rng.integers(0, 15))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.6, 1.8) * scale
        box = window(cy, cx, r + 1, h, w)
        speck = ((yy[box] - cy) ** 2 + (xx[box] - cx) ** 2 < r * r) & ~inside[box]
        signal[box][speck] = rng.uniform(0.3, 0.9)

    # Fluorescence-like (bright on dark) or bright-field-like (dark on light), low contrast.
    contrast = rng.uniform(0.2, 0.5)
    if rng.random() < 0.5:
        image = rng.uniform(0.05, 0.25) + contrast * signal
    else:
        image = rng.uniform(0.55, 0.8) - contrast * signal
    vignette = 1.0 - rng.uniform(0.0, 0.2) * (((yy / h - 0.5) ** 2 + (xx / w - 0.5) ** 2) / 0.5)
    image = image * vignette * np.clip(1.0 + rng.uniform(0.08, 0.2) * low, 0.5, 1.5)
    image = gaussian_blur(image.astype(np.float32), rng.uniform(0.6, 1.6) * scale)

    # Shot noise (Poisson at ``photons`` for level 1) and read noise; a faint tint, 3 channels.
    photons = rng.uniform(60.0, 400.0)
    image = rng.poisson(np.clip(image, 0.0, None) * photons).astype(np.float32) / photons
    image += rng.uniform(0.005, 0.02) * rng.standard_normal(image.shape, dtype=np.float32)
    tint = (1.0 + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)
    return np.clip(image[..., None] * tint, 0.0, 1.0).astype(np.float32), label


class Cells(GeneratedDataset):
    """Generated microscopy-like images (3 classes, see :data:`CELL_CLASSES`).

    Touching and overlapping cells of varied size, a 1-2 px boundary class between a cell and
    the background or a neighbouring cell, uneven illumination, blur, shot noise, low contrast;
    grey images as 3 channels (module docstring: what makes it hard).

    Args:
        num_images: length of the dataset.
        size: side (or ``(H, W)``) of the images, at least 16.
        seed: the seed of the whole set; ``(seed, split, index)`` fixes each image.
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        transform: a joint transform ``(image, label) -> (image, label)`` (see
            :mod:`errwrap.data.transforms`; :meth:`errwrap.data.Corrupt.joint` for shifts).
        cache: keep generated images in memory (each is drawn once).

    Shapes:
        item: image ``(3, H, W)`` float32 in ``[0, 1]`` (before ``transform``), label ``(H, W)`` int64.

    Example:
        >>> ds = Cells(4, size=64)
        >>> image, label = ds[0]
        >>> image.shape, label.shape, ds.num_classes
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), 3)
    """

    class_names = list(CELL_CLASSES)
    num_classes = len(CELL_CLASSES)
    _render = staticmethod(render_cells)
