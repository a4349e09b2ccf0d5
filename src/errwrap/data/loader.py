"""``make_loader``: a ``DataLoader`` set up for :func:`errwrap.finetune` (seeded, distributed-aware)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from .._distributed import is_initialized

__all__ = ["make_loader"]

logger = logging.getLogger(__name__)



def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    distributed: bool | None = None,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """Build a ``DataLoader`` whose order is fixed by ``seed`` (and the epoch).

    Without distribution the sampler is a ``RandomSampler`` with its own ``torch.Generator``
    (seeded with ``seed``; :func:`~errwrap.training.finetune` re-seeds it with ``seed + epoch``
    at each epoch, which is what makes resumed runs see the same batches). With distribution
    it is a ``DistributedSampler(seed=seed)``, each rank reading its own share;
    :func:`~errwrap.training.finetune` calls its ``set_epoch``.

    Args:
        dataset: a map-style dataset.
        batch_size: images per batch (per process when distributed).
        shuffle: random order (training) or the dataset's order (evaluation).
        distributed: use a ``DistributedSampler``; ``None``: when ``torch.distributed`` is
            initialised.
        seed: the order's seed.
        num_workers, drop_last, pin_memory, kwargs: passed to ``DataLoader``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if distributed is None:
        distributed = is_initialized()
    if distributed:
        sampler: torch.utils.data.Sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    else:
        sampler = SequentialSampler(dataset)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)  # worker seeds
    logger.debug("make_loader: %s, batch %d, %d workers", type(sampler).__name__, batch_size, num_workers)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
        pin_memory=pin_memory, generator=generator, persistent_workers=False, **kwargs,
    )
