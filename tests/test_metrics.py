import math
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from errwrap.metrics import (
    CalibrationMetrics,
    ErrorDetectionMetrics,
    ImageRiskCoverageMetrics,
    RiskCoverageMetrics,
    SegmentationMetrics,
    exact_error_detection,
    exact_risk_coverage,
    image_aurc,
    optimal_aurc,
    risk_coverage_curve,
)

METRICS = ("auroc", "aupr_error", "aupr_success", "fpr95")


# ---------------------------------------------------------------------------- segmentation
def test_segmentation_hand_computed():
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    preds = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 3]]])  # the last two pixels are ignored
    m = SegmentationMetrics(4)
    m.update(preds, labels)
    assert m.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    r = m.compute()
    # class 0: tp 1, fp 1 (label 2), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: 1/2;
    # class 3: absent from labels and (non-ignored) predictions -> nan, out of the mean.
    assert r.iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(r.iou[3])
    assert r.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r.pixel_accuracy == pytest.approx(4 / 6)
    assert r.mean_accuracy == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert r.num_pixels == 6


def test_segmentation_predicted_but_absent_class_counts_zero():
    m = SegmentationMetrics(3)
    m.update(torch.tensor([[[2, 0]]]), torch.tensor([[[0, 0]]]))
    r = m.compute()
    assert r.iou[0] == 0.5 and r.iou[2] == 0.0 and math.isnan(r.iou[1])
    assert r.miou == pytest.approx(0.25)  # class 2 was predicted, so it is in the mean
    assert r.mean_accuracy == pytest.approx(0.5)  # only class 0 is in the labels


def test_segmentation_accepts_logits_and_perfect_prediction():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 8, 8), generator=g)
    logits = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    m = SegmentationMetrics(5)
    m.update(logits, labels)
    r = m.compute()
    assert r.miou == 1.0 and r.pixel_accuracy == 1.0 and r.mean_accuracy == 1.0


def test_segmentation_empty_is_nan_and_bad_input():
    m = SegmentationMetrics(3)
    m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))
    r = m.compute()
    assert math.isnan(r.miou) and math.isnan(r.pixel_accuracy) and r.num_pixels == 0
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\) or ignore_index=255, got \[7\]"):
        m.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[7, 0]]]))
    with pytest.raises(ValueError, match="preds"):
        m.update(torch.tensor([[[5, 0]]]), torch.tensor([[[1, 0]]]))
    with pytest.raises(TypeError, match="labels"):
        m.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(0)


def _batches(n=3, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, c, (2, 6, 7), generator=g)
        labels[torch.rand(labels.shape, generator=g) < 0.1] = 255
        out.append((torch.randint(0, c, (2, 6, 7), generator=g), labels))
    return out


def test_segmentation_streaming_merge_state_dict():
    batches = _batches()
    stream = SegmentationMetrics(4)
    for p, y in batches:
        stream.update(p, y)
    whole = SegmentationMetrics(4)
    whole.update(torch.cat([p for p, _ in batches]), torch.cat([y for _, y in batches]))
    assert torch.equal(stream.confusion, whole.confusion)
    a, b = SegmentationMetrics(4), SegmentationMetrics(4)
    a.update(*batches[0])
    for p, y in batches[1:]:
        b.update(p, y)
    assert torch.equal(a.merge(b).confusion, whole.confusion)
    # state dicts are plain tensors that add up
    c = SegmentationMetrics(4).load_state_dict(whole.state_dict())
    assert c.compute() == whole.compute()
    assert c.reset().compute().num_pixels == 0
    with pytest.raises(ValueError, match="same settings"):
        a.merge(SegmentationMetrics(5))
    with pytest.raises(TypeError):
        a.merge(CalibrationMetrics(4))
    with pytest.raises(ValueError, match="missing keys"):
        c.load_state_dict({})


@settings(max_examples=40, deadline=None)
@given(
    num_classes=st.integers(1, 6),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
    seed=st.integers(0, 2**16),
    ignore_frac=st.floats(0, 1),
)
def test_segmentation_property_matches_naive_count(num_classes, shape, seed, ignore_frac):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = 255
    preds = torch.randint(0, num_classes, shape, generator=g)
    m = SegmentationMetrics(num_classes)
    m.update(preds, labels)
    naive = np.zeros((num_classes, num_classes), dtype=np.int64)
    for y, p in zip(labels.flatten().tolist(), preds.flatten().tolist(), strict=False):
        if y != 255:
            naive[y, p] += 1
    assert m.confusion.numpy().tolist() == naive.tolist()
    r = m.compute()
    assert r.num_pixels == int((labels != 255).sum())
    assert len(r.iou) == num_classes
    for k in range(num_classes):
        present = naive[k].sum() + naive[:, k].sum() > 0
        assert math.isnan(r.iou[k]) != present
    if r.num_pixels:
        assert 0 <= r.miou <= 1 and 0 <= r.pixel_accuracy <= 1


# ---------------------------------------------------------------------------- error detection
def _ed(scores, errors, num_bins=10_000, valid=None):
    m = ErrorDetectionMetrics(num_bins)
    m.update(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(errors), valid)
    return m.compute()


def test_error_detection_hand_computed():
    r = _ed([0.9, 0.8, 0.2, 0.1], [True, False, True, False])
    assert r.auroc == pytest.approx(0.75)  # 3 of the 4 (error, success) pairs are ordered
    assert r.aupr_error == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert r.aupr_success == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert r.fpr95 == pytest.approx(0.5)  # both errors flagged only at t=0.2, which flags 0.8 too
    assert (r.auroc_bound, r.aupr_error_bound, r.aupr_success_bound, r.fpr95_bound) == (0, 0, 0, 0)
    assert (r.num_errors, r.num_pixels, r.error_rate) == (2, 4, 0.5)


def test_error_detection_perfect_inverted_constant():
    errors = torch.tensor([True, True, False, False, False])
    perfect = _ed([0.9, 0.7, 0.3, 0.2, 0.1], errors)
    assert (perfect.auroc, perfect.aupr_error, perfect.aupr_success, perfect.fpr95) == (1.0, 1.0, 1.0, 0.0)
    inverted = _ed([0.1, 0.2, 0.7, 0.8, 0.9], errors)
    assert inverted.auroc == 0.0 and inverted.fpr95 == 1.0
    assert inverted.aupr_error == pytest.approx((1 / 4 + 2 / 5) / 2)
    constant = _ed([0.4] * 5, errors)
    assert constant.auroc == 0.5 and constant.fpr95 == 1.0
    assert constant.aupr_error == pytest.approx(2 / 5) and constant.aupr_success == pytest.approx(3 / 5)
    assert constant.auroc_bound == 0.5  # every pair shares a bin


@pytest.mark.parametrize("errors", [[False] * 4, [True] * 4])
def test_error_detection_undefined_without_both_classes(errors):
    r = _ed([0.1, 0.5, 0.6, 0.9], errors)
    assert all(math.isnan(getattr(r, k)) for k in METRICS)
    assert r.num_pixels == 4 and r.num_errors == sum(errors)
    exact = exact_error_detection(torch.tensor([0.1, 0.5, 0.6, 0.9]), torch.tensor(errors))
    assert math.isnan(exact.auroc) and exact.num_errors == r.num_errors


def test_error_detection_valid_mask_and_range():
    scores = torch.tensor([0.9, 0.1, 0.95, 0.05])
    errors = torch.tensor([True, False, False, True])
    r = _ed(scores, errors, valid=torch.tensor([True, True, False, False]))
    assert r.auroc == 1.0 and r.num_pixels == 2
    with pytest.raises(ValueError, match="score_range"):
        _ed([0.5, 1.5], [True, False])
    with pytest.raises(ValueError, match="NaN"):
        _ed([0.5, float("nan")], [True, False])
    overshoot = ErrorDetectionMetrics(10)
    overshoot.update(torch.tensor([1.0 + 1e-8, -1e-8], dtype=torch.float64), torch.tensor([True, False]))
    assert overshoot.compute().auroc == 1.0  # rounding overshoots are clamped into the end bins
    assert overshoot.histograms[0][-1] == 1 and overshoot.histograms[1][0] == 1
    # score_range maps linearly: entropy in nats with range (0, log C) == entropy / log C
    g = torch.Generator().manual_seed(1)
    nats = torch.rand(500, generator=g) * math.log(7)
    err = torch.rand(500, generator=g) < nats / 3
    in_nats = ErrorDetectionMetrics(score_range=(0.0, math.log(7)))
    in_nats.update(nats, err)
    assert in_nats.compute() == _ed(nats / math.log(7), err)
    with pytest.raises(ValueError, match="score_range"):
        ErrorDetectionMetrics(score_range=(1.0, 0.0))


@pytest.mark.parametrize("num_bins", [7, 100, 10_000])
@pytest.mark.parametrize("kind", ["continuous", "ties", "saturated"])
def test_error_detection_within_bound_of_exact(num_bins, kind):
    g = torch.Generator().manual_seed(num_bins)
    n = 4000
    scores = torch.rand(n, generator=g)
    if kind == "ties":
        scores = (scores * 13).floor() / 13
    elif kind == "saturated":  # a sigmoid's pile-up near 1
        scores = torch.where(torch.rand(n, generator=g) < 0.5, 1 - 1e-5 * torch.rand(n, generator=g), scores)
    errors = torch.rand(n, generator=g) < 0.1 + 0.5 * scores
    hist = _ed(scores, errors, num_bins)
    exact = exact_error_detection(scores.double(), errors)
    for k in METRICS:
        bound = getattr(hist, f"{k}_bound")
        assert abs(getattr(hist, k) - getattr(exact, k)) <= bound + 1e-9, (
            k,
            getattr(hist, k),
            getattr(exact, k),
            bound,
        )
    assert hist.num_errors == exact.num_errors
    if kind == "continuous" and num_bins == 10_000:
        assert hist.auroc_bound < 1e-3 and hist.fpr95_bound < 1e-2


def test_error_detection_exact_matches_binned_on_distinct_bins():
    # scores at bin centres, one score per bin: binning loses nothing, bounds are 0
    g = torch.Generator().manual_seed(3)
    scores = (torch.randperm(100, generator=g)[:60].double() + 0.5) / 100
    errors = torch.rand(60, generator=g) < 0.4
    hist, exact = _ed(scores, errors, 100), exact_error_detection(scores, errors)
    for k in METRICS:
        assert getattr(hist, k) == pytest.approx(getattr(exact, k), abs=1e-12)
        assert getattr(hist, f"{k}_bound") == 0


def test_error_detection_streaming_and_merge():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, 16, 16, generator=g)
    errors = torch.rand(3, 2, 16, 16, generator=g) < scores
    valid = torch.rand(3, 2, 16, 16, generator=g) < 0.9
    stream, whole, half_a, half_b = (ErrorDetectionMetrics(1000) for _ in range(4))
    for i in range(3):
        stream.update(scores[i], errors[i], valid[i])
    whole.update(scores.flatten(0, 1), errors.flatten(0, 1), valid.flatten(0, 1))
    half_a.update(scores[0], errors[0], valid[0])
    half_b.update(scores[1:], errors[1:], valid[1:])
    assert stream.compute() == whole.compute()
    assert half_a.merge(half_b).compute() == whole.compute()
    assert all(torch.equal(a, b) for a, b in zip(stream.histograms, whole.histograms, strict=False))
    no_mask, flat = ErrorDetectionMetrics(1000), ErrorDetectionMetrics(1000)
    no_mask.update(scores, errors)  # any shape, also without a valid mask
    flat.update(scores.flatten(), errors.flatten())
    assert no_mask.compute() == flat.compute() and no_mask.compute().num_pixels == scores.numel()
    with pytest.raises(ValueError, match="same settings"):
        stream.merge(ErrorDetectionMetrics(10))


# ---------------------------------------------------------------------------- risk-coverage
def _naive_aurc(scores, errors):
    """Sort (no ties), accept from the lowest score up, average the running error rate."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    e = np.asarray(errors, dtype=np.float64)[order]
    return float((np.cumsum(e) / np.arange(1, len(e) + 1)).mean())


def test_risk_coverage_hand_computed():
    # accepted order by score: ok (0.1), err (0.2), ok (0.3), err (0.9): risks 0, 1/2, 1/3, 2/4
    scores, errors = torch.tensor([0.9, 0.1, 0.3, 0.2]), torch.tensor([True, False, False, True])
    r = exact_risk_coverage(scores, errors, coverages=(0.5, 1.0))
    assert r.aurc == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    # perfect order: ok, ok, err, err -> risks 0, 0, 1/3, 2/4
    assert r.optimal_aurc == pytest.approx((1 / 3 + 2 / 4) / 4) == optimal_aurc(2, 4)
    assert r.eaurc == pytest.approx(r.aurc - r.optimal_aurc)
    assert r.risks == pytest.approx([1 / 2, 2 / 4]) and r.coverages == [0.5, 1.0]
    assert (r.num_errors, r.num_pixels, r.error_rate) == (2, 4, 0.5)
    m = RiskCoverageMetrics(num_bins=100, coverages=(0.5, 1.0))
    m.update(scores, errors)
    assert m.compute() == r  # one score per bin: the histogram is exact, bounds 0
    coverage, risk = risk_coverage_curve(scores, errors)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0] and risk == pytest.approx([0, 1 / 2, 1 / 3, 2 / 4])
    hist_cov, hist_risk = m.curve()
    assert hist_cov == pytest.approx(coverage) and hist_risk == pytest.approx(risk)
    grid_cov, grid_risk = m.curve(num_points=4)
    assert grid_cov.tolist() == [0.25, 0.5, 0.75, 1.0] and grid_risk == pytest.approx(risk)
    with pytest.raises(ValueError, match="num_points"):
        m.curve(num_points=0)


def test_aurc_perfect_ranking_is_optimal_and_random_ranking_is_the_error_rate():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    errors = torch.rand(n, generator=g) < 0.15
    perfect = torch.where(errors, 0.6 + 0.4 * torch.rand(n, generator=g), 0.5 * torch.rand(n, generator=g))
    for result in (exact_risk_coverage(perfect, errors), _rc(perfect, errors)):
        assert result.aurc == pytest.approx(result.optimal_aurc, abs=1e-12) and abs(result.eaurc) < 1e-12
        assert result.risks[:2] == [0.0, 0.0]  # 50% and 80% coverage: only successes accepted
    rate = float(errors.double().mean())
    # the optimum tends to r + (1 - r) ln(1 - r)
    assert optimal_aurc(int(errors.sum()), n) == pytest.approx(rate + (1 - rate) * math.log(1 - rate), abs=2e-4)
    random = exact_risk_coverage(torch.rand(n, generator=g), errors)
    assert random.aurc == pytest.approx(rate, abs=0.01) and random.eaurc > 0.1
    inverted = exact_risk_coverage(-perfect, errors)
    assert inverted.aurc > random.aurc > exact_risk_coverage(perfect, errors).aurc


def test_exact_aurc_matches_naive_sort_and_counts_ties_at_their_expectation():
    g = torch.Generator().manual_seed(1)
    scores = torch.randperm(500, generator=g).double() / 500  # distinct
    errors = torch.rand(500, generator=g) < 0.3
    assert exact_risk_coverage(scores, errors).aurc == pytest.approx(_naive_aurc(scores, errors), abs=1e-12)
    # a tie between one error and one success: risk 1 or 0 at k=1 (expected 1/2), 1/2 at k=2
    r = exact_risk_coverage(torch.tensor([0.5, 0.5]), torch.tensor([True, False]))
    assert r.aurc == pytest.approx(0.5) and r.optimal_aurc == pytest.approx(0.25)
    assert math.isnan(exact_risk_coverage(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).aurc)
    assert math.isnan(RiskCoverageMetrics().compute().aurc)


def _rc(scores, errors, num_bins=10_000):
    m = RiskCoverageMetrics(num_bins)
    m.update(scores, errors)
    return m.compute()


@pytest.mark.parametrize("num_bins", [7, 100, 10_000])
@pytest.mark.parametrize("kind", ["continuous", "ties", "saturated"])
def test_risk_coverage_streaming_within_bound_of_exact(num_bins, kind):
    g = torch.Generator().manual_seed(num_bins)
    n = 4000
    scores = torch.rand(n, generator=g)
    if kind == "ties":
        scores = (scores * 13).floor() / 13
    elif kind == "saturated":
        scores = torch.where(torch.rand(n, generator=g) < 0.5, 1 - 1e-5 * torch.rand(n, generator=g), scores)
    errors = torch.rand(n, generator=g) < 0.1 + 0.5 * scores
    hist, exact = _rc(scores, errors, num_bins), exact_risk_coverage(scores.double(), errors)
    assert abs(hist.aurc - exact.aurc) <= hist.aurc_bound + 1e-12
    assert abs(hist.eaurc - exact.eaurc) <= hist.aurc_bound + 1e-12
    assert hist.optimal_aurc == exact.optimal_aurc and hist.num_errors == exact.num_errors
    for a, b in zip(hist.risks, exact.risks, strict=False):
        assert abs(a - b) <= hist.risk_bound + 1e-12
    if kind == "continuous" and num_bins == 10_000:
        assert hist.aurc_bound < 1e-4 and abs(hist.aurc - exact.aurc) < 1e-4


def test_risk_coverage_streaming_merge_and_input_checks():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, 16, 16, generator=g)
    errors = torch.rand(3, 2, 16, 16, generator=g) < scores
    valid = torch.rand(3, 2, 16, 16, generator=g) < 0.9
    stream, whole, half = RiskCoverageMetrics(1000), RiskCoverageMetrics(1000), RiskCoverageMetrics(1000)
    for i in range(3):
        stream.update(scores[i], errors[i], valid[i])
    whole.update(scores.flatten(0, 1), errors.flatten(0, 1), valid.flatten(0, 1))
    half.update(scores[0], errors[0], valid[0])
    rest = RiskCoverageMetrics(1000)
    rest.update(scores[1:], errors[1:], valid[1:])
    assert stream.compute() == whole.compute() == half.merge(rest).compute()
    assert whole.compute().num_pixels == int(valid.sum())
    with pytest.raises(ValueError, match="same settings"):
        stream.merge(RiskCoverageMetrics(1000, coverages=(0.5,)))
    with pytest.raises(ValueError, match="score_range"):
        stream.update(torch.tensor([1.5]), torch.tensor([True]))
    with pytest.raises(ValueError, match="coverages"):
        RiskCoverageMetrics(coverages=(0.0,))


def test_image_aurc_against_the_oracle():
    rates = np.array([0.0, 0.1, 0.4, 0.9])
    # risks along the oracle order: 0, 0.05, 0.5/3, 1.4/4
    oracle = (0 + 0.05 + 0.5 / 3 + 1.4 / 4) / 4
    good = image_aurc(rates * 0.5 + 0.1, rates)
    assert (
        good.aurc == pytest.approx(oracle)
        and good.oracle_aurc == pytest.approx(oracle)
        and good.eaurc == pytest.approx(0)
    )
    bad = image_aurc(-rates, rates)
    assert bad.aurc == pytest.approx((0.9 + 1.3 / 2 + 1.4 / 3 + 1.4 / 4) / 4) and bad.eaurc > 0.3
    assert (good.num_images, good.error_rate) == (4, pytest.approx(0.35))
    tied = image_aurc(np.zeros(4), rates)
    assert tied.aurc == pytest.approx(rates.mean())  # a constant score: every prefix at the mean rate, in expectation
    with pytest.raises(ValueError, match="error_rates"):
        image_aurc([0.1], [1.5])


def test_image_risk_coverage_metrics_per_image_means_over_valid_pixels():
    scores = torch.tensor([[[0.2, 0.4], [0.6, 0.9]], [[0.1, 0.1], [0.1, 0.1]], [[0.5, 0.5], [0.5, 0.5]]])
    errors = torch.tensor(
        [[[True, False], [False, True]], [[False, False], [False, False]], [[True, True], [True, True]]]
    )
    valid = torch.ones_like(errors)
    valid[0, 1, 1] = False  # image 0: valid scores 0.2, 0.4, 0.6, one error in three
    valid[2] = False  # image 2 has no valid pixel: skipped
    m = ImageRiskCoverageMetrics()
    m.update(scores, errors, valid)
    assert m.mean_scores == pytest.approx([0.4, 0.1]) and m.error_rates == pytest.approx([1 / 3, 0.0])
    other = ImageRiskCoverageMetrics()
    other.update(scores[2:], errors[2:])
    m.merge(other)
    assert m.compute() == image_aurc([0.4, 0.1, 0.5], [1 / 3, 0.0, 1.0])
    assert m.sync() is m and m.reset().compute().num_images == 0


# ---------------------------------------------------------------------------- calibration
def test_calibration_hand_computed():
    # four pixels, top-label confidences 0.9, 0.9, 0.6, 0.6 (2 classes); correct: T F T T
    p = torch.tensor([0.9, 0.9, 0.6, 0.4]).view(1, 1, 2, 2)
    probs = torch.cat([p, 1 - p], dim=1)
    labels = torch.tensor([[[0, 1], [0, 1]]])
    m = CalibrationMetrics(2, num_bins=10)
    m.update(probs, labels)
    r = m.compute()
    # bin 0.9: acc 1/2 vs conf 0.9 (2 px); bin 0.6: acc 1 vs conf 0.6 (2 px)
    assert r.ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert r.mce == pytest.approx(0.4)
    assert r.accuracy == pytest.approx(0.75) and r.confidence == pytest.approx(0.75)
    # ignored pixels are left out; one-hot correct predictions are perfectly calibrated
    m2 = CalibrationMetrics(2)
    labels_ignored = torch.tensor([[[0, 255], [0, 255]]])
    m2.update(probs, labels_ignored)
    assert m2.compute().num_pixels == 2
    perfect = CalibrationMetrics(2)
    perfect.update(
        torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3).contiguous(),
        torch.zeros(1, 3, 3, dtype=torch.long),
    )
    assert perfect.compute().ece == 0.0
    assert math.isnan(CalibrationMetrics(2).compute().ece)


def test_calibration_streaming_and_merge():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4, 5, 8, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (4, 8, 8), generator=g)
    stream, whole, a = CalibrationMetrics(5), CalibrationMetrics(5), CalibrationMetrics(5)
    for i in range(4):
        stream.update(probs[i : i + 1], labels[i : i + 1])
    whole.update(probs, labels)
    a.update(probs[:1], labels[:1])
    b = CalibrationMetrics(5)
    b.update(probs[1:], labels[1:])
    for other in (stream, a.merge(b)):
        got, want = other.compute(), whole.compute()
        assert got.num_pixels == want.num_pixels
        assert got.ece == pytest.approx(want.ece, abs=1e-12)
    with pytest.raises(ValueError, match="5 classes"):
        whole.update(probs[:, :3], labels)


# ---------------------------------------------------------------------------- distributed
def test_sync_is_noop_without_distributed():
    m = SegmentationMetrics(3)
    m.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 2]]]))
    before = m.state_dict()
    assert m.sync() is m and torch.equal(m.state_dict()["confusion"], before["confusion"])


def _sync_worker(rank, world_size, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        seg, det = SegmentationMetrics(4), ErrorDetectionMetrics(100)
        for p, y in _batches(seed=rank):
            seg.update(p, y)
        g = torch.Generator().manual_seed(rank)
        s = torch.rand(200, generator=g)
        det.update(s, torch.rand(200, generator=g) < s)
        seg.sync()
        det.all_reduce()
        results[rank] = (seg.state_dict()["confusion"], det.state_dict()["errors"], det.state_dict()["successes"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_sums_over_two_processes():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_sync_worker, args=(2, os.path.join(tmp, "init"), results), nprocs=2, join=True)
        seg, det = SegmentationMetrics(4), ErrorDetectionMetrics(100)
        for rank in range(2):
            for p, y in _batches(seed=rank):
                seg.update(p, y)
            g = torch.Generator().manual_seed(rank)
            s = torch.rand(200, generator=g)
            det.update(s, torch.rand(200, generator=g) < s)
        for rank in range(2):
            confusion, errors, successes = results[rank]
            assert torch.equal(confusion, seg.state_dict()["confusion"])
            assert torch.equal(errors, det.histograms[0]) and torch.equal(successes, det.histograms[1])


def _risk_sync_worker(rank, world_size, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rc, images = RiskCoverageMetrics(100), ImageRiskCoverageMetrics()
        s, e = _risk_batch(rank)
        rc.update(s, e)
        images.update(s, e)
        rc.sync()
        images.sync()
        results[rank] = (rc.compute(), images.compute())
    finally:
        dist.destroy_process_group()


def _risk_batch(rank):
    g = torch.Generator().manual_seed(rank)
    s = torch.rand(3 + rank, 8, 8, generator=g)
    return s, torch.rand(3 + rank, 8, 8, generator=g) < s


@pytest.mark.slow
def test_risk_coverage_sync_over_two_processes():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_risk_sync_worker, args=(2, os.path.join(tmp, "init"), results), nprocs=2, join=True)
        rc, images = RiskCoverageMetrics(100), ImageRiskCoverageMetrics()
        for rank in range(2):
            s, e = _risk_batch(rank)
            rc.update(s, e)
            images.update(s, e)
        for rank in range(2):
            assert results[rank][0] == rc.compute()
            assert results[rank][1].num_images == 7 and results[rank][1] == images.compute()
