"""``finetune``'s argument checks and the choices it makes before building anything: the device,
which part of the wrapper trains, and the preprocessing a loader's ``Normalize`` records."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import _distributed
from .._batch import check_loader_num_classes
from .._io import check_writable, tensor_bytes
from .._utils import module_device
from ..losses import ErrorCorrectionLoss
from .augment import AUGMENTS
from .checkpoint import checkpoint_weights
from .optim import PRECISIONS, SCHEDULES

__all__ = ["check_arguments", "check_data", "check_room", "place", "select_trained"]

logger = logging.getLogger("errwrap.training")


def check_arguments(
    *,
    steps: int,
    accumulate: int,
    warmup_steps: int,
    checkpoint_every: int | None,
    val_every: int | None,
    log_every: int | None,
    schedule: str,
    precision: str,
    lr: float,
    weight_decay: float,
    clip_grad_norm: float | None,
    augment: str | None = None,
    calibrate: bool = True,
) -> None:
    """Refuse out-of-range numbers and unknown choices with a ``ValueError`` naming the argument."""
    for name, value, low in (("steps", steps, 1), ("accumulate", accumulate, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    for name, every in (("checkpoint_every", checkpoint_every), ("val_every", val_every), ("log_every", log_every)):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"{name}: expected a positive integer or None, got {every!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment: expected one of {AUGMENTS}, got {augment!r}")
    if not isinstance(calibrate, bool):
        raise ValueError(f"calibrate: expected True or False, got {calibrate!r}")
    numbers = (("lr", lr, "> 0"), ("weight_decay", weight_decay, ">= 0"))
    for name, number, rule in (*numbers, ("clip_grad_norm", clip_grad_norm, "> 0 (None: no clipping)")):
        if name == "clip_grad_norm" and number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"{name}: expected a finite number {rule}, got {number!r}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr, weight_decay: expected lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
    if clip_grad_norm is not None and clip_grad_norm <= 0:
        raise ValueError(f"clip_grad_norm: expected a positive number or None, got {clip_grad_norm}")


def check_data(
    wrapper: nn.Module, train_loader: Iterable, val_loader: Iterable | None, checkpoint_dir: str | os.PathLike | None
) -> None:
    """Refuse a wrapper that is no ``ErrorCorrectionWrapper`` (``TypeError``), loaders whose
    datasets declare other classes, and a ``checkpoint_dir`` that is a file; record the train
    loader's ``Normalize`` as the wrapper's preprocessing."""
    if not hasattr(wrapper, "freeze_base") or not hasattr(wrapper, "unfreeze_base"):
        raise TypeError(f"wrapper: expected an ErrorCorrectionWrapper, got {type(wrapper).__name__}")
    check_loader_num_classes(train_loader, int(wrapper.num_classes), "train_loader")  # type: ignore[arg-type]
    _record_preprocessing(wrapper, train_loader)
    if val_loader is not None:
        check_loader_num_classes(val_loader, int(wrapper.num_classes), "val_loader")  # type: ignore[arg-type]
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise NotADirectoryError(
            f"checkpoint_dir: expected a directory (existing or not), got the file {checkpoint_dir}"
        )


def _normalizers(transform: object, depth: int = 0) -> list[tuple[list[float], list[float]]]:
    """``(mean, std)`` of every ``Normalize`` in a transform, by duck typing: any class named
    ``Normalize`` with per-channel ``mean`` and ``std`` (errwrap's, torchvision's v1 and v2,
    albumentations'), looking into the ``.transforms`` of a ``Compose`` (anyone's)."""
    if type(transform).__name__ == "Normalize" and hasattr(transform, "mean") and hasattr(transform, "std"):
        try:
            mean = [float(v) for v in transform.mean]
            std = [float(v) for v in transform.std]
        except TypeError:  # a scalar mean or std: not per-channel statistics to record
            return []
        return [(mean, std)] if len(mean) == len(std) else []
    chain = getattr(transform, "transforms", None)
    if chain is None and getattr(transform, "transform", None) is not None:  # torchvision's StandardTransform
        chain = [transform.transform]  # type: ignore[attr-defined]
    if depth > 4 or not isinstance(chain, list | tuple):
        return []
    return [found for t in chain for found in _normalizers(t, depth + 1)]


def _record_preprocessing(wrapper: nn.Module, loader: Iterable) -> None:
    """Set ``wrapper.preprocessing`` from the one ``Normalize`` in ``loader.dataset``'s transform
    (errwrap's, torchvision's or albumentations', directly or inside a ``Compose``) when the wrapper
    has none, so that a saved model says how its images were normalised and ``finetune``'s
    augmentation knows the pixel values; warn when the wrapper records other statistics."""
    dataset = getattr(loader, "dataset", None)
    transform = getattr(dataset, "transform", None)
    if transform is None:
        transform = getattr(dataset, "transforms", None)
    found = _normalizers(transform)
    if len(found) != 1 or not hasattr(wrapper, "preprocessing"):
        return
    seen = {"mean": found[0][0], "std": found[0][1]}
    if wrapper.preprocessing is None:
        wrapper.preprocessing = seen
        logger.info("finetune: recorded the loader's Normalize as wrapper.preprocessing %s", seen)
    elif {k: [float(v) for v in wrapper.preprocessing[k]] for k in ("mean", "std")} != seen:  # type: ignore[index]
        warnings.warn(
            f"finetune: the loader normalises with {seen}, but wrapper.preprocessing is {wrapper.preprocessing}; "
            "save_pretrained records the latter",
            UserWarning,
            stacklevel=4,  # finetune's caller
        )


def place(wrapper: nn.Module, device: str | torch.device | None, precision: str) -> torch.device:
    """The device to train on (``device``, default the wrapper's; CUDA with its index), the
    wrapper moved there when it is elsewhere (logged). fp16 needs CUDA (``ValueError``)."""
    current = module_device(wrapper)
    target = torch.device(device) if device is not None else current
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target != current:
        logger.info("finetune: moving the wrapper from %s to %s", current, target)
        wrapper.to(target)
    if precision == "fp16" and target.type != "cuda":
        raise ValueError(
            f"precision='fp16': expected a CUDA device (fp16 needs GradScaler on GPU), got {target}; use 'bf16' on CPU"
        )
    return target


def select_trained(wrapper: nn.Module, loss: nn.Module | None) -> tuple[nn.Module, bool, list[Tensor]]:
    """The loss (default ``ErrorCorrectionLoss()``), whether the base trains (``loss.w_base > 0``;
    the wrapper is unfrozen or frozen to match, logged) and the parameters to train."""
    loss_fn = loss if loss is not None else ErrorCorrectionLoss()
    base_trained = float(getattr(loss_fn, "w_base", 0.0)) > 0
    if base_trained and wrapper.base_frozen:
        logger.info("finetune: loss has w_base > 0; unfreezing the base for joint training")
        wrapper.unfreeze_base()  # type: ignore[operator]
    elif not base_trained and not wrapper.base_frozen:
        logger.info("finetune: loss has w_base = 0; freezing the base, training the heads only")
        wrapper.freeze_base()  # type: ignore[operator]
    params: list[Tensor] = [p for p in wrapper.parameters() if p.requires_grad]
    if not params:
        raise ValueError("wrapper: no parameter requires grad; nothing to train")
    return loss_fn, base_trained, params


def check_room(
    checkpoint_dir: str | os.PathLike | None, wrapper: nn.Module, base_trained: bool, params: list[Tensor]
) -> None:
    """On rank 0, refuse (``OSError``) a ``checkpoint_dir`` without room for one checkpoint
    (weights and AdamW moments) twice over."""
    if checkpoint_dir is not None and _distributed.rank() == 0:
        need = 2 * (tensor_bytes(checkpoint_weights(wrapper, base_trained).values()) + 2 * tensor_bytes(params))
        check_writable(checkpoint_dir, need, "checkpoint_dir")
