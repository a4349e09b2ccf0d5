"""The batch protocol: what errwrap reads from a loader, and how.

A labelled batch is ``(images, labels, ...)`` or a mapping with one key of :data:`IMAGE_KEYS`
and one of :data:`LABEL_KEYS` (:func:`split_batch`); an unlabelled batch is a tensor of images,
``(images, ...)`` or a mapping with an image key (:func:`images_of`). :func:`prepare_batch`
checks a labelled batch and moves it to the model; :func:`explain_batch_error` and
:func:`check_loader_num_classes` turn what a loader gets wrong into clear errors. Used by
``evaluate``, ``estimate``, ``calibrate_temperature``, ``write_report`` and ``finetune``; kept
out of :mod:`errwrap.data`, which is optional.

``split_batch`` and the key tables are defined in :mod:`errwrap._validate` (which this module
builds on) and re-exported here, so that this is the one place to import the protocol from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._validate import IMAGE_KEYS, LABEL_KEYS, check_finite, check_images, describe, prepare_labels, split_batch

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "split_batch",
    "unpack_batch",
    "prepare_batch",
    "images_of",
    "explain_batch_error",
    "check_loader_num_classes",
    "numbered_batches",
]

#: ``(images, labels)`` of a batch; the name :mod:`errwrap.evaluation` has always exported.
unpack_batch = split_batch


def prepare_batch(
    batch: Any,
    index: int,
    *,
    in_channels: int | None,
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Images and labels of batch ``index`` of a labelled loader, checked (errors name the batch),
    the images moved and cast to ``device`` and ``dtype`` and refused when not finite, the labels
    as :func:`~errwrap._validate.prepare_labels` makes them, on ``device``. Shared by
    ``evaluate``, ``estimate``, ``calibrate_temperature`` and ``write_report``.

    Shapes:
        -> images ``(B, in_channels, H, W)``, labels ``(B, H, W)`` int64.
    """
    images, labels = split_batch(batch, name=f"batch {index}")
    check_images(images, in_channels, name=f"images of batch {index}")
    images = images.to(device, dtype=dtype)
    check_finite(images, f"images of batch {index}")
    size, batch_size = tuple(images.shape[-2:]), images.shape[0]
    labels = prepare_labels(
        labels, num_classes, ignore_index, size=size, batch=batch_size, name=f"labels of batch {index}"
    )
    return images, labels.to(device)


def images_of(batch: Any, index: int, in_channels: int | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The images of an unlabelled batch: a tensor, a mapping with an image key, or an
    ``(images, ...)`` sequence whose other items (labels, names) are ignored; checked like
    :func:`prepare_batch` checks them.

    Shapes:
        -> ``(B, in_channels, H, W)``.
    """
    images = batch
    if isinstance(batch, Mapping):
        key = next((k for k in IMAGE_KEYS if k in batch), None)
        if key is None:
            raise ValueError(
                f"batch {index}: expected a mapping with an image key (one of {list(IMAGE_KEYS)}), "
                f"got keys {list(batch)[:8]}"
            )
        images = batch[key]
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 1:
        images = batch[0]
    if not isinstance(images, Tensor):
        raise TypeError(
            f"batch {index}: expected images, (images, labels) or a mapping with key 'image', got {describe(batch)}"
        )
    check_images(images, in_channels, name=f"images of batch {index}")
    images = images.to(device, dtype=dtype)
    check_finite(images, f"images of batch {index}")
    return images


def explain_batch_error(exc: BaseException, name: str) -> BaseException:
    """``exc`` itself, or a clearer ``RuntimeError`` when the default collate could not stack
    images (or labels) of different sizes into one batch."""
    if isinstance(exc, RuntimeError) and "stack expects each tensor to be equal size" in str(exc):
        return RuntimeError(
            f"{name}: its items have different sizes and cannot be stacked into one batch ({exc}); use batch_size=1 "
            "(errwrap CLI: --batch-size 1), resize or crop every item to one size (errwrap.data.Resize, RandomCrop), "
            "or give the DataLoader a collate_fn that pads"
        )
    return exc


def check_loader_num_classes(loader: Any, num_classes: int, name: str) -> None:
    """Refuse a loader whose dataset declares a number of classes other than the model's
    (labels would name the wrong classes: e.g. ADE20K's 150 against a 151-output model)."""
    declared = getattr(getattr(loader, "dataset", None), "num_classes", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared != num_classes:
        raise ValueError(
            f"{name}: its dataset has num_classes={declared}, but the model predicts {num_classes} classes, "
            "so labels and "
            "predictions would name different classes; use data labelled for this model's classes (for ADE20K and a "
            "151-output model: ADE20K(..., reduce_zero_label=False)), or set dataset.num_classes = None if the labels "
            "already use the model's class indices"
        )


def numbered_batches(loader: Iterable[Any], max_batches: int | None, name: str = "loader") -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` for at most ``max_batches`` batches of ``loader``; a ``RuntimeError``
    raised while fetching a batch (a worker's failure) comes out explained by
    :func:`explain_batch_error`."""
    batches = iter(loader)
    index = 0
    while max_batches is None or index < max_batches:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            raise explain_batch_error(exc, name) from exc
        yield index, batch
        index += 1

