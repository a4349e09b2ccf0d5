"""Adapter for torchvision's segmentation models: DeepLabV3 and FCN (ResNet or MobileNetV3
backbones) and LRASPP.

The adapter runs what the model's ``forward`` runs and reads the same ``"out"`` logits,
upsampled to the input size as torchvision does (bilinear, ``align_corners=False``); it skips the
auxiliary classifier, whose output errwrap does not use.

Features:

- DeepLabV3 / FCN: ``"low"``, the backbone's stride-4 stage (``layer1`` of a ResNet, the last
  stride-4 block of a MobileNetV3); ``"backbone"``, the backbone's ``"out"`` feature (the
  classifier's input); ``"high"``, the classifier's last hidden feature (the input of its final
  1x1 convolution: the ASPP-and-3x3-conv output of DeepLabV3, the 3x3-conv output of FCN).
- LRASPP: ``"low"`` and ``"high"``, the two backbone features its head uses (strides 8 and 16).

Defaults: low-level ``"low"``, high-level ``"high"``. The adapter and the matcher import nothing
from torchvision; :func:`torchvision_spec` and :func:`build_torchvision` import its builders.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, BaseOutput
from .features import FeaturePair
from .registry import Family
from .specs import spec_config

__all__ = [
    "TorchvisionSegmentationAdapter",
    "is_torchvision_segmentation_model",
    "torchvision_spec",
    "build_torchvision",
    "TORCHVISION_BUILDERS",
    "TORCHVISION_FAMILY",
]

logger = logging.getLogger(__name__)

#: torchvision builders whose spec errwrap can rebuild, by the model class they return.
TORCHVISION_BUILDERS: dict[str, tuple[str, ...]] = {
    "DeepLabV3": ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"),
    "FCN": ("fcn_resnet50", "fcn_resnet101"),
    "LRASPP": ("lraspp_mobilenet_v3_large",),
}


def is_torchvision_segmentation_model(model: nn.Module) -> bool:
    """True for torchvision's DeepLabV3, FCN and LRASPP instances (without importing torchvision)."""
    simple = sys.modules.get("torchvision.models.segmentation._utils")
    lraspp = sys.modules.get("torchvision.models.segmentation.lraspp")
    return (simple is not None and isinstance(model, simple._SimpleSegmentationModel)) or (
        lraspp is not None and isinstance(model, lraspp.LRASPP)
    )


def _stride4_stage(backbone: nn.Module) -> str:
    """Name of the backbone's last stride-4 stage: ResNet ``layer1``, else the block before the
    second strided MobileNetV3 block, else the first stage."""
    names = list(dict(backbone.named_children()))
    if "layer1" in names:
        return "layer1"
    strided = [i for i, block in enumerate(backbone.children()) if getattr(block, "_is_cn", False)]
    if len(strided) >= 2:
        return names[strided[1] - 1]
    return names[0]


def _num_classes(model: Any) -> int | None:
    if type(model).__name__ == "LRASPP":
        return int(model.classifier.low_classifier.out_channels)
    last = model.classifier[-1] if isinstance(model.classifier, nn.Sequential) else None
    return int(last.out_channels) if isinstance(last, nn.Conv2d) else None


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


def torchvision_spec(model: nn.Module) -> dict[str, Any] | None:
    """``{"family": "torchvision", "config": {"name": builder, "num_classes": ..., "aux_loss": ...}}``
    when the model has exactly the architecture of one of :data:`TORCHVISION_BUILDERS`
    (checked against a copy built on the meta device), else ``None``."""
    from torchvision.models import segmentation

    cls = type(model).__name__
    num_classes = _num_classes(model)
    if cls not in TORCHVISION_BUILDERS or num_classes is None:
        return None
    aux = getattr(model, "aux_classifier", None) is not None
    for name in TORCHVISION_BUILDERS[cls]:
        config: dict[str, Any] = {"name": name, "num_classes": num_classes}
        if cls != "LRASPP":
            config["aux_loss"] = aux
        with torch.device("meta"):
            reference = getattr(segmentation, name)(weights=None, weights_backbone=None, **config)
        if type(reference) is type(model) and _same_architecture(reference, model):
            return {"family": "torchvision", "config": config}
    logger.info("torchvision model %s matches none of %s; no spec", cls, TORCHVISION_BUILDERS[cls])
    return None


def build_torchvision(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a torchvision segmentation model (no weights) with one of :data:`TORCHVISION_BUILDERS`."""
    from torchvision.models import segmentation

    config = spec_config(spec)
    name = config.pop("name", None)
    allowed = [n for names in TORCHVISION_BUILDERS.values() for n in names]
    if name not in allowed:
        raise ValueError(f"base spec torchvision: unknown name {name!r}; expected one of {allowed}")
    unknown = sorted(set(config) - {"num_classes", "aux_loss"})
    if unknown:
        raise ValueError(f"base spec torchvision: unknown config keys {unknown}; expected 'num_classes' and 'aux_loss'")
    return getattr(segmentation, name)(weights=None, weights_backbone=None, **config)


class TorchvisionSegmentationAdapter(Adapter):
    """Runs a torchvision segmentation model step by step to expose backbone and head features.

    Args:
        model: a ``torchvision.models.segmentation`` DeepLabV3, FCN or LRASPP.

    Shapes:
        input ``(B, 3, H, W)`` -> logits ``(B, num_classes, H, W)`` and features ``low``
        ``(B, C_l, H/4, W/4)`` (LRASPP: ``H/8``), ``backbone`` and ``high`` at the backbone's
        output stride.
    """

    name = "torchvision"
    default_features: FeaturePair = ("low", "high")

    def __init__(self, model: Any) -> None:
        self.lraspp = type(model).__name__ == "LRASPP" and hasattr(model.classifier, "low_classifier")
        backbone: Any = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.ModuleDict) or not hasattr(backbone, "return_layers"):
            raise TypeError(
                "TorchvisionSegmentationAdapter: expected the backbone to be torchvision's IntermediateLayerGetter, "
                "got "
                f"{type(backbone).__name__}; tap it with ErrorCorrectionWrapper(model, low_level=..., high_level=...)"
            )
        if not self.lraspp and not isinstance(model.classifier, nn.Sequential):
            raise TypeError(
                "TorchvisionSegmentationAdapter: expected an nn.Sequential classifier, got "
                f"{type(model.classifier).__name__}"
            )
        return_layers: Any = backbone.return_layers  # IntermediateLayerGetter's {module name: output name}
        self.return_layers: dict[str, str] = dict(return_layers)
        self.low_stage = None if self.lraspp else _stride4_stage(backbone)

    def _backbone(self, backbone: nn.ModuleDict, x: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        # IntermediateLayerGetter.forward, also keeping the stride-4 stage.
        out: dict[str, Tensor] = {}
        low = None
        for name, module in backbone.items():
            x = module(x)
            if name == self.low_stage:
                low = x
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out, low

    def forward(self, model: Any, x: Tensor) -> BaseOutput:
        return self.forward_with_coarse_logits(model, x)[0]

    def forward_with_coarse_logits(self, model: Any, x: Tensor) -> tuple[BaseOutput, Tensor | None]:
        """Also the classifier's logits before the model's upsampling to the input (stride 8 or 16)."""
        size = x.shape[-2:]
        features, low = self._backbone(model.backbone, x)
        if self.lraspp:
            coarse = model.classifier(features)
            logits = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
            return BaseOutput(logits, {"low": features["low"], "high": features["high"]}), coarse
        h = features["out"]
        high = h
        layers = list(model.classifier.children())
        for layer in layers[:-1]:
            h = layer(h)
            if not isinstance(layer, nn.modules.dropout._DropoutNd):
                high = h
        coarse = layers[-1](h)
        logits = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        return BaseOutput(logits, {"low": low, "backbone": features["out"], "high": high}), coarse  # type: ignore[dict-item]

    def spec(self, model: nn.Module) -> dict[str, Any] | None:
        """See :func:`torchvision_spec`."""
        return torchvision_spec(model)


TORCHVISION_FAMILY = Family("torchvision", build_torchvision, is_torchvision_segmentation_model, torchvision_spec)
