"""The one place where errwrap checks what enters its public API.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
size or value) with a message that names what was expected and what was received. Checks are
skipped while ``torch.compile``, ``torch.export``, ``torch.jit.trace`` or FX trace the code, so the
hot path stays graph-friendly; checks that read tensor values (and so synchronise with the device)
are kept out of ``forward`` and run only on labels and configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx import _symbolic_trace

__all__ = [
    "is_tracing",
    "check_images",
    "check_labels",
    "prepare_labels",
    "split_batch",
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "check_logits",
    "check_finite",
    "check_outputs_finite",
    "explain_device_mismatch",
    "check_base_batch",
    "check_norm_batch",
    "describe",
    "input_dtype",
    "check_positive_int",
]


def is_tracing() -> bool:
    """True while the code is being compiled, exported or traced (checks are skipped then)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    fx_check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
    return bool(fx_check())


def describe(obj: Any) -> str:
    """A short description of ``obj`` for error messages: shape and dtype for tensors."""
    if isinstance(obj, Tensor):
        return f"Tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    if isinstance(obj, Mapping):
        return f"{type(obj).__name__} with keys {list(obj.keys())[:8]}"
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        inner = ", ".join(describe(o) if isinstance(o, Tensor) else type(o).__name__ for o in obj[:4])
        more = ", ..." if len(obj) > 4 else ""
        return f"{type(obj).__name__} of length {len(obj)} ({inner}{more})"
    return type(obj).__name__


def input_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype images are cast to before ``module`` runs: that of its first floating-point
    parameter (``float32`` when it has none). Under autocast the cast is harmless."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_images(x: Any, in_channels: int | None = None, name: str = "images") -> None:
    """Check that ``x`` is a floating-point ``B x C x H x W`` tensor with ``in_channels`` channels."""
    if is_tracing():
        return
    expected = f"a floating-point tensor of shape Bx{in_channels or 'C'}xHxW"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected {expected}, got {describe(x)}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected {expected}, got {x.ndim}-d shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected {expected}, got dtype {x.dtype}; convert integer images with "
            "x.float() / 255 and normalise them as the base network expects"
        )
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(
            f"{name}: expected {in_channels} channels (Bx{in_channels}xHxW), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")


def check_logits(logits: Any, num_classes: int | None = None, name: str = "logits") -> None:
    """Check that ``logits`` is a floating-point ``B x C x H x W`` tensor with ``num_classes`` channels."""
    if is_tracing():
        return
    expected = f"a floating-point tensor of shape Bx{num_classes or 'C'}xHxW"
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name}: expected {expected}, got {describe(logits)}")
    if logits.ndim != 4 or not logits.is_floating_point():
        raise ValueError(f"{name}: expected {expected}, got {describe(logits)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"{name}: expected {num_classes} channels (num_classes={num_classes}), "
            f"got shape {tuple(logits.shape)}"
        )


def _label_dtype_hint(labels: Tensor) -> str:
    """What to do with labels of a non-integer dtype (reads values: only on the error path)."""
    if labels.dtype == torch.bool:
        return "class indices must be integers (use labels.long() for a binary mask)"
    if labels.is_complex() or labels.numel() == 0:
        return "class indices must be integers (use labels.long())"
    values = labels.detach().float()
    finite = values[torch.isfinite(values)]
    if finite.numel() and bool((finite != finite.round()).any()):
        if float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0:
            return (
                "the values are fractions in [0, 1], as when a mask is scaled like an image (torchvision's "
                "ToTensor divides by 255); load masks without scaling, e.g. torch.as_tensor(np.array(mask))"
            )
        return "the values are not whole numbers; labels are class indices, not probabilities or one-hot scores"
    return "class indices must be integers (use labels.long())"


def check_labels(
    labels: Any,
    num_classes: int,
    ignore_index: int,
    size: tuple[int, int] | None = None,
    batch: int | None = None,
    name: str = "labels",
) -> None:
    """Check that ``labels`` is an integer ``B x H x W`` map with values in ``[0, num_classes)``
    or equal to ``ignore_index``; ``size`` and ``batch`` pin ``(H, W)`` and ``B`` when given.
    Any integer dtype passes (``int64``, ``int32``, ``uint8``, ...); ``bool`` and floating point
    do not. :func:`prepare_labels` also accepts ``B x 1 x H x W`` and returns ``int64``.

    This check reads the label values, so it synchronises with the label's device.
    """
    if is_tracing():
        return
    expected = "an integer tensor of class indices of shape BxHxW"
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected {expected}, got {describe(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected {expected}, got dtype {labels.dtype}; {_label_dtype_hint(labels)}")
    if labels.ndim != 3:
        hint = ""
        if labels.ndim == 4 and labels.shape[1] == num_classes and num_classes > 1:
            hint = f" (one-hot targets with {num_classes} channels? pass class indices: labels.argmax(1))"
        elif labels.ndim == 4 and labels.shape[1] == 1:
            hint = " (drop the channel dimension with labels[:, 0])"
        elif labels.ndim == 2:
            hint = " (a single HxW mask? add the batch dimension with labels[None])"
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(labels.shape)}{hint}")
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(f"{name}: expected batch size {batch}, got shape {tuple(labels.shape)}")
    if size is not None and tuple(labels.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{name}: expected spatial size {tuple(size)} (the images' HxW), got "
            f"{tuple(labels.shape[-2:])}; resize labels with nearest-neighbour interpolation"
        )
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:8].tolist()
        raise ValueError(
            f"{name}: expected values in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got {values}"
        )


def prepare_labels(
    labels: Any,
    num_classes: int,
    ignore_index: int,
    size: tuple[int, int] | None = None,
    batch: int | None = None,
    name: str = "labels",
    validate: bool = True,
) -> Tensor:
    """Labels as the losses and metrics use them: ``B x H x W`` ``int64``.

    Accepts ``B x H x W`` or ``B x 1 x H x W`` maps of any integer dtype and checks them with
    :func:`check_labels` (when ``validate``); ``int64`` labels of shape ``B x H x W`` are
    returned as they are (no copy).

    Shapes:
        labels ``(B, H, W)`` or ``(B, 1, H, W)`` -> ``(B, H, W)`` int64.
    """
    if isinstance(labels, Tensor) and labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if validate:
        check_labels(labels, num_classes, ignore_index, size=size, batch=batch, name=name)
    return labels if labels.dtype == torch.long else labels.long()


# The batch protocol is errwrap._batch; split_batch and its keys stay here, where errwrap.training
# imports them, and _batch re-exports them.
#: Keys that :func:`split_batch` reads images and labels from, in order of preference.
IMAGE_KEYS: tuple[str, ...] = ("image", "images", "pixel_values", "img")
LABEL_KEYS: tuple[str, ...] = ("label", "labels", "mask", "masks", "target", "targets")


def split_batch(batch: Any, name: str = "batch") -> tuple[Any, Any]:
    """``(images, labels)`` from a batch: a ``(images, labels, ...)`` tuple or list (extra items,
    such as file names, are ignored) or a mapping with one key of :data:`IMAGE_KEYS` and one of
    :data:`LABEL_KEYS` (``{"image", "mask"}``, ``{"pixel_values", "labels"}``, ...)."""
    if isinstance(batch, Mapping):
        image_key = next((k for k in IMAGE_KEYS if k in batch), None)
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        if image_key is None or label_key is None:
            raise ValueError(
                f"{name}: expected a mapping with keys 'image' and 'label' (images: one of {list(IMAGE_KEYS)}; "
                f"labels: one of {list(LABEL_KEYS)}), got keys {list(batch)[:8]}"
            )
        return batch[image_key], batch[label_key]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"{name}: expected (images, labels) or a mapping with keys 'image' and 'label', got {describe(batch)}"
    )


def check_positive_int(value: Any, name: str, *, or_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a ``bool``) ``>= 1``, or ``None``
    when ``or_none``: ``"{name}: expected a positive int[ or None], got {value!r}"``."""
    if or_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if or_none else ''}, got {value!r}")


def check_finite(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` when ``t`` holds NaN or Inf (reads values: synchronises)."""
    if is_tracing():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: expected finite values, got {int(bad.sum())} NaN/Inf entries of {t.numel()}; "
            "check the images (NaN/Inf pixels) and the base network"
        )


def check_outputs_finite(out: Any, name: str) -> None:
    """Raise ``ValueError`` when the wrapper's outputs (``base_logits``, ``logits``,
    ``error_prob``, or ``out`` itself when it is a tensor of logits) hold NaN or Inf, naming how
    many pixels and which images of the batch (reads values: synchronises). Used by
    ``evaluate``, ``calibrate_temperature`` and the CLI.

    Shapes:
        out fields ``(B, C, H, W)`` or ``(B, H, W)``.
    """
    if is_tracing():
        return
    fields, pixels, images = [], 0, set()
    found = (
        {"logits": out}
        if isinstance(out, Tensor)
        else {f: getattr(out, f, None) for f in ("base_logits", "logits", "error_prob")}
    )
    for field, t in found.items():
        if not isinstance(t, Tensor) or t.ndim < 3:
            continue
        bad = ~torch.isfinite(t)
        bad = bad.flatten(2).any(1) if t.ndim == 4 else bad.flatten(1)  # (B, pixels)
        if bool(bad.any()):
            fields.append(field)
            pixels = max(pixels, int(bad.sum()))
            images.update(bad.any(1).nonzero().flatten().tolist())
    if fields:
        raise ValueError(
            f"{name}: the model's outputs hold NaN/Inf ({', '.join(fields)}) at {pixels} pixels of images "
            f"{sorted(images)} (0-based in the batch); the base network or the heads give non-finite values: "
            "check the weights, the temperature and the preprocessing (mean/std)"
        )


def explain_device_mismatch(exc: BaseException, model: torch.nn.Module, x: Tensor, name: str = "images") -> None:
    """After ``model(x)`` raised ``exc``: when ``x`` is on another device than every parameter of
    ``model``, raise a ``RuntimeError`` that says so (chained to ``exc``); else return. Called
    only on failure, so the forward pass pays nothing."""
    if not isinstance(x, Tensor):
        return
    devices = {p.device for p in model.parameters()}
    if devices and x.device not in devices:
        shown = ", ".join(sorted(str(d) for d in devices))
        raise RuntimeError(
            f"{name} are on {x.device}, the model's parameters on {shown}: move the images with "
            f"x.to({shown.split(', ')[0]!r}) "
            "or the model with wrapper.to(device)"
        ) from exc


def check_base_batch(out: Any, x: Tensor) -> None:
    """Raise ``ValueError`` when the base's logits or features (a ``BaseOutput``) do not have one
    entry per image of ``x`` (shape-only check, skipped while tracing)."""
    if is_tracing() or not isinstance(x, Tensor) or x.ndim == 0:
        return
    found = {
        "logits": getattr(out, "logits", None),
        **{f"feature {k!r}": v for k, v in (getattr(out, "features", None) or {}).items()},
    }
    wrong = {
        k: int(v.shape[0])
        for k, v in found.items()
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] != x.shape[0]
    }
    if wrong:
        shown = ", ".join(f"{k} batch {b}" for k, b in wrong.items())
        raise ValueError(
            f"base output: {shown} for a batch of {x.shape[0]} images; expected the base network to return one output "
            "per image"
        )


def check_norm_batch(module: torch.nn.Module, feature: Tensor, name: str) -> None:
    """BatchNorm in training mode needs more than one value per channel: refuse a batch whose
    ``B * h * w == 1`` with a message that says what to do (shape-only check)."""
    if is_tracing() or not module.training:
        return
    if feature.shape[0] * feature.shape[-2] * feature.shape[-1] == 1 and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()
    ):
        raise ValueError(
            f"{name}: a BatchNorm head in training mode got a single value per channel (feature shape "
            f"{tuple(feature.shape)}); use a larger batch or image, or build the wrapper with norm_layer='groupnorm'"
        )
