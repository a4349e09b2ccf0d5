"""Losses of the three heads, each a function plus, for the whole, an ``nn.Module``.

Every loss respects ``ignore_index`` and averages over the pixels that are not ignored; a batch
whose pixels are all ignored gives a zero, finite loss (still connected to the graph, so every
parameter gets a zero gradient rather than none).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_finite, check_logits, is_tracing, prepare_labels
from .functional import class_labels
from .layers import resize

__all__ = [
    "error_target",
    "balanced_pos_weight",
    "error_loss",
    "detail_loss",
    "fused_nll",
    "base_ce",
    "LossOutput",
    "ErrorCorrectionLoss",
]

ERROR_LOSSES = ("balanced_bce", "bce", "focal")


def _masked_mean(values: Tensor, valid: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over ``valid`` pixels (weighted when ``weights`` is given); 0 when none."""
    valid = valid.to(values.dtype)
    if weights is not None:
        valid = valid * weights
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


def _at_label_size(logits: Tensor, labels: Tensor) -> Tensor:
    return resize(logits, labels.shape[-2:])


def error_target(base_logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """The error head's target: 1 where ``argmax(base_logits) != labels``, 0 where equal, and
    ``ignore_index`` where the label is ignored. Logits are resized (bilinear) to the label size.

    Shapes:
        base_logits ``(B, C, h, w)``, labels ``(B, H, W)`` -> target ``(B, H, W)`` int64.

    Example:
        >>> z = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])   # predicts class 0, then 1
        >>> error_target(z, torch.tensor([[[0, 0]]]))
        tensor([[[0, 1]]])
    """
    pred = class_labels(_at_label_size(base_logits.detach(), labels))
    target = (pred != labels).long()
    return torch.where(labels == ignore_index, torch.full_like(target, ignore_index), target)


def balanced_pos_weight(target: Tensor, ignore_index: int = 255, max_weight: float = 50.0) -> Tensor:
    """Per-batch ``pos_weight = n_negative / n_positive`` over non-ignored pixels, clamped to
    ``[1, max_weight]`` (1 when there are no errors, or no pixels)."""
    valid = target != ignore_index
    pos = ((target == 1) & valid).sum()
    neg = ((target == 0) & valid).sum()
    weight = neg.float() / pos.float().clamp_min(1.0)
    weight = torch.where(pos > 0, weight, torch.ones_like(weight))
    return weight.clamp(1.0, max_weight)


def error_loss(
    error_logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    mode: str = "balanced_bce",
    gamma: float = 2.0,
    max_pos_weight: float = 50.0,
) -> Tensor:
    """Binary loss of the error head against :func:`error_target`.

    ``mode``:
        - ``"balanced_bce"``: BCE with errors weighted by :func:`balanced_pos_weight` (default);
        - ``"bce"``: plain BCE;
        - ``"focal"``: focal loss ``-(1 - p_t)^gamma * log(p_t)``.

    Shapes:
        error_logits ``(B, 1, h, w)`` or ``(B, h, w)`` (resized to the target), target ``(B, H, W)``
        -> scalar.
    """
    if mode not in ERROR_LOSSES:
        raise ValueError(f"error loss mode: expected one of {ERROR_LOSSES}, got {mode!r}")
    if error_logits.ndim == 3:
        error_logits = error_logits.unsqueeze(1)
    logits = _at_label_size(error_logits, target)[:, 0].float()
    valid = target != ignore_index
    t = (target == 1).to(logits.dtype)
    if mode == "focal":
        bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        p_t = torch.exp(-bce)
        return _masked_mean((1.0 - p_t).pow(gamma) * bce, valid)
    pos_weight = None
    if mode == "balanced_bce":
        pos_weight = balanced_pos_weight(target, ignore_index, max_pos_weight).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight, reduction="none")
    return _masked_mean(bce, valid)


def _pixel_ce(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(_at_label_size(logits, labels).float(), labels, ignore_index=ignore_index, reduction="none")


def detail_loss(
    detail_logits: Tensor,
    labels: Tensor,
    target: Tensor,
    focus: float = 4.0,
    ignore_index: int = 255,
) -> Tensor:
    """Cross-entropy of the detail head, each pixel weighted by ``1 + focus * target`` so that
    the base's erroneous pixels dominate; the weighted mean over non-ignored pixels.

    Shapes:
        detail_logits ``(B, C, h, w)``, labels and target ``(B, H, W)`` -> scalar.
    """
    ce = _pixel_ce(detail_logits, labels, ignore_index)
    valid = labels != ignore_index
    weights = 1.0 + focus * (target == 1).to(ce.dtype)
    return _masked_mean(ce, valid, weights)


def fused_nll(fused_log_probs: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Negative log-likelihood of ``labels`` under the fused log-probabilities.

    Shapes:
        fused_log_probs ``(B, C, h, w)``, labels ``(B, H, W)`` -> scalar.
    """
    log_probs = _at_label_size(fused_log_probs, labels).float()
    nll = F.nll_loss(log_probs, labels, ignore_index=ignore_index, reduction="none")
    return _masked_mean(nll, labels != ignore_index)


def base_ce(base_logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Plain cross-entropy of the base logits (for joint fine-tuning).

    Shapes:
        base_logits ``(B, C, h, w)``, labels ``(B, H, W)`` -> scalar.
    """
    return _masked_mean(_pixel_ce(base_logits, labels, ignore_index), labels != ignore_index)


class LossOutput(NamedTuple):
    """The total loss and each (unweighted) term; ``base`` is 0 unless ``w_base > 0``."""

    total: Tensor
    error: Tensor
    detail: Tensor
    fused: Tensor
    base: Tensor


class ErrorCorrectionLoss(nn.Module):
    """``w_err * L_err + w_detail * L_detail + w_fused * L_fused + w_base * L_base``.

    Args:
        w_err, w_detail, w_fused, w_base: weights of the terms (``w_base > 0`` trains the base).
        error_mode: ``"balanced_bce"``, ``"bce"`` or ``"focal"`` (see :func:`error_loss`).
        focus: extra weight of erroneous pixels in the detail loss.
        gamma: focal loss exponent.
        max_pos_weight: clamp of the balanced BCE weight.
        ignore_index: label value that marks unlabeled pixels.
        validate: check labels (dtype, shape, values) and that the base logits are finite;
            reads values, so it synchronises with the device.

    Shapes:
        output: an :class:`~errwrap.ErrorCorrectionOutput` with maps at ``(H, W)``;
        labels ``(B, H, W)`` or ``(B, 1, H, W)`` of any integer dtype (``int64``, ``int32``,
        ``uint8``, ...) -> :class:`LossOutput` of scalars.

    Example:
        >>> loss_fn = ErrorCorrectionLoss()
        >>> losses = loss_fn(wrapper(images), labels)   # doctest: +SKIP
        >>> losses.total.backward()                     # doctest: +SKIP
    """

    def __init__(
        self,
        w_err: float = 1.0,
        w_detail: float = 1.0,
        w_fused: float = 1.0,
        w_base: float = 0.0,
        *,
        error_mode: str = "balanced_bce",
        focus: float = 4.0,
        gamma: float = 2.0,
        max_pos_weight: float = 50.0,
        ignore_index: int = 255,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if error_mode not in ERROR_LOSSES:
            raise ValueError(f"error_mode: expected one of {ERROR_LOSSES}, got {error_mode!r}")
        for name, value in (
            ("w_err", w_err),
            ("w_detail", w_detail),
            ("w_fused", w_fused),
            ("w_base", w_base),
            ("focus", focus),
        ):
            if value < 0:
                raise ValueError(f"{name}: expected a non-negative weight, got {value}")
        self.w_err, self.w_detail, self.w_fused, self.w_base = w_err, w_detail, w_fused, w_base
        self.error_mode, self.focus, self.gamma = error_mode, focus, gamma
        self.max_pos_weight, self.ignore_index, self.validate = max_pos_weight, ignore_index, validate

    def forward(self, output, labels: Tensor) -> LossOutput:
        validate = self.validate and not is_tracing()
        if validate:
            check_logits(output.logits, name="output.logits")
            check_finite(output.base_logits, "base logits")
        b, c, h, w = output.logits.shape
        labels = prepare_labels(labels, c, self.ignore_index, size=(h, w), batch=b, validate=validate)
        target = error_target(output.base_logits, labels, self.ignore_index)
        l_err = error_loss(
            output.error_logits, target, self.ignore_index, self.error_mode, self.gamma, self.max_pos_weight
        )
        l_detail = detail_loss(output.detail_logits, labels, target, self.focus, self.ignore_index)
        l_fused = fused_nll(output.logits, labels, self.ignore_index)
        l_base = base_ce(output.base_logits, labels, self.ignore_index) if self.w_base > 0 else l_fused.new_zeros(())
        total = self.w_err * l_err + self.w_detail * l_detail + self.w_fused * l_fused + self.w_base * l_base
        return LossOutput(total, l_err, l_detail, l_fused, l_base)
