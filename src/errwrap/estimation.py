"""``estimate``: how good the returned labels are on images nobody labelled.

From one pass of the wrapper, with no labels, :func:`estimate` predicts the pixel accuracy and the
per-class IoU / mIoU of ``out.labels`` per image and for the data set, ranks the images most likely
wrong first (:meth:`EstimateReport.worst`), and reports two label-free baselines beside it:

* **errwrap** [ours]: expected counts under the fused distribution ``p``. A pixel labelled ``c`` is
  right with probability ``1 - out.error_prob = max p``; its true class is ``k`` with probability
  ``p_k``. So ``E[TP_c] = sum_{label = c} (1 - error_prob)``, ``pred_c = #{label = c}``,
  ``E[true_c] = sum p_c`` and ``IoU_c = E[TP_c] / (pred_c + E[true_c] - E[TP_c])`` (a ratio of
  expectations, not the expectation of the ratio). Pixel accuracy is ``1 - mean(error_prob)``.
* **average confidence** (``"avg_confidence"``): the same expected counts under the *base*
  softmax, for the *base* labels (pixel accuracy = mean max-softmax probability).
* **ATC** (``"atc"``, Garg et al., "Leveraging unlabeled data to predict out-of-distribution
  performance", ICLR 2022): the fraction of pixels whose base max-softmax probability exceeds a
  threshold fitted on labelled data by :func:`fit_atc`; for IoU [ours] a pixel above the threshold
  counts as a true positive and ``E[true_c] = pred_c`` (false positives and negatives balance).

The baselines describe the base network's labels, errwrap's estimate the corrected labels: each is
compared with the accuracy of the labels it describes in :func:`compare_estimates`.

Every estimate assumes the probabilities are calibrated on the data at hand. Under a shift that
the heads never saw they need not be, and no label-free estimate can be right under every shift
(see docs/estimate.md for measured errors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._batch import check_loader_num_classes, images_of, numbered_batches, prepare_batch
from ._distributed import gather_objects as _gather
from ._distributed import rank_and_world as _dist_world
from ._io import nan_to_none, none_to_nan, read_json_text, write_json_text
from ._utils import eval_mode, resolve_device
from ._validate import check_positive_int, input_dtype

__all__ = [
    "EstimateReport",
    "EstimateComparison",
    "estimate",
    "fit_atc",
    "compare_estimates",
    "expected_counts",
    "scores_from_counts",
    "spearman",
]

logger = logging.getLogger(__name__)

#: The estimators, in report order: errwrap's and the two label-free baselines.
ESTIMATORS: tuple[str, ...] = ("errwrap", "avg_confidence", "atc")
_ATC_BINS = 1 << 16


# ---------------------------------------------------------------------------- counts and scores
def expected_counts(
    labels: Tensor,
    correct: Tensor,
    truth: Tensor | None,
    valid: Tensor | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Per-image, per-class counts ``[TP, predicted, true]`` of a label map, exact or expected.

    Args:
        labels: the predicted labels.
        correct: per pixel, ``1`` / ``0`` (exact) or the probability that the label is right.
        truth: the true class per pixel: class probabilities ``(B, C, H, W)`` (expected
            counts), or integer labels ``(B, H, W)`` (exact counts; values at pixels outside
            ``valid`` are not read); ``None`` sets ``true = predicted`` (ATC's assumption).
        valid: pixels to count (default: all).
        num_classes: ``C``; default: from ``truth`` when it holds probabilities, else
            ``labels.max() + 1``.

    Shapes:
        labels ``(B, H, W)`` int64, correct ``(B, H, W)``, truth ``(B, C, H, W)`` float or
        ``(B, H, W)`` int64, valid ``(B, H, W)`` bool -> ``(B, 3, C)`` float64.
    """
    b = labels.shape[0]
    soft = truth is not None and truth.is_floating_point()
    if num_classes is None:
        num_classes = truth.shape[1] if soft else int(labels.max()) + 1  # type: ignore[union-attr]
    weight = (
        torch.ones(labels.shape, dtype=torch.float64, device=labels.device)
        if valid is None
        else valid.to(torch.float64)
    )
    pred = torch.zeros(b, num_classes, dtype=torch.float64, device=labels.device)
    pred.scatter_add_(1, labels.reshape(b, -1), weight.reshape(b, -1))
    tp = torch.zeros_like(pred).scatter_add_(
        1, labels.reshape(b, -1), (correct.to(torch.float64) * weight).reshape(b, -1)
    )
    if truth is None:
        true = pred.clone()
    elif soft:  # summed in float64 without a float64 copy of the (B, C, H, W) map
        masked = truth if valid is None else truth * valid[:, None].to(truth.dtype)
        true = masked.sum(dim=(2, 3), dtype=torch.float64)
    else:
        index = truth if valid is None else truth.where(valid, torch.zeros_like(truth))
        true = torch.zeros_like(pred).scatter_add_(1, index.reshape(b, -1).long(), weight.reshape(b, -1))
    return torch.stack([tp, pred, true], dim=1)


def scores_from_counts(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel accuracy, per-class IoU and mIoU from counts ``[TP, predicted, true]``.

    A class enters the mIoU when it is predicted or its (expected) true mass exceeds half a pixel;
    ``nan`` where no class does (no pixel). Leading dimensions are kept (images, resamples).

    Shapes:
        ``(..., 3, C)`` -> accuracy ``(...)``, IoU ``(..., C)`` (``nan`` for absent classes),
        mIoU ``(...)``.
    """
    tp, pred, true = counts.unbind(dim=-2)
    total = pred.sum(dim=-1)
    accuracy = tp.sum(dim=-1) / total.where(total > 0, torch.full_like(total, float("nan")))
    union = pred + true - tp
    present = (pred > 0.5) | (true > 0.5)
    iou = torch.where(present, tp / union.clamp_min(1e-12), torch.full_like(tp, float("nan")))
    num_present = present.sum(dim=-1)
    miou = torch.where(present, iou, torch.zeros_like(iou)).sum(dim=-1) / num_present.to(iou.dtype)
    miou = miou.where(num_present > 0, torch.full_like(miou, float("nan")))
    return accuracy, iou, miou


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two sequences (Pearson correlation of their ranks, ties
    averaged); ``nan`` with fewer than two pairs, when either is constant, or for ``nan`` entries."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: expected two 1-d sequences of one length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    rx, ry = _ranks(x) - (len(x) + 1) / 2.0, _ranks(y) - (len(y) + 1) / 2.0
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _bootstrap_interval(counts: Tensor, resamples: int, level: float, seed: int) -> dict[str, list[float]]:
    """Percentile bootstrap over images of the data-set pixel accuracy and mIoU (summed counts)."""
    n = counts.shape[0]
    if n < 2 or resamples < 1:
        return {"pixel_accuracy": [float("nan")] * 2, "miou": [float("nan")] * 2}
    g = torch.Generator().manual_seed(seed)
    flat = counts.reshape(n, -1).cpu()
    acc, miou = [], []
    for chunk in range(0, resamples, 256):  # bounded memory: at most 256 x n weights at once
        m = min(256, resamples - chunk)
        picks = torch.randint(0, n, (m, n), generator=g)
        weights = torch.zeros(m, n, dtype=torch.float64).scatter_add_(1, picks, torch.ones(m, n, dtype=torch.float64))
        a, _, mi = scores_from_counts((weights @ flat).reshape(m, *counts.shape[1:]))
        acc.append(a)
        miou.append(mi)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)

    def bounds(values: list[Tensor]) -> list[float]:
        v = torch.cat(values)
        v = v[~v.isnan()]
        return [float("nan")] * 2 if v.numel() == 0 else torch.quantile(v, q).tolist()

    return {"pixel_accuracy": bounds(acc), "miou": bounds(miou)}


# ---------------------------------------------------------------------------- batches and devices


# ---------------------------------------------------------------------------- the pass
@dataclasses.dataclass
class _Pass:
    """What one pass over a loader collected: per-image rows and per-image counts of each estimator."""

    rows: list[dict[str, Any]]
    counts: dict[str, Tensor]  # estimator (or "truth", "base_truth") -> (N, 3, C)
    error_sum: float
    flagged: float
    num_pixels: float


def _check_run_settings(threshold: float, atc_threshold: float | None, max_batches: int | None) -> None:
    check_positive_int(max_batches, "max_batches", or_none=True)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold: expected a probability in [0, 1], got {threshold!r}")
    if atc_threshold is not None and not 0.0 <= float(atc_threshold) <= 1.0:
        raise ValueError(
            f"atc_threshold: expected a probability in [0, 1] (from fit_atc) or None, got {atc_threshold!r}"
        )


def _outputs(
    wrapper: nn.Module,
    loader: Iterable[Any],
    *,
    labelled: bool,
    ignore_index: int,
    device: torch.device | str | None,
    max_batches: int | None,
    progress: bool | Callable[[int], None] | None,
    name: str,
) -> Generator[tuple[Any, Tensor | None, Tensor | None], None, None]:
    """Run the wrapper (eval mode, no gradients; every module's mode restored at the end) on each
    batch and yield ``(output, labelled pixels or None, labels or None)``."""
    num_classes = int(wrapper.num_classes)  # type: ignore[arg-type]
    check_loader_num_classes(loader, num_classes, "loader")
    device = resolve_device(wrapper, device)
    in_channels = getattr(wrapper, "in_channels", None)
    dtype = input_dtype(wrapper)
    iterator: Iterable[Any] = loader
    if progress is True:
        iterator = tqdm(loader, desc=name, total=max_batches)
    callback = progress if callable(progress) else None
    with eval_mode(wrapper):
        for index, batch in numbered_batches(iterator, max_batches):
            truth = None
            if labelled:
                images, truth = prepare_batch(
                    batch,
                    index,
                    in_channels=in_channels,
                    num_classes=num_classes,
                    ignore_index=ignore_index,
                    device=device,
                    dtype=dtype,
                )
            else:
                images = images_of(batch, index, in_channels, device, dtype)
            with torch.no_grad():
                out = wrapper(images)
            yield out, (truth != ignore_index if truth is not None else None), truth
            if callback is not None:
                callback(index)


def _run(
    wrapper: nn.Module,
    loader: Iterable[Any],
    *,
    threshold: float,
    atc_threshold: float | None,
    labelled: bool,
    ignore_index: int,
    device: torch.device | str | None,
    max_batches: int | None,
    progress: bool | Callable[[int], None] | None,
    name: str,
) -> _Pass:
    """One pass over ``loader``: per-image rows and counts, gathered over processes."""
    _check_run_settings(threshold, atc_threshold, max_batches)
    rank, world = _dist_world()
    rows: list[dict[str, Any]] = []
    counts: dict[str, list[Tensor]] = {}
    totals = torch.zeros(3, dtype=torch.float64)  # error-prob sum, flagged pixels, pixels
    outputs = _outputs(
        wrapper,
        loader,
        labelled=labelled,
        ignore_index=ignore_index,
        device=device,
        max_batches=max_batches,
        progress=progress,
        name=name,
    )
    with contextlib.closing(outputs):
        for out, valid, truth in outputs:
            batch_counts, stats = _batch_counts(out, valid, threshold, atc_threshold, truth)
            for key, value in batch_counts.items():
                counts.setdefault(key, []).append(value.cpu())
            totals += stats.sum(dim=0).cpu()
            rows.extend(_rows(len(rows), batch_counts, stats, atc_threshold is not None, rank if world > 1 else None))

    gathered = _gather((rows, {k: torch.cat(v) for k, v in counts.items()}, totals))
    parts = [part for part in gathered if part[0]]
    if not parts:
        raise ValueError("loader: expected at least one batch of images, got none")
    merged = {k: torch.cat([part[1][k] for part in parts]) for k in parts[0][1]}
    totals = sum((part[2] for part in parts), torch.zeros(3, dtype=torch.float64))
    error_sum, flagged, num_pixels = totals.tolist()
    return _Pass(
        rows=[row for part in parts for row in part[0]],
        counts=merged,
        error_sum=error_sum,
        flagged=flagged,
        num_pixels=num_pixels,
    )


def _batch_counts(
    out: Any, valid: Tensor | None, threshold: float, atc_threshold: float | None, truth: Tensor | None
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-image counts ``(B, 3, C)`` of each estimator (and of the truth when labelled), and per
    image ``[error-prob sum, flagged pixels, pixels]`` ``(B, 3)``, over the ``valid`` pixels (all
    when ``None``)."""
    labels, error_prob = out.labels, out.error_prob
    base_probs = torch.softmax(out.base_logits.float(), dim=1)
    base_msp, base_labels = base_probs.max(dim=1)
    counts = {
        "errwrap": expected_counts(labels, 1.0 - error_prob, out.probs, valid),
        "avg_confidence": expected_counts(base_labels, base_msp, base_probs, valid),
    }
    if atc_threshold is not None:
        counts["atc"] = expected_counts(
            base_labels, (base_msp > atc_threshold).float(), None, valid, base_probs.shape[1]
        )
    if truth is not None:
        num_classes = counts["errwrap"].shape[-1]
        counts["truth"] = expected_counts(labels, (labels == truth).float(), truth, valid, num_classes)
        counts["base_truth"] = expected_counts(base_labels, (base_labels == truth).float(), truth, valid, num_classes)
    w = (
        torch.ones(labels.shape, dtype=torch.float64, device=labels.device)
        if valid is None
        else valid.to(torch.float64)
    )
    stats = torch.stack([
        (error_prob.to(torch.float64) * w).sum(dim=(1, 2)),
        ((error_prob > threshold).to(torch.float64) * w).sum(dim=(1, 2)),
        w.sum(dim=(1, 2)),
    ], dim=1)  # fmt: skip
    return counts, stats


def _rows(
    start: int, counts: dict[str, Tensor], stats: Tensor, with_atc: bool, rank: int | None
) -> list[dict[str, Any]]:
    """One JSON-ready dict per image of a batch."""
    scores = {key: scores_from_counts(value) for key, value in counts.items()}
    rows = []
    for i in range(stats.shape[0]):
        pixels = float(stats[i, 2])
        row: dict[str, Any] = {"index": start + i}
        if rank is not None:
            row["rank"] = rank
        row.update(
            pixel_accuracy=float(scores["errwrap"][0][i]),
            miou=float(scores["errwrap"][2][i]),
            mean_error_prob=float(stats[i, 0]) / pixels if pixels else float("nan"),
            flagged_fraction=float(stats[i, 1]) / pixels if pixels else float("nan"),
            num_pixels=int(pixels),
            avg_confidence=float(scores["avg_confidence"][0][i]),
        )
        if with_atc:
            row["atc"] = float(scores["atc"][0][i])
        if "truth" in scores:
            row.update(
                true_pixel_accuracy=float(scores["truth"][0][i]),
                true_miou=float(scores["truth"][2][i]),
                base_true_pixel_accuracy=float(scores["base_truth"][0][i]),
            )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- reports


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


@dataclasses.dataclass
class EstimateReport:
    """What :func:`estimate` predicted, without labels. Rates are fractions in ``[0, 1]``.

    Attributes:
        per_image: one dict per image, in loader order: ``"index"`` (position in the loader;
            under ``torch.distributed`` the position in that process's loader, with ``"rank"``),
            ``"pixel_accuracy"`` and ``"miou"`` (predicted, of ``out.labels``),
            ``"mean_error_prob"``, ``"flagged_fraction"`` (pixels with ``error_prob > threshold``),
            ``"num_pixels"``, and the baselines' predicted pixel accuracy ``"avg_confidence"``
            (and ``"atc"`` when a threshold was given).
        pixel_accuracy: predicted data-set pixel accuracy of ``out.labels`` (summed counts).
        miou: predicted data-set mIoU of ``out.labels`` (summed counts).
        iou: predicted IoU per class (``nan`` for classes neither predicted nor expected).
        interval: ``{"pixel_accuracy": [lo, hi], "miou": [lo, hi], "level", "method"}``: a
            percentile bootstrap over images (fixed seed). It is the spread of the estimate over
            resampled images, not a bound on the estimator's own bias.
        mean_error_prob: mean of ``out.error_prob`` over every pixel.
        flagged_fraction: fraction of pixels with ``error_prob > threshold``.
        baselines: per baseline (``"avg_confidence"``, ``"atc"``), its predicted
            ``"pixel_accuracy"`` and ``"miou"`` of the *base* labels.
        num_images, num_pixels: what was estimated.
        config: the settings (threshold, ATC threshold, bootstrap, ``num_classes``, ...).
    """

    per_image: list[dict[str, Any]]
    pixel_accuracy: float
    miou: float
    iou: list[float]
    interval: dict[str, Any]
    mean_error_prob: float
    flagged_fraction: float
    baselines: dict[str, dict[str, float]]
    num_images: int
    num_pixels: int
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def worst(self, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` images with the lowest predicted pixel accuracy (most likely wrong) first;
        ties keep loader order."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"worst: expected a non-negative int k, got {k!r}")

        def key(row: dict[str, Any]) -> tuple[float, int, int]:
            acc = row["pixel_accuracy"]
            return (math.inf if acc is None or math.isnan(acc) else acc, row.get("rank", 0), row["index"])

        return sorted(self.per_image, key=key)[:k]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; ``nan`` becomes ``None``."""
        return nan_to_none({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EstimateReport:
        """Inverse of :meth:`to_dict` (``None`` becomes ``nan``)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"from_dict: expected a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and n != "config"]
        if missing:
            raise ValueError(f"EstimateReport.from_dict: missing keys {missing} in {sorted(data)}")
        values = {n: none_to_nan(data[n]) for n in names if n in data}
        values["per_image"] = [dict(r) for r in values["per_image"]]
        values["num_images"], values["num_pixels"] = int(data["num_images"]), int(data["num_pixels"])
        values["config"] = dict(data.get("config", {}))
        return cls(**values)

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """The report as strict JSON text (no ``NaN``); also written to ``path`` if given."""
        return write_json_text(self.to_dict(), path, indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> EstimateReport:
        """Read a report from JSON text or from a ``.json`` file."""
        return cls.from_dict(read_json_text(text_or_path))

    def table(self, k: int = 5) -> str:
        """A readable text table: the data-set estimate, the baselines, the ``k`` worst images."""
        level = self.interval.get("level", 0.95)
        pa, mi = self.interval.get("pixel_accuracy", [math.nan] * 2), self.interval.get("miou", [math.nan] * 2)
        lines = [
            f"errwrap estimate (no labels): {self.num_images} images, {self.num_pixels} pixels",
            "",
            f"{'estimator':<16}{'pixAcc':>8}{'mIoU':>8}",
            f"{'errwrap':<16}{_pct(self.pixel_accuracy):>8}{_pct(self.miou):>8}   "
            f"({100 * level:.0f}% interval: pixAcc {_pct(pa[0])}-{_pct(pa[1])}, mIoU {_pct(mi[0])}-{_pct(mi[1])})",
        ]
        for name, values in self.baselines.items():
            lines.append(f"{name:<16}{_pct(values['pixel_accuracy']):>8}{_pct(values['miou']):>8}   (base labels)")
        threshold = self.config.get("threshold", 0.5)
        if self.config.get("temperature", 1.0) == 1.0:
            lines += [
                "(the fused probabilities have no fitted temperature: the estimate is only as good as their "
                "calibration;",
                " fit one on held-out labelled data with errwrap.calibrate_temperature, docs/estimate.md)",
            ]
        lines += [
            "",
            f"mean error probability {_pct(self.mean_error_prob)}%, pixels above {threshold:g}: "
            f"{_pct(self.flagged_fraction)}%",
        ]
        worst = self.worst(k)
        if worst:
            lines += [
                "",
                f"most likely wrong first ({len(worst)} of {self.num_images}):",
                f"{'index':>7}{'pixAcc':>8}{'mIoU':>8}{'meanErr':>9}{'flagged':>9}",
            ]
            for row in worst:
                lines.append(f"{row['index']:>7}{_pct(row['pixel_accuracy']):>8}{_pct(row['miou']):>8}{_pct(row['mean_error_prob']):>9}{_pct(row['flagged_fraction']):>9}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _report(
    run: _Pass,
    threshold: float,
    atc_threshold: float | None,
    bootstrap: int,
    level: float,
    seed: int,
    wrapper: nn.Module,
) -> EstimateReport:
    totals = {k: v.sum(dim=0) for k, v in run.counts.items()}
    accuracy, iou, miou = scores_from_counts(totals["errwrap"])
    baselines: dict[str, dict[str, float]] = {}
    for name in ("avg_confidence", "atc"):
        if name in totals:
            b_acc, _, b_miou = scores_from_counts(totals[name])
            baselines[name] = {"pixel_accuracy": float(b_acc), "miou": float(b_miou)}
    if atc_threshold is not None:
        baselines["atc"]["threshold"] = float(atc_threshold)
    interval: dict[str, Any] = _bootstrap_interval(run.counts["errwrap"], bootstrap, level, seed)
    interval.update(level=level, method=f"percentile bootstrap over images ({bootstrap} resamples, seed {seed})")
    pixels = run.num_pixels
    _, world = _dist_world()
    return EstimateReport(
        per_image=[{k: v for k, v in r.items() if not k.startswith(("true_", "base_true_"))} for r in run.rows],
        pixel_accuracy=float(accuracy),
        miou=float(miou),
        iou=iou.tolist(),
        interval=interval,
        mean_error_prob=run.error_sum / pixels if pixels else float("nan"),
        flagged_fraction=run.flagged / pixels if pixels else float("nan"),
        baselines=baselines,
        num_images=len(run.rows),
        num_pixels=int(pixels),
        config={"threshold": float(threshold), "atc_threshold": atc_threshold, "num_classes": int(wrapper.num_classes),  # type: ignore[arg-type]
                "temperature": float(getattr(wrapper, "temperature", 1.0)), "bootstrap": bootstrap, "level": level,
                "seed": seed, "world_size": world},
    )  # fmt: skip


def _check_interval_settings(bootstrap: int, level: float) -> None:
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap: expected a non-negative int (resamples; 0 for no interval), got {bootstrap!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level: expected a coverage in (0, 1), got {level!r}")


def estimate(
    wrapper: nn.Module,
    loader: Iterable[Any],
    *,
    threshold: float = 0.5,
    atc_threshold: float | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool | Callable[[int], None] | None = None,
) -> EstimateReport:
    """Predict, without labels, how accurate ``out.labels`` is, per image and for the data set.

    One streaming pass (memory does not grow with the number of pixels; a few numbers per class
    and image are kept), the wrapper in eval mode without gradients, every module's mode restored
    afterwards. Under ``torch.distributed`` each process estimates its own part of the data and
    every process returns the same report (per-image rows gathered, counts summed).

    Args:
        wrapper: an :class:`~errwrap.ErrorCorrectionWrapper` (anything with ``num_classes`` and a
            call returning an ``ErrorCorrectionOutput``).
        loader: yields image batches ``(B, C, H, W)``, ``(images, labels, ...)`` (labels ignored),
            or mappings with an ``"image"`` key; float images, NaN/Inf refused (``ValueError``).
        threshold: ``error_prob`` above which a pixel counts as flagged.
        atc_threshold: the ATC baseline's threshold (from :func:`fit_atc`); ``None`` leaves ATC out.
        device: where batches go; default the wrapper's device (the wrapper is never moved).
        max_batches: stop after this many batches.
        bootstrap: resamples of the interval (``0``: no interval, ``nan`` bounds).
        level: coverage of the interval.
        seed: seed of the bootstrap.
        progress: ``True`` for a tqdm bar, or a callable ``f(batch_index)``.

    Returns:
        An :class:`EstimateReport`.

    Example:
        >>> report = errwrap.estimate(wrapper, unlabelled_loader)  # doctest: +SKIP
        >>> report.pixel_accuracy, report.miou, report.worst(5)    # doctest: +SKIP
    """
    _check_interval_settings(bootstrap, level)
    run = _run(wrapper, loader, threshold=threshold, atc_threshold=atc_threshold, labelled=False, ignore_index=-1,
               device=device, max_batches=max_batches, progress=progress, name="estimate")  # fmt: skip
    report = _report(run, threshold, atc_threshold, bootstrap, level, seed, wrapper)
    logger.info(
        "estimated %d images: pixel accuracy %.4f, mIoU %.4f", report.num_images, report.pixel_accuracy, report.miou
    )
    return report


# ---------------------------------------------------------------------------- ATC and comparison
def fit_atc(
    wrapper: nn.Module,
    loader: Iterable[Any],
    *,
    ignore_index: int = 255,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool | Callable[[int], None] | None = None,
) -> float:
    """Fit the ATC threshold (Garg et al., ICLR 2022) on labelled data: the ``t`` at which the
    fraction of labelled pixels whose base max-softmax probability exceeds ``t`` equals the base
    labels' pixel accuracy. Streaming (a histogram of ``2**16`` bins, linear within a bin);
    under ``torch.distributed`` the histograms are summed over processes.

    Args:
        wrapper: an :class:`~errwrap.ErrorCorrectionWrapper`.
        loader: labelled batches, read as :func:`errwrap.evaluate` reads them.
        ignore_index: label of unlabelled pixels, left out.
        device, max_batches, progress: as in :func:`estimate`.

    Returns:
        The threshold, in ``[0, 1]``; pass it to :func:`estimate` as ``atc_threshold``.
    """
    _check_run_settings(0.5, None, max_batches)
    hist = torch.zeros(_ATC_BINS, dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    outputs = _outputs(
        wrapper,
        loader,
        labelled=True,
        ignore_index=ignore_index,
        device=device,
        max_batches=max_batches,
        progress=progress,
        name="fit_atc",
    )
    with contextlib.closing(outputs):
        for out, valid, truth in outputs:
            msp, base_labels = torch.softmax(out.base_logits.float(), dim=1).max(dim=1)
            bins = (msp[valid].to(torch.float64) * _ATC_BINS).long().clamp_(0, _ATC_BINS - 1)
            hist += torch.bincount(bins, minlength=_ATC_BINS).to(torch.float64).cpu()
            correct += ((base_labels == truth) & valid).sum().to(torch.float64).cpu()  # type: ignore[operator]
    parts = _gather((hist, correct))
    hist, correct = sum(p[0] for p in parts), sum(p[1] for p in parts)
    total = float(hist.sum())
    if total == 0:
        raise ValueError(
            f"fit_atc: expected labelled pixels, got none (every label was ignore_index={ignore_index}, or no batch)"
        )
    return _atc_threshold(hist / total, float(correct) / total)


def _atc_threshold(mass: Tensor, accuracy: float) -> float:
    """``t`` with ``P(score > t) = accuracy`` for scores histogrammed in ``len(mass)`` equal bins of
    ``[0, 1]`` (uniform within a bin)."""
    n = mass.numel()
    survival = torch.cat([mass.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=mass.dtype)])  # S[j] = mass of bins >= j
    j = int((survival >= accuracy - 1e-12).nonzero().max())  # last edge with at least `accuracy` above it
    if j >= n:
        return 1.0
    inside = float(mass[j])
    frac = 0.0 if inside <= 0 else min(1.0, max(0.0, (float(survival[j]) - accuracy) / inside))
    return (j + frac) / n


def _abs(a: float, b: float) -> float:
    return abs(a - b)


@dataclasses.dataclass
class EstimateComparison:
    """How far each label-free estimate is from the truth on labelled data (:func:`compare_estimates`).

    Attributes:
        estimate: the :class:`EstimateReport`, computed on the labelled pixels only.
        truth: ``{"fused": ..., "base": ...}``: true ``"pixel_accuracy"`` and ``"miou"`` of the
            corrected labels and of the base labels.
        errors: per estimator (``"errwrap"``, ``"avg_confidence"``, ``"atc"``): ``"target"`` (the
            labels it describes: ``"fused"`` or ``"base"``), absolute errors of the data-set
            ``"pixel_accuracy"`` and ``"miou"``, per-image mean absolute errors
            ``"per_image_mae"`` (pixel accuracy) and ``"per_image_miou_mae"``, and ``"spearman"``,
            the rank correlation of per-image predicted and true pixel accuracy.
        per_image: the estimate's rows with ``"true_pixel_accuracy"``, ``"true_miou"`` and
            ``"base_true_pixel_accuracy"`` added.
    """

    estimate: EstimateReport
    truth: dict[str, dict[str, float]]
    errors: dict[str, dict[str, Any]]
    per_image: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; ``nan`` becomes ``None``."""
        return nan_to_none(
            {
                "estimate": self.estimate.to_dict(),
                "truth": self.truth,
                "errors": self.errors,
                "per_image": self.per_image,
            }
        )

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """Strict JSON text; also written to ``path`` if given."""
        return write_json_text(self.to_dict(), path, indent)

    def table(self) -> str:
        """Each estimator against the truth of the labels it describes (points, lower is better
        except Spearman)."""
        lines = [
            f"label-free estimates vs truth: {self.estimate.num_images} images, {self.estimate.num_pixels} labelled "
            "pixels",
            f"truth: fused labels pixAcc {_pct(self.truth['fused']['pixel_accuracy'])} mIoU "
            f"{_pct(self.truth['fused']['miou'])}; "
            f"base labels pixAcc {_pct(self.truth['base']['pixel_accuracy'])} mIoU {_pct(self.truth['base']['miou'])}",
            "",
            f"{'estimator':<16}{'labels':>7}{'pixAcc':>8}{'|err|':>7}{'mIoU':>8}{'|err|':>7}{'imgMAE':>8}{'Spearman':>9}",
        ]
        for name, e in self.errors.items():
            lines.append(
                f"{name:<16}{e['target']:>7}{_pct(e['estimate_pixel_accuracy']):>8}{_pct(e['pixel_accuracy']):>7}"
                f"{_pct(e['estimate_miou']):>8}{_pct(e['miou']):>7}{_pct(e['per_image_mae']):>8}{e['spearman']:>9.3f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compare_estimates(
    wrapper: nn.Module,
    loader: Iterable[Any],
    *,
    threshold: float = 0.5,
    atc_threshold: float | None = None,
    ignore_index: int = 255,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool | Callable[[int], None] | None = None,
) -> EstimateComparison:
    """Run :func:`estimate` on labelled data, restricted to the labelled pixels, and measure each
    estimator against the truth of the labels it describes: errwrap's against the corrected
    labels, average confidence's and ATC's against the base labels.

    Args and the DDP behaviour are those of :func:`estimate`; ``ignore_index`` marks the
    unlabelled pixels, which no estimate or truth counts. Fit ``atc_threshold`` with
    :func:`fit_atc` on *other* labelled data than ``loader``'s.

    Returns:
        An :class:`EstimateComparison`.
    """
    _check_interval_settings(bootstrap, level)
    run = _run(wrapper, loader, threshold=threshold, atc_threshold=atc_threshold, labelled=True,
               ignore_index=ignore_index, device=device, max_batches=max_batches, progress=progress,
               name="compare_estimates")  # fmt: skip
    report = _report(run, threshold, atc_threshold, bootstrap, level, seed, wrapper)
    truth = {}
    for target, key in (("fused", "truth"), ("base", "base_truth")):
        acc, _, miou = scores_from_counts(run.counts[key].sum(dim=0))
        truth[target] = {"pixel_accuracy": float(acc), "miou": float(miou)}
    errors: dict[str, dict[str, Any]] = {}
    for name in ESTIMATORS:
        if name not in run.counts:
            continue
        target, key = ("fused", "truth") if name == "errwrap" else ("base", "base_truth")
        est_acc, _, est_miou = scores_from_counts(run.counts[name].sum(dim=0))
        img_acc, _, img_miou = scores_from_counts(run.counts[name])
        true_acc, _, true_miou = scores_from_counts(run.counts[key])
        errors[name] = {
            "target": target,
            "estimate_pixel_accuracy": float(est_acc),
            "estimate_miou": float(est_miou),
            "pixel_accuracy": _abs(float(est_acc), truth[target]["pixel_accuracy"]),
            "miou": _abs(float(est_miou), truth[target]["miou"]),
            "per_image_mae": float(torch.nanmean((img_acc - true_acc).abs())),
            "per_image_miou_mae": float(torch.nanmean((img_miou - true_miou).abs())),
            "spearman": spearman(img_acc.tolist(), true_acc.tolist()),
        }
    report.config["ignore_index"] = ignore_index
    result = EstimateComparison(estimate=report, truth=truth, errors=errors, per_image=[dict(r) for r in run.rows])
    logger.info("compare_estimates: %s", {k: round(v["pixel_accuracy"], 4) for k, v in errors.items()})
    return result
