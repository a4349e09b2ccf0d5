"""Label-free estimates (errwrap.estimation): counts, scores, report, baselines, DDP."""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest
import torch
from torch import nn

import errwrap
from errwrap import ErrorCorrectionOutput, ErrorCorrectionWrapper
from errwrap.estimation import _atc_threshold, expected_counts, scores_from_counts, spearman
from errwrap.metrics import SegmentationMetrics

from .tiny import batch, tiny_base


class LogProbStub(nn.Module):
    """A wrapper stand-in whose 'images' are the fused log-probabilities themselves (``C`` channels),
    so a test chooses ``p`` exactly; the base logits are ``base_scale`` times the same map."""

    def __init__(self, num_classes: int, base_scale: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = num_classes
        self.base_scale = base_scale
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the stub a device

    def forward(self, images: torch.Tensor) -> ErrorCorrectionOutput:
        log_p = torch.log_softmax(images, dim=1)
        zeros = torch.zeros_like(images[:, :1])
        return ErrorCorrectionOutput(log_p, self.base_scale * images, zeros, torch.zeros_like(images))


def _one_hot_logits(labels: torch.Tensor, num_classes: int, strength: float = 50.0) -> torch.Tensor:
    return strength * nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


# ---------------------------------------------------------------------------- counts and scores
def test_exact_counts_equal_true_counts_and_segmentation_metrics():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (3, 16, 16), generator=g)
    labels = torch.where(torch.rand(3, 16, 16, generator=g) < 0.3, torch.randint(0, 4, (3, 16, 16), generator=g), truth)
    truth[:, :2] = 255
    valid = truth != 255
    one_hot = nn.functional.one_hot(truth.where(valid, 0), 4).permute(0, 3, 1, 2).float()
    counts = expected_counts(labels, (labels == truth).float(), truth, valid, num_classes=4)
    assert counts.shape == (3, 3, 4) and counts.dtype == torch.float64
    # probabilities 0/1 = exact
    assert torch.equal(counts, expected_counts(labels, (labels == truth).float(), one_hot, valid))
    for c in range(4):
        assert torch.equal(counts[:, 0, c], ((labels == c) & (truth == c) & valid).sum(dim=(1, 2)).double())
        assert torch.equal(counts[:, 1, c], ((labels == c) & valid).sum(dim=(1, 2)).double())
        assert torch.equal(counts[:, 2, c], ((truth == c) & valid).sum(dim=(1, 2)).double())
    metrics = SegmentationMetrics(4)
    metrics.update(labels, truth)
    want = metrics.compute()
    accuracy, iou, miou = scores_from_counts(counts.sum(dim=0))
    assert float(accuracy) == pytest.approx(want.pixel_accuracy, abs=1e-12)
    assert float(miou) == pytest.approx(want.miou, abs=1e-12)
    assert iou.tolist() == pytest.approx(want.iou, abs=1e-12)


def test_scores_leave_out_absent_classes_and_empty_images():
    counts = torch.tensor([[[3.0, 0.0, 0.0], [4.0, 0.0, 0.0], [3.0, 0.2, 1.0]], [[0.0] * 3] * 3], dtype=torch.float64)
    accuracy, iou, miou = scores_from_counts(counts)
    assert accuracy[0].item() == pytest.approx(0.75)
    # class 0: 3 / (4 + 3 - 3); class 2: true mass 1.0 > 0.5 px, never predicted -> IoU 0; class 1: 0.2 px, absent
    assert iou[0, 0].item() == pytest.approx(0.75) and math.isnan(iou[0, 1].item()) and iou[0, 2].item() == 0.0
    assert miou[0].item() == pytest.approx(0.375)
    assert math.isnan(accuracy[1].item()) and math.isnan(miou[1].item())


def test_spearman_known_values():
    # 0.82078 (scipy agrees)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="1-d sequences"):
        spearman([1, 2], [1, 2, 3])


# ---------------------------------------------------------------------------- estimate on a stub
def test_one_hot_probabilities_predict_perfect_labels_exactly():
    labels = torch.randint(0, 3, (4, 8, 8), generator=torch.Generator().manual_seed(1))
    images = _one_hot_logits(labels, 3)
    report = errwrap.estimate(LogProbStub(3), [images[:2], images[2:]], bootstrap=50)
    assert report.pixel_accuracy == pytest.approx(1.0, abs=1e-9) and report.miou == pytest.approx(1.0, abs=1e-9)
    assert report.mean_error_prob == pytest.approx(0.0, abs=1e-9) and report.flagged_fraction == 0.0
    comparison = errwrap.compare_estimates(LogProbStub(3), [(images, labels)], bootstrap=0)
    assert comparison.truth["fused"] == {"pixel_accuracy": 1.0, "miou": 1.0}
    assert comparison.errors["errwrap"]["pixel_accuracy"] == pytest.approx(0.0, abs=1e-9)
    assert comparison.errors["errwrap"]["miou"] == pytest.approx(0.0, abs=1e-9)


def test_estimate_is_unbiased_when_the_truth_is_drawn_from_p():
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(8, 4, 32, 32, generator=g)
    p = torch.softmax(logits, dim=1)
    truth = torch.multinomial(p.permute(0, 2, 3, 1).reshape(-1, 4), 1, generator=g).reshape(8, 32, 32)
    comparison = errwrap.compare_estimates(
        LogProbStub(4), [(logits[:4], truth[:4]), (logits[4:], truth[4:])], bootstrap=200
    )
    errors = comparison.errors["errwrap"]
    assert 0.3 < comparison.truth["fused"]["pixel_accuracy"] < 0.9
    assert errors["pixel_accuracy"] < 0.015 and errors["miou"] < 0.02  # 8192 pixels: sampling std ~0.005
    assert errors["per_image_mae"] < 0.04
    lo, hi = comparison.estimate.interval["pixel_accuracy"]
    assert 0.0 <= lo <= comparison.estimate.pixel_accuracy <= hi <= 1.0


def test_bounds_interval_and_worst_order():
    wrapper = ErrorCorrectionWrapper(tiny_base(), error_channels=8, detail_channels=8)
    images, _ = batch(6, 32)
    report = errwrap.estimate(wrapper, [images[:3], images[3:]], threshold=0.7, bootstrap=100)
    assert report.num_images == 6 and report.num_pixels == 6 * 32 * 32 and len(report.iou) == 5
    for row in report.per_image:
        for key in ("pixel_accuracy", "miou", "mean_error_prob", "flagged_fraction", "avg_confidence"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert row["pixel_accuracy"] == pytest.approx(1.0 - row["mean_error_prob"], abs=1e-9)
    assert [r["index"] for r in report.per_image] == list(range(6))
    for key in ("pixel_accuracy", "miou"):
        lo, hi = report.interval[key]
        assert 0.0 <= lo <= hi <= 1.0
    assert report.pixel_accuracy == pytest.approx(1.0 - report.mean_error_prob, abs=1e-9)
    assert "method" in report.interval and report.config["threshold"] == 0.7 and report.config["temperature"] == 1.0
    assert "calibrate_temperature" in report.table()  # no temperature fitted: the table says so
    worst = report.worst(3)
    assert (
        len(worst) == 3
        and [r["pixel_accuracy"] for r in worst] == sorted(r["pixel_accuracy"] for r in report.per_image)[:3]
    )
    assert report.worst(100) == sorted(report.per_image, key=lambda r: r["pixel_accuracy"])
    assert report.worst(0) == []
    text = report.table()
    assert "errwrap" in text and "avg_confidence" in text and f"{100 * report.pixel_accuracy:.2f}" in text
    with pytest.raises(ValueError, match="non-negative int"):
        report.worst(-1)
    wrapper.temperature = 0.5  # sharper fused probabilities: same labels, higher predicted accuracy, no note
    sharper = errwrap.estimate(wrapper, [images], bootstrap=0)
    assert sharper.pixel_accuracy > report.pixel_accuracy and sharper.config["temperature"] == 0.5
    assert "calibrate_temperature" not in sharper.table()


def test_streaming_equals_one_batch_and_modes_are_restored():
    wrapper = ErrorCorrectionWrapper(tiny_base(), error_channels=8, detail_channels=8)
    wrapper.train()
    modes = [m.training for m in wrapper.modules()]
    images, labels = batch(4, 32)
    whole = errwrap.estimate(wrapper, [images], bootstrap=100)
    streamed = errwrap.estimate(wrapper, [(images[i : i + 1], labels[i : i + 1]) for i in range(4)], bootstrap=100)
    assert [m.training for m in wrapper.modules()] == modes and wrapper.training
    assert whole.pixel_accuracy == pytest.approx(streamed.pixel_accuracy, abs=1e-6)
    assert whole.miou == pytest.approx(streamed.miou, abs=1e-6)
    assert whole.interval["miou"] == pytest.approx(streamed.interval["miou"], abs=1e-6)
    for a, b in zip(whole.per_image, streamed.per_image, strict=False):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)


def test_json_round_trip(tmp_path):
    wrapper = ErrorCorrectionWrapper(tiny_base(), error_channels=8, detail_channels=8)
    images, labels = batch(3, 32)
    report = errwrap.estimate(wrapper, [{"image": images, "label": labels}], atc_threshold=0.3, bootstrap=0)
    assert math.isnan(report.interval["pixel_accuracy"][0])  # no bootstrap: nan, written as null
    text = report.to_json(tmp_path / "estimate.json")
    data = json.loads((tmp_path / "estimate.json").read_text())
    assert data == json.loads(text) and data["interval"]["pixel_accuracy"] == [None, None]
    back = errwrap.EstimateReport.from_json(tmp_path / "estimate.json")
    assert back.to_dict() == report.to_dict()
    assert back.worst(2) == report.worst(2)
    assert set(report.baselines) == {"avg_confidence", "atc"} and report.baselines["atc"]["threshold"] == 0.3
    assert all("atc" in row for row in report.per_image)


# ---------------------------------------------------------------------------- ATC
def test_atc_threshold_of_a_known_distribution():
    mass = torch.full((100,), 0.01, dtype=torch.float64)  # scores uniform on [0, 1]
    assert _atc_threshold(mass, 0.8) == pytest.approx(0.2, abs=1e-9)
    assert _atc_threshold(mass, 0.25) == pytest.approx(0.75, abs=1e-9)
    assert _atc_threshold(mass, 1.0) == pytest.approx(0.0, abs=1e-9)
    assert _atc_threshold(mass, 0.0) == pytest.approx(1.0, abs=1e-9)


def test_fit_atc_on_synthetic_data_and_estimate_with_it():
    # two classes; base MSP runs over an even grid of [0.55, 0.95]; the 80% most confident pixels are right
    n = 1000
    msp = torch.linspace(0.55, 0.95, n, dtype=torch.float64)
    margin = torch.log(msp / (1 - msp)).float()
    logits = torch.stack([margin, torch.zeros(n)]).reshape(1, 2, 10, 100)  # class 0 predicted everywhere
    truth = (torch.arange(n) < n // 5).long().reshape(1, 10, 100)  # the 20% least confident are class 1
    t = errwrap.fit_atc(LogProbStub(2), [(logits, truth)])
    assert 0.55 + 0.2 * 0.4 - 2e-3 < t < 0.55 + 0.2 * 0.4 + 2e-3
    comparison = errwrap.compare_estimates(LogProbStub(2), [(logits, truth)], atc_threshold=t, bootstrap=0)
    assert comparison.truth["base"]["pixel_accuracy"] == pytest.approx(0.8)
    assert comparison.errors["atc"]["pixel_accuracy"] < 2e-3
    assert comparison.errors["atc"]["target"] == "base" and comparison.errors["errwrap"]["target"] == "fused"
    assert comparison.errors["avg_confidence"]["estimate_pixel_accuracy"] == pytest.approx(0.75, abs=1e-4)  # mean MSP
    assert set(comparison.per_image[0]) >= {"true_pixel_accuracy", "true_miou", "base_true_pixel_accuracy", "atc"}
    assert "atc" in comparison.table() and json.loads(comparison.to_json())["errors"]["atc"]["target"] == "base"


# ---------------------------------------------------------------------------- input errors
def test_input_errors_name_the_problem():
    stub = LogProbStub(3)
    images = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="threshold"):
        errwrap.estimate(stub, [images], threshold=1.5)
    with pytest.raises(ValueError, match="atc_threshold"):
        errwrap.estimate(stub, [images], atc_threshold=-0.1)
    with pytest.raises(ValueError, match="at least one batch"):
        errwrap.estimate(stub, [])
    with pytest.raises(ValueError, match="image key"):
        errwrap.estimate(stub, [{"mask": images}])
    with pytest.raises(ValueError, match="3 channels"):
        errwrap.estimate(stub, [torch.zeros(1, 4, 4, 4)])
    with pytest.raises(ValueError, match="finite"):
        errwrap.estimate(stub, [torch.full((1, 3, 4, 4), float("nan"))])
    with pytest.raises(ValueError, match="bootstrap"):
        errwrap.estimate(stub, [images], bootstrap=-1)
    with pytest.raises(ValueError, match="labelled pixels"):
        errwrap.fit_atc(stub, [(images, torch.full((1, 4, 4), 255))])


# ---------------------------------------------------------------------------- distributed
def _ddp_data():
    g = torch.Generator().manual_seed(3)
    logits = 2.0 * torch.randn(6, 3, 8, 8, generator=g)
    truth = torch.randint(0, 3, (6, 8, 8), generator=g)
    return logits, truth


def _ddp_worker(rank, world_size, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits, truth = _ddp_data()
        part = [(logits[i : i + 1], truth[i : i + 1]) for i in range(rank, 6, world_size)]
        t = errwrap.fit_atc(LogProbStub(3, base_scale=0.5), part)
        report = errwrap.estimate(LogProbStub(3, base_scale=0.5), part, atc_threshold=t, bootstrap=100)
        results[rank] = (t, report.to_dict())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_one_process():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), results), nprocs=2, join=True)
        (t0, r0), (t1, r1) = results[0], results[1]
    logits, truth = _ddp_data()
    stub = LogProbStub(3, base_scale=0.5)
    t = errwrap.fit_atc(stub, [(logits, truth)])
    single = errwrap.estimate(stub, [logits], atc_threshold=t, bootstrap=100)
    assert t0 == t1 == pytest.approx(t, abs=1e-12)
    assert r0 == r1 and r0["num_images"] == 6 and r0["config"]["world_size"] == 2
    for key in ("pixel_accuracy", "miou", "mean_error_prob", "flagged_fraction"):
        assert r0[key] == pytest.approx(getattr(single, key), abs=1e-9), key
    assert r0["baselines"]["atc"]["pixel_accuracy"] == pytest.approx(
        single.baselines["atc"]["pixel_accuracy"], abs=1e-9
    )
    # rank r holds images r, r + 2, r + 4: its rows carry (rank, index in its own loader)
    by_image = {2 * row["index"] + row["rank"]: row for row in r0["per_image"]}
    for i, row in enumerate(single.per_image):
        assert by_image[i]["pixel_accuracy"] == pytest.approx(row["pixel_accuracy"], abs=1e-9)
        assert by_image[i]["miou"] == pytest.approx(row["miou"], abs=1e-9)
