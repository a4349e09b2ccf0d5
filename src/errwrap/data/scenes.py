"""``Scenes``: built-in generated segmentation scenes, for tests, examples and quick experiments.

Each image is drawn from ``(seed, split, index)`` alone (the same triple gives the same bytes), at
any size, with vectorised numpy (no per-pixel Python loops). A scene has the parts that make
real segmentation hard, so that a small network trained for a few minutes reaches a moderate
mIoU and errs where real networks err:

- **textures, not flat colours**: every class is a texture (noise of a given spectrum, stripes of
  an orientation and period, bricks, checkers, dots), with per-image jitter of colour, phase,
  period and orientation; two pairs of classes share their colour and differ only in texture
  (``grass``/``foliage``: fine grain vs. blotches; ``stripes``/``planks``: orientation and period);
- **many scales**: two or three large background regions (with a wavy horizon and irregular
  low-frequency boundaries), medium objects (ellipses, boxes, polygons, blobs), small objects of
  a few pixels;
- **thin structures**: poles of 1-3 px, sagging wires of 1-2 px and rims of 1-2 px around some
  objects (class ``wire``);
- **occlusions** (painter's order), **soft shading** (low-frequency illumination and a gradient),
  a slight optical blur and pixel noise.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ._generated import SPLITS, GeneratedDataset

__all__ = ["Scenes", "SCENE_CLASSES", "render_scene"]

#: Class names of :class:`Scenes`, in label order.
SCENE_CLASSES: tuple[str, ...] = (
    "sky",      # 0 smooth vertical gradient, faint grain
    "ground",   # 1 brown, low-frequency blotches
    "grass",    # 2 green, fine high-frequency grain       } same colour,
    "foliage",  # 3 green, mid-frequency blotches          } different texture
    "brick",    # 4 offset bricks with mortar lines
    "stripes",  # 5 beige, near-horizontal stripes, period 6-9 px   } same colour,
    "planks",   # 6 beige, near-vertical waves, period 3-5 px       } different texture
    "checker",  # 7 rotated two-tone checkerboard
    "dots",     # 8 light dots on a purple grid
    "pole",     # 9 thin near-vertical poles, 1-3 px
    "wire",     # 10 sagging wires and rims around objects, 1-2 px
)

SKY, GROUND, GRASS, FOLIAGE, BRICK, STRIPES, PLANKS, CHECKER, DOTS, POLE, WIRE = range(len(SCENE_CLASSES))
_OBJECT_CLASSES = np.array([FOLIAGE, BRICK, STRIPES, PLANKS, CHECKER, DOTS, GROUND, GRASS])


# ---------------------------------------------------------------------------- noise and shapes
def _band_noise(rng: np.random.Generator, shape: tuple[int, int], bands: list[tuple[float, float]]) -> list[np.ndarray]:
    """Fields of unit variance, each white noise filtered to a Gaussian band ``(centre, width)``
    of spatial frequency (cycles per pixel); one FFT of one white-noise image for all bands."""
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


def _shape_field(
    kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, cy: float, cx: float, r: float
) -> np.ndarray:
    """A normalised radius ``f`` of a shape centred at ``(cy, cx)``: ``f < 1`` inside."""
    angle = rng.uniform(0, math.pi)
    dy, dx = yy - cy, xx - cx
    a = dx * math.cos(angle) + dy * math.sin(angle)
    b = -dx * math.sin(angle) + dy * math.cos(angle)
    aspect = rng.uniform(0.5, 1.6)
    if kind == 0:  # ellipse
        return np.sqrt((a / (r * aspect)) ** 2 + (b / (r / aspect)) ** 2)
    if kind == 1:  # box
        return np.maximum(np.abs(a) / (r * aspect), np.abs(b) / (r / aspect))
    rho = np.sqrt(a * a + b * b)
    theta = np.arctan2(b, a)
    if kind == 2:  # regular polygon with 3-6 sides
        n = int(rng.integers(3, 7))
        sector = 2 * math.pi / n
        return rho * np.cos((theta % sector) - sector / 2) / (r * math.cos(math.pi / n))
    radius = np.full_like(theta, r)  # blob: radius modulated by a few harmonics
    for harmonic in (2, 3, 5):
        radius *= 1.0 + rng.uniform(0.0, 0.18) * np.cos(harmonic * theta + rng.uniform(0, 2 * math.pi))
    return rho / radius


def _box(cy: float, cx: float, radius: float, h: int, w: int) -> tuple[slice, slice]:
    """The window of the canvas within ``radius`` of ``(cy, cx)`` (shapes are drawn inside it)."""
    y0, y1 = max(0, int(cy - radius)), min(h, int(math.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(cx - radius)), min(w, int(math.ceil(cx + radius)) + 1)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    (y0, x0), (y1, x1) = p0, p1
    vy, vx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * vy + (xx - x0) * vx) / (vy * vy + vx * vx + 1e-9), 0.0, 1.0)
    return np.hypot(yy - (y0 + t * vy), xx - (x0 + t * vx))


# ---------------------------------------------------------------------------- layout
def _layout(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, low: np.ndarray) -> np.ndarray:
    h, w = yy.shape
    s = min(h, w)
    label = np.empty((h, w), dtype=np.int64)
    # Large regions: a wavy, tilted horizon; below it ground and grass split by a noise threshold.
    horizon = h * rng.uniform(0.2, 0.5) + (xx[0] - w / 2) * rng.uniform(-0.25, 0.25)
    for period in (rng.uniform(0.5, 1.5) * w, rng.uniform(0.1, 0.3) * w):
        horizon = horizon + rng.uniform(0.0, 0.05) * h * np.sin(
            2 * math.pi * xx[0] / period + rng.uniform(0, 2 * math.pi)
        )
    above = SKY if rng.random() < 0.7 else BRICK
    first, second = (GROUND, GRASS) if rng.random() < 0.5 else (GRASS, GROUND)
    label[:] = np.where(low > rng.uniform(-0.6, 0.6), first, second)
    label[yy < horizon[None, :]] = above

    # Medium objects and poles, interleaved so that they occlude each other.
    events = ["object"] * int(rng.integers(2, 6)) + ["pole"] * int(rng.integers(0, 4))
    rng.shuffle(events)
    for event in events:
        if event == "object":
            r = s * rng.uniform(0.08, 0.25)
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            box = _box(cy, cx, 1.8 * r + 4.0, h, w)
            field = _shape_field(int(rng.integers(0, 4)), yy[box], xx[box], rng, cy, cx, r)
            if rng.random() < 0.4:  # a rim of 1-2 px around the object
                label[box][field < 1.0 + rng.uniform(1.0, 2.0) / r] = WIRE
            label[box][field < 1.0] = rng.choice(_OBJECT_CLASSES)
        else:
            x0 = rng.uniform(0, w)
            top = rng.uniform(0, 0.5 * h)
            dist = _segment_distance(yy, xx, (top, x0), (h + 1.0, x0 + rng.uniform(-0.08, 0.08) * h))
            label[dist <= rng.uniform(0.5, 1.5)] = POLE
            if rng.random() < 0.5:  # a lamp or sign on top
                r = s * rng.uniform(0.02, 0.05)
                box = _box(top, x0, 1.8 * r + 2.0, h, w)
                lamp = _shape_field(int(rng.integers(0, 4)), yy[box], xx[box], rng, top, x0, r)
                label[box][lamp < 1.0] = rng.choice(_OBJECT_CLASSES)

    # Small objects of a few pixels.
    for _ in range(int(rng.integers(3, 9))):
        r = s * rng.uniform(0.015, 0.05)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        box = _box(cy, cx, 1.8 * r + 2.0, h, w)
        field = _shape_field(int(rng.integers(0, 4)), yy[box], xx[box], rng, cy, cx, r)
        label[box][field < 1.0] = rng.choice(_OBJECT_CLASSES)

    # Sagging wires of 1-2 px, on top of everything.
    for _ in range(int(rng.integers(0, 3))):
        y0 = rng.uniform(0.05, 0.6) * h
        sag = rng.uniform(0.02, 0.2) * h
        mid = rng.uniform(0.2, 0.8) * w
        curve = y0 + sag * ((xx[0] - mid) / w) ** 2 * 4 + rng.uniform(-0.1, 0.1) * (xx[0] - mid)
        slope = np.gradient(curve)
        half = rng.uniform(0.5, 1.0) * np.sqrt(1.0 + slope * slope)
        label[np.abs(yy - curve[None, :]) <= half[None, :]] = WIRE
    return label


# ---------------------------------------------------------------------------- textures
def _jitter(rng: np.random.Generator, colour: tuple[float, float, float], amount: float = 0.04) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _wave(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, angle: float, period: float) -> np.ndarray:
    return np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 2 * math.pi))


def _texture(
    c: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, noise: dict[str, np.ndarray], h: int
) -> np.ndarray:
    """The texture of class ``c`` at the pixels ``(yy, xx)`` (1-d coordinates), ``(N, 3)``."""
    one = np.ones_like(yy)[..., None]
    if c == SKY:
        top, bottom = _jitter(rng, (0.50, 0.66, 0.88)), _jitter(rng, (0.78, 0.86, 0.95))
        t = (yy / h)[..., None]
        return top * (1 - t) + bottom * t + 0.015 * noise["high"][..., None]
    if c == GROUND:
        return _jitter(rng, (0.46, 0.36, 0.26)) + (0.10 * noise["low"] + 0.03 * noise["high"])[..., None] * np.array(
            [1.0, 0.9, 0.7], np.float32
        )
    if c == GRASS:
        return _jitter(rng, (0.32, 0.50, 0.22)) + (0.09 * noise["high"])[..., None] * np.array(
            [0.8, 1.0, 0.6], np.float32
        )
    if c == FOLIAGE:
        blotch = 0.08 * noise["mid"] - 0.06 * (noise["mid"] > 1.0)
        return _jitter(rng, (0.32, 0.50, 0.22)) + (blotch + 0.02 * noise["high"])[..., None] * np.array(
            [0.8, 1.0, 0.6], np.float32
        )
    if c == BRICK:
        row_h = rng.uniform(5.0, 8.0)
        brick_w = row_h * rng.uniform(1.8, 2.6)
        v = yy + rng.uniform(0, row_h)
        row = np.floor(v / row_h)
        u = xx + rng.uniform(0, brick_w) + (row % 2) * brick_w / 2
        col = np.floor(u / brick_w)
        mortar = ((v % row_h) < 1.0) | ((u % brick_w) < 1.0)
        shade = np.modf(np.sin(row * 12.9898 + col * 78.233) * 43758.5453)[0]  # per-brick variation
        brick = _jitter(rng, (0.60, 0.30, 0.22)) + 0.06 * shade[..., None]
        return np.where(mortar[..., None], _jitter(rng, (0.72, 0.70, 0.66)) * one, brick)
    if c in (STRIPES, PLANKS):
        beige = _jitter(rng, (0.74, 0.67, 0.50))
        if c == STRIPES:
            pattern = 0.10 * np.sign(_wave(rng, yy, xx, math.pi / 2 + rng.uniform(-0.35, 0.35), rng.uniform(6.0, 9.0)))
        else:
            pattern = 0.10 * _wave(rng, yy, xx, rng.uniform(-0.35, 0.35), rng.uniform(3.0, 5.0))
        return beige + (pattern + 0.02 * noise["high"])[..., None]
    if c == CHECKER:
        angle, period = rng.uniform(0, math.pi / 2), rng.uniform(6.0, 10.0)
        cells = np.sign(_wave(rng, yy, xx, angle, period) * _wave(rng, yy, xx, angle + math.pi / 2, period))
        dark, light = _jitter(rng, (0.34, 0.40, 0.55)), _jitter(rng, (0.56, 0.60, 0.70))
        return np.where((cells > 0)[..., None], light * one, dark * one)
    if c == DOTS:
        period = rng.uniform(5.0, 8.0)
        u = (xx + rng.uniform(0, period)) % period - period / 2
        v = (yy + rng.uniform(0, period)) % period - period / 2
        dot = (u * u + v * v) < (period * rng.uniform(0.18, 0.28)) ** 2
        return np.where(dot[..., None], _jitter(rng, (0.78, 0.64, 0.82)) * one, _jitter(rng, (0.42, 0.30, 0.50)) * one)
    if c == POLE:
        return (
            _jitter(rng, (0.40, 0.40, 0.43))
            + (0.05 * np.sin(yy / rng.uniform(2.0, 4.0)) + 0.02 * noise["high"])[..., None]
        )
    if c == WIRE:
        return _jitter(rng, (0.16, 0.13, 0.11)) + 0.02 * noise["high"][..., None]
    raise ValueError(f"class: expected 0..{len(SCENE_CLASSES) - 1}, got {c}")


def _blur3(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 3-tap Gaussian blur (edge pixels repeated) of an ``(H, W, 3)`` image."""
    side = math.exp(-0.5 / (sigma * sigma))
    side, centre = side / (1 + 2 * side), 1 / (1 + 2 * side)
    for axis in (0, 1):
        padded = np.concatenate([image.take([0], axis), image, image.take([-1], axis)], axis)
        n = image.shape[axis]
        image = centre * image + side * (padded.take(range(0, n), axis) + padded.take(range(2, n + 2), axis))
    return image


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def render_scene(seed: int, split: str, index: int, size: int | tuple[int, int] = 128) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: image ``(H, W, 3)`` float32 in ``[0, 1]`` and labels ``(H, W)`` int64.

    The result depends on ``(seed, split, index, size)`` only.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 8 or w < 8:
        raise ValueError(f"size: expected at least 8x8 pixels, got {h}x{w}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    yy, xx = _grid(h, w)
    low, illum = _band_noise(rng, (h, w), [(0.0, 0.025), (0.0, 0.008)])
    high, mid = _band_noise(rng, (h, w), [(0.5, 0.25), (0.09, 0.03)])
    noise = {"low": low, "mid": mid, "high": high}
    label = _layout(rng, yy, xx, low)

    # Texture each class at its own pixels only (pixels grouped by class with one sort).
    flat_label = label.ravel()
    order = np.argsort(flat_label, kind="stable")
    bounds = np.cumsum(np.bincount(flat_label, minlength=len(SCENE_CLASSES)))
    image: np.ndarray = np.empty((h * w, 3), dtype=np.float32)
    flat_y, flat_x = yy.ravel(), xx.ravel()
    flat_noise = {k: v.ravel() for k, v in noise.items()}
    start = 0
    for c, stop in enumerate(bounds):
        if stop > start:
            idx = order[start:stop]
            image[idx] = _texture(c, rng, flat_y[idx], flat_x[idx], {k: v[idx] for k, v in flat_noise.items()}, h)
        start = stop
    image = image.reshape(h, w, 3)

    # Soft shading: low-frequency illumination and a global gradient; slight blur; pixel noise.
    gradient = 1.0 + rng.uniform(-0.15, 0.15) * (xx / w - 0.5) + rng.uniform(-0.15, 0.15) * (yy / h - 0.5)
    image *= (gradient * (1.0 + rng.uniform(0.05, 0.15) * illum))[..., None]
    image = _blur3(image, rng.uniform(0.3, 0.8))
    image += rng.uniform(0.01, 0.04) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


class Scenes(GeneratedDataset):
    """Built-in generated segmentation scenes (11 textured classes, see :data:`SCENE_CLASSES`).

    Args:
        num_images: length of the dataset.
        size: side (or ``(H, W)``) of the images.
        seed: the seed of the whole set; ``(seed, split, index)`` fixes each image.
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        transform: a joint transform ``(image, label) -> (image, label)`` (see
            :mod:`errwrap.data.transforms`).
        cache: keep generated images in memory (each is drawn once).

    Shapes:
        item: image ``(3, H, W)`` float32 in ``[0, 1]`` (before ``transform``), label ``(H, W)`` int64.

    Example:
        >>> ds = Scenes(4, size=64)
        >>> image, label = ds[0]
        >>> image.shape, label.shape, ds.num_classes
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), 11)
    """

    class_names = list(SCENE_CLASSES)
    num_classes = len(SCENE_CLASSES)
    min_size = 1
    _render = staticmethod(render_scene)
