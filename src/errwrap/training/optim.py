"""What ``finetune`` builds before its first step: AdamW with its learning-rate schedule, and
the precision (autocast and ``GradScaler``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["PRECISIONS", "SCHEDULES", "build_optimizer", "build_precision", "lr_factor"]

SCHEDULES = ("poly", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")


def lr_factor(step: int, steps: int, warmup_steps: int = 0, schedule: str = "poly", power: float = 0.9) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up from
    ``1 / warmup_steps`` to 1, then ``(1 - t) ** power`` (poly) or ``(1 + cos(pi t)) / 2``
    (cosine) with ``t`` going from 0 to 1 over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    if schedule == "poly":
        return (1.0 - t) ** power
    return 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(
    params: list[Tensor], *, lr: float, weight_decay: float, steps: int, warmup_steps: int, schedule: str
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (no weight decay on biases and norm weights, the 0/1-d tensors) and
    its ``LambdaLR`` schedule of :func:`lr_factor`."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    # a lambda, not a callable object: LambdaLR.state_dict then leaves it out, as checkpoints always did
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup_steps, schedule))
    return optimizer, scheduler


def build_precision(precision: str, device: torch.device) -> tuple[torch.amp.GradScaler, Callable[[], Any]]:
    """The ``GradScaler`` (enabled for fp16 only) and a factory of the forward pass's autocast
    context (a null context for fp32) for training on ``device``."""
    scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=precision == "fp16")
    if precision == "fp32":
        return scaler, contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return scaler, lambda: torch.autocast(device.type, dtype=dtype)
