"""The base-network protocol: what an adapter returns, as a type both the adapters and the
models errwrap ships can import without importing each other."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["BaseOutput"]


class BaseOutput(NamedTuple):
    """What every adapter returns: logits ``(B, C, h0, w0)`` and named 4-d feature maps."""

    logits: Tensor
    features: dict[str, Tensor]
