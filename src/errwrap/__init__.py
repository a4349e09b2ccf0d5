"""errwrap: learn where a semantic-segmentation network is wrong, and correct it.

Implements Gong et al., "Erroneous pixel prediction for semantic image segmentation",
Computational Visual Media 8(1), 2022, as a wrapper around any segmentation network.
"""

import logging

from ._version import __version__
from .calibration import TemperatureFit, calibrate_temperature
from .estimation import EstimateComparison, EstimateReport, compare_estimates, estimate, fit_atc
from .evaluation import EvaluationReport, evaluate
from .heads import DetailHead, ErrorHead, LearnedFusion, MixtureFusion, mixture_log_probs
from .losses import (
    ErrorCorrectionLoss,
    LossOutput,
    base_ce,
    detail_loss,
    error_loss,
    error_target,
    fused_nll,
)
from .metrics import (
    CalibrationMetrics,
    CalibrationResult,
    ErrorDetectionMetrics,
    ErrorDetectionResult,
    ImageRiskCoverageResult,
    RiskCoverageMetrics,
    RiskCoverageResult,
    SegmentationMetrics,
    SegmentationResult,
    exact_error_detection,
    exact_risk_coverage,
    image_aurc,
)
from .report import write_report
from .scores import (
    EnergyScore,
    EnsembleScore,
    EntropyScore,
    ErrorHeadScore,
    ErrorScore,
    ErrwrapScore,
    MaxLogitScore,
    MCDropoutScore,
    MSPScore,
    ScoreOutput,
    TemperatureMSPScore,
)
from .training import FinetuneResult, NonFiniteLossError, finetune
from .wrapper import ErrorCorrectionOutput, ErrorCorrectionWrapper

__all__ = [
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
    "MCDropoutScore",
    "calibrate_temperature",
    "TemperatureFit",
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
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
