"""Registers errwrap's built-in families and their adapters (priority -10, so a user's
registration wins).

The family modules declare their :class:`~errwrap.adapters.registry.Family` (matcher, spec and
rebuild functions) and their adapter; this module is the one place that wires them into the
registries, so the registries and :mod:`~errwrap.adapters.specs` never import a family module.
The matchers look at the model's class and at ``sys.modules``; they never import SMP,
torchvision or transformers, so importing errwrap stays cheap and optional packages stay optional.
"""

from __future__ import annotations

from .deeplab import DEEPLAB_FAMILY
from .registry import register_adapter, register_family
from .smp import SMP_FAMILY, SMPAdapter, is_smp_model
from .torchvision import TORCHVISION_FAMILY, TorchvisionSegmentationAdapter, is_torchvision_segmentation_model
from .transformers import TRANSFORMERS_FAMILY, TransformersAdapter, is_transformers_segmentation_model

__all__ = ["BUILTIN_PRIORITY", "BUILTIN_FAMILIES", "register_builtin_adapters"]

BUILTIN_PRIORITY = -10

#: the families :func:`~errwrap.adapters.specs.build_base` rebuilds out of the box, in the order
#: :func:`~errwrap.adapters.registry.family_spec` tries them.
BUILTIN_FAMILIES = (DEEPLAB_FAMILY, SMP_FAMILY, TORCHVISION_FAMILY, TRANSFORMERS_FAMILY)


def register_builtin_adapters() -> None:
    """(Re-)register the built-in families and the SMP, torchvision and transformers adapters under their names."""
    for family in BUILTIN_FAMILIES:
        register_family(family)
    register_adapter(SMPAdapter.name, is_smp_model, SMPAdapter, priority=BUILTIN_PRIORITY)
    register_adapter(
        TorchvisionSegmentationAdapter.name,
        is_torchvision_segmentation_model,
        TorchvisionSegmentationAdapter,
        priority=BUILTIN_PRIORITY,
    )
    register_adapter(
        TransformersAdapter.name, is_transformers_segmentation_model, TransformersAdapter, priority=BUILTIN_PRIORITY
    )


register_builtin_adapters()
