"""Pins the public API surface: a change here is a change users see."""

import subprocess
import sys

import errwrap

EXPECTED = {
    "__version__",
    "ErrorCorrectionWrapper",
    "ErrorCorrectionOutput",
    "ErrorHead",
    "DetailHead",
    "MixtureFusion",
    "LearnedFusion",
    "mixture_log_probs",
    "ErrorCorrectionLoss",
    "LossOutput",
    "error_target",
    "error_loss",
    "detail_loss",
    "fused_nll",
    "base_ce",
    "finetune",
    "FinetuneResult",
    "NonFiniteLossError",
    "evaluate",
    "EvaluationReport",
    "SegmentationMetrics",
    "ErrorDetectionMetrics",
    "CalibrationMetrics",
    "SegmentationResult",
    "ErrorDetectionResult",
    "CalibrationResult",
    "exact_error_detection",
    "ErrorScore",
    "ScoreOutput",
    "ErrorHeadScore",
    "MSPScore",
    "EntropyScore",
    "calibrate_temperature",
    "TemperatureFit",
    "MCDropoutScore",
    "MaxLogitScore",
    "EnergyScore",
    "TemperatureMSPScore",
    "EnsembleScore",
    "ErrwrapScore",
    "RiskCoverageMetrics",
    "RiskCoverageResult",
    "ImageRiskCoverageResult",
    "exact_risk_coverage",
    "image_aurc",
    "estimate",
    "EstimateReport",
    "fit_atc",
    "compare_estimates",
    "EstimateComparison",
    "write_report",
}


def test_public_api_is_pinned():
    assert set(errwrap.__all__) == EXPECTED
    for name in EXPECTED:
        assert hasattr(errwrap, name), name


def test_output_fields_are_pinned():
    assert errwrap.ErrorCorrectionOutput._fields == ("logits", "base_logits", "error_logits", "detail_logits")
    assert errwrap.LossOutput._fields == ("total", "error", "detail", "fused", "base")


def test_import_does_not_pull_optional_families():
    code = (
        "import sys, errwrap; print(sorted(m for m in ('segmentation_models_pytorch', 'transformers', "
        "'torchvision.models.segmentation', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_module_declares_all():
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(errwrap.__path__, "errwrap."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        assert isinstance(getattr(module, "__all__", None), (list, tuple)), f"{info.name} has no __all__"
