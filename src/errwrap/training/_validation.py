"""Validation during training: run ``val_fn`` (or ``errwrap.evaluation.evaluate``) without
changing the training run, and keep its result as JSON-safe values."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import evaluation

__all__ = ["run_validation", "validate"]

logger = logging.getLogger("errwrap.training")


ValFn = Callable[[nn.Module], dict]


def run_validation(wrapper: nn.Module, val_fn: ValFn | None, val_loader: Iterable | None) -> dict[str, Any]:
    """``val_fn(wrapper)``, by default ``evaluate(wrapper, val_loader).to_dict()``, under
    ``torch.no_grad()`` in eval mode, with the RNG states and the train/eval mode restored after."""
    if val_fn is None:

        def val_fn(model: nn.Module) -> dict:
            report = evaluation.evaluate(model, val_loader)  # type: ignore[arg-type]  # looked up at call time
            return report.to_dict() if hasattr(report, "to_dict") else dict(report)  # type: ignore[call-overload]

    was_training = wrapper.training
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    saved = (random.getstate(), np.random.get_state())
    wrapper.eval()
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            result = val_fn(wrapper)
    finally:
        wrapper.train(was_training)
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    if not isinstance(result, dict):
        raise TypeError(f"validation: expected a dict of metrics, got {type(result).__name__}")
    return result


def _to_json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def validate(wrapper: nn.Module, step: int, val_fn: ValFn | None, val_loader: Iterable | None) -> dict[str, Any]:
    """Validate at optimizer step ``step`` (logged) and return ``{"step": step, **metrics}``, JSON-safe."""
    result = run_validation(wrapper, val_fn, val_loader)
    entry = {"step": step, **_to_json_safe(result)}
    logger.info("validation at step %d: %s", step, result)
    return entry
