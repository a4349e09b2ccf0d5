"""``evaluate``: segmentation, error detection, calibration and timing of a wrapper on a data set.

One pass over a loader computes, in constant memory (see :mod:`errwrap.metrics`):

* segmentation metrics of the base prediction and of the fused (corrected) prediction;
* error-detection metrics of the error head and of every baseline score, where an *error* is a
  labelled pixel whose *base* label is wrong (what the error head predicts);
* for the labels errwrap returns (``out.labels``) ranked by ``out.error_prob``: error detection,
  risk-coverage (AURC, E-AURC) and image-level AURC, next to the same for the base's labels
  ranked by each base score (MSP always);
* expected calibration error of the base softmax and of the fused probabilities;
* wall time per image of the base pass, the wrapper pass, and each baseline's extra work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._batch import check_loader_num_classes, numbered_batches, prepare_batch, unpack_batch
from ._distributed import is_initialized as _dist_initialized
from ._distributed import sum_over_processes as _sum_over_processes
from ._distributed import world_size as _world_size
from ._io import nan_to_none, none_to_nan, read_json_text, write_json_text
from ._utils import eval_mode, resolve_device
from ._validate import check_outputs_finite, check_positive_int, input_dtype
from .layers import resize
from .metrics import (
    DEFAULT_SCORE_BINS,
    CalibrationMetrics,
    CalibrationResult,
    ErrorDetectionMetrics,
    ErrorDetectionResult,
    ImageRiskCoverageMetrics,
    ImageRiskCoverageResult,
    RiskCoverageMetrics,
    RiskCoverageResult,
    SegmentationMetrics,
    SegmentationResult,
    StreamingMetric,
)
from .scores import ErrorHeadScore, ErrorScore, MCDropoutScore, build_score, msp_score

__all__ = ["EvaluationReport", "evaluate", "unpack_batch"]

logger = logging.getLogger(__name__)


def _result_from_dict(cls: Any, data: Mapping[str, Any]) -> Any:
    missing = [f for f in cls._fields if f not in data]
    if missing:
        raise ValueError(f"{cls.__name__}: missing keys {missing} in {sorted(data)}")
    return cls(**{f: none_to_nan(data[f]) for f in cls._fields})


def _name_width(names: Sequence[str]) -> int:
    """Width of a table's name column: 14, or wider for a longer name."""
    return max([14, *(len(n) + 2 for n in names)])


def _fmt(value: float, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


@dataclasses.dataclass
class EvaluationReport:
    """Everything :func:`evaluate` measured. Rates are fractions in ``[0, 1]``, times seconds.

    Attributes:
        base: segmentation metrics of the base network's labels.
        fused: segmentation metrics of the wrapper's fused labels.
        error_detection: per score name (``"error_head"``, ``"msp"``, ...), its error-detection
            metrics; errors are labelled pixels where the base label is wrong.
        calibration: ``"base"`` (softmax of the base logits) and ``"fused"`` calibration.
        num_images: images evaluated.
        num_pixels: labelled (not ignored) pixels evaluated.
        time_per_image: seconds per image (after one untimed warm-up pass of the base and of
            the wrapper on the first batch): ``"base_forward"``, ``"wrapper_forward"`` (base +
            heads + fusion), for each baseline the time it adds to a base pass
            ``"extra/<name>"`` (MSP/entropy: a softmax; MC dropout: ``T`` base passes), and for
            each score its total cost ``"score/<name>"`` (the error head: the wrapper pass; a
            baseline: the base pass plus its extra time).
        config: the settings of the evaluation (bins, ``T``, ``ignore_index``, ...).
        returned_detection: error detection of ``out.error_prob`` where an error is a labelled
            pixel whose **returned** label ``out.labels`` is wrong.
        risk_coverage: per score, the risk-coverage (AURC, E-AURC, risk at coverages) of the
            labels it judges ranked by it: ``"error_prob"`` (``out.labels`` by
            ``out.error_prob``), ``"msp"`` (the base's labels by MSP, always), then every score
            of ``error_detection``.
        image_risk_coverage: per score (the same keys), the image-level AURC: images ranked by
            their mean score against their error rate, with the oracle's.
        judged_labels: per key of ``risk_coverage``, whose labels are judged: ``"returned"``,
            ``"base"`` or ``"ensemble"``.
        risk_curves: per key of ``risk_coverage``, its curve ``(coverage, risk)`` at the 100
            coverages ``0.01, 0.02, ..., 1`` (lists; for :func:`errwrap.viz.risk_coverage_plot`).
    """

    base: SegmentationResult
    fused: SegmentationResult
    error_detection: dict[str, ErrorDetectionResult]
    calibration: dict[str, CalibrationResult]
    num_images: int
    num_pixels: int
    time_per_image: dict[str, float]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    returned_detection: ErrorDetectionResult | None = None
    risk_coverage: dict[str, RiskCoverageResult] = dataclasses.field(default_factory=dict)
    image_risk_coverage: dict[str, ImageRiskCoverageResult] = dataclasses.field(default_factory=dict)
    judged_labels: dict[str, str] = dataclasses.field(default_factory=dict)
    risk_curves: dict[str, tuple[list[float], list[float]]] = dataclasses.field(default_factory=dict)

    @property
    def miou_gain(self) -> float:
        """``fused.miou - base.miou``."""
        return self.fused.miou - self.base.miou

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; ``nan`` becomes ``None``."""
        data = {
            "base": self.base._asdict(),
            "fused": self.fused._asdict(),
            "error_detection": {k: v._asdict() for k, v in self.error_detection.items()},
            "calibration": {k: v._asdict() for k, v in self.calibration.items()},
            "num_images": self.num_images,
            "num_pixels": self.num_pixels,
            "time_per_image": dict(self.time_per_image),
            "config": dict(self.config),
            "returned_detection": None if self.returned_detection is None else self.returned_detection._asdict(),
            "risk_coverage": {k: v._asdict() for k, v in self.risk_coverage.items()},
            "image_risk_coverage": {k: v._asdict() for k, v in self.image_risk_coverage.items()},
            "judged_labels": dict(self.judged_labels),
            "risk_curves": {k: [list(c), list(r)] for k, (c, r) in self.risk_curves.items()},
        }
        return nan_to_none(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`to_dict` (``None`` becomes ``nan``); reports written before the
        returned-label metrics existed read with those fields empty."""
        if not isinstance(data, Mapping):
            raise TypeError(f"from_dict: expected a mapping, got {type(data).__name__}")
        return cls(
            base=_result_from_dict(SegmentationResult, data["base"]),
            fused=_result_from_dict(SegmentationResult, data["fused"]),
            error_detection={k: _result_from_dict(ErrorDetectionResult, v) for k, v in data["error_detection"].items()},
            calibration={k: _result_from_dict(CalibrationResult, v) for k, v in data["calibration"].items()},
            num_images=int(data["num_images"]),
            num_pixels=int(data["num_pixels"]),
            time_per_image={k: none_to_nan(v) for k, v in data["time_per_image"].items()},
            config=dict(data.get("config", {})),
            returned_detection=None
            if data.get("returned_detection") is None
            else _result_from_dict(ErrorDetectionResult, data["returned_detection"]),
            risk_coverage={
                k: _result_from_dict(RiskCoverageResult, v) for k, v in data.get("risk_coverage", {}).items()
            },
            image_risk_coverage={
                k: _result_from_dict(ImageRiskCoverageResult, v) for k, v in data.get("image_risk_coverage", {}).items()
            },
            judged_labels=dict(data.get("judged_labels", {})),
            risk_curves={k: (list(c), list(r)) for k, (c, r) in data.get("risk_curves", {}).items()},
        )

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """The report as JSON text (strict: no ``NaN`` literals); also written to ``path`` if given."""
        return write_json_text(self.to_dict(), path, indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> EvaluationReport:
        """Read a report from JSON text or from a ``.json`` file."""
        return cls.from_dict(read_json_text(text_or_path))

    # ------------------------------------------------------------------ display
    def table(self) -> str:
        """A readable text table of the report (percentages, milliseconds)."""
        lines = [f"errwrap evaluation: {self.num_images} images, {self.num_pixels} labelled pixels"]
        lines.append("")
        lines.append(f"{'segmentation':<14}{'mIoU':>8}{'pixAcc':>8}{'mAcc':>8}{'ECE':>8}")
        # corrected: the fused labels
        for name, label, seg in (("base", "base", self.base), ("fused", "corrected", self.fused)):
            ece = self.calibration[name].ece if name in self.calibration else float("nan")
            lines.append(f"{label:<14}{_fmt(seg.miou):>8}{_fmt(seg.pixel_accuracy):>8}{_fmt(seg.mean_accuracy):>8}{_fmt(ece):>8}")
        gain = "n/a" if math.isnan(self.miou_gain) else f"{100 * self.miou_gain:+.2f}"
        lines.append(f"{'corrected - base':<16} {gain:>5}")
        lines.append("")
        lines.append(f"per-class IoU  base     : {' '.join(_fmt(v) for v in self.base.iou)}")
        lines.append(f"per-class IoU  corrected: {' '.join(_fmt(v) for v in self.fused.iou)}")
        lines.append("")
        first = next(iter(self.error_detection.values()), None)
        rate = _fmt(first.error_rate) if first is not None else "n/a"
        lines.append(f"error detection (errors = wrong base labels, {rate}% of pixels; higher is better except FPR95)")
        w = _name_width([*self.error_detection, *self.risk_coverage])
        lines.append(f"{'score':<{w}}{'AUROC':>8}{'AUPR-E':>8}{'AUPR-S':>8}{'FPR95':>8}{'bound':>8}{'ms/img':>9}")
        for name, r in self.error_detection.items():
            t = self.time_per_image.get(f"score/{name}", float("nan"))
            ms = "n/a" if math.isnan(t) else f"{1000 * t:.2f}"
            bound = max(r.auroc_bound, r.aupr_error_bound, r.aupr_success_bound, r.fpr95_bound)
            lines.append(f"{name:<{w}}{_fmt(r.auroc):>8}{_fmt(r.aupr_error):>8}{_fmt(r.aupr_success):>8}{_fmt(r.fpr95):>8}{_fmt(bound):>8}{ms:>9}")
        lines.append("")
        lines.append("(bound: largest binning error bound of the four, in points; ms/img: total cost of the score)")
        if self.risk_coverage:
            lines.append("")
            lines.extend(self._risk_coverage_lines())
        times = ", ".join(
            f"{k} {1000 * v:.2f} ms" for k, v in self.time_per_image.items() if not k.startswith("score/")
        )
        lines.append(f"time per image: {times}")
        return "\n".join(lines)

    def _risk_coverage_lines(self) -> list[str]:
        lines = ["risk-coverage (errors of the labels each score judges; lower is better except AUROC, AUPR-E)"]
        w = _name_width([*self.error_detection, *self.risk_coverage])
        lines.append(f"{'score':<{w}}{'labels':<10}{'err%':>7}{'AUROC':>8}{'AUPR-E':>8}{'FPR95':>8}{'AURC':>8}{'E-AURC':>8}{'imAURC':>8}{'imE-AURC':>10}")
        for name, rc in self.risk_coverage.items():
            labels = self.judged_labels.get(name, "base")
            det = (
                self.returned_detection
                if name == "error_prob" and labels == "returned"
                else self.error_detection.get(name)
            )
            auroc, aupr, fpr = (det.auroc, det.aupr_error, det.fpr95) if det is not None else (float("nan"),) * 3
            img = self.image_risk_coverage.get(name)
            img_aurc, img_eaurc = (img.aurc, img.eaurc) if img is not None else (float("nan"),) * 2
            lines.append(
                f"{name:<{w}}{labels:<10}{_fmt(rc.error_rate):>7}{_fmt(auroc):>8}{_fmt(aupr):>8}{_fmt(fpr):>8}"
                f"{_fmt(rc.aurc):>8}{_fmt(rc.eaurc):>8}{_fmt(img_aurc):>8}{_fmt(img_eaurc):>10}"
            )
        lines.append("(AURC: mean risk as pixels are accepted from the least suspicious; E-AURC: AURC minus a perfect")
        lines.append(
            " ranking's; imAURC, imE-AURC: images ranked by mean score against their error rate; all in points)"
        )
        return lines

    def __str__(self) -> str:
        return self.table()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




def evaluate(
    wrapper: nn.Module,
    loader: Iterable[Any],
    baselines: Sequence[str | ErrorScore] = ("msp", "entropy"),
    mc_dropout_T: int = 10,
    ignore_index: int = 255,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool | Callable[[int], None] | None = None,
    *,
    score_bins: int = DEFAULT_SCORE_BINS,
    calibration_bins: int = 15,
    mc_dropout_seed: int = 0,
    mc_dropout_p: float = 0.1,
) -> EvaluationReport:
    """Evaluate a wrapper (base vs corrected segmentation, error scores, calibration, timing).

    The wrapper runs in eval mode without gradients; the mode of every module is restored
    afterwards. When ``torch.distributed`` is initialised, every process evaluates its own
    part of the data and the counts (and timings) are summed over processes, so every process
    returns the same report.

    Args:
        wrapper: an :class:`~errwrap.ErrorCorrectionWrapper` (anything with ``forward_base``,
            ``num_classes`` and a call returning an ``ErrorCorrectionOutput``).
        loader: yields ``(images, labels)`` or mappings with ``"image"`` and ``"label"`` (see
            :func:`unpack_batch` for the other keys read); float images of any dtype (cast to the
            wrapper's, NaN/Inf refused with ``ValueError``); labels ``(B, H, W)`` or
            ``(B, 1, H, W)`` of any integer dtype, at the images' resolution. Images of
            different sizes need ``batch_size=1`` (or a padding ``collate_fn``). A dataset
            whose ``num_classes`` differs from the wrapper's is refused (``ValueError``).
        baselines: scores to compare with the error head: names in
            :data:`errwrap.scores.SCORES` (``"msp"``, ``"entropy"``, ``"mc_dropout"``,
            ``"max_logit"``, ``"energy"``, ...) or :class:`~errwrap.scores.ErrorScore` objects
            (e.g. a fitted ``TemperatureMSPScore`` or an ``EnsembleScore``).
        mc_dropout_T: passes of ``"mc_dropout"`` (used only when it is listed).
        ignore_index: label of unlabelled pixels, left out of every metric.
        device: where the batches go; default: the device of the wrapper's parameters (the
            wrapper itself is never moved).
        max_batches: stop after this many batches.
        progress: ``True`` for a tqdm bar, or a callable ``f(batch_index)`` called after each
            batch.
        score_bins: histogram bins of the error-detection metrics.
        calibration_bins: bins of the ECE.
        mc_dropout_seed, mc_dropout_p: seed and inserted-dropout probability of ``"mc_dropout"``.

    Returns:
        An :class:`EvaluationReport`.

    Example:
        >>> report = evaluate(wrapper, val_loader, baselines=("msp", "entropy"))  # doctest: +SKIP
        >>> print(report.table())                                                 # doctest: +SKIP
    """
    check_positive_int(max_batches, "max_batches", or_none=True)
    num_classes = int(wrapper.num_classes)  # type: ignore[arg-type]
    check_loader_num_classes(loader, num_classes, "loader")
    scores = _build_scores(baselines, mc_dropout_T, mc_dropout_seed, mc_dropout_p)
    device = resolve_device(wrapper, device)
    meters = _Meters.create(num_classes, ignore_index, score_bins, calibration_bins, scores)
    seg, cal, det, returned_det = meters.seg, meters.cal, meters.det, meters.returned_det
    risk, images_rc = meters.risk, meters.images_rc
    seconds = {"base_forward": 0.0, "wrapper_forward": 0.0, **{f"extra/{n}": 0.0 for n in scores}}
    num_images = 0

    iterator: Iterable[Any] = loader
    if progress is True:
        iterator = tqdm(loader, desc="evaluate", total=max_batches)
    callback = progress if callable(progress) else None

    dtype = input_dtype(wrapper)  # float64 or float16 images run in the model's dtype
    error_head = ErrorHeadScore()
    with eval_mode(wrapper), torch.no_grad():
        for index, batch in numbered_batches(iterator, max_batches):
            images, labels = prepare_batch(
                batch, index, in_channels=getattr(wrapper, "in_channels", None), num_classes=num_classes,
                ignore_index=ignore_index, device=device, dtype=dtype,
            )  # fmt: skip
            if index == 0:  # untimed warm-up, so one-time costs do not land on whichever pass runs first
                wrapper.forward_base(images)  # type: ignore[operator]
                wrapper(images)
            out, outputs = _timed_pass(wrapper, images, error_head, scores, device, seconds, f"batch {index}")
            meters.update(out, outputs, labels, ignore_index)
            num_images += int(images.shape[0])
            if callback is not None:
                callback(index)

    if _dist_initialized():
        metrics: list[StreamingMetric | ImageRiskCoverageMetrics] = [
            *seg.values(), *cal.values(), *det.values(), returned_det, *risk.values(), *images_rc.values()
        ]
        for metric in metrics:
            metric.sync()
        keys = list(seconds)
        summed = _sum_over_processes([float(num_images), *(seconds[k] for k in keys)])
        num_images = int(summed[0])
        seconds = dict(zip(keys, summed[1:], strict=False))
    if num_images == 0:
        raise ValueError("loader: expected at least one batch of images, got none")

    config = {
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "score_bins": score_bins,
        "calibration_bins": calibration_bins,
        "scores": {name: repr(s) for name, s in scores.items()},
        "device": str(device),
        "world_size": _world_size(),
    }
    report = meters.report(num_images, _time_per_image(seconds, num_images, scores), config)
    if report.num_pixels == 0:
        logger.warning("evaluate: every label was ignore_index=%d; the metrics are all nan", ignore_index)
    logger.info("evaluated %d images: base mIoU %.4f, fused mIoU %.4f", num_images, report.base.miou, report.fused.miou)
    return report


def _build_scores(
    baselines: Sequence[str | ErrorScore], mc_dropout_T: int, mc_dropout_seed: int, mc_dropout_p: float
) -> dict[str, ErrorScore]:
    """The baseline scores by name, refusing duplicates and the error head's own name."""
    scores: dict[str, ErrorScore] = {}
    for spec in baselines:
        score: ErrorScore
        if spec == "mc_dropout":
            score = MCDropoutScore(T=mc_dropout_T, seed=mc_dropout_seed, p=mc_dropout_p)
        else:
            score = build_score(spec)
        if score.name == ErrorHeadScore.name or score.name in scores:
            raise ValueError(
                f"baselines: expected distinct baseline names other than 'error_head', got {list(baselines)}"
            )
        scores[score.name] = score
    return scores


def _timed_pass(
    wrapper: nn.Module,
    images: Tensor,
    error_head: ErrorScore,
    scores: Mapping[str, ErrorScore],
    device: torch.device,
    seconds: dict[str, float],
    name: str,
) -> tuple[Any, dict[str, Any]]:
    """The wrapper's output and every score's :class:`~errwrap.scores.ScoreOutput` on one batch,
    the wall time of the base pass, the wrapper pass and each score's extra work added to
    ``seconds``."""
    size = images.shape[-2:]
    _synchronize(device)
    start = time.perf_counter()
    base_logits = resize(wrapper.forward_base(images).logits, size)  # type: ignore[operator]
    _synchronize(device)
    seconds["base_forward"] += time.perf_counter() - start

    start = time.perf_counter()
    out = wrapper(images)
    _synchronize(device)
    seconds["wrapper_forward"] += time.perf_counter() - start
    check_outputs_finite(out, name)

    outputs = {ErrorHeadScore.name: error_head(wrapper, images, output=out)}
    for score_name, score in scores.items():
        _synchronize(device)
        start = time.perf_counter()
        outputs[score_name] = score(wrapper, images, base_logits=base_logits)
        _synchronize(device)
        seconds[f"extra/{score_name}"] += time.perf_counter() - start
    return out, outputs


def _time_per_image(
    seconds: Mapping[str, float], num_images: int, scores: Mapping[str, ErrorScore]
) -> dict[str, float]:
    """Seconds per image of each pass, and of each score in all (its base pass included)."""
    per_image = {k: v / num_images for k, v in seconds.items()}
    time_per_image = {"base_forward": per_image["base_forward"], "wrapper_forward": per_image["wrapper_forward"]}
    time_per_image[f"score/{ErrorHeadScore.name}"] = per_image["wrapper_forward"]
    for name in scores:
        time_per_image[f"extra/{name}"] = per_image[f"extra/{name}"]
        time_per_image[f"score/{name}"] = per_image["base_forward"] + per_image[f"extra/{name}"]
    return time_per_image


@dataclasses.dataclass
class _Meters:
    """The streaming metrics one evaluation fills, and which labels each ranking judges."""

    seg: dict[str, SegmentationMetrics]
    cal: dict[str, CalibrationMetrics]
    det: dict[str, ErrorDetectionMetrics]
    returned_det: ErrorDetectionMetrics
    risk: dict[str, RiskCoverageMetrics]
    images_rc: dict[str, ImageRiskCoverageMetrics]
    judged: dict[str, str]

    @classmethod
    def create(
        cls,
        num_classes: int,
        ignore_index: int,
        score_bins: int,
        calibration_bins: int,
        scores: Mapping[str, ErrorScore],
    ) -> _Meters:
        judged = {"error_prob": "returned", "msp": "base", ErrorHeadScore.name: "base"}
        judged.update({n: s.judges for n, s in scores.items()})
        return cls(
            seg={k: SegmentationMetrics(num_classes, ignore_index) for k in ("base", "fused")},
            cal={k: CalibrationMetrics(num_classes, calibration_bins, ignore_index) for k in ("base", "fused")},
            det={name: ErrorDetectionMetrics(score_bins) for name in [ErrorHeadScore.name, *scores]},
            returned_det=ErrorDetectionMetrics(score_bins),
            risk={name: RiskCoverageMetrics(score_bins) for name in judged},
            images_rc={name: ImageRiskCoverageMetrics() for name in judged},
            judged=judged,
        )

    def update(self, out: Any, outputs: Mapping[str, Any], labels: Tensor, ignore_index: int) -> None:
        """Add one batch: the wrapper's output, each score's output, and the labels."""
        valid = labels != ignore_index
        ranked = {
            "error_prob": (out.error_prob, out.labels != labels),
            "msp": (msp_score(out.base_logits), out.base_labels != labels),
        }
        for name, scored in outputs.items():
            wrong = scored.prediction != labels
            self.det[name].update(scored.score, wrong, valid)
            ranked[name] = (scored.score, wrong)
        self.returned_det.update(*ranked["error_prob"], valid)
        for name, (score_map, wrong) in ranked.items():
            self.risk[name].update(score_map, wrong, valid)
            self.images_rc[name].update(score_map, wrong, valid)
        self.seg["base"].update(out.base_labels, labels)
        self.seg["fused"].update(out.labels, labels)
        self.cal["base"].update(torch.softmax(out.base_logits.float(), dim=1), labels)
        self.cal["fused"].update(out.probs, labels)

    def report(self, num_images: int, time_per_image: dict[str, float], config: dict[str, Any]) -> EvaluationReport:
        """The :class:`EvaluationReport` of what was added."""
        base_result = self.seg["base"].compute()
        return EvaluationReport(
            base=base_result,
            fused=self.seg["fused"].compute(),
            error_detection={name: m.compute() for name, m in self.det.items()},
            calibration={k: m.compute() for k, m in self.cal.items()},
            num_images=num_images,
            num_pixels=base_result.num_pixels,
            time_per_image=time_per_image,
            config=config,
            returned_detection=self.returned_det.compute(),
            risk_coverage={name: m.compute() for name, m in self.risk.items()},
            image_risk_coverage={name: m.compute() for name, m in self.images_rc.items()},
            judged_labels=self.judged,
            risk_curves={name: tuple(a.tolist() for a in m.curve(num_points=100)) for name, m in self.risk.items()},
        )

