"""The ``errwrap.DeepLabV3Plus`` family: errwrap's reference base, rebuilt from its spec.

The model describes itself (``DeepLabV3Plus.errwrap_spec()``) and speaks the native protocol, so
the family needs no adapter and no matcher: only the checked rebuild below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..models.deeplabv3plus import DeepLabV3Plus
from .registry import Family
from .specs import check_timm_name, spec_config

__all__ = ["build_errwrap_deeplab", "DEEPLAB_FAMILY", "DEEPLAB_KEYS"]

#: the constructor arguments a spec may set.
DEEPLAB_KEYS = frozenset(
    {
        "encoder_name", "num_classes", "in_channels", "output_stride", "atrous_rates", "aspp_channels",
        "decoder_channels", "low_level_channels", "dropout", "pretrained", "norm_layer", "act_layer",
    }
)  # fmt: skip


def build_errwrap_deeplab(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a :class:`~errwrap.models.DeepLabV3Plus` (``pretrained`` switched off) from its spec."""
    config = spec_config(spec)
    unknown = sorted(set(config) - DEEPLAB_KEYS)
    if unknown:
        raise ValueError(
            f"base spec errwrap.DeepLabV3Plus: unknown config keys {unknown}; "
            f"expected a subset of {sorted(DEEPLAB_KEYS)}"
        )
    check_timm_name(config.get("encoder_name", "resnet50"), "encoder_name", "errwrap.DeepLabV3Plus")
    config["pretrained"] = False
    return DeepLabV3Plus(**config)


DEEPLAB_FAMILY = Family("errwrap.DeepLabV3Plus", build_errwrap_deeplab)
