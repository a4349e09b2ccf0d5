"""``write_report``: a static HTML page to look at, the images most likely wrong first.

:func:`write_report` runs :func:`errwrap.estimate` (no labels needed) and writes ``OUT/index.html``,
a page that opens from disk, offline: no server, no script, no style sheet, font or picture from
elsewhere. Its pictures are PNG files in ``OUT/images/``, referenced by relative paths (keep the
folder together when moving the page); ``OUT/report.json`` holds the numbers behind it.

The page shows the data-set estimate (predicted pixel accuracy and mIoU with their interval),
then the ``worst`` images with the lowest predicted pixel accuracy first, each with the image, the
returned labels in colour, the error map ``out.error_prob`` with a colour bar, a legend of the
classes in view, the predicted accuracy and the mean error probability. When the batches carry
labels it adds the truth: true against predicted accuracy per image and for the data set
(:func:`errwrap.compare_estimates`), the ground truth beside the labels, and the risk-coverage
plot of ``error_prob`` against the max-softmax probability (:func:`errwrap.evaluate`).
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ._batch import LABEL_KEYS, images_of, prepare_batch
from ._io import atomic_path
from ._utils import eval_mode, resolve_device
from ._validate import input_dtype
from .estimation import EstimateComparison, EstimateReport, _dist_world, compare_estimates, estimate
from .evaluation import evaluate
from .viz import colorize, heatmap, palette_for, risk_coverage_plot, to_uint8_image

__all__ = ["write_report", "REPORT_FILES"]

logger = logging.getLogger(__name__)

#: What :func:`write_report` writes into its output directory (besides ``images/*.png``).
REPORT_FILES = ("index.html", "report.json")
_COLORBAR_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------- data
def _as_loader(data: Any, batch_size: int) -> Iterable[Any]:
    """A dataset (``__getitem__`` and ``__len__``) becomes an unshuffled DataLoader; a loader is
    kept. A one-shot iterator is refused: the report reads the data more than once."""
    if isinstance(data, DataLoader):
        return data
    if (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (str, bytes, Tensor, Mapping))
    ):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, Iterable) or iter(data) is data:
        raise TypeError(
            "data: expected a dataset or a loader that can be read more than once (a DataLoader), got "
            f"{type(data).__name__}"
        )
    return data


def _has_labels(batch: Any) -> bool:
    """Whether a batch carries integer labels: ``(images, labels, ...)`` or a mapping with a label key."""
    if isinstance(batch, Mapping):
        return any(k in batch for k in LABEL_KEYS)
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return isinstance(batch[1], Tensor) and not batch[1].is_floating_point()
    return False


def _first_batch(loader: Iterable[Any]) -> Any:
    for batch in loader:
        return batch
    raise ValueError("data: expected at least one batch of images, got none")


def _dataset_of(loader: Iterable[Any]) -> tuple[Any, list[int] | None]:
    """The loader's dataset, looked through a ``Subset`` (with the indices it picks)."""
    dataset, indices = getattr(loader, "dataset", None), None
    while isinstance(dataset, Subset):
        picked = [int(i) for i in dataset.indices]
        indices = picked if indices is None else [picked[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _default_names(loader: Iterable[Any]) -> list[str] | None:
    """File names from the dataset when it knows them (``paths``, or ``pairs`` of (image, label))."""
    dataset, indices = _dataset_of(loader)
    paths = getattr(dataset, "paths", None)
    if paths is None and getattr(dataset, "pairs", None) is not None:
        paths = [pair[0] for pair in dataset.pairs]
    if paths is None:
        return None
    names = [Path(p).name for p in paths]
    return names if indices is None else [names[i] for i in indices]


def _class_names(given: Sequence[str] | None, wrapper: nn.Module, loader: Iterable[Any], num_classes: int) -> list[str]:
    """The legend's names: given, else the wrapper's, else the dataset's, else the class numbers."""
    for names in (given, getattr(wrapper, "class_names", None), getattr(_dataset_of(loader)[0], "class_names", None)):
        if names is not None and not isinstance(names, str) and len(names) == num_classes:
            return [str(n) for n in names]
        if given is not None and names is given:
            raise ValueError(f"class_names: expected {num_classes} names (one per class), got {len(names)}")
    return [str(c) for c in range(num_classes)]


def _check_options(worst: int, max_side: int, names: Sequence[str] | None) -> None:
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise ValueError(f"worst: expected a non-negative int (images to show), got {worst!r}")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
        raise ValueError(f"max_side: expected an int of at least 16 (pixels), got {max_side!r}")
    if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
        raise TypeError(
            f"names: expected a sequence of strings (one per image, in loader order), got {type(names).__name__}"
        )


# ---------------------------------------------------------------------------- pictures
def _fit(tile: np.ndarray, max_side: int, nearest: bool) -> Image.Image:
    """``H x W x 3`` uint8 -> a Pillow image whose longer side is at most ``max_side``."""
    img = Image.fromarray(tile)
    scale = max_side / max(img.size)
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.NEAREST if nearest else Image.BILINEAR)  # type: ignore[attr-defined]
    return img


def _save_png(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _colorbar(path: Path, width: int = 16, height: int = 128) -> None:
    """The heat-map ramp of :func:`errwrap.viz.heatmap`, 1 at the top, 0 at the bottom."""
    ramp = np.repeat(np.linspace(1.0, 0.0, height)[:, None], width, axis=1)
    _save_png(Image.fromarray(heatmap(ramp)), path)


def _risk_plot(comparison_curves: Mapping[str, Any], path: Path) -> bool:
    curves: dict[str, Any] = {}
    for key, name in (("error_prob", "errwrap error_prob (returned labels)"), ("msp", "MSP (base labels)")):
        if key in comparison_curves:
            curves[name] = tuple(np.asarray(c, dtype=np.float64) for c in comparison_curves[key])
    if not curves:
        return False
    risk_coverage_plot(curves, path, title="risk-coverage of pixels (lower is better)")
    return True


def _accuracy_scatter(rows: Sequence[Mapping[str, Any]], shown: Sequence[int], path: Path, size: int = 380) -> int:
    """Per image, true (x) against predicted (y) pixel accuracy of the returned labels, both axes
    0 to 1, the diagonal in grey, the images shown on the page in red; returns the points drawn."""
    left, right, upper, lower = 44, 12, 22, 36
    plot = size - left - right
    height = upper + plot + lower
    img = Image.new("RGB", (size, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + x * plot, upper + (1 - y) * plot

    for k in range(6):
        frac, label = k / 5, f"{k / 5:.1f}"
        draw.line([px(frac, 0), px(frac, 1)], fill=(232, 232, 232))
        draw.line([px(0, frac), px(1, frac)], fill=(232, 232, 232))
        x, y = px(frac, 0)
        draw.text((x - draw.textlength(label) / 2, y + 5), label, fill=(0, 0, 0))
        x, y = px(0, frac)
        draw.text((x - 6 - draw.textlength(label), y - 5), label, fill=(0, 0, 0))
    draw.line([px(0, 0), px(1, 1)], fill=(160, 160, 160), width=1)
    draw.rectangle([*px(0, 1), *px(1, 0)], outline=(0, 0, 0))
    xname = "true pixel accuracy"
    draw.text((left + (plot - draw.textlength(xname)) / 2, height - 14), xname, fill=(0, 0, 0))
    draw.text((4, 0), "predicted", fill=(0, 0, 0))
    drawn, marked = 0, set(shown)
    for row in sorted(rows, key=lambda r: int(r["index"]) in marked):  # the shown images on top
        true_acc, acc = row.get("true_pixel_accuracy"), row.get("pixel_accuracy")
        if true_acc is None or acc is None or math.isnan(true_acc) or math.isnan(acc):
            continue
        cx, cy = px(min(max(true_acc, 0.0), 1.0), min(max(acc, 0.0), 1.0))
        color = (214, 39, 40) if int(row["index"]) in marked else (31, 119, 180)
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        drawn += 1
    _save_png(img, path)
    return drawn


# ---------------------------------------------------------------------------- the worst images
def _render_worst(
    wrapper: nn.Module,
    loader: Iterable[Any],
    rows: Sequence[dict[str, Any]],
    *,
    labelled: bool,
    ignore_index: int,
    device: torch.device,
    max_batches: int | None,
    save: Callable[[int, dict[str, Any]], Any],
) -> dict[int, Any]:
    """A second pass over ``loader``: for each image of ``rows`` (by ``"index"``), what
    ``save(index, item)`` returns, ``item`` holding its image, labels, error map and ground truth
    (``None`` without labels) on the CPU; only the images asked for are run, and nothing is kept
    but what ``save`` returns. Refuses a loader that yields other images than on the first pass
    (shuffled, random transforms)."""
    wanted = {int(r["index"]): r for r in rows}
    found: dict[int, dict[str, Any]] = {}
    in_channels = getattr(wrapper, "in_channels", None)
    dtype = input_dtype(wrapper)
    num_classes = int(wrapper.num_classes)  # type: ignore[arg-type]
    start = 0
    with eval_mode(wrapper):
        for index, batch in enumerate(loader):
            if len(found) == len(wanted) or (max_batches is not None and index >= max_batches):
                break
            if labelled:
                images, truth = prepare_batch(batch, index, in_channels=in_channels, num_classes=num_classes,
                                              ignore_index=ignore_index, device=device, dtype=dtype)  # fmt: skip
            else:
                images, truth = images_of(batch, index, in_channels, device, dtype), None
            picks = [i for i in range(images.shape[0]) if start + i in wanted]
            if picks:
                with torch.no_grad():
                    out = wrapper(images[picks])
                for j, i in enumerate(picks):
                    item = {
                        "image": images[i].float().cpu(),
                        "labels": out.labels[j].cpu(),
                        "error_prob": out.error_prob[j].float().cpu(),
                        "truth": None if truth is None else truth[i].cpu(),
                    }
                    _check_same_image(item, wanted[start + i], ignore_index)
                    found[start + i] = save(start + i, item)
            start += images.shape[0]
    return found


def _save_pictures(
    item: Mapping[str, Any],
    out: Path,
    stem: str,
    *,
    palette: np.ndarray,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    ignore_index: int,
    max_side: int,
) -> tuple[dict[str, str], set[int], bool]:
    """Write one image's pictures as ``out/images/STEM_*.png``; return their paths relative to
    ``out``, the classes in view (returned labels and ground truth) and whether any pixel is
    unlabelled."""
    files = {"image": f"images/{stem}_image.png", "labels": f"images/{stem}_labels.png",
             "error": f"images/{stem}_error.png", "colorbar": "images/colorbar.png"}  # fmt: skip
    _save_png(_fit(to_uint8_image(item["image"], mean, std), max_side, nearest=False), out / files["image"])
    _save_png(_fit(colorize(item["labels"], palette, ignore_index), max_side, nearest=True), out / files["labels"])
    _save_png(_fit(heatmap(item["error_prob"]), max_side, nearest=True), out / files["error"])
    in_view = set(torch.unique(item["labels"]).tolist())
    ignored = False
    if item["truth"] is not None:
        files["truth"] = f"images/{stem}_truth.png"
        _save_png(_fit(colorize(item["truth"], palette, ignore_index), max_side, nearest=True), out / files["truth"])
        truth_classes = set(torch.unique(item["truth"]).tolist())
        ignored = ignore_index in truth_classes
        in_view |= truth_classes - {ignore_index}
    return files, in_view, ignored


def _check_same_image(item: dict[str, Any], row: Mapping[str, Any], ignore_index: int) -> None:
    err = item["error_prob"]
    if item["truth"] is not None:
        err = err[item["truth"] != ignore_index]
    mean = float(err.double().mean()) if err.numel() else float("nan")
    expected = row.get("mean_error_prob")
    if (
        expected is not None
        and not math.isnan(expected)
        and not math.isclose(mean, expected, rel_tol=1e-5, abs_tol=1e-6)
    ):
        raise ValueError(
            f"data: image {row['index']} differs between two passes over the loader (mean error probability "
            f"{expected:.6f}, "
            f"then {mean:.6f}); write_report needs the same images in the same order on every pass: shuffle=False and "
            "no random transforms"
        )


# ---------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; }
td.name, th.name { text-align: left; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 0.8em; color: #555; }
img.tile { width: 200px; height: auto; image-rendering: pixelated; border: 1px solid #ddd; }
.bar { display: flex; gap: 4px; align-items: stretch; }
.bar img.cbar { width: 14px; height: 150px; border: 1px solid #999; }
.ticks { display: flex; flex-direction: column; justify-content: space-between; height: 152px; font-size: 0.7em; }
.legend { list-style: none; padding: 0; margin: 0; font-size: 0.8em; max-width: 220px; }
.legend li { margin: 1px 0; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #777; margin-right: 0.4em;
  vertical-align: middle; }
section.image { border-top: 2px solid #ddd; padding-top: 0.6em; margin-top: 1em; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
"""


def _e(value: Any) -> str:
    """Text for HTML, attribute-safe."""
    return html.escape(str(value), quote=True)


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * float(value):.2f}%"


def _interval(report: EstimateReport, key: str) -> str:
    lo, hi = report.interval.get(key, [math.nan, math.nan])
    level = float(report.interval.get("level", 0.95))
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "n/a"
    return f"{_pct(lo)} to {_pct(hi)} ({100 * level:.0f}%)"


def _legend(classes: Sequence[int], palette: np.ndarray, class_names: Sequence[str], ignored: bool) -> str:
    items = []
    for c in classes:
        r, g, b = (int(v) for v in palette[c])
        name = class_names[c] if c < len(class_names) else str(c)
        items.append(f'<li><span class="swatch" style="background: rgb({r}, {g}, {b})"></span>{_e(c)}: {_e(name)}</li>')
    if ignored:
        items.append('<li><span class="swatch" style="background: rgb(0, 0, 0)"></span>ignored (no label)</li>')
    return '<ul class="legend">' + "".join(items) + "</ul>"


def _figure(src: str, caption: str, alt: str) -> str:
    return (
        f'<figure><a href="{_e(src)}"><img class="tile" src="{_e(src)}" alt="{_e(alt)}"></a>'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _summary(report: EstimateReport, comparison: EstimateComparison | None) -> str:
    head = "<tr><th class=\"name\">estimator</th><th>labels it describes</th><th>pixel accuracy</th><th>mIoU</th>"
    head += "<th>true pixel accuracy</th><th>true mIoU</th><th>per-image Spearman</th></tr>" if comparison else "</tr>"
    truth = comparison.truth if comparison else {}
    errors = comparison.errors if comparison else {}

    def row(name: str, target: str, acc: str, miou: str) -> str:
        cells = f'<tr><td class="name">{_e(name)}</td><td>{_e(target)}</td><td>{acc}</td><td>{miou}</td>'
        if comparison:
            key = "fused" if target == "returned" else "base"
            spear = errors.get(name, {}).get("spearman", math.nan)
            spear_text = "n/a" if spear is None or math.isnan(spear) else f"{spear:.3f}"
            cells += (
                f"<td>{_pct(truth[key]['pixel_accuracy'])}</td><td>{_pct(truth[key]['miou'])}</td><td>{spear_text}</td>"
            )
        return cells + "</tr>"

    rows = [row("errwrap", "returned",
                f"{_pct(report.pixel_accuracy)}<br><small>{_e(_interval(report, 'pixel_accuracy'))}</small>",
                f"{_pct(report.miou)}<br><small>{_e(_interval(report, 'miou'))}</small>")]  # fmt: skip
    for name, values in report.baselines.items():
        rows.append(row(name, "base", _pct(values.get("pixel_accuracy")), _pct(values.get("miou"))))
    return "<table>" + head + "".join(rows) + "</table>"


def _image_section(
    rank: int,
    row: Mapping[str, Any],
    name: str,
    files: Mapping[str, str],
    legend: str,
    threshold: float,
) -> str:
    cells = [
        ("predicted pixel accuracy", _pct(row.get("pixel_accuracy"))),
        ("predicted mIoU", _pct(row.get("miou"))),
        ("mean error probability", _pct(row.get("mean_error_prob"))),
        (f"pixels with error probability > {threshold:g}", _pct(row.get("flagged_fraction"))),
    ]
    if "true_pixel_accuracy" in row:
        cells += [("true pixel accuracy", _pct(row.get("true_pixel_accuracy"))),
                  ("true mIoU", _pct(row.get("true_miou"))),
                  ("base labels' true pixel accuracy", _pct(row.get("base_true_pixel_accuracy")))]  # fmt: skip
    table = (
        "<table>"
        + "".join(f'<tr><td class="name">{_e(k)}</td><td class="value">{v}</td></tr>' for k, v in cells)
        + "</table>"
    )
    figures = [
        _figure(files["image"], "image", f"{name}: image"),
        _figure(files["labels"], "returned labels", f"{name}: labels"),
    ]
    if "truth" in files:
        figures.append(_figure(files["truth"], "ground truth", f"{name}: ground truth"))
    bar = "".join(f"<span>{t:g}</span>" for t in reversed(_COLORBAR_TICKS))
    figures.append(
        f'<figure><div class="bar"><a href="{_e(files["error"])}"><img class="tile" src="{_e(files["error"])}" '
        f'alt="{_e(name)}: error map"></a>'
        f'<img class="cbar" src="{_e(files["colorbar"])}" alt="colour bar of the error probability, 0 to 1"><div '
        f'class="ticks">{bar}</div></div>'
        "<figcaption>error probability of the returned labels</figcaption></figure>"
    )
    figures.append(f"<figure>{legend}<figcaption>classes in view</figcaption></figure>")
    return (
        f'<section class="image" id="rank-{rank}"><h3>#{rank}: <span class="image-name">{_e(name)}</span> '
        f'<small>(image {_e(row["index"])} of the loader)</small></h3>'
        f'{table}<div class="tiles">{"".join(figures)}</div></section>'
    )


# ---------------------------------------------------------------------------- the function
def write_report(
    wrapper: nn.Module,
    data: Any,
    out_dir: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    labels: bool = True,
    worst: int = 24,
    class_names: Sequence[str] | None = None,
    palette: np.ndarray | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 1,
    threshold: float = 0.5,
    ignore_index: int = 255,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    max_side: int = 512,
    title: str = "errwrap report",
) -> Path:
    """Write ``out_dir/index.html``: the data-set estimate and the images most likely wrong first.

    A static page that opens from disk offline (no server, no script, nothing fetched from
    elsewhere). Pictures are PNG files in ``out_dir/images/`` referenced by relative paths;
    ``out_dir/report.json`` holds the estimate (``"estimate"``, :meth:`EstimateReport.to_dict`),
    the order of the images shown (``"ranking"``: loader indices, worst first) and their names,
    and with labels the comparison with the truth (``"comparison"``) and the risk-coverage
    (``"risk_coverage"``). Every string put in the page is HTML-escaped.

    Args:
        wrapper: an :class:`~errwrap.ErrorCorrectionWrapper`.
        data: a dataset (read in order, ``batch_size`` images per batch) or a loader that yields
            the same images in the same order each time it is read (``shuffle=False``, no random
            transforms; checked): batches of images, ``(images, labels, ...)`` or mappings, as
            :func:`errwrap.estimate` reads them.
        out_dir: created if needed; ``index.html``, ``report.json`` and ``images/`` are replaced.
        names: one name per image in loader order (file names); default: the dataset's file
            names when it has them (``paths``, ``pairs``), else ``"image N"``.
        labels: use the labels when the batches carry them (true accuracy, ground truth,
            risk-coverage; the estimate is then made on the labelled pixels, as
            :func:`errwrap.compare_estimates` makes it, so that it compares with the truth);
            ``False`` ignores them.
        worst: how many images to show, lowest predicted pixel accuracy first.
        class_names: for the legend; default ``wrapper.class_names``, else the dataset's, else
            the class numbers.
        palette: ``num_classes x 3`` uint8 colours; default :func:`errwrap.viz.palette_for`.
        mean, std: how the images were normalised, to show them; default the wrapper's saved
            ``preprocessing``; without it, images are shown as they are (values in ``[0, 1]``).
        batch_size: images per batch when ``data`` is a dataset.
        threshold: ``error_prob`` above which a pixel counts as flagged.
        ignore_index: label of unlabelled pixels.
        device: where batches go; default the wrapper's device.
        max_batches: read at most this many batches.
        max_side: pictures are shrunk so that their longer side is at most this (pixels).
        title: the page's title.

    Returns:
        The path of ``index.html``.

    Example:
        >>> page = errwrap.write_report(wrapper, val_dataset, "report")  # doctest: +SKIP
    """
    _check_options(worst, max_side, names)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out}: expected a directory (existing or new), got an existing file")
    if _dist_world()[1] > 1:
        raise ValueError(
            "write_report: runs on one process; call it outside torch.distributed (or on rank 0 with a loader of all "
            "images)"
        )
    loader = _as_loader(data, batch_size)
    labelled = bool(labels) and _has_labels(_first_batch(loader))
    dev = resolve_device(wrapper, device)
    num_classes = int(wrapper.num_classes)  # type: ignore[arg-type]
    class_names = _class_names(class_names, wrapper, loader, num_classes)
    palette = np.asarray(palette, dtype=np.uint8) if palette is not None else palette_for(num_classes)
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] < num_classes:
        raise ValueError(
            f"palette: expected at least {num_classes} RGB colours (shape ({num_classes}, 3)), got shape "
            f"{palette.shape}"
        )
    pre = getattr(wrapper, "preprocessing", None) or {}
    if mean is None and std is None:
        mean, std = pre.get("mean"), pre.get("std")
    if (mean is None) != (std is None):
        raise ValueError(
            f"mean, std: expected both or neither (how the images were normalised), got mean={mean!r}, std={std!r}"
        )

    comparison: EstimateComparison | None = None
    evaluation = None
    if labelled:
        comparison = compare_estimates(
            wrapper, loader, threshold=threshold, ignore_index=ignore_index, device=dev, max_batches=max_batches
        )
        report, rows = comparison.estimate, comparison.per_image
        evaluation = evaluate(
            wrapper, loader, baselines=(), ignore_index=ignore_index, device=dev, max_batches=max_batches
        )
    else:
        report = estimate(wrapper, loader, threshold=threshold, device=dev, max_batches=max_batches)
        rows = report.per_image
    if names is None:
        names = _default_names(loader)
    if names is not None and len(names) < report.num_images:
        raise ValueError(f"names: expected one name per image ({report.num_images}), got {len(names)}")
    image_names = [names[i] if names is not None else f"image {i}" for i in range(report.num_images)]

    by_index = {int(r["index"]): r for r in rows}
    shown = [by_index[int(r["index"])] for r in report.worst(min(worst, report.num_images))]
    rank_of = {int(row["index"]): rank for rank, row in enumerate(shown, start=1)}
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for old in images_dir.glob("*.png"):
        old.unlink()
    _colorbar(images_dir / "colorbar.png")

    def save(index: int, item: dict[str, Any]) -> tuple[dict[str, str], set[int], bool]:
        return _save_pictures(item, out, f"{rank_of[index]:03d}", palette=palette, mean=mean, std=std,
                              ignore_index=ignore_index, max_side=max_side)  # fmt: skip

    pictures = _render_worst(wrapper, loader, shown, labelled=labelled, ignore_index=ignore_index, device=dev,
                             max_batches=max_batches, save=save)  # fmt: skip
    missing = sorted(set(rank_of) - set(pictures))
    if missing:
        raise ValueError(f"data: images {missing[:5]} were not there on a second pass over the loader; "
                         "write_report needs the same "
                         "images in the same order on every pass: shuffle=False and no random transforms")  # fmt: skip
    sections, seen_classes, any_ignored = [], set(), False
    for rank, row in enumerate(shown, start=1):
        files, in_view, ignored = pictures[int(row["index"])]
        seen_classes |= in_view
        any_ignored |= ignored
        legend = _legend(sorted(c for c in in_view if 0 <= c < num_classes), palette, class_names, ignored)
        sections.append(_image_section(rank, row, image_names[int(row["index"])], files, legend, threshold))

    has_plot = evaluation is not None and _risk_plot(evaluation.risk_curves, images_dir / "risk_coverage.png")
    has_scatter = (
        comparison is not None
        and _accuracy_scatter(rows, [int(r["index"]) for r in shown], images_dir / "accuracy.png") > 0
    )
    page = _page(title, report, comparison, evaluation, sections, has_plot, has_scatter, len(shown),
                 _legend(sorted(c for c in seen_classes if 0 <= c < num_classes), palette, class_names,
                         any_ignored))  # fmt: skip
    index = out / "index.html"
    with atomic_path(index) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    data_out = {
        "estimate": report.to_dict(),
        "ranking": [int(r["index"]) for r in shown],
        "names": [image_names[int(r["index"])] for r in shown],
        "labelled": labelled,
    }
    if comparison is not None:
        data_out["comparison"] = comparison.to_dict()
    if evaluation is not None:
        data_out["risk_coverage"] = {k: {"aurc": v.aurc, "eaurc": v.eaurc, "labels": evaluation.judged_labels.get(k)}
                                     for k, v in evaluation.risk_coverage.items()}  # fmt: skip
    with atomic_path(out / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(_finite(data_out), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("wrote %s: %d of %d images shown", index, len(shown), report.num_images)
    return index


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _page(
    title: str,
    report: EstimateReport,
    comparison: EstimateComparison | None,
    evaluation: Any,
    sections: Sequence[str],
    has_plot: bool,
    has_scatter: bool,
    shown: int,
    legend: str,
) -> str:
    where = "the labelled pixels" if comparison is not None else "every pixel"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">{report.num_images} images, {report.num_pixels} pixels ({where}). Estimated by '
        'errwrap.estimate '
        "from the error map and the fused probabilities, without labels; the interval is a bootstrap over images, "
        "not a bound on the estimate's own error (docs/estimate.md).</p>",
        '<h2>The data set</h2><div id="summary">',
        _summary(report, comparison),
        "</div>",
    ]
    if float(report.config.get("temperature", 1.0)) == 1.0:
        parts.append('<p class="note">The fused probabilities have no fitted temperature: the estimate is only as '
                     "good as "
                     "their calibration (errwrap.calibrate_temperature on held-out labelled data).</p>")  # fmt: skip
    if comparison is None:
        parts.append('<p class="note">No labels: the true accuracy and the risk-coverage plot need labelled data.</p>')
    if has_scatter:
        parts.append(
            '<h2>True against predicted accuracy</h2><figure id="accuracy"><img src="images/accuracy.png" '
            'alt="per image, true against predicted pixel accuracy">'
            "<figcaption>One dot per image: true (across) against predicted (up) pixel accuracy of the returned "
            "labels; "
            "on the grey diagonal the estimate is exact, above it too high. Red: the images shown "
            "below.</figcaption></figure>"
        )
    if has_plot:
        rc = evaluation.risk_coverage
        aurc = ", ".join(f"{_e(k)} {100 * v.aurc:.2f}" for k, v in rc.items() if k in ("error_prob", "msp"))
        parts.append(
            '<h2>Risk-coverage</h2><figure id="risk-coverage"><img src="images/risk_coverage.png" '
            'alt="risk-coverage plot: errwrap error probability against the max-softmax probability">'
            "<figcaption>Reject the most suspicious pixels first: error rate of the accepted ones. AURC (points, "
            "lower is "
            f"better): {aurc}. error_prob judges the returned labels, MSP the base labels.</figcaption></figure>"
        )
    parts += [f"<h2>Classes in the images shown</h2>{legend}",
              f'<h2>Images, most likely wrong first</h2><p class="note">{shown} of {report.num_images} images, by '
              'predicted '
              "pixel accuracy, lowest first.</p>",
              '<div id="images">', *sections, "</div>", "</body></html>"]  # fmt: skip
    return "\n".join(parts) + "\n"
