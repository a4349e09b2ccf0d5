"""Registers errwrap's built-in adapters (priority -10, so a user's registration wins).

The matchers look at the model's class and at ``sys.modules``; they never import SMP,
torchvision or transformers, so importing errwrap stays cheap and optional packages stay optional.
"""

from __future__ import annotations

from .registry import register_adapter
from .smp import SMPAdapter, is_smp_model
from .torchvision import TorchvisionSegmentationAdapter, is_torchvision_segmentation_model
from .transformers import TransformersAdapter, is_transformers_segmentation_model

__all__ = ["BUILTIN_PRIORITY", "register_builtin_adapters"]

BUILTIN_PRIORITY = -10


def register_builtin_adapters() -> None:
    """(Re-)register the SMP, torchvision and transformers adapters under their names."""
    register_adapter(SMPAdapter.name, is_smp_model, SMPAdapter, priority=BUILTIN_PRIORITY)
    register_adapter(TorchvisionSegmentationAdapter.name, is_torchvision_segmentation_model, TorchvisionSegmentationAdapter, priority=BUILTIN_PRIORITY)
    register_adapter(TransformersAdapter.name, is_transformers_segmentation_model, TransformersAdapter, priority=BUILTIN_PRIORITY)


register_builtin_adapters()
