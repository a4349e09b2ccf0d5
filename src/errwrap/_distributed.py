"""The few ``torch.distributed`` calls errwrap makes, each a no-op (or the one-process answer)
when ``torch.distributed`` is not initialised.

Training, evaluation, estimation, the streaming metrics and :func:`errwrap.data.make_loader`
all ask the same questions (is a process group running, which rank am I, how many are we) and
sum or gather the same way; they ask here. Under the NCCL backend tensors travel through the
current CUDA device and are copied back to where they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_sum",
    "barrier",
    "communication_device",
    "gather_objects",
    "is_initialized",
    "rank",
    "rank_and_world",
    "sum_over_processes",
    "world_size",
]


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is running (``torchrun``, ``init_process_group``)."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group when ``None``); 0 without distribution."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (the default group when ``None``); 1 without distribution."""
    return dist.get_world_size(group) if is_initialized() else 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group; ``(0, 1)`` without distribution."""
    return rank(), world_size()


def communication_device(device: torch.device | str, group: Any = None) -> torch.device:
    """Where a tensor of ``device`` is reduced: the current CUDA device under NCCL, else ``device`` itself."""
    if is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over every process of ``group``, in place, and return it.

    The tensor keeps its device (it is copied to the :func:`communication_device` and back when
    they differ); without distribution it is returned unchanged.
    """
    if not is_initialized():
        return tensor
    buffer = tensor.to(communication_device(tensor.device, group))
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def sum_over_processes(values: Sequence[float]) -> list[float]:
    """``values`` summed element-wise over every process, in float64; ``list(values)`` without distribution."""
    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64)).tolist()


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process of ``group`` (picklable objects;
    ``all_gather_object``); ``[obj]`` without distribution."""
    size = world_size(group)
    if size == 1:
        return [obj]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def barrier(group: Any = None) -> None:
    """Wait for every process of ``group``; returns at once without distribution."""
    if is_initialized():
        dist.barrier(group=group)
