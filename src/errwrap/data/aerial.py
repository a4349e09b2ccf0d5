"""``Aerial``: generated top-down, map-like tiles (6 classes), a second family beside ``Scenes``.

Each tile is drawn from ``(seed, split, index)`` alone with vectorised numpy. What makes it hard,
and different in character from the street-like :class:`~errwrap.data.Scenes`:

- **class imbalance**: bare soil covers about two thirds of a tile, cars well under 1%;
- **long thin structures**: roads are straight or curved bands of constant width (3-7 px at
  128 px) that cross the whole tile, with dashed centre markings; some are sandy dirt tracks with
  wheel ruts, close in colour to light soil;
- **small objects**: cars of about 2x4 px on the roads, single tree crowns of a few pixels;
- **colour is not enough**: crop parcels of the soil class can be as green as vegetation (they
  differ in texture: rows vs. blotchy crowns), grey roofs look like asphalt, water ranges from
  blue to murky green; buildings cast shadows onto every other class (the label does not change
  in the shadow);
- **soft boundaries**: water shores fade over a few pixels, so the label edge is not an image
  edge; a slight blur, uneven light and pixel noise on top.
"""

from __future__ import annotations

import math
from typing import Any

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

__all__ = ["Aerial", "AERIAL_CLASSES", "render_aerial"]

#: Class names of :class:`Aerial`, in label order.
AERIAL_CLASSES: tuple[str, ...] = (
    "soil",        # 0 bare ground and crop parcels (some in rows, some green)
    "water",       # 1 lakes and rivers with soft shores
    "vegetation",  # 2 woods, hedges and single tree crowns
    "building",    # 3 rectangles and L-shapes, gabled or flat roofs, with shadows
    "road",        # 4 bands of constant width, asphalt with markings or dirt
    "car",         # 5 small rectangles on roads
)
SOIL, WATER, VEGETATION, BUILDING, ROAD, CAR = range(len(AERIAL_CLASSES))

_ROOF_COLOURS = np.array(
    [(0.62, 0.30, 0.22), (0.50, 0.50, 0.52), (0.32, 0.32, 0.35), (0.70, 0.62, 0.50), (0.80, 0.80, 0.78)], np.float32
)
_CAR_COLOURS = np.array(
    [(0.92, 0.92, 0.90), (0.10, 0.10, 0.12), (0.70, 0.12, 0.10), (0.15, 0.25, 0.60), (0.65, 0.66, 0.68)], np.float32
)


def _jitter(
    rng: np.random.Generator, colour: tuple[float, float, float] | np.ndarray, amount: float = 0.04
) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _road(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> dict:
    """A road's centre line, straight or a gentle parabola ``v = bend * (1 - (u / reach) ** 2)``
    in a frame rotated by ``angle`` around a point of the tile; per pixel its distance ``d`` to
    the line (first order, exact for a straight road; the curvature radius stays above ~250 px),
    the coordinate ``u`` along it, and the line's slope there."""
    h, w = yy.shape
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    angle = rng.uniform(0, math.pi) if rng.random() < 0.5 else rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.1, 0.1)
    bend = 0.0 if rng.random() < 0.55 else rng.uniform(-0.35, 0.35) * min(h, w)
    reach = 0.9 * math.hypot(h, w)
    u, v = rotated_coords(yy, xx, cy, cx, angle)
    slope = -2.0 * bend * u / reach**2
    d = np.abs(v - bend * (1.0 - (u / reach) ** 2)) / np.sqrt(1.0 + slope * slope)
    return {"cy": cy, "cx": cx, "angle": angle, "bend": bend, "reach": reach, "d": d, "along": u, "slope": slope}


def _layout(rng: np.random.Generator, h: int, w: int, noise: dict[str, np.ndarray]) -> dict:
    """The label map and what the renderer needs to draw it (soft water, roads, buildings, cars)."""
    yy, xx = grid(h, w)
    scale = min(h, w) / 128.0
    label = np.full((h, w), SOIL, dtype=np.int64)

    # Vegetation: woods and hedges from a noise threshold.
    veg_field = 0.8 * noise["low2"] + 0.45 * noise["mid"]
    label[veg_field > rng.uniform(0.5, 1.4)] = VEGETATION

    # Water: a lake from low-frequency noise, or a river, or neither; ``water`` > 0 inside (px).
    water: np.ndarray = np.full((h, w), -1e3, dtype=np.float32)
    kind = rng.choice(["lake", "river", "none"], p=[0.4, 0.35, 0.25])
    if kind == "lake":
        water = (noise["low"] - rng.uniform(0.7, 1.5)) * 12.0 * scale + 1.5 * noise["mid"]
    elif kind == "river":
        cy, cx, angle = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0, math.pi)
        u, v = rotated_coords(yy, xx, cy, cx, angle)
        amp, period, phase = rng.uniform(0.05, 0.2) * h, rng.uniform(0.8, 2.0) * w, rng.uniform(0, 2 * math.pi)
        centre = amp * np.sin(2 * math.pi * u / period + phase)
        slope = amp * 2 * math.pi / period * np.cos(2 * math.pi * u / period + phase)
        dist = np.abs(v - centre) / np.sqrt(1.0 + slope * slope)
        water = rng.uniform(5.0, 11.0) * scale + 1.5 * scale * noise["mid"] - dist
    label[water > 0] = WATER

    # Single tree crowns of a few pixels on open soil.
    for _ in range(int(rng.integers(0, 12))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.2, 3.0) * scale
        box = window(cy, cx, r + 1, h, w)
        crown = (yy[box] - cy) ** 2 + (xx[box] - cx) ** 2 < r * r
        label[box][crown & (label[box] == SOIL)] = VEGETATION

    # Roads: 1-3 bands of constant width crossing the tile; some are dirt tracks.
    roads = []
    road_mask = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        road = _road(rng, yy, xx)
        road["half"] = rng.uniform(1.5, 3.5) * scale
        road["mask"] = road["d"] <= road["half"]
        road["dirt"] = rng.random() < 0.25
        road_mask |= road["mask"]
        roads.append(road)
    label[road_mask] = ROAD

    # Buildings: rotated rectangles or L-shapes, kept off roads and water; one dominant angle.
    blocked = road_mask | (water > -2.0 * scale)
    blocked = (
        blocked | np.roll(blocked, 2, 0) | np.roll(blocked, -2, 0) | np.roll(blocked, 2, 1) | np.roll(blocked, -2, 1)
    )
    buildings: list[dict[str, Any]] = []
    angle0 = 0.0 if rng.random() < 0.4 else rng.uniform(0, math.pi / 2)
    for _ in range(int(rng.integers(3, 16))):
        if len(buildings) >= 9:
            break
        a, b = rng.uniform(4.0, 13.0) * scale, rng.uniform(3.0, 8.0) * scale
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        angle = angle0 + rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.05, 0.05)
        box = window(cy, cx, math.hypot(a, 2.6 * b) + 1, h, w)  # room for an L wing
        u, v = rotated_coords(yy[box], xx[box], cy, cx, angle)
        inside = (np.abs(u) <= a) & (np.abs(v) <= b)
        if rng.random() < 0.3:  # an L: a wing along one end
            inside |= (np.abs(u - a * 0.6) <= 0.4 * a) & (v >= -b) & (v <= b * rng.uniform(1.8, 2.6))
        if not inside.any() or (blocked[box] & inside).any():
            continue
        label[box][inside] = BUILDING
        blocked[box] |= inside
        buildings.append({"box": box, "inside": inside, "v": v, "b": b, "gable": rng.random() < 0.6,
                          "colour": _jitter(rng, _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))], 0.05),
                          "height": rng.uniform(1.5, 4.0) * scale})

    # Cars: small rectangles on the lanes of asphalt roads.
    cars = []
    for road in roads:
        if road["dirt"] or road["half"] < 2.0 * scale:
            continue
        ys, xs = np.nonzero(road["mask"])
        for _ in range(int(rng.poisson(3.0))):
            if len(ys) == 0:
                break
            k = int(rng.integers(len(ys)))
            # the nearest point of the centre line, in the road's frame
            along = float(road["along"][ys[k], xs[k]])
            across = road["bend"] * (1.0 - (along / road["reach"]) ** 2) + rng.choice([-1.0, 1.0]) * road["half"] * 0.45
            sin, cos = math.sin(road["angle"]), math.cos(road["angle"])
            cy, cx = road["cy"] + along * sin + across * cos, road["cx"] + along * cos - across * sin
            angle = road["angle"] + math.atan(float(road["slope"][ys[k], xs[k]]))
            length, width = rng.uniform(1.6, 2.4) * scale, rng.uniform(0.9, 1.2) * scale
            box = window(cy, cx, length + 1, h, w)
            u, v = rotated_coords(yy[box], xx[box], cy, cx, angle)
            inside = (np.abs(u) <= length) & (np.abs(v) <= width) & road["mask"][box]
            if inside.any():
                label[box][inside] = CAR
                cars.append(
                    {
                        "box": box,
                        "inside": inside,
                        "colour": _jitter(rng, _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))], 0.03),
                    }
                )
    return {"label": label, "water": water, "roads": roads, "buildings": buildings, "cars": cars}


def _textures(rng: np.random.Generator, h: int, w: int, noise: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Full-tile ``(H, W, 3)`` textures of soil, water and vegetation."""
    yy, xx = grid(h, w)
    # Soil: parcels (nearest of a few seeds), each with its own tone; some with rows, some green.
    seeds = rng.uniform(0, 1, (int(rng.integers(3, 7)), 2)) * (h, w)
    parcel = ((yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2).argmin(0)
    base = _jitter(rng, (0.58, 0.48, 0.36), 0.06)
    tones = base + rng.uniform(-0.08, 0.08, (len(seeds), 1)).astype(np.float32)
    green = rng.random(len(seeds)) < 0.3
    tones[green] = _jitter(rng, (0.42, 0.50, 0.28), 0.05)
    rows = np.zeros((h, w), dtype=np.float32)
    for k in range(len(seeds)):
        if rng.random() < 0.5:
            angle, period = rng.uniform(0, math.pi), rng.uniform(2.5, 4.5)
            u, _ = rotated_coords(yy, xx, 0.0, 0.0, angle)
            rows = np.where(parcel == k, 0.05 * np.sin(2 * math.pi * u / period), rows)
    soil = tones[parcel] + (rows + 0.04 * noise["low"] + 0.02 * noise["high"])[..., None]

    # Water: blue to murky green, smooth, faint ripples.
    water_colour = _jitter(rng, (0.16, 0.26, 0.36), 0.03) + rng.uniform(0, 1) * np.array(
        [0.06, 0.06, -0.08], np.float32
    )
    u, _ = rotated_coords(yy, xx, 0.0, 0.0, rng.uniform(0, math.pi))
    ripple = 0.012 * np.sin(2 * math.pi * u / rng.uniform(3.0, 6.0)) * (noise["mid"] > 0.5)
    water = water_colour + (ripple + 0.015 * noise["low"])[..., None]

    # Vegetation: dark blotchy crowns.
    crowns = 0.07 * np.tanh(1.5 * noise["high"]) + 0.05 * noise["mid"]
    vegetation = _jitter(rng, (0.24, 0.34, 0.17), 0.04) + crowns[..., None] * np.array([0.9, 1.0, 0.7], np.float32)
    return {SOIL: soil, WATER: water, VEGETATION: vegetation}


def _cast(shadow: np.ndarray, inside: np.ndarray, box: tuple[slice, slice], dy: int, dx: int) -> None:
    """Mark in ``shadow`` the footprint ``inside`` (drawn in ``box``) moved by ``(dy, dx)``, no wrap."""
    h, w = shadow.shape
    y0, x0 = box[0].start + dy, box[1].start + dx
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + inside.shape[0]), min(w, x0 + inside.shape[1])
    if ys < ye and xs < xe:
        shadow[ys:ye, xs:xe] |= inside[ys - y0:ye - y0, xs - x0:xe - x0]


def render_aerial(
    seed: int, split: str, index: int, size: int | tuple[int, int] = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one tile: image ``(H, W, 3)`` float32 in ``[0, 1]`` and labels ``(H, W)`` int64.

    The result depends on ``(seed, split, index, size)`` only.
    """
    h, w = check_render_args(split, size)
    rng = make_rng(seed, split, index, family=1)
    yy, xx = grid(h, w)
    scale = min(h, w) / 128.0
    low, low2, illum = band_noise(rng, (h, w), [(0.0, 0.02), (0.0, 0.03), (0.0, 0.008)])
    mid, high = band_noise(rng, (h, w), [(0.07, 0.025), (0.45, 0.25)])
    noise = {"low": low, "low2": low2, "mid": mid, "high": high}
    scene = _layout(rng, h, w, noise)
    label = scene["label"]
    tex = _textures(rng, h, w, noise)

    # Land (soil or vegetation), then water faded in over the shore.
    image = np.where((label == VEGETATION)[..., None], tex[VEGETATION], tex[SOIL])
    shore = rng.uniform(1.5, 3.5) * scale
    alpha = np.clip(0.5 + scene["water"] / shore, 0.0, 1.0)[..., None]
    wet = image * 0.85 + 0.05
    image = (1 - alpha) * np.where(alpha > 0, wet, image) + alpha * tex[WATER]

    # Roads: asphalt with dashed centre lines, or sandy dirt tracks with ruts.
    for road in scene["roads"]:
        mask = road["mask"]
        if road["dirt"]:
            # compacted sand, lighter than the soil around, with two darker wheel ruts
            ruts = np.abs(road["d"][mask] - 0.5 * road["half"]) < 0.45 * scale
            colour = _jitter(rng, (0.72, 0.64, 0.52), 0.04) + 0.02 * noise["high"][mask][:, None] - 0.08 * ruts[:, None]
        else:
            asphalt = _jitter(rng, (0.42, 0.42, 0.44), 0.06)
            edge = (road["d"][mask] > road["half"] - 0.8 * scale)[:, None]
            colour = asphalt + 0.025 * noise["high"][mask][:, None] - 0.04 * edge
            period = rng.uniform(6.0, 10.0) * scale
            dash = (road["d"][mask] < 0.55 * scale) & ((road["along"][mask] % period) < 0.5 * period)
            colour = np.where(dash[:, None], np.float32(0.88), colour)
        image[mask] = colour

    # Buildings: gabled roofs (two shades and a ridge) or flat roofs (a darker rim); shadows.
    shadow = np.zeros((h, w), dtype=bool)
    sun = rng.uniform(0, 2 * math.pi)
    for b in scene["buildings"]:
        box, inside, v = b["box"], b["inside"], b["v"]
        roof = np.broadcast_to(b["colour"], v.shape + (3,)).copy()
        if b["gable"]:
            roof *= np.where(v > 0, 0.8, 1.05)[..., None]
            roof[np.abs(v) < 0.6 * scale] *= 1.15
        else:
            interior = (
                inside & np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1)
            )
            roof[inside & ~interior] *= 0.75
        roof += 0.015 * noise["high"][box][..., None]
        image[box][inside] = roof[inside]
        dy, dx = round(b["height"] * math.sin(sun)), round(b["height"] * math.cos(sun))
        for step in range(1, max(abs(dy), abs(dx)) + 1):
            frac = step / max(abs(dy), abs(dx))
            _cast(shadow, inside, box, round(dy * frac), round(dx * frac))
    shadow &= (label != BUILDING) & (label != CAR)
    image[shadow] *= rng.uniform(0.45, 0.65)

    for car in scene["cars"]:
        image[car["box"]][car["inside"]] = car["colour"]

    # Uneven light, a slight blur, pixel noise.
    gradient = 1.0 + rng.uniform(-0.1, 0.1) * (xx / w - 0.5) + rng.uniform(-0.1, 0.1) * (yy / h - 0.5)
    image = image * (gradient * (1.0 + rng.uniform(0.03, 0.1) * illum))[..., None]
    image = gaussian_blur(image.astype(np.float32), rng.uniform(0.35, 0.7) * scale)
    image += rng.uniform(0.01, 0.03) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


class Aerial(GeneratedDataset):
    """Generated top-down map-like tiles (6 classes, see :data:`AERIAL_CLASSES`).

    Soil and crop parcels, lakes and rivers with soft shores, woods and single trees, buildings
    with shadows, roads of constant width with markings, and cars of a few pixels: strong class
    imbalance, long thin roads, small objects (module docstring: what makes it hard).

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
        >>> ds = Aerial(4, size=64)
        >>> image, label = ds[0]
        >>> image.shape, label.shape, ds.num_classes
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), 6)
    """

    class_names = list(AERIAL_CLASSES)
    num_classes = len(AERIAL_CLASSES)
    _render = staticmethod(render_aerial)
