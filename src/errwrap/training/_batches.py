"""Batches for the training loop: the loader cycled over epochs in a repeatable order, one batch
unpacked and moved to the device, and the RNG states a checkpoint saves and a resume restores."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._batch import explain_batch_error
from .._validate import check_images, split_batch

__all__ = ["Batches", "rng_state", "seed_everything", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """This process's torch, Python and numpy RNG states (and CUDA's when it is initialised), as
    tensors and plain containers that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, ``random`` and numpy with ``seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class Batches:
    """Cycles over a loader forever; epoch ``e`` starts by seeding torch (and the sampler's and
    loader's own generators) with ``seed + e`` and calling ``sampler.set_epoch(e)``, so its
    order depends on ``(seed, e)`` only and a resumed run can rebuild it and skip ahead.

    Attributes:
        epoch: the current epoch (0-based).
        position: the batches of this epoch already drawn.
    """

    def __init__(self, loader: Iterable, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.loader, self.seed = loader, seed
        self.epoch, self.position = epoch, position
        self._it: Iterator | None = None

    def _samplers(self) -> list[Any]:
        found = [getattr(self.loader, "sampler", None)]
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        found.append(getattr(batch_sampler, "sampler", None))
        return [s for s in found if s is not None]

    def _start_epoch(self) -> Iterator:
        torch.manual_seed(self.seed + self.epoch)
        for sampler in self._samplers():
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            if isinstance(getattr(sampler, "generator", None), torch.Generator):
                sampler.generator.manual_seed(self.seed + self.epoch)
        if isinstance(getattr(self.loader, "generator", None), torch.Generator):
            self.loader.generator.manual_seed(self.seed + self.epoch)  # type: ignore[attr-defined]
        self._it = iter(self.loader)
        return self._it

    def skip_to_position(self) -> None:
        """Rebuild the current epoch's iterator and consume the batches already used."""
        it = self._start_epoch()
        for used in range(self.position):
            try:
                next(it)
            except StopIteration:
                raise ValueError(
                    f"resume: the checkpoint stopped after batch {self.position} of epoch {self.epoch}, but "
                    f"train_loader now yields only {used} batches per epoch; resume with the same data, batch size "
                    "and drop_last"
                ) from None

    def __next__(self) -> Any:
        it = self._it if self._it is not None else self._start_epoch()
        try:
            batch = next(it)
        except StopIteration:
            if self.position == 0:
                raise ValueError("train_loader yielded no batches; expected at least one per epoch") from None
            self.epoch, self.position = self.epoch + 1, 0
            try:
                batch = next(self._start_epoch())
            except StopIteration:
                raise ValueError("train_loader yielded no batches; expected at least one per epoch") from None
        self.position += 1
        return batch

    def next_on(self, device: torch.device, dtype: torch.dtype, in_channels: int | None) -> tuple[Tensor, Any]:
        """The next batch as ``(images, labels)``: checked, images on ``device`` in ``dtype``,
        tensor labels on ``device``. A collate error of items of different sizes is explained."""
        try:
            batch = next(self)
        except RuntimeError as exc:
            raise explain_batch_error(exc, "train_loader") from exc
        images, labels = split_batch(batch, name="train_loader batch")
        check_images(images, in_channels, name="train_loader images")
        images = images.to(device, dtype=dtype, non_blocking=True)
        if isinstance(labels, Tensor):
            labels = labels.to(device, non_blocking=True)
        return images, labels
