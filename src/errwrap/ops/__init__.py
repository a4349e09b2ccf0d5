"""Fused operators for the hot paths of errwrap (the mixture fusion at full resolution)."""

from .fusion import (
    BACKENDS,
    FusedPrediction,
    fused_labels_and_error_prob,
    fused_mixture_log_probs,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "FusedPrediction",
    "fused_labels_and_error_prob",
    "fused_mixture_log_probs",
    "triton_available",
]
