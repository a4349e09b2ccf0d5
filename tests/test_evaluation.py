import json
import math

import pytest
import torch
from torch import nn

from errwrap import ErrorCorrectionWrapper
from errwrap.evaluation import EvaluationReport, evaluate, unpack_batch
from errwrap.metrics import (
    CalibrationMetrics,
    ErrorDetectionMetrics,
    ImageRiskCoverageMetrics,
    RiskCoverageMetrics,
    SegmentationMetrics,
    exact_risk_coverage,
)
from errwrap.scores import EnsembleScore, MSPScore, TemperatureMSPScore, entropy_score, msp_score

NUM_CLASSES = 4


class StrideTwoBase(nn.Module):
    """A few convs; logits at stride 2 and a list of features (native protocol)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.Conv2d(16 + 8, 8, 3, 1, 1)
        self.classifier = nn.Conv2d(8, NUM_CLASSES, 1)

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.down(f1)
        up = nn.functional.interpolate(f2, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.relu(self.up(torch.cat([up, f1], 1)))), [f1, f2]


def _wrapper(seed=0):
    torch.manual_seed(seed)
    return ErrorCorrectionWrapper(StrideTwoBase(), sample_size=32)


def _loader(n=3, batch_size=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images = torch.randn(batch_size, 3, size, size, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (batch_size, size, size), generator=g)
        labels[:, :3, :] = 255
        batches.append((images, labels))
    return batches


def test_evaluate_matches_metrics_computed_by_hand():
    wrap = _wrapper()
    loader = _loader()
    report = evaluate(wrap, loader, baselines=("msp", "entropy"))
    seg_base, seg_fused = SegmentationMetrics(NUM_CLASSES), SegmentationMetrics(NUM_CLASSES)
    det = {k: ErrorDetectionMetrics() for k in ("error_head", "msp", "entropy")}
    ece = CalibrationMetrics(NUM_CLASSES)
    wrap.eval()
    with torch.no_grad():
        for x, y in loader:
            out = wrap(x)
            seg_base.update(out.base_labels, y)
            seg_fused.update(out.labels, y)
            errors, valid = out.base_labels != y, y != 255
            det["error_head"].update(out.base_error_prob, errors, valid)
            det["msp"].update(msp_score(out.base_logits), errors, valid)
            det["entropy"].update(entropy_score(out.base_logits), errors, valid)
            ece.update(out.probs, y)
    assert report.num_images == 6
    assert report.num_pixels == 6 * 29 * 32
    assert report.base.miou == seg_base.compute().miou
    assert report.fused.iou == seg_fused.compute().iou
    assert list(report.error_detection) == ["error_head", "msp", "entropy"]
    for name, metric in det.items():
        assert report.error_detection[name] == metric.compute()
    assert report.calibration["fused"].ece == pytest.approx(ece.compute().ece)
    assert report.error_detection["msp"].num_pixels == report.num_pixels
    assert 0 < report.error_detection["msp"].error_rate < 1
    assert report.miou_gain == report.fused.miou - report.base.miou
    t = report.time_per_image
    assert set(t) == {
        "base_forward",
        "wrapper_forward",
        "extra/msp",
        "extra/entropy",
        "score/error_head",
        "score/msp",
        "score/entropy",
    }
    assert all(v > 0 for v in t.values())
    assert t["score/msp"] == pytest.approx(t["base_forward"] + t["extra/msp"])


def test_evaluate_reports_the_returned_labels_with_risk_coverage():
    wrap = _wrapper()
    loader = _loader()
    report = evaluate(wrap, loader, baselines=("entropy",))
    returned, rc = (
        ErrorDetectionMetrics(),
        {k: RiskCoverageMetrics() for k in ("error_prob", "msp", "error_head", "entropy")},
    )
    images = {k: ImageRiskCoverageMetrics() for k in rc}
    scores_all, wrong_all = [], []
    wrap.eval()
    with torch.no_grad():
        for x, y in loader:
            out = wrap(x)
            valid = y != 255
            maps = {
                "error_prob": (out.error_prob, out.labels != y),
                "msp": (msp_score(out.base_logits), out.base_labels != y),
                "error_head": (out.base_error_prob, out.base_labels != y),
                "entropy": (entropy_score(out.base_logits), out.base_labels != y),
            }
            returned.update(*maps["error_prob"], valid)
            for k, (score, wrong) in maps.items():
                rc[k].update(score, wrong, valid)
                images[k].update(score, wrong, valid)
            scores_all.append(out.error_prob[valid])
            wrong_all.append((out.labels != y)[valid])
    assert report.returned_detection == returned.compute()
    assert list(report.risk_coverage) == ["error_prob", "msp", "error_head", "entropy"]
    assert report.judged_labels == {"error_prob": "returned", "msp": "base", "error_head": "base", "entropy": "base"}
    for k in rc:
        assert report.risk_coverage[k] == rc[k].compute()
        assert report.image_risk_coverage[k] == images[k].compute()
        assert report.image_risk_coverage[k].num_images == 6
    exact = exact_risk_coverage(torch.cat(scores_all), torch.cat(wrong_all))
    got = report.risk_coverage["error_prob"]
    assert abs(got.aurc - exact.aurc) <= got.aurc_bound + 1e-12 and got.num_errors == exact.num_errors
    # both: base errors
    assert report.risk_coverage["msp"].num_errors == report.error_detection["error_head"].num_errors
    assert 0 <= got.eaurc <= got.aurc <= 1
    coverage, risk = report.risk_curves["error_prob"]
    assert len(coverage) == 100 and coverage[-1] == 1.0 and risk[-1] == pytest.approx(got.error_rate)
    assert risk[49] == pytest.approx(got.risks[0])  # 50% coverage
    table = report.table()
    row = next(line for line in table.splitlines() if line.startswith("error_prob"))
    assert row.split()[:3] == ["error_prob", "returned", f"{100 * got.error_rate:.2f}"]
    assert f"{100 * got.aurc:.2f}" in row and f"{100 * got.eaurc:.2f}" in row
    assert f"{100 * report.image_risk_coverage['error_prob'].aurc:.2f}" in row


def test_evaluate_counts_the_ensemble_errors_on_its_own_labels():
    wrap = _wrapper()
    torch.manual_seed(1)
    other = StrideTwoBase().eval()
    report = evaluate(wrap, _loader(n=1), baselines=(EnsembleScore([wrap.base, other]),))
    assert report.judged_labels["ensemble"] == "ensemble"
    assert report.risk_coverage["ensemble"].num_errors == report.error_detection["ensemble"].num_errors
    assert "ensemble      ensemble" in report.table()


def test_report_table_widens_its_name_column_for_long_score_names():
    report = evaluate(_wrapper(), _loader(n=1), baselines=(TemperatureMSPScore(0.5), "max_logit"))
    # its error-detection row and its risk-coverage row, the name apart from the next column
    lines = [line.split() for line in report.table().splitlines() if line.startswith("temperature_msp")]
    assert [row[0] for row in lines] == ["temperature_msp", "temperature_msp"]
    assert lines[1][1] == "base" and lines[0][1] == f"{100 * report.error_detection['temperature_msp'].auroc:.2f}"


def test_evaluate_restores_modes_and_accepts_dict_batches():
    wrap = _wrapper().train()
    modes = {n: m.training for n, m in wrap.named_modules()}
    state = {k: v.clone() for k, v in wrap.state_dict().items()}
    batches = [{"image": x, "label": y} for x, y in _loader(n=2)]
    seen = []
    report = evaluate(wrap, batches, baselines=(), progress=seen.append, max_batches=1)
    assert {n: m.training for n, m in wrap.named_modules()} == modes
    assert all(torch.equal(v, state[k]) for k, v in wrap.state_dict().items())  # eval: no BN updates
    assert report.num_images == 2 and seen == [0]
    assert list(report.error_detection) == ["error_head"]
    tuple_report = evaluate(wrap, _loader(n=2), baselines=(), max_batches=1)
    assert tuple_report.to_dict()["error_detection"] == report.to_dict()["error_detection"]


def test_evaluate_reads_common_batch_forms_and_label_dtypes():
    wrap = _wrapper()
    loader = _loader(n=2)
    reference = evaluate(wrap, loader, baselines=("msp",)).to_dict()
    forms = {
        "image/mask, uint8 (B, 1, H, W)": [{"image": x, "mask": y[:, None].to(torch.uint8)} for x, y in loader],
        "pixel_values/labels, int32": [{"pixel_values": x, "labels": y.int()} for x, y in loader],
        "(image, label, name)": [(x, y, ["a", "b"]) for x, y in loader],
    }
    for name, batches in forms.items():
        report = evaluate(wrap, batches, baselines=("msp",)).to_dict()
        for key in ("base", "fused", "error_detection", "calibration", "num_pixels"):
            assert report[key] == reference[key], name


def test_evaluate_casts_images_to_the_model_dtype_and_refuses_nan(caplog):
    wrap = _wrapper()
    loader = _loader(n=1)
    reference = evaluate(wrap, loader, baselines=("msp",)).to_dict()
    doubled = evaluate(wrap, [(x.double(), y) for x, y in loader], baselines=("msp",)).to_dict()
    for key in ("base", "fused", "error_detection", "calibration"):
        assert doubled[key] == reference[key]
    x, y = loader[0]
    bad = x.clone()
    bad[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"images of batch 1: expected finite values, got 1 NaN/Inf"):
        evaluate(wrap, [(x, y), (bad, y)])
    with caplog.at_level("WARNING", logger="errwrap.evaluation"):
        report = evaluate(wrap, [(x, torch.full_like(y, 255))])
    assert report.num_pixels == 0 and math.isnan(report.base.miou) and math.isnan(report.fused.miou)
    assert "every label was ignore_index=255" in caplog.text


def test_evaluate_with_mc_dropout_costs_T_passes():
    wrap = _wrapper()
    calls = []
    handle = wrap.base.register_forward_hook(lambda *_: calls.append(1))
    report = evaluate(wrap, _loader(n=2), baselines=("msp", "mc_dropout"), mc_dropout_T=5)
    handle.remove()
    # one untimed warm-up (base pass, wrapper pass), then per batch: base pass, wrapper pass,
    # T dropout passes (MSP reuses the base logits)
    assert len(calls) == 2 + 2 * (2 + 5)
    mc = report.error_detection["mc_dropout"]
    assert 0 <= mc.auroc <= 1 and mc.num_errors == report.error_detection["msp"].num_errors
    assert "MCDropoutScore(T=5" in report.config["scores"]["mc_dropout"]


def test_report_json_round_trip(tmp_path):
    report = evaluate(_wrapper(), _loader(n=2), baselines=("msp",))
    report.base.iou[0] = float("nan")  # a class absent from labels and predictions
    text = report.to_json(tmp_path / "report.json")
    assert "NaN" not in text and json.loads(text)["base"]["iou"][0] is None
    again = EvaluationReport.from_json(tmp_path / "report.json")
    assert math.isnan(again.base.iou[0])
    assert again.to_dict() == report.to_dict()
    assert EvaluationReport.from_dict(json.loads(text)).to_json() == text
    assert EvaluationReport.from_json(text).error_detection["msp"] == report.error_detection["msp"]
    assert again.risk_coverage["error_prob"] == report.risk_coverage["error_prob"]
    assert again.returned_detection == report.returned_detection
    assert again.risk_curves == report.risk_curves and len(again.risk_curves["msp"][0]) == 100
    # a report written before the returned-label metrics existed still reads
    new_keys = ("returned_detection", "risk_coverage", "image_risk_coverage", "judged_labels", "risk_curves")
    old = {k: v for k, v in json.loads(text).items() if k not in new_keys}
    legacy = EvaluationReport.from_dict(old)
    assert legacy.returned_detection is None and legacy.risk_coverage == {} and "risk-coverage" not in legacy.table()


def test_report_table_lists_every_score():
    report = evaluate(_wrapper(), _loader(n=1), baselines=("msp", "entropy"))
    table = report.table()
    assert str(report) == table
    for word in ("mIoU", "base", "corrected", "error_head", "msp", "entropy", "AUROC", "FPR95", "ECE"):
        assert word in table
    msp_line = next(line for line in table.splitlines() if line.startswith("msp"))
    assert f"{100 * report.error_detection['msp'].auroc:.2f}" in msp_line


def test_evaluate_errors():
    wrap = _wrapper()
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(wrap, [])
    with pytest.raises(ValueError, match="max_batches"):
        evaluate(wrap, _loader(), max_batches=0)
    with pytest.raises(ValueError, match="distinct"):
        evaluate(wrap, _loader(), baselines=("msp", MSPScore()))
    with pytest.raises(ValueError, match="unknown name"):
        evaluate(wrap, _loader(), baselines=("odin",))
    x, y = _loader(n=1)[0]
    with pytest.raises(ValueError, match="spatial size"):
        evaluate(wrap, [(x, y[:, :16])])
    with pytest.raises(ValueError, match="keys 'image' and 'label'"):
        unpack_batch({"img": x})
    with pytest.raises(ValueError, match=r"one-hot targets with 4 channels"):
        evaluate(wrap, [(x, torch.nn.functional.one_hot(y.clamp(max=3), 4).permute(0, 3, 1, 2))])
    with pytest.raises(TypeError, match="batch"):
        unpack_batch(x)
    with pytest.raises(ValueError, match="wrapper's parameters are on cpu"):
        evaluate(wrap, _loader(), device="meta")


def test_evaluate_explains_images_of_different_sizes_and_takes_them_one_by_one():
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    items = [
        (torch.randn(3, h, w, generator=g), torch.randint(0, NUM_CLASSES, (h, w), generator=g))
        for h, w in ((32, 48), (40, 24), (24, 24))
    ]
    with pytest.raises(RuntimeError, match=r"loader: its items have different sizes.*batch_size=1.*--batch-size 1"):
        evaluate(_wrapper(), DataLoader(items, batch_size=2))
    report = evaluate(_wrapper(), DataLoader(items, batch_size=1))
    assert report.num_images == 3 and report.num_pixels == 32 * 48 + 40 * 24 + 24 * 24


def test_evaluate_refuses_a_dataset_declaring_other_classes():
    from torch.utils.data import DataLoader

    class Data(torch.utils.data.Dataset):
        num_classes = NUM_CLASSES + 1  # e.g. ADE20K with reduce_zero_label=False against a 150-class model

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.randn(3, 32, 32), torch.zeros(32, 32, dtype=torch.long)

    with pytest.raises(ValueError, match=r"num_classes=5, but the model predicts 4 classes.*reduce_zero_label=False"):
        evaluate(_wrapper(), DataLoader(Data(), batch_size=2))
    data = Data()
    data.num_classes = None  # the documented way out: labels already use the model's indices
    assert evaluate(_wrapper(), DataLoader(data, batch_size=2)).num_images == 2


def test_time_per_image_leaves_out_the_first_calls_one_time_cost():
    """A base whose first call is slow (lazy set-up, cudnn autotuning, caches) must not make the
    score that happens to run first look expensive: evaluate warms up untimed."""
    import time

    class SlowFirstCall(StrideTwoBase):
        calls = 0

        def forward(self, x):
            type(self).calls += 1
            if type(self).calls == 1:
                time.sleep(0.5)
            return super().forward(x)

    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(SlowFirstCall(), sample_size=32)  # the probe is the first call
    SlowFirstCall.calls = 0
    report = evaluate(wrap, _loader(n=2), baselines=("msp",))
    assert report.time_per_image["base_forward"] < 0.1 and report.time_per_image["score/msp"] < 0.1


def _ddp_evaluate_worker(rank, world_size, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        shard = _loader(n=4)[rank::world_size]
        results[rank] = evaluate(_wrapper(), shard, baselines=("msp",)).to_dict()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_sums_every_metric_over_processes(tmp_path):
    import os

    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_evaluate_worker, args=(2, os.path.join(tmp_path, "init"), results), nprocs=2, join=True)
    loader = _loader(n=4)
    whole = evaluate(_wrapper(), loader[0::2] + loader[1::2], baselines=("msp",)).to_dict()
    for rank in range(2):
        got = results[rank]
        assert got["num_images"] == whole["num_images"] == 8
        for key in (
            "base",
            "fused",
            "error_detection",
            "returned_detection",
            "risk_coverage",
            "image_risk_coverage",
            "risk_curves",
        ):
            assert got[key] == whole[key], key
