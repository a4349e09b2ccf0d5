"""Find the two features of a network that returns only logits, by watching one forward pass.

``ErrorCorrectionWrapper(model)`` uses this when ``model`` has no family adapter and returns
logits alone (a tensor, a mapping with ``"out"`` or ``"logits"``, a transformers output), or when
a transformers model's hidden states are not feature maps (ViT-style tokens). It hooks every
submodule for one probe pass and picks two module outputs, which the hooks adapter then taps:

* the classifier: of the leaf modules with parameters whose output has ``C`` channels, the one
  whose output (resized, and centred over classes) is closest to the returned logits, so an
  auxiliary head that runs after the main one is not taken for it;
* high-level: the last 4-d output produced before the classifier, i.e. the classifier's input;
* low-level: the end of the first stage at the finest stride >= 4 (the shallowest module, last
  to run, in the first run of modules at that stride), the paper's "early layer" feature;
  stride 2 or 1 when the network never reaches stride 4.

Only modules that run exactly once per forward pass qualify (a shared ``ReLU`` does not), and
globally pooled ``1 x 1`` maps do not count. The choice is logged; pass ``low_level=`` /
``high_level=`` module names to choose others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import NoFeaturesError
from .hooks import _first_tensor, logits_from_output

__all__ = ["NoFeaturesError", "ModuleOutput", "record_module_outputs", "choose_feature_modules"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleOutput:
    """What one submodule produced in the probe pass: its 4-d output's shape, the order in which
    it finished (hooks fire when a module returns), how often it ran, and whether it is a leaf."""

    name: str
    order: int
    calls: int
    shape: tuple[int, ...] | None
    leaf: bool
    has_params: bool
    value: Tensor | None = None

    @property
    def depth(self) -> int:
        return self.name.count(".")


def record_module_outputs(model: nn.Module, x: Tensor) -> tuple[Any, list[ModuleOutput]]:
    """Run ``model(x)`` once with a forward hook on every submodule; return the output and what
    each submodule produced (its last 4-d output), in the order they finished. Hooks are removed
    before returning."""
    seen: dict[str, dict[str, Any]] = {}
    counter = [0]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = _first_tensor(output)
            entry = seen.setdefault(name, {"calls": 0})
            entry["calls"] += 1
            entry["order"] = counter[0]
            counter[0] += 1
            ok = isinstance(value, Tensor) and value.ndim == 4 and value.is_floating_point()
            entry["shape"] = tuple(value.shape) if ok else None
            entry["value"] = value if ok else None

        return hook

    handles = []
    kinds: dict[str, tuple[bool, bool]] = {}
    try:
        for name, module in model.named_modules():
            if name:
                kinds[name] = (
                    next(iter(module.children()), None) is None,
                    next(iter(module.parameters()), None) is not None,
                )
                handles.append(module.register_forward_hook(make_hook(name)))
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    records = [
        ModuleOutput(n, e["order"], e["calls"], e["shape"], *kinds[n], value=e["value"]) for n, e in seen.items()
    ]
    return out, sorted(records, key=lambda r: r.order)


def _centred(z: Tensor) -> Tensor:
    z = z.float()
    return z - z.mean(dim=1, keepdim=True)


def _distance(output: Tensor, logits: Tensor) -> float:
    """How far a module's C-channel output is from the returned logits, up to resizing and a
    per-pixel shift (``log_softmax``), relative to the logits' spread."""
    if output.shape[-2:] != logits.shape[-2:]:
        output = F.interpolate(output.float(), size=logits.shape[-2:], mode="bilinear", align_corners=False)
    target = _centred(logits)
    return float((_centred(output) - target).abs().mean() / target.abs().mean().clamp_min(1e-12))


def _square_stride(shape: tuple[int, ...], size: tuple[int, int]) -> bool:
    """The map is the input downsampled by the same factor in height and width (up to rounding)."""
    return abs(size[0] / shape[-2] - size[1] / shape[-1]) <= 0.5 * max(
        1.0, min(size[0] / shape[-2], size[1] / shape[-1])
    )


def _stride(shape: tuple[int, ...], size: tuple[int, int]) -> int:
    return max(1, round(max(size[0] / shape[-2], size[1] / shape[-1])))


def choose_feature_modules(
    model: nn.Module,
    x: Tensor,
    logits_fn: Callable[[Any], Tensor] = logits_from_output,
) -> tuple[str, str]:
    """Names of the modules whose outputs feed the detail head (low-level) and the error head
    (high-level), chosen from one forward pass of ``model`` on ``x`` (see the module docstring).

    Raises:
        NoFeaturesError: no submodule produces a usable 4-d feature map.
    """
    with torch.no_grad():
        out, records = record_module_outputs(model, x)
    logits = logits_fn(out)
    num_classes, size = int(logits.shape[1]), (int(x.shape[-2]), int(x.shape[-1]))
    pooled = x.shape[-2] * x.shape[-1] > 1  # globally pooled maps (squeeze-excitation, image pooling) are no features
    maps = [
        r for r in records
        if r.shape is not None and r.shape[0] == x.shape[0] and r.calls == 1
        and not (pooled and r.shape[-2] * r.shape[-1] == 1)
        and _square_stride(r.shape, size)  # channels-last (B, H, W, C) tensors are no BxCxhxw maps
    ]  # fmt: skip
    heads = [r for r in maps if r.leaf and r.has_params and r.shape[1] == num_classes]  # type: ignore[index]
    classifier = min(heads, key=lambda r: _distance(r.value, logits)) if heads else None  # type: ignore[arg-type]
    before = [r for r in maps if classifier is None or r.order < classifier.order]
    # The input itself, passed through (normalisation layers at the input), is no feature.
    before = [r for r in before if not (r.shape[1] == x.shape[1] and _stride(r.shape, size) == 1)]  # type: ignore[index, arg-type]
    if classifier is None:  # logits made without a conv classifier: drop the C-channel tail
        while before and before[-1].shape[1] == num_classes:  # type: ignore[index]
            before.pop()
    if not before:
        hint = (
            "its submodules produce no 4-d feature maps"
            if not maps
            else "no 4-d feature map is produced before its classifier"
        )
        raise NoFeaturesError(
            f"{type(model).__name__}: errwrap could not find features to tap ({hint}); pass module names: "
            "ErrorCorrectionWrapper(model, low_level='<early module>', high_level='<module before the classifier>')"
        )
    high = before[-1]
    strides = {r.name: _stride(r.shape, size) for r in before}  # type: ignore[arg-type]
    available = sorted(set(strides.values()))
    target = next((s for s in available if s >= 4), None) or next((s for s in available if s >= 2), available[0])
    stage = []  # the first run of modules at the target stride, the high-level module excluded
    for r in before[:-1]:
        if strides[r.name] == target:
            stage.append(r)
        elif stage and strides[r.name] > target:
            break
    stage = stage or [high]
    shallowest = min(r.depth for r in stage)
    low = [r for r in stage if r.depth == shallowest][-1]
    logger.info(
        "%s gives logits but no feature maps errwrap can use: tapping low_level=%r (%d channels, stride %d) and "
        "high_level=%r (%d channels, stride %d); "
        "pass low_level= / high_level= module names to choose others",
        type(model).__name__, low.name, low.shape[1], strides[low.name], high.name, high.shape[1], strides[high.name],  # type: ignore[index]
    )
    return low.name, high.name
