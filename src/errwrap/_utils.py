"""Small helpers shared by the modules that run a wrapper: where a module lives, running it in
eval mode without losing anyone's ``training`` flag, and the ``stacklevel`` of a warning that
points at the user's own line."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["module_device", "resolve_device", "eval_mode", "user_stacklevel"]


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU when it has none)."""
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def resolve_device(wrapper: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` (default: :func:`module_device` of ``wrapper``), refused with ``ValueError``
    when it is not where the wrapper's parameters are (the wrapper is never moved)."""
    wrapper_device = module_device(wrapper)
    chosen = torch.device(device) if device is not None else wrapper_device
    indexed = chosen.index is not None and wrapper_device.index is not None
    if chosen.type != wrapper_device.type or (indexed and chosen != wrapper_device):
        raise ValueError(
            f"device={chosen}, but the wrapper's parameters are on {wrapper_device}; "
            "move the wrapper first (wrapper.to(device))"
        )
    return chosen


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``module`` in eval mode; on leaving it (also on an error), every
    submodule gets back its own ``training`` flag (a frozen norm layer stays in eval)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode


_LIBRARY_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def user_stacklevel() -> int:
    """The ``stacklevel`` of a ``warnings.warn`` made by this function's caller that points at
    the first frame outside errwrap and torch: the user's own line (``wrap(x)``, or their call
    of ``errwrap.finetune``), whichever torch version's ``Module.__call__`` is in between."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level
