"""Pictures: colour palettes, an error-probability heat map, the six-tile panel
``image | ground truth | base | error probability | corrected | changed pixels``, and a
risk-coverage plot.

Everything returns NumPy ``uint8`` arrays (``H x W x 3``) or Pillow images; nothing is shown.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ._io import atomic_path
from .metrics import risk_coverage_curve

__all__ = [
    "CITYSCAPES_PALETTE",
    "generated_palette",
    "ade20k_palette",
    "palette_for",
    "colorize",
    "heatmap",
    "to_uint8_image",
    "make_panel",
    "save_label_png",
    "save_heatmap_png",
    "PANEL_TITLES",
    "PANEL_GAP",
    "PANEL_TITLE_HEIGHT",
    "risk_coverage_plot",
    "risk_coverage_curve",
    "PLOT_COLORS",
]

#: The 19 Cityscapes training classes' official colours (road, sidewalk, ..., bicycle).
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)

PANEL_TITLES = ("image", "ground truth", "base", "error probability", "corrected", "changed pixels")
PANEL_GAP = 4
PANEL_TITLE_HEIGHT = 16
IGNORE_COLOR = (0, 0, 0)


def generated_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for any number of classes (bit-interleaved, as in the PASCAL VOC
    colour map), ``num_classes x 3`` uint8; class 0 is not black so it differs from 'ignore'."""
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(num_classes):
        c, r, g, b = i + 1, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def ade20k_palette() -> np.ndarray:
    """150 distinct colours for ADE20K's classes (errwrap's generated palette, not the
    benchmark's own colour table)."""
    return generated_palette(150)


def palette_for(num_classes: int, name: str | None = None) -> np.ndarray:
    """``"cityscapes"`` (19 classes), ``"ade20k"`` (150) or ``"generated"``; ``None`` picks
    Cityscapes for 19 classes and the generated palette otherwise."""
    if name is None:
        name = "cityscapes" if num_classes == 19 else "generated"
    if name == "cityscapes":
        if num_classes > len(CITYSCAPES_PALETTE):
            raise ValueError(f"palette 'cityscapes' has 19 colours, got num_classes={num_classes}")
        return CITYSCAPES_PALETTE[:num_classes]
    if name == "ade20k":
        return ade20k_palette()[:num_classes] if num_classes <= 150 else generated_palette(num_classes)
    if name == "generated":
        return generated_palette(num_classes)
    raise ValueError(f"palette: expected 'cityscapes', 'ade20k' or 'generated', got {name!r}")


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def colorize(labels: torch.Tensor | np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Label map ``H x W`` -> ``H x W x 3`` uint8; ``ignore_index`` (and any value outside the
    palette) is black."""
    labels = _numpy(labels).astype(np.int64)
    if labels.ndim != 2:
        raise ValueError(f"labels: expected an HxW map, got shape {labels.shape}")
    valid = (labels >= 0) & (labels < len(palette)) & (labels != ignore_index)
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[valid] = palette[labels[valid]]
    return out


# Anchor colours of a dark-to-bright perceptual ramp (black, purple, red, orange, pale yellow).
_RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)


def heatmap(prob: torch.Tensor | np.ndarray) -> np.ndarray:
    """Probability map ``H x W`` in ``[0, 1]`` -> ``H x W x 3`` uint8, dark (0) to bright (1)."""
    p = np.clip(_numpy(prob).astype(np.float64), 0.0, 1.0)
    if p.ndim != 2:
        raise ValueError(f"prob: expected an HxW map, got shape {p.shape}")
    pos = p * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def to_uint8_image(
    image: torch.Tensor | np.ndarray,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """A ``3 x H x W`` float image (in ``[0, 1]``, or normalised with ``mean``/``std``) ->
    ``H x W x 3`` uint8."""
    x = _numpy(image).astype(np.float64)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image: expected a 3xHxW (or 1xHxW) array, got shape {x.shape}")
    if mean is not None and std is not None:
        x = x * np.asarray(std, dtype=np.float64)[:, None, None] + np.asarray(mean, dtype=np.float64)[:, None, None]
    x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0)


def _changed(base: np.ndarray, corrected: np.ndarray, gt: np.ndarray | None, ignore_index: int) -> np.ndarray:
    """Green: fixed by the correction; red: broken by it; yellow: changed where unlabeled or
    still wrong; dark grey: unchanged."""
    out = np.full((*base.shape, 3), 40, dtype=np.uint8)
    changed = base != corrected
    if gt is None:
        out[changed] = (255, 255, 255)
        return out
    labelled = gt != ignore_index
    out[changed] = (255, 210, 0)
    out[changed & labelled & (corrected == gt)] = (0, 200, 0)
    out[changed & labelled & (base == gt)] = (220, 0, 0)
    return out


def make_panel(
    image: torch.Tensor | np.ndarray,
    base_labels: torch.Tensor | np.ndarray,
    error_prob: torch.Tensor | np.ndarray,
    corrected: torch.Tensor | np.ndarray,
    *,
    ground_truth: torch.Tensor | np.ndarray | None = None,
    palette: np.ndarray | None = None,
    num_classes: int | None = None,
    ignore_index: int = 255,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    titles: bool = True,
) -> Image.Image:
    """The six-tile panel ``image | ground truth | base | error probability | corrected |
    changed pixels`` as an RGB Pillow image.

    Size: width ``6 * W + 5 * PANEL_GAP``, height ``H + PANEL_TITLE_HEIGHT`` (``H`` without
    titles). Without ground truth its tile is grey. In the last tile green pixels were fixed by
    the correction, red ones broken, yellow ones changed but still wrong (or unlabeled).

    Shapes:
        image ``3 x H x W`` float; labels and error_prob ``H x W``.
    """
    base = _numpy(base_labels).astype(np.int64)
    fixed = _numpy(corrected).astype(np.int64)
    gt = None if ground_truth is None else _numpy(ground_truth).astype(np.int64)
    h, w = base.shape
    if palette is None:
        top = int(max(base.max(), fixed.max(), 0)) + 1
        palette = palette_for(num_classes or top)
    img = to_uint8_image(image, mean, std)
    for name, arr in (
        ("image", img[..., 0]),
        ("error_prob", _numpy(error_prob)),
        ("corrected", fixed),
        ("ground_truth", gt),
    ):
        if arr is not None and arr.shape[:2] != (h, w):
            raise ValueError(f"{name}: expected spatial size {(h, w)} like base_labels, got {arr.shape[:2]}")
    tiles = [
        img,
        colorize(gt, palette, ignore_index) if gt is not None else np.full((h, w, 3), 128, dtype=np.uint8),
        colorize(base, palette, ignore_index),
        heatmap(error_prob),
        colorize(fixed, palette, ignore_index),
        _changed(base, fixed, gt, ignore_index),
    ]
    top = PANEL_TITLE_HEIGHT if titles else 0
    if titles:  # tiles narrower than their titles (small images) are enlarged, nearest-neighbour
        widest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t) for t in PANEL_TITLES) + 4
        scale = max(1, math.ceil(widest / w))
        if scale > 1:
            tiles = [np.repeat(np.repeat(t, scale, axis=0), scale, axis=1) for t in tiles]
            h, w = h * scale, w * scale
    panel = Image.new("RGB", (6 * w + 5 * PANEL_GAP, h + top), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (tile, title) in enumerate(zip(tiles, PANEL_TITLES, strict=False)):
        x = i * (w + PANEL_GAP)
        panel.paste(Image.fromarray(tile), (x, top))
        if titles:
            draw.text((x + 2, 2), title, fill=(0, 0, 0))
    return panel


def save_label_png(labels: torch.Tensor | np.ndarray, path: str | os.PathLike, palette: np.ndarray) -> Path:
    """Save a label map as an indexed (palette) PNG whose pixel values are the class ids."""
    arr = _numpy(labels).astype(np.int64)
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise ValueError(f"labels: a palette PNG holds values 0..255, got range [{arr.min()}, {arr.max()}]")
    if arr.ndim != 2:
        raise ValueError(f"labels: expected an HxW map, got shape {arr.shape}")
    img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr.astype(np.uint8)).tobytes())
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette[:256]
    img.putpalette(flat.reshape(-1).tolist())
    return _save(img, path)


def save_heatmap_png(prob: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Save an error-probability map as a heat-map PNG."""
    return _save(Image.fromarray(heatmap(prob)), path)


def _save(img: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


# ---------------------------------------------------------------------- keys, overlays, sizes
#: The changed-pixels tile's colours as ``make_panel`` draws them, with ground truth.
CHANGED_KEY = (
    ("fixed", (0, 200, 0)),
    ("broken", (220, 0, 0)),
    ("changed, still wrong", (255, 210, 0)),
    ("unchanged", (40, 40, 40)),
)
#: The same tile's colours without ground truth.
CHANGED_KEY_NO_GROUND_TRUTH = (("changed", (255, 255, 255)), ("unchanged", (40, 40, 40)))
KEY_ROW_HEIGHT = 14
KEY_SWATCH = 10
#: Panels wider than this are shrunk by ``errwrap predict`` (``--panel-max-width``).
PANEL_MAX_WIDTH = 2048

__all__ += [
    "CHANGED_KEY",
    "CHANGED_KEY_NO_GROUND_TRUTH",
    "KEY_ROW_HEIGHT",
    "PANEL_MAX_WIDTH",
    "colorbar",
    "panel_key",
    "add_panel_key",
    "overlay",
    "shrink_to_width",
    "panel_scale",
]


def colorbar(width: int, height: int = KEY_SWATCH) -> np.ndarray:
    """The heat map's colour ramp from 0 (left) to 1 (right), ``height x width x 3`` uint8."""
    if width < 2 or height < 1:
        raise ValueError(f"colorbar: expected width >= 2 and height >= 1, got {width}x{height}")
    return heatmap(np.repeat(np.linspace(0.0, 1.0, width)[None], height, axis=0))


def _flow(
    draw: ImageDraw.ImageDraw, items: Sequence[tuple[str, tuple[int, int, int]]], x0: int, y: int, width: int
) -> int:
    """Draw ``swatch name`` items left to right from ``(x0, y)``, wrapping at ``width``; the ``y``
    below the last row."""
    x = x0
    for name, colour in items:
        step = KEY_SWATCH + 4 + int(draw.textlength(name)) + 10
        if x > x0 and x + step > width:
            x, y = x0, y + KEY_ROW_HEIGHT
        draw.rectangle((x, y + 2, x + KEY_SWATCH - 1, y + 1 + KEY_SWATCH), fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + KEY_SWATCH + 4, y + 1), name, fill=(0, 0, 0))
        x += step
    return y + KEY_ROW_HEIGHT


def panel_key(
    width: int,
    palette: np.ndarray,
    class_ids: Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
    ground_truth: bool = False,
    max_classes: int = 40,
) -> Image.Image:
    """A key for a panel, ``width`` pixels wide: the colours of ``class_ids`` (a class legend;
    names from ``class_names``, else the ids; at most ``max_classes``, then "+N more"), a colour
    bar for the error probability from 0 to 1, and the changed-pixels colours."""
    ids = sorted({int(c) for c in class_ids if 0 <= int(c) < len(palette)})
    names = [class_names[c] if class_names is not None and c < len(class_names) else str(c) for c in ids]
    items = [
        (name, tuple(int(v) for v in palette[c]))
        for c, name in zip(ids[:max_classes], names[:max_classes], strict=False)
    ]
    # tall enough; cropped below
    canvas = Image.new("RGB", (width, 64 + KEY_ROW_HEIGHT * (len(items) + 3)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    label = "classes:"
    draw.text((2, 1), label, fill=(0, 0, 0))
    x0 = 2 + int(draw.textlength("changed pixels:")) + 8
    y = _flow(draw, items, x0, 0, width)  # type: ignore[arg-type]
    if len(ids) > max_classes:
        draw.text((x0, y + 1), f"+{len(ids) - max_classes} more", fill=(0, 0, 0))
        y += KEY_ROW_HEIGHT
    draw.text((2, y + 1), "error prob.:", fill=(0, 0, 0))
    draw.text((x0, y + 1), "0", fill=(0, 0, 0))
    bar_left = x0 + int(draw.textlength("0")) + 4
    bar_width = max(2, min(256, width - bar_left - int(draw.textlength("1")) - 8))
    canvas.paste(Image.fromarray(colorbar(bar_width)), (bar_left, y + 2))
    draw.text((bar_left + bar_width + 4, y + 1), "1", fill=(0, 0, 0))
    y += KEY_ROW_HEIGHT
    draw.text((2, y + 1), "changed pixels:", fill=(0, 0, 0))
    y = _flow(draw, CHANGED_KEY if ground_truth else CHANGED_KEY_NO_GROUND_TRUTH, x0, y, width)
    return canvas.crop((0, 0, width, y + 2))


def add_panel_key(
    panel: Image.Image,
    palette: np.ndarray,
    class_ids: Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
    ground_truth: bool = False,
) -> Image.Image:
    """``panel`` with :func:`panel_key` below it (same width)."""
    key = panel_key(panel.width, palette, class_ids, class_names=class_names, ground_truth=ground_truth)
    out = Image.new("RGB", (panel.width, panel.height + key.height), (255, 255, 255))
    out.paste(panel.convert("RGB"), (0, 0))
    out.paste(key, (0, panel.height))
    return out


def overlay(
    image: torch.Tensor | np.ndarray,
    colours: np.ndarray,
    alpha: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """``image`` blended with a colour map (``colorize`` labels or a ``heatmap``):
    ``(1 - alpha) * image + alpha * colours``, ``H x W x 3`` uint8.

    Shapes:
        image ``3 x H x W`` float (as :func:`to_uint8_image` reads it) or ``H x W x 3`` uint8;
        colours ``H x W x 3`` uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    img = _numpy(image)
    if not (img.ndim == 3 and img.shape[-1] == 3 and img.dtype == np.uint8):
        img = to_uint8_image(image, mean, std)
    colours = np.asarray(colours)
    if colours.shape != img.shape:
        raise ValueError(f"colours: expected shape {img.shape} like the image, got {colours.shape}")
    return np.round((1.0 - alpha) * img + alpha * colours.astype(np.float64)).astype(np.uint8)


def panel_scale(width: int, max_width: int | None, tiles: int = len(PANEL_TITLES)) -> float:
    """The factor (at most 1) by which images ``width`` pixels wide must shrink so that a panel of
    ``tiles`` tiles is at most ``max_width`` wide; 1 when ``max_width`` is ``None``."""
    if max_width is None:
        return 1.0
    room = (max_width - (tiles - 1) * PANEL_GAP) // tiles
    if room < 1:
        raise ValueError(f"max_width: {max_width} px leaves no room for {tiles} tiles")
    return min(1.0, room / width)


def shrink_to_width(img: Image.Image, max_width: int | None) -> Image.Image:
    """``img`` downscaled (aspect kept) to at most ``max_width`` pixels wide; unchanged if narrower."""
    if max_width is None or img.width <= max_width:
        return img
    height = max(1, round(img.height * max_width / img.width))
    return img.resize((max_width, height), resample=Image.Resampling.BOX)


#: Line colours of :func:`risk_coverage_plot`, in the order of the curves.
PLOT_COLORS = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (23, 190, 207),
    (140, 86, 75),
    (127, 127, 127),
)


def _nice_top(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``value`` (``value > 0``)."""
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * 10**exponent >= value - 1e-12:
            return step * 10**exponent
    return 10.0 ** (exponent + 1)


def _checked_curve(name: str, curve: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(curve, (tuple, list)) or len(curve) != 2:
        raise ValueError(f"curves[{name!r}]: expected a (coverage, risk) pair of arrays, got {type(curve).__name__}")
    coverage, risk = (np.asarray(_numpy(c), dtype=np.float64).ravel() for c in curve)
    if coverage.shape != risk.shape or coverage.size == 0:
        raise ValueError(
            f"curves[{name!r}]: expected coverage and risk of the same non-zero length, got {coverage.size} and "
            f"{risk.size}"
        )
    if not (np.isfinite(coverage).all() and np.isfinite(risk).all()):
        raise ValueError(f"curves[{name!r}]: expected finite values")
    if coverage.min() < 0 or coverage.max() > 1 or risk.min() < 0 or risk.max() > 1:
        raise ValueError(
            f"curves[{name!r}]: expected coverage and risk in [0, 1], got coverage [{coverage.min():.3g}, "
            f"{coverage.max():.3g}], risk [{risk.min():.3g}, {risk.max():.3g}]"
        )
    return coverage, risk


def _thinned(coverage: np.ndarray, risk: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by coverage; above ``columns`` points, the last point of each pixel column."""
    order = np.argsort(coverage, kind="stable")
    coverage, risk = coverage[order], risk[order]
    if coverage.size > columns:
        column = np.floor(coverage * columns).astype(np.int64)
        last = np.r_[column[1:] != column[:-1], True]
        coverage, risk = coverage[last], risk[last]
    return coverage, risk


def risk_coverage_plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    *,
    size: tuple[int, int] = (560, 380),
    title: str | None = "risk-coverage",
    max_risk: float | None = None,
) -> Path:
    """Draw risk-coverage curves (lower is better) and save them as a PNG.

    The x axis is the coverage (fraction of pixels or images accepted, least suspicious first)
    from 0 to 1, the y axis the risk (error rate of the accepted ones) from 0 to ``max_risk``
    (default: a round number at or above the largest risk drawn, after thinning); both carry
    tick labels. Each
    curve is a polyline in its colour of :data:`PLOT_COLORS`, named in a legend at the top left;
    a curve with more points than the plot has pixels is thinned to one point per pixel column.

    Args:
        curves: name -> ``(coverage, risk)`` arrays of the same length, values in ``[0, 1]``,
            e.g. from :func:`errwrap.metrics.risk_coverage_curve` or
            :meth:`errwrap.metrics.RiskCoverageMetrics.curve`.
        path: where the PNG goes (written atomically).
        size: ``(width, height)`` in pixels.
        title: drawn above the plot (``None``: none).
        max_risk: top of the y axis.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError(f"curves: expected a non-empty dict name -> (coverage, risk), got {type(curves).__name__}")
    if len(curves) > len(PLOT_COLORS):
        raise ValueError(f"curves: at most {len(PLOT_COLORS)} curves, got {len(curves)}")
    checked = {name: _checked_curve(name, c) for name, c in curves.items()}
    width, height = size
    if width < 200 or height < 150:
        raise ValueError(f"size: expected at least (200, 150), got {size!r}")
    left, right, upper, lower = 52, 14, 24 if title else 12, 38
    plot_w, plot_h = width - left - right, height - upper - lower
    checked = {name: _thinned(*curve, plot_w) for name, curve in checked.items()}
    top = max_risk if max_risk is not None else _nice_top(max(max(float(r.max()) for _, r in checked.values()), 1e-3))
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)

    def to_px(cov: np.ndarray, risk: np.ndarray) -> list[tuple[float, float]]:
        x = left + cov * plot_w
        y = upper + plot_h * (1 - np.clip(risk / top, 0, 1))
        return list(zip(x.tolist(), y.tolist(), strict=False))

    for k in range(6):  # ticks, grid lines and labels: 0, 0.2, ..., 1 of each axis
        frac = k / 5
        x, y = left + frac * plot_w, upper + plot_h * (1 - frac)
        draw.line([(x, upper), (x, upper + plot_h)], fill=(232, 232, 232))
        draw.line([(left, y), (left + plot_w, y)], fill=(232, 232, 232))
        draw.line([(x, upper + plot_h), (x, upper + plot_h + 4)], fill=(0, 0, 0))
        draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        xlabel = f"{frac:.1f}"
        draw.text((x - draw.textlength(xlabel) / 2, upper + plot_h + 6), xlabel, fill=(0, 0, 0))
        ylabel = f"{frac * top:.3g}"
        draw.text((left - 6 - draw.textlength(ylabel), y - 5), ylabel, fill=(0, 0, 0))
    draw.rectangle([left, upper, left + plot_w, upper + plot_h], outline=(0, 0, 0))
    xname = "coverage (accepted, least suspicious first)"
    draw.text((left + (plot_w - draw.textlength(xname)) / 2, height - 14), xname, fill=(0, 0, 0))
    draw.text((4, 4 if not title else 12), "risk", fill=(0, 0, 0))
    if title:
        draw.text((left + (plot_w - draw.textlength(title)) / 2, 4), title, fill=(0, 0, 0))
    for i, (name, (coverage, risk)) in enumerate(checked.items()):
        color = PLOT_COLORS[i]
        points = to_px(coverage, risk)
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        else:
            draw.line(points, fill=color, width=2)
        y = upper + 6 + 14 * i
        draw.line([(left + 8, y + 5), (left + 26, y + 5)], fill=color, width=3)
        draw.text((left + 30, y), name, fill=(0, 0, 0))
    return _save(img, path)
