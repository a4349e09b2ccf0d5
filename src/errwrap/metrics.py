"""Streaming evaluation metrics: segmentation, error detection and calibration.

Every metric keeps a few fixed-size tensors of counts (its *state*), so it accumulates over a
whole data set in constant memory. ``update()`` adds a batch, ``compute()`` reads the result,
``reset()`` clears it, ``merge(other)`` adds another object's counts, and ``sync()`` sums the
counts of every process when ``torch.distributed`` is initialised. ``state_dict()`` returns the
state as plain tensors, so any code can sum them itself.

Error detection treats *errors as the positive class*: a score is high where the pixel is
predicted to be wrong. Its metrics are computed from two fixed-bin histograms of the scores
over ``[0, 1]`` (one for errors, one for successes); every result comes with a bound on the
error that binning causes, computed from the same histograms. See docs/metrics.md.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from ._distributed import all_reduce_sum, gather_objects, is_initialized
from ._validate import check_positive_int, describe
from .functional import class_labels

__all__ = [
    "StreamingMetric",
    "SegmentationResult",
    "SegmentationMetrics",
    "ErrorDetectionResult",
    "ErrorDetectionMetrics",
    "CalibrationResult",
    "CalibrationMetrics",
    "exact_error_detection",
    "DEFAULT_SCORE_BINS",
    "DEFAULT_COVERAGES",
    "RiskCoverageResult",
    "RiskCoverageMetrics",
    "exact_risk_coverage",
    "risk_coverage_curve",
    "optimal_aurc",
    "ImageRiskCoverageResult",
    "ImageRiskCoverageMetrics",
    "image_aurc",
]

DEFAULT_SCORE_BINS = 10_000
"""Default number of score bins (width ``1e-4`` on ``[0, 1]``)."""

_NAN = float("nan")
_M = TypeVar("_M", bound="StreamingMetric")  # methods that return self keep the subclass


def _finite_or_nan(num: float, den: float) -> float:
    return num / den if den > 0 else _NAN


class StreamingMetric:
    """Base class: named count tensors that add up across batches, objects and processes.

    Subclasses register their state in ``__init__`` with :meth:`_add_state` and define
    :meth:`config` (the constructor arguments that must match for two objects to merge).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._states: dict[str, Tensor] = {}

    def _add_state(self, name: str, size: int, dtype: torch.dtype) -> None:
        self._states[name] = torch.zeros(size, dtype=dtype, device=self.device)

    def config(self) -> dict[str, Any]:
        """The settings that define the state's meaning (checked by :meth:`merge`)."""
        return {}

    def reset(self: _M) -> _M:
        """Zero every count."""
        for state in self._states.values():
            state.zero_()
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of the state: plain tensors that add up (sum them to combine evaluations)."""
        return {name: state.clone() for name, state in self._states.items()}

    def load_state_dict(self: _M, state: dict[str, Tensor]) -> _M:
        """Replace the state by ``state`` (as returned by :meth:`state_dict`), strictly."""
        missing = sorted(set(self._states) - set(state))
        unexpected = sorted(set(state) - set(self._states))
        if missing or unexpected:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        for name, value in state.items():
            own = self._states[name]
            if not isinstance(value, Tensor) or value.shape != own.shape:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {name!r}: expected a tensor of shape {tuple(own.shape)}, "
                    f"got {describe(value)}"
                )
            own.copy_(value.to(own.device, own.dtype))
        return self

    def merge(self: _M, other: StreamingMetric) -> _M:
        """Add the counts of ``other`` (same class and settings) to this object's."""
        if type(other) is not type(self):
            raise TypeError(f"merge: expected a {type(self).__name__}, got {type(other).__name__}")
        if other.config() != self.config():
            raise ValueError(f"merge: expected the same settings {self.config()}, got {other.config()}")
        for name, state in self._states.items():
            state.add_(other._states[name].to(state.device))
        return self

    def sync(self: _M, group: Any = None) -> _M:
        """Sum the state over every process of ``group`` (``all_reduce``); a no-op when
        ``torch.distributed`` is not initialised. Call it once, after the last ``update``."""
        for state in self._states.values():
            all_reduce_sum(state, group)
        return self

    all_reduce = sync

    def to(self: _M, device: torch.device | str) -> _M:
        """Move the state to ``device``."""
        self.device = torch.device(device)
        self._states = {name: state.to(self.device) for name, state in self._states.items()}
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------- segmentation
class SegmentationResult(NamedTuple):
    """Segmentation scores (fractions in ``[0, 1]``; ``nan`` where undefined).

    Attributes:
        miou: mean of the defined per-class IoUs.
        iou: per-class IoU ``TP / (TP + FP + FN)``; ``nan`` for a class absent from both the
            predictions and the labels (it is left out of ``miou``).
        pixel_accuracy: correctly labelled pixels / labelled pixels.
        mean_accuracy: mean over the classes present in the labels of ``TP / (TP + FN)``.
        num_pixels: labelled (not ignored) pixels counted.
    """

    miou: float
    iou: list[float]
    pixel_accuracy: float
    mean_accuracy: float
    num_pixels: int


def _nanmean(values: Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else _NAN


class SegmentationMetrics(StreamingMetric):
    """Confusion matrix of labels against predictions, and the scores derived from it.

    The state is a ``num_classes x num_classes`` int64 confusion matrix (rows: label, columns:
    prediction), filled with ``bincount``. Pixels whose label is ``ignore_index`` are skipped.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: label value of unlabelled pixels.
        device: where the state lives (default CPU); batches may be on any device.

    Shapes:
        ``update(preds, labels)``: ``preds`` int ``(B, H, W)`` or logits/probabilities
        ``(B, C, H, W)`` (argmax taken); ``labels`` int ``(B, H, W)``.

    Example:
        >>> m = SegmentationMetrics(3)
        >>> m.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 1]]]))
        >>> round(m.compute().pixel_accuracy, 4)
        0.6667
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        super().__init__(device)
        check_positive_int(num_classes, "num_classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._add_state("confusion", num_classes * num_classes, torch.int64)

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    @property
    def confusion(self) -> Tensor:
        """The ``(C, C)`` confusion matrix, ``[label, prediction]``."""
        return self._states["confusion"].view(self.num_classes, self.num_classes)

    def update(self, preds: Tensor, labels: Tensor) -> None:
        """Add a batch of predictions (labels or ``(B, C, H, W)`` scores) and labels."""
        if not isinstance(preds, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(f"update: expected tensors, got preds {describe(preds)} and labels {describe(labels)}")
        if preds.is_floating_point():
            if preds.ndim < 2 or preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"preds: expected integer labels or scores of shape BxCxHxW with C={self.num_classes}, got "
                    f"{describe(preds)}"
                )
            preds = class_labels(preds)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels: expected an integer tensor, got {describe(labels)}")
        if preds.shape != labels.shape:
            raise ValueError(
                f"preds and labels: expected the same shape, got {tuple(preds.shape)} and {tuple(labels.shape)}"
            )
        valid = labels != self.ignore_index
        labels, preds = labels[valid].long(), preds[valid].long()
        c = self.num_classes
        if labels.numel() and bool(((labels < 0) | (labels >= c)).any()):
            raise ValueError(
                f"labels: expected values in [0, {c}) or ignore_index={self.ignore_index}, got "
                f"{torch.unique(labels[(labels < 0) | (labels >= c)])[:8].tolist()}"
            )
        if preds.numel() and bool(((preds < 0) | (preds >= c)).any()):
            raise ValueError(
                f"preds: expected values in [0, {c}), got "
                f"{torch.unique(preds[(preds < 0) | (preds >= c)])[:8].tolist()}"
            )
        counts = torch.bincount(labels * c + preds, minlength=c * c)
        self._states["confusion"].add_(counts.to(self.device))

    def compute(self) -> SegmentationResult:
        """IoU per class, mIoU, pixel accuracy and mean accuracy of everything seen so far."""
        conf = self.confusion.double().cpu()
        tp = conf.diagonal()
        label_count = conf.sum(dim=1)
        pred_count = conf.sum(dim=0)
        union = label_count + pred_count - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, _NAN))
        recall = torch.where(label_count > 0, tp / label_count.clamp_min(1), torch.full_like(tp, _NAN))
        total = float(conf.sum())
        return SegmentationResult(
            miou=_nanmean(iou),
            iou=[float(v) for v in iou],
            pixel_accuracy=_finite_or_nan(float(tp.sum()), total),
            mean_accuracy=_nanmean(recall),
            num_pixels=int(self._states["confusion"].sum()),
        )


# ---------------------------------------------------------------------------- error detection
class ErrorDetectionResult(NamedTuple):
    """Error-detection scores, errors positive; ``nan`` when there are no errors or no successes.

    Attributes:
        auroc: area under the ROC curve (ties count one half).
        aupr_error: average precision with errors as the positive class.
        aupr_success: average precision with successes positive and the score negated.
        fpr95: false-positive rate (successes flagged) at the first threshold, from the top,
            whose true-positive rate (errors flagged) reaches 95%.
        auroc_bound, aupr_error_bound, aupr_success_bound, fpr95_bound: bounds on
            ``|histogram value - exact value|`` caused by the bins (0 for exact computations).
        num_errors: error pixels counted.
        num_pixels: pixels counted (errors and successes).
        error_rate: ``num_errors / num_pixels``.
    """

    auroc: float
    aupr_error: float
    aupr_success: float
    fpr95: float
    auroc_bound: float
    aupr_error_bound: float
    aupr_success_bound: float
    fpr95_bound: float
    num_errors: int
    num_pixels: int
    error_rate: float


def _average_precision_from_hist(pos: Tensor, neg: Tensor) -> tuple[float, float]:
    """AP and its binning bound, bins ordered from the most to the least "positive" score."""
    total_pos = float(pos.sum())
    tp = pos.cumsum(0)
    fp = neg.cumsum(0)
    above_tp, above_fp = tp - pos, fp - neg
    has_pos = pos > 0
    precision = tp / (tp + fp).clamp_min(1)
    ap = float((pos * precision).sum()) / total_pos
    # A positive in bin b sees, exactly, precision (A + a) / (A + F + a + c) with 1 <= a <= pos_b
    # positives and 0 <= c <= neg_b negatives of its bin ranked at or above it.
    high = (above_tp + pos) / (above_tp + above_fp + pos).clamp_min(1)
    low = (above_tp + 1) / (above_tp + above_fp + 1 + neg)
    gap = torch.maximum(high - precision, precision - low).clamp_min(0)
    bound = float((pos * gap)[has_pos].sum()) / total_pos
    return ap, bound


class ErrorDetectionMetrics(StreamingMetric):
    """AUROC, AUPR-Error, AUPR-Success and FPR at 95% TPR of a per-pixel error score.

    Errors are the positive class: the score should be high where the base prediction is wrong.
    Scores are binned into ``num_bins`` equal-width bins over ``score_range`` (mapped linearly to
    ``[0, 1]``, bin ``b`` holding ``[b/n, (b+1)/n)``, the last bin also ``1``), one histogram for
    errors and one for successes; values outside the range by more than ``1e-6`` of its width
    raise ``ValueError``, smaller overshoots (rounding) are clamped. The metrics are computed
    from the histograms, exactly as if every score were replaced by its bin index; binning can
    only merge scores that share a bin, and each result carries a bound on the difference to the
    exact (sort-based) value, see :class:`ErrorDetectionResult` and docs/metrics.md.

    Args:
        num_bins: number of score bins.
        score_range: ``(low, high)`` of the scores; use a monotone map of unbounded scores to
            ``[0, 1]`` instead (the metrics are invariant to monotone maps).
        device: where the state lives (default CPU).

    Shapes:
        ``update(scores, errors, valid=None)``: any shape, all three the same.

    Example:
        >>> m = ErrorDetectionMetrics()
        >>> m.update(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([True, False, True, False]))
        >>> m.compute().auroc
        0.75
    """

    def __init__(
        self,
        num_bins: int = DEFAULT_SCORE_BINS,
        score_range: tuple[float, float] = (0.0, 1.0),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(device)
        check_positive_int(num_bins, "num_bins")
        low, high = (float(v) for v in score_range)
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"score_range: expected finite (low, high) with low < high, got {score_range!r}")
        self.num_bins = num_bins
        self.score_range = (low, high)
        self._add_state("errors", num_bins, torch.int64)
        self._add_state("successes", num_bins, torch.int64)

    def config(self) -> dict[str, Any]:
        return {"num_bins": self.num_bins, "score_range": self.score_range}

    @property
    def histograms(self) -> tuple[Tensor, Tensor]:
        """``(errors, successes)``: counts per score bin, lowest scores first."""
        return self._states["errors"], self._states["successes"]

    def bin_index(self, scores: Tensor) -> Tensor:
        """The bin of each score (int64, same shape)."""
        low, high = self.score_range
        unit = (scores.double() - low) / (high - low)
        tol = 1e-6
        if unit.numel():
            if bool(torch.isnan(unit).any()):
                raise ValueError("scores: expected finite values, got NaN")
            lo, hi = float(unit.min()), float(unit.max())
            if lo < -tol or hi > 1 + tol:
                raise ValueError(
                    f"scores: expected values in score_range={self.score_range}, got [{lo * (high - low) + low:.6g}, "
                    f"{hi * (high - low) + low:.6g}]; map unbounded scores to [0, 1] (e.g. entropy / log(C)) or set "
                    "score_range"
                )
        return (unit.clamp(0, 1) * self.num_bins).long().clamp_(0, self.num_bins - 1)

    def update(self, scores: Tensor, errors: Tensor, valid: Tensor | None = None) -> None:
        """Add scores with their error indicator; pixels where ``valid`` is false are skipped."""
        if not isinstance(scores, Tensor) or not scores.is_floating_point():
            raise TypeError(f"scores: expected a floating-point tensor, got {describe(scores)}")
        if not isinstance(errors, Tensor):
            raise TypeError(f"errors: expected a bool tensor, got {describe(errors)}")
        if errors.shape != scores.shape or (valid is not None and valid.shape != scores.shape):
            shapes = f"{tuple(scores.shape)}, {tuple(errors.shape)}" + (
                f", {tuple(valid.shape)}" if valid is not None else ""
            )
            raise ValueError(f"scores, errors, valid: expected the same shape, got {shapes}")
        errors = errors.bool()
        if valid is not None:
            valid = valid.bool()
            scores, errors = scores[valid], errors[valid]
        bins = self.bin_index(scores).reshape(-1)
        n = self.num_bins
        counts = torch.bincount(bins + n * (~errors).long().reshape(-1), minlength=2 * n).to(self.device)
        self._states["errors"].add_(counts[:n])
        self._states["successes"].add_(counts[n:])

    def compute(self) -> ErrorDetectionResult:
        """The four metrics and their binning bounds; ``nan`` when errors or successes are absent."""
        pos = self._states["errors"].double().cpu()
        neg = self._states["successes"].double().cpu()
        n_pos, n_neg = int(self._states["errors"].sum()), int(self._states["successes"].sum())
        total = n_pos + n_neg
        if n_pos == 0 or n_neg == 0:
            return ErrorDetectionResult._make([*([_NAN] * 8), n_pos, total, _finite_or_nan(n_pos, total)])
        # AUROC: pairs in different bins are ordered as their scores; a pair sharing a bin counts 1/2.
        neg_below = neg.cumsum(0) - neg
        pairs = float(n_pos) * float(n_neg)
        auroc = float((pos * (neg_below + 0.5 * neg)).sum()) / pairs
        auroc_bound = 0.5 * float((pos * neg).sum()) / pairs
        ap_err, ap_err_bound = _average_precision_from_hist(pos.flip(0), neg.flip(0))
        ap_ok, ap_ok_bound = _average_precision_from_hist(neg, pos)
        # FPR95: highest bin k with TP(>= k) >= 0.95 P; the exact threshold lies inside bin k.
        tp_from_top = self._states["errors"].cpu().flip(0).cumsum(0)
        k = int(torch.nonzero(tp_from_top * 100 >= 95 * n_pos)[0])
        fp_from_top = neg.flip(0).cumsum(0)
        fpr95 = float(fp_from_top[k]) / n_neg
        fpr95_bound = float(neg.flip(0)[k]) / n_neg
        return ErrorDetectionResult(
            auroc,
            ap_err,
            ap_ok,
            fpr95,
            auroc_bound,
            ap_err_bound,
            ap_ok_bound,
            fpr95_bound,
            n_pos,
            total,
            n_pos / total,
        )


def _exact_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    values, inverse = np.unique(-scores, return_inverse=True)  # distinct thresholds, highest score first
    pos_per = np.bincount(inverse, weights=positive.astype(np.float64), minlength=len(values))
    all_per = np.bincount(inverse, minlength=len(values)).astype(np.float64)
    precision = np.cumsum(pos_per) / np.cumsum(all_per)
    return float((pos_per * precision).sum() / positive.sum())


def exact_error_detection(scores: Tensor | np.ndarray, errors: Tensor | np.ndarray) -> ErrorDetectionResult:
    """The same metrics as :class:`ErrorDetectionMetrics`, exactly, by sorting (memory O(n)).

    A reference for tests and small data: AUROC is the Mann-Whitney statistic with ties counted
    one half; average precision is ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds
    (as ``sklearn.metrics.average_precision_score``); FPR95 is taken at the highest threshold
    whose TPR reaches 95%. Bounds are 0.

    Shapes:
        scores, errors: any shape, the same; flattened.
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
    e = np.asarray(errors.detach().cpu() if isinstance(errors, Tensor) else errors).astype(bool).ravel()
    if s.shape != e.shape:
        raise ValueError(f"scores and errors: expected the same number of values, got {s.size} and {e.size}")
    n_pos = int(e.sum())
    n_neg = int(e.size - n_pos)
    total = n_pos + n_neg
    if n_pos == 0 or n_neg == 0:
        return ErrorDetectionResult._make([*([_NAN] * 8), n_pos, total, _finite_or_nan(n_pos, total)])
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    ranks = (starts + (counts + 1) / 2.0)[inverse]  # average ranks, 1-based
    auroc = (ranks[e].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    # FPR95 at the highest distinct threshold with TPR >= 0.95.
    values, inv_desc = np.unique(-s, return_inverse=True)
    tp = np.cumsum(np.bincount(inv_desc, weights=e.astype(np.float64), minlength=len(values)))
    fp = np.cumsum(np.bincount(inv_desc, weights=(~e).astype(np.float64), minlength=len(values)))
    k = int(np.nonzero(tp * 100 >= 95 * n_pos)[0][0])
    return ErrorDetectionResult(
        float(auroc),
        _exact_ap(s, e),
        _exact_ap(-s, ~e),
        float(fp[k] / n_neg),
        0.0,
        0.0,
        0.0,
        0.0,
        n_pos,
        total,
        n_pos / total,
    )


# ---------------------------------------------------------------------------- calibration
class CalibrationResult(NamedTuple):
    """Calibration of the top-label confidence.

    Attributes:
        ece: expected calibration error ``sum_b (n_b / n) |acc_b - conf_b|``.
        mce: maximum calibration error ``max_b |acc_b - conf_b|`` over non-empty bins.
        accuracy: fraction of pixels whose top label is correct.
        confidence: mean top-label confidence.
        num_pixels: pixels counted.
    """

    ece: float
    mce: float
    accuracy: float
    confidence: float
    num_pixels: int


class CalibrationMetrics(StreamingMetric):
    """Expected calibration error of the top-label confidence, equal-width bins.

    Bin ``b`` of ``num_bins`` holds confidences in ``[b/M, (b+1)/M)`` (the last one also 1).
    The state is per bin: pixel count, correct count, and the float64 sum of confidences.

    Args:
        num_classes: number of classes (checked against the probabilities).
        num_bins: number of confidence bins ``M``.
        ignore_index: label value of unlabelled pixels.
        device: where the state lives (default CPU).

    Shapes:
        ``update(probs, labels)``: probabilities ``(B, C, H, W)``, labels ``(B, H, W)``.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        num_bins: int = 15,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(device)
        check_positive_int(num_bins, "num_bins")
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.ignore_index = ignore_index
        self._add_state("count", num_bins, torch.int64)
        self._add_state("correct", num_bins, torch.int64)
        self._add_state("confidence", num_bins, torch.float64)

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "num_bins": self.num_bins, "ignore_index": self.ignore_index}

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add class probabilities (e.g. ``softmax(logits)``) and labels."""
        if not isinstance(probs, Tensor) or not probs.is_floating_point() or probs.ndim < 2:
            raise TypeError(f"probs: expected a floating-point tensor of shape BxCxHxW, got {describe(probs)}")
        if self.num_classes is not None and probs.shape[1] != self.num_classes:
            raise ValueError(f"probs: expected {self.num_classes} classes (BxCxHxW), got shape {tuple(probs.shape)}")
        if not isinstance(labels, Tensor) or labels.shape != probs.shape[:1] + probs.shape[2:]:
            raise ValueError(
                f"labels: expected shape {tuple(probs.shape[:1] + probs.shape[2:])}, got {describe(labels)}"
            )
        confidence, pred = probs.max(dim=1)
        valid = labels != self.ignore_index
        self.update_confidences(confidence[valid], pred[valid] == labels[valid])

    def update_confidences(self, confidences: Tensor, correct: Tensor) -> None:
        """Add top-label confidences in ``[0, 1]`` with whether each top label is correct."""
        if confidences.shape != correct.shape:
            raise ValueError(
                f"confidences and correct: expected the same shape, got {tuple(confidences.shape)} and "
                f"{tuple(correct.shape)}"
            )
        conf = confidences.detach().double().flatten().clamp(0, 1)
        bins = (conf * self.num_bins).long().clamp_(0, self.num_bins - 1)
        n = self.num_bins
        self._states["count"].add_(torch.bincount(bins, minlength=n).to(self.device))
        self._states["correct"].add_(torch.bincount(bins[correct.flatten().bool()], minlength=n).to(self.device))
        self._states["confidence"].add_(
            torch.zeros(n, dtype=torch.float64, device=conf.device).index_add_(0, bins, conf).to(self.device)
        )

    def compute(self) -> CalibrationResult:
        """ECE, MCE, accuracy and mean confidence; ``nan`` when nothing was counted."""
        count = self._states["count"].double().cpu()
        correct = self._states["correct"].double().cpu()
        conf = self._states["confidence"].cpu()
        n = float(count.sum())
        if n == 0:
            return CalibrationResult(_NAN, _NAN, _NAN, _NAN, 0)
        gap = (correct - conf).abs()
        filled = count > 0
        mce = float((gap[filled] / count[filled]).max())
        return CalibrationResult(float(gap.sum()) / n, mce, float(correct.sum()) / n, float(conf.sum()) / n, int(n))


# ---------------------------------------------------------------------------- risk-coverage
DEFAULT_COVERAGES = (0.5, 0.8, 0.9, 0.95)
"""Coverages at which :class:`RiskCoverageMetrics` reports the selective risk."""

_EULER_GAMMA = 0.5772156649015329


def _harmonic(n: Tensor) -> Tensor:
    """``H(n) = sum_{k=1..n} 1/k`` for real ``n >= 0`` (float64), via the digamma function."""
    return torch.special.digamma(n + 1.0) + _EULER_GAMMA


def _area_of_groups(err: Tensor, cnt: Tensor) -> float:
    """``sum_k risk_k`` over every acceptance count ``k = 1..n``, for groups accepted in order.

    Group ``g`` holds ``cnt_g`` items carrying ``err_g`` errors (a real number: the errors of
    pixels, or the summed error rates of images), accepted in an unknown order: the value is the
    expectation over the orders inside each group. With ``A`` items and ``E`` errors accepted
    before the group, accepting ``j`` of its items gives risk ``(E + j err/cnt) / (A + j)``, and
    ``sum_{j=1..m} (E + j e/m) / (A + j) = (E - A e/m) (H(A + m) - H(A)) + e``.
    """
    keep = cnt > 0
    err, cnt = err[keep].double(), cnt[keep].double()
    if cnt.numel() == 0:
        return 0.0
    before_n = cnt.cumsum(0) - cnt
    before_e = err.cumsum(0) - err
    span = _harmonic(before_n + cnt) - _harmonic(before_n)
    return float(((before_e - before_n * err / cnt) * span + err).sum())


def optimal_aurc(num_errors: int, num_pixels: int) -> float:
    """The smallest AURC of ``num_pixels`` items of which ``num_errors`` are errors: every error
    ranked after every success, ``(e - s (H(n) - H(s))) / n`` with ``s = n - e``. It tends to
    ``r + (1 - r) ln(1 - r)`` for the error rate ``r`` as ``n`` grows (Geifman et al., 2019)."""
    if num_pixels <= 0:
        return _NAN
    s = num_pixels - num_errors
    err = torch.tensor([0.0, float(num_errors)], dtype=torch.float64)
    cnt = torch.tensor([float(s), float(num_errors)], dtype=torch.float64)
    return _area_of_groups(err, cnt) / num_pixels


class RiskCoverageResult(NamedTuple):
    """Risk-coverage of a score: accept the pixels from the least to the most suspicious.

    Attributes:
        aurc: area under the risk-coverage curve, ``(1/n) sum_k risk_k`` where ``risk_k`` is the
            error rate of the ``k`` least suspicious pixels (lower is better; ties: expected
            value over the orders inside a tie).
        eaurc: ``aurc - optimal_aurc``: 0 for a perfect ranking.
        optimal_aurc: the AURC of a perfect ranking with the same errors, :func:`optimal_aurc`.
        aurc_bound: bound on ``|histogram value - exact value|`` of ``aurc`` and ``eaurc``
            (0 for exact computations).
        coverages: the coverages of ``risks``.
        risks: the error rate of the accepted pixels at each coverage (the ``ceil(c n)`` least
            suspicious pixels).
        risk_bound: bound on ``|histogram - exact|`` of every value of ``risks``.
        num_errors: error pixels counted.
        num_pixels: pixels counted.
        error_rate: ``num_errors / num_pixels`` (the risk at full coverage).
    """

    aurc: float
    eaurc: float
    optimal_aurc: float
    aurc_bound: float
    coverages: list[float]
    risks: list[float]
    risk_bound: float
    num_errors: int
    num_pixels: int
    error_rate: float


def _check_coverages(coverages: Any) -> tuple[float, ...]:
    values = tuple(float(c) for c in coverages)
    if not all(0.0 < c <= 1.0 for c in values):
        raise ValueError(f"coverages: expected values in (0, 1], got {coverages!r}")
    return values


def _risks_at(err: Tensor, cnt: Tensor, coverages: tuple[float, ...]) -> tuple[list[float], float]:
    """Risk at each coverage (linear share of the errors of the group it falls in) and a bound
    over the orders inside that group."""
    err, cnt = err.double(), cnt.double()
    n = float(cnt.sum())
    cum_n, cum_e = cnt.cumsum(0), err.cumsum(0)
    risks, bound = [], 0.0
    for c in coverages:
        k = max(1.0, math.ceil(c * n - 1e-9))
        g = int(torch.searchsorted(cum_n, torch.tensor([k], dtype=torch.float64))[0].clamp(max=len(cnt) - 1))
        before_n, before_e = float(cum_n[g] - cnt[g]), float(cum_e[g] - err[g])
        taken, m, e = k - before_n, float(cnt[g]), float(err[g])
        risks.append((before_e + taken * e / m) / k)
        low, high = before_e + max(0.0, taken - (m - e)), before_e + min(taken, e)
        bound = max(bound, (high - low) / k)
    return risks, bound


def _risk_coverage_result(err: Tensor, cnt: Tensor, coverages: tuple[float, ...], bound: float) -> RiskCoverageResult:
    n_err, n = int(round(float(err.sum()))), int(round(float(cnt.sum())))
    if n == 0:
        return RiskCoverageResult(_NAN, _NAN, _NAN, _NAN, list(coverages), [_NAN] * len(coverages), _NAN, 0, 0, _NAN)
    aurc = _area_of_groups(err, cnt) / n
    best = optimal_aurc(n_err, n)
    risks, risk_bound = _risks_at(err, cnt, coverages)
    return RiskCoverageResult(aurc, aurc - best, best, bound, list(coverages), risks, risk_bound, n_err, n, n_err / n)


class RiskCoverageMetrics(StreamingMetric):
    """AURC, E-AURC and the selective risk at a few coverages of a per-pixel error score.

    Selective prediction: accept the pixels with the lowest score (least suspicious) first; at
    coverage ``k / n`` the risk is the error rate of the ``k`` accepted pixels. The state is the
    same pair of score histograms as :class:`ErrorDetectionMetrics` (errors, successes; equal
    bins over ``score_range``); pixels sharing a bin are a tie, counted at its expected value over
    the orders inside the bin, and ``aurc_bound`` / ``risk_bound`` bound the difference to the
    exact, sorted value (:func:`exact_risk_coverage`) from the same histograms: the two extreme
    orders inside each bin (its errors first, or last).

    Args:
        num_bins: number of score bins.
        score_range: ``(low, high)`` of the scores.
        coverages: where to report the risk, in ``(0, 1]``.
        device: where the state lives (default CPU).

    Shapes:
        ``update(scores, errors, valid=None)``: any shape, all three the same.

    Example:
        >>> m = RiskCoverageMetrics()
        >>> m.update(torch.tensor([0.9, 0.1, 0.2, 0.3]), torch.tensor([True, False, False, False]))
        >>> m.compute().eaurc
        0.0
    """

    def __init__(
        self,
        num_bins: int = DEFAULT_SCORE_BINS,
        score_range: tuple[float, float] = (0.0, 1.0),
        coverages: tuple[float, ...] = DEFAULT_COVERAGES,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(device)
        self._binner = ErrorDetectionMetrics(num_bins, score_range)  # the same bins and input checks
        self.num_bins = num_bins
        self.score_range = self._binner.score_range
        self.coverages = _check_coverages(coverages)
        self._add_state("errors", num_bins, torch.int64)
        self._add_state("successes", num_bins, torch.int64)

    def config(self) -> dict[str, Any]:
        return {"num_bins": self.num_bins, "score_range": self.score_range, "coverages": self.coverages}

    @property
    def histograms(self) -> tuple[Tensor, Tensor]:
        """``(errors, successes)``: counts per score bin, lowest scores first."""
        return self._states["errors"], self._states["successes"]

    def update(self, scores: Tensor, errors: Tensor, valid: Tensor | None = None) -> None:
        """Add scores with their error indicator; pixels where ``valid`` is false are skipped."""
        binner = self._binner.reset()
        binner.update(scores, errors, valid)
        self._states["errors"].add_(binner._states["errors"].to(self.device))
        self._states["successes"].add_(binner._states["successes"].to(self.device))

    def _groups(self) -> tuple[Tensor, Tensor]:
        err = self._states["errors"].double().cpu()
        return err, err + self._states["successes"].double().cpu()

    def compute(self) -> RiskCoverageResult:
        """AURC, E-AURC, the risks at :attr:`coverages` and their binning bounds; ``nan`` when
        nothing was counted."""
        err, cnt = self._groups()
        ok = cnt - err
        n = float(cnt.sum())
        if n == 0:
            return _risk_coverage_result(err, cnt, self.coverages, _NAN)
        expected = _area_of_groups(err, cnt)
        zeros = torch.zeros_like(err)
        # the extreme orders inside each bin: its successes first (best) or its errors first (worst)
        best = _area_of_groups(torch.stack([zeros, err], 1).flatten(), torch.stack([ok, err], 1).flatten())
        worst = _area_of_groups(torch.stack([err, zeros], 1).flatten(), torch.stack([err, ok], 1).flatten())
        bound = max(expected - best, worst - expected, 0.0) / n
        return _risk_coverage_result(err, cnt, self.coverages, bound)

    def curve(self, num_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The risk-coverage curve ``(coverage, risk)``, coverage increasing to 1.

        Args:
            num_points: ``None``: one point at the end of every non-empty bin; an int: the
                risk at the coverages ``k / num_points``, ``k = 1..num_points`` (in-bin errors
                shared linearly, as for :attr:`RiskCoverageResult.risks`).
        """
        err, cnt = self._groups()
        if num_points is None:
            return _curve_of_groups(err, cnt)
        check_positive_int(num_points, "num_points", or_none=True)
        if float(cnt.sum()) == 0:
            return np.zeros(0), np.zeros(0)
        coverages = tuple(k / num_points for k in range(1, num_points + 1))
        return np.asarray(coverages), np.asarray(_risks_at(err, cnt, coverages)[0])


def _curve_of_groups(err: Tensor, cnt: Tensor) -> tuple[np.ndarray, np.ndarray]:
    keep = cnt > 0
    cum_n, cum_e = cnt[keep].double().cumsum(0), err[keep].double().cumsum(0)
    if cum_n.numel() == 0:
        return np.zeros(0), np.zeros(0)
    return (cum_n / cum_n[-1]).numpy(), (cum_e / cum_n).numpy()


def _groups_by_score(scores: Any, values: Any, name: str) -> tuple[Tensor, Tensor]:
    """Items grouped by equal score, lowest first: ``(sum of values, count)`` per group."""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
    v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64).ravel()
    if s.shape != v.shape:
        raise ValueError(f"scores and {name}: expected the same number of values, got {s.size} and {v.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores: expected finite values, got NaN or Inf")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse.ravel(), weights=v, minlength=len(counts))
    return torch.from_numpy(sums), torch.from_numpy(counts.astype(np.float64))


def exact_risk_coverage(
    scores: Tensor | np.ndarray, errors: Tensor | np.ndarray, coverages: tuple[float, ...] = DEFAULT_COVERAGES
) -> RiskCoverageResult:
    """The same values as :class:`RiskCoverageMetrics`, exactly, by sorting (memory O(n)).

    Pixels with equal scores are a tie, counted at the expected value over their orders (as the
    histogram does for a bin); the bounds are 0.

    Shapes:
        scores, errors: any shape, the same; flattened.
    """
    err, cnt = _groups_by_score(
        scores, np.asarray(errors.detach().cpu() if isinstance(errors, Tensor) else errors).astype(bool), "errors"
    )
    return _risk_coverage_result(err, cnt, _check_coverages(coverages), 0.0)


def risk_coverage_curve(scores: Tensor | np.ndarray, errors: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact risk-coverage curve ``(coverage, risk)``: pixels accepted from the lowest score
    up, one point after each distinct score (float64 arrays, coverage increasing to 1).

    Shapes:
        scores, errors: any shape, the same -> two arrays of length ``#distinct scores``.
    """
    err, cnt = _groups_by_score(
        scores, np.asarray(errors.detach().cpu() if isinstance(errors, Tensor) else errors).astype(bool), "errors"
    )
    return _curve_of_groups(err, cnt)


# ---------------------------------------------------------------------------- image level
class ImageRiskCoverageResult(NamedTuple):
    """Image-level risk-coverage: images accepted from the lowest mean score up, the risk being
    the mean of the accepted images' true error rates.

    Attributes:
        aurc: ``(1/N) sum_k risk_k`` (ties: expected value over their orders).
        oracle_aurc: the AURC of the oracle ranking (images sorted by their true error rate).
        eaurc: ``aurc - oracle_aurc``.
        num_images: images counted.
        error_rate: mean of the per-image error rates (the risk at full coverage).
    """

    aurc: float
    oracle_aurc: float
    eaurc: float
    num_images: int
    error_rate: float


def image_aurc(
    mean_scores: Tensor | np.ndarray | list[float], error_rates: Tensor | np.ndarray | list[float]
) -> ImageRiskCoverageResult:
    """Image-level AURC of ranking images by their mean error score against their true error
    rates, with the oracle ranking (by the true rates) and the excess over it.

    Shapes:
        mean_scores, error_rates: ``(N,)``, rates in ``[0, 1]``.
    """
    rates = np.asarray(
        error_rates.detach().cpu() if isinstance(error_rates, Tensor) else error_rates, dtype=np.float64
    ).ravel()
    if rates.size and (not np.isfinite(rates).all() or rates.min() < 0 or rates.max() > 1):
        raise ValueError(f"error_rates: expected values in [0, 1], got range [{rates.min()}, {rates.max()}]")
    n = rates.size
    if n == 0:
        return ImageRiskCoverageResult(_NAN, _NAN, _NAN, 0, _NAN)
    aurc = _area_of_groups(*_groups_by_score(mean_scores, rates, "error_rates")) / n
    oracle = _area_of_groups(*_groups_by_score(rates, rates, "error_rates")) / n
    return ImageRiskCoverageResult(aurc, oracle, aurc - oracle, n, float(rates.mean()))


class ImageRiskCoverageMetrics:
    """Per image, the mean error score and the true error rate over its valid pixels, for
    :func:`image_aurc`. Its state grows with the data: two floats per image (images without a
    valid pixel are skipped). ``merge`` concatenates; ``sync`` gathers every process's images
    (``all_gather_object``) when ``torch.distributed`` is initialised.

    Shapes:
        ``update(scores, errors, valid=None)``: ``(B, H, W)``, all three the same.
    """

    def __init__(self) -> None:
        self.mean_scores: list[float] = []
        self.error_rates: list[float] = []

    def reset(self) -> ImageRiskCoverageMetrics:
        self.mean_scores, self.error_rates = [], []
        return self

    def update(self, scores: Tensor, errors: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch of images."""
        if (
            not isinstance(scores, Tensor)
            or scores.ndim < 2
            or errors.shape != scores.shape
            or (valid is not None and valid.shape != scores.shape)
        ):
            raise ValueError(
                f"scores, errors, valid: expected the same shape (B, H, W), got {describe(scores)}, "
                f"{describe(errors)}, {describe(valid)}"
            )
        weight = torch.ones_like(scores, dtype=torch.float64) if valid is None else valid.double()
        dims = tuple(range(1, scores.ndim))
        count = weight.sum(dims)
        keep = count > 0
        means = (scores.double() * weight).sum(dims)[keep] / count[keep]
        rates = (errors.double() * weight).sum(dims)[keep] / count[keep]
        self.mean_scores += means.cpu().tolist()
        self.error_rates += rates.cpu().tolist()

    def merge(self, other: ImageRiskCoverageMetrics) -> ImageRiskCoverageMetrics:
        """Append the images of ``other``."""
        self.mean_scores += other.mean_scores
        self.error_rates += other.error_rates
        return self

    def sync(self, group: Any = None) -> ImageRiskCoverageMetrics:
        """Gather the images of every process (a no-op without ``torch.distributed``)."""
        if not is_initialized():
            return self
        gathered = gather_objects((self.mean_scores, self.error_rates), group)
        self.mean_scores = [v for scores, _ in gathered for v in scores]
        self.error_rates = [v for _, rates in gathered for v in rates]
        return self

    def compute(self) -> ImageRiskCoverageResult:
        return image_aurc(self.mean_scores, self.error_rates)
