"""Temperature scaling of the corrected (fused) probabilities.

The mixture of the base's and the detail head's softmax is not calibrated by construction, and
on our benchmarks its expected calibration error is higher than the base's (docs/benchmarks.md).
:func:`calibrate_temperature` fits one temperature ``T`` on held-out labelled data by minimising
the negative log-likelihood of ``log_softmax(fused_log_probs / T)`` (Guo et al., ICML 2017,
applied to the fused log-probabilities) and stores it on the wrapper, which then applies it in
every forward pass. Dividing log-probabilities by ``T`` keeps their ``argmax``: labels, error
map and mIoU do not change; only the fused probabilities (``out.probs``, ``out.logits``) do.

This is errwrap's addition, not the paper's.

Example:
    >>> fit = errwrap.calibrate_temperature(wrap, val_loader)  # doctest: +SKIP
    >>> fit.temperature, fit.nll_before, fit.nll_after          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._batch import prepare_batch
from ._utils import module_device
from ._validate import check_outputs_finite, input_dtype
from .hub import TEMPERATURE_RANGE

__all__ = ["TemperatureFit", "calibrate_temperature", "fit_temperature", "sample_labelled_pixels"]

logger = logging.getLogger(__name__)

#: search range of ``log(T)``: ``T`` in ``[e^-3, e^3]`` (about 0.05 to 20).
LOG_T_RANGE = (-3.0, 3.0)


class TemperatureFit(NamedTuple):
    """The fitted temperature and the mean negative log-likelihood (nats per pixel) of the
    pixels it was fitted on, before (``T = 1``) and after."""

    temperature: float
    nll_before: float
    nll_after: float
    pixels: int


def _nll(log_probs: Tensor, labels: Tensor, log_t: float) -> float:
    scaled = torch.log_softmax(log_probs / math.exp(log_t), dim=1)
    return float(-scaled.gather(1, labels[:, None]).mean())


def fit_temperature(log_probs: Tensor, labels: Tensor, tol: float = 1e-4) -> TemperatureFit:
    """Fit ``T`` minimising ``NLL(log_softmax(log_probs / T), labels)`` by golden-section search
    on ``log T`` (the NLL of temperature scaling is unimodal in ``T``); deterministic.

    Shapes:
        log_probs ``(N, C)`` float, labels ``(N,)`` int64 in ``[0, C)``.
    """
    if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1]:
        raise ValueError(
            f"fit_temperature: expected log_probs (N, C) and labels (N,), got {tuple(log_probs.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if log_probs.shape[0] == 0:
        raise ValueError("fit_temperature: expected at least one labelled pixel, got none")
    log_probs = log_probs.float()
    bad = ~torch.isfinite(log_probs)
    if bool(bad.any()):
        raise ValueError(
            f"fit_temperature: expected finite log_probs, got NaN/Inf in {int(bad.any(1).sum())} of "
            f"{log_probs.shape[0]} pixels"
        )
    lo, hi = LOG_T_RANGE
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(log_probs, labels, a), _nll(log_probs, labels, b)
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(log_probs, labels, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(log_probs, labels, b)
    log_t = (lo + hi) / 2.0
    if min(abs(log_t - LOG_T_RANGE[0]), abs(log_t - LOG_T_RANGE[1])) < 1e-2:
        logger.warning(
            "fitted temperature %.3g is at the edge of the search range [%.3g, %.3g]",
            math.exp(log_t),
            *map(math.exp, LOG_T_RANGE),
        )
    return TemperatureFit(
        math.exp(log_t), _nll(log_probs, labels, 0.0), _nll(log_probs, labels, log_t), int(labels.numel())
    )


def calibrate_temperature(
    wrapper: Any,
    loader: Iterable[Any],
    *,
    ignore_index: int = 255,
    max_pixels: int = 500_000,
    max_batches: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> TemperatureFit:
    """Fit the temperature of ``wrapper``'s fused probabilities on held-out labelled data and
    set ``wrapper.temperature`` to it (saved by ``save_pretrained``).

    Use data the heads were not trained on. At most ``max_pixels`` labelled pixels are kept, a
    seeded uniform sample of all of them, to bound memory (``max_pixels x C`` floats).

    Args:
        wrapper: an :class:`~errwrap.ErrorCorrectionWrapper`.
        loader: batches of ``(images, labels)`` (any form :func:`errwrap.evaluate` reads).
        ignore_index: label value of unlabelled pixels.
        max_pixels: the most labelled pixels kept for the fit.
        max_batches: stop after this many batches.
        seed: seed of the pixel subsampling.
        device: where to run (default: the wrapper's device).

    Returns:
        :class:`TemperatureFit` with the temperature now set on the wrapper.
    """
    was_training, old_t = wrapper.training, float(getattr(wrapper, "temperature", 1.0))
    wrapper.temperature = 1.0
    try:
        kept_lp, kept_y = sample_labelled_pixels(
            wrapper, loader, lambda w, x: w(x).logits,
            ignore_index=ignore_index, max_pixels=max_pixels, max_batches=max_batches, seed=seed, device=device,
        )  # fmt: skip
    except BaseException:
        wrapper.temperature = old_t
        raise
    finally:
        wrapper.train(was_training)
    if kept_y.numel() == 0:
        wrapper.temperature = old_t
        raise ValueError(
            "calibrate_temperature: the loader gave no labelled pixels (all equal to ignore_index, or empty)"
        )
    fit = fit_temperature(kept_lp, kept_y)
    low, high = TEMPERATURE_RANGE
    if not low <= fit.temperature <= high:  # NaN fails too
        wrapper.temperature = old_t
        raise ValueError(
            f"calibrate_temperature: the fitted temperature {fit.temperature!r} is outside [{low:g}, {high:g}]; kept "
            f"{old_t}"
        )
    wrapper.temperature = fit.temperature
    logger.info(
        "fused temperature %.4f on %d pixels: NLL %.4f -> %.4f",
        fit.temperature,
        fit.pixels,
        fit.nll_before,
        fit.nll_after,
    )
    return fit


def sample_labelled_pixels(
    wrapper: Any,
    loader: Iterable[Any],
    logits_of: Callable[[Any, Tensor], Tensor],
    *,
    ignore_index: int = 255,
    max_pixels: int = 500_000,
    max_batches: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """A seeded uniform sample of at most ``max_pixels`` labelled pixels: their logits and labels.

    The wrapper runs in eval mode without gradients (its mode is restored); ``logits_of(wrapper,
    images)`` gives the ``(B, C, H, W)`` logits at the labels' resolution (e.g. the fused
    log-probabilities ``wrapper(x).logits``, or the base logits).

    Shapes:
        -> logits ``(N, C)`` float32 on the CPU, labels ``(N,)`` int64, ``N <= max_pixels``.
    """
    device = torch.device(device) if device is not None else module_device(wrapper)
    generator = torch.Generator().manual_seed(seed)
    was_training = wrapper.training
    dtype = input_dtype(wrapper)
    kept_lp = torch.empty(0, wrapper.num_classes)
    kept_y = torch.empty(0, dtype=torch.long)
    kept_key = torch.empty(0)
    wrapper.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images, labels = prepare_batch(
                    batch, i, in_channels=getattr(wrapper, "in_channels", None), num_classes=wrapper.num_classes,
                    ignore_index=ignore_index, device=device, dtype=dtype,
                )  # fmt: skip
                logits = logits_of(wrapper, images)
                check_outputs_finite(logits, f"calibration: batch {i}")
                flat = labels.reshape(-1).cpu()
                valid = (flat != ignore_index).nonzero().squeeze(1)
                if valid.numel() == 0:
                    continue
                log_probs = logits.float().permute(0, 2, 3, 1).reshape(-1, wrapper.num_classes).cpu()
                # a uniform sample of all labelled pixels seen so far: keep the smallest random keys
                keys = torch.rand(valid.numel(), generator=generator)
                kept_lp = torch.cat([kept_lp, log_probs[valid]])
                kept_y = torch.cat([kept_y, flat[valid]])
                kept_key = torch.cat([kept_key, keys])
                if kept_key.numel() > max_pixels:
                    keep = kept_key.topk(max_pixels, largest=False).indices
                    kept_lp, kept_y, kept_key = kept_lp[keep], kept_y[keep], kept_key[keep]
    finally:
        wrapper.train(was_training)
    return kept_lp, kept_y
