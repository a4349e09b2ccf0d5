"""Adapter for Hugging Face transformers segmentation models: ``*ForSemanticSegmentation`` and
the query-based Mask2Former / MaskFormer.

``*ForSemanticSegmentation``: the adapter calls ``model(pixel_values=x, output_hidden_states=True)``
and reads ``.logits`` unchanged (SegFormer's are at 1/4 of the input resolution; the wrapper
resizes them). Features: ``"hidden0"`` ... (the encoder/backbone hidden states that are 4-d maps)
and, for the classes in :data:`DECODE_TAPS`, ``"decode_head"``: the decode head's fused feature
read by a forward hook (SegFormer: after ``linear_fuse``, batch norm and ReLU, before dropout and
the classifier; UperNet: the output of ``fpn_bottleneck``; MobileViT(V2): the ASPP output).
Defaults: low-level = the stride-4 hidden state, high-level = ``"decode_head"`` (else the last
hidden state). Classes whose hidden states are tokens (DPT, BEiT, Data2VecVision) raise
:class:`~errwrap.adapters.NoFeaturesError`, and the wrapper then taps two modules itself.

Mask2Former and MaskFormer (:data:`QUERY_CLASSES`) predict ``Q`` class/mask query pairs, not
per-pixel logits. The adapter turns them into semantic logits as their image processors'
``post_process_semantic_segmentation`` does, at the masks' resolution (1/4 of the input),
and takes the log: ``log(sum_q softmax(class_q)[:-1] * sigmoid(mask_q))`` (see
:func:`semantic_logits_from_queries`; ``argmax`` is the processor's label map before resizing).
Features: ``"encoder0"`` ... (the backbone stages) and ``"pixel_decoder"`` (the per-pixel
embedding the masks are made from). Defaults: low-level ``"encoder0"`` (stride 4), high-level
``"pixel_decoder"``. OneFormer needs tokenised text task inputs and is refused with a message.

This module imports nothing from transformers until a model is rebuilt from its spec.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import is_tracing
from .base import PROTOCOL_HELP, Adapter, BaseOutput, NoFeaturesError
from .features import FeatureInfo, FeaturePair
from .hooks import FeatureTap
from .registry import Family
from .specs import check_timm_name, spec_config

__all__ = [
    "TransformersAdapter",
    "is_transformers_segmentation_model",
    "semantic_logits_from_queries",
    "transformers_spec",
    "build_transformers",
    "TRANSFORMERS_FAMILY",
    "DECODE_TAPS",
    "QUERY_CLASSES",
    "TRANSFORMERS_CLASSES",
]

logger = logging.getLogger(__name__)

#: module whose output is the decode head's fused feature (the classifier's input, up to dropout).
DECODE_TAPS: dict[str, str] = {
    "SegformerForSemanticSegmentation": "decode_head.activation",
    "UperNetForSemanticSegmentation": "decode_head.fpn_bottleneck",
    "MobileViTForSemanticSegmentation": "segmentation_head.aspp",
    "MobileViTV2ForSemanticSegmentation": "segmentation_head.aspp",
}

#: query-based universal-segmentation classes whose outputs become semantic logits.
QUERY_CLASSES = ("Mask2FormerForUniversalSegmentation", "MaskFormerForInstanceSegmentation")

#: classes (and their config classes) whose spec errwrap can rebuild.
TRANSFORMERS_CLASSES: dict[str, str] = {
    "SegformerForSemanticSegmentation": "SegformerConfig",
    "UperNetForSemanticSegmentation": "UperNetConfig",
    "MobileViTForSemanticSegmentation": "MobileViTConfig",
    "MobileViTV2ForSemanticSegmentation": "MobileViTV2Config",
    "DPTForSemanticSegmentation": "DPTConfig",
    "BeitForSemanticSegmentation": "BeitConfig",
    "Data2VecVisionForSemanticSegmentation": "Data2VecVisionConfig",
    "Mask2FormerForUniversalSegmentation": "Mask2FormerConfig",
    "MaskFormerForInstanceSegmentation": "MaskFormerConfig",
}

_ONEFORMER = "OneFormerForUniversalSegmentation"


def is_transformers_segmentation_model(model: nn.Module) -> bool:
    """True for transformers ``PreTrainedModel`` s whose class name ends in
    ``ForSemanticSegmentation``, and for Mask2Former, MaskFormer and OneFormer (without
    importing transformers)."""
    utils = sys.modules.get("transformers.modeling_utils")
    name = type(model).__name__
    return (
        utils is not None
        and isinstance(model, utils.PreTrainedModel)
        and (name.endswith("ForSemanticSegmentation") or name in QUERY_CLASSES or name == _ONEFORMER)
    )


def semantic_logits_from_queries(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-pixel semantic logits from ``Q`` class/mask query pairs: the log of
    ``sum_q softmax(class_logits_q)[:-1] * sigmoid(mask_logits_q)``, the score map of
    Mask2Former's ``post_process_semantic_segmentation`` (the last class is "no object").
    Its softmax over classes is that score map normalised per pixel. Computed in float32,
    returned in the masks' dtype.

    Shapes:
        class_logits ``(B, Q, C + 1)``, mask_logits ``(B, Q, h, w)`` -> ``(B, C, h, w)``.
    """
    classes = class_logits.float().softmax(dim=-1)[..., :-1]
    masks = mask_logits.float().sigmoid()
    scores = torch.einsum("bqc,bqhw->bchw", classes, masks)
    return scores.clamp_min(torch.finfo(torch.float32).tiny).log().to(mask_logits.dtype)


def transformers_spec(model: Any) -> dict[str, Any] | None:
    """``{"family": "transformers", "class": ..., "config": model.config.to_dict()}`` for the
    classes in :data:`TRANSFORMERS_CLASSES`, else ``None``."""
    cls = type(model).__name__
    if cls not in TRANSFORMERS_CLASSES or not hasattr(model, "config"):
        return None
    config = model.config.to_dict()
    try:
        json.dumps(config)
    except (TypeError, ValueError):
        logger.info("%s: its config is not JSON data; no spec", cls)
        return None
    return {"family": "transformers", "class": cls, "config": config}


def _check_backbones(values: dict[str, Any], cls: str) -> None:
    """A transformers config names its backbone either by a nested ``backbone_config`` (data,
    fine) or by ``backbone``: a timm name (checked) or a Hub name, which transformers would fetch
    with ``AutoConfig.from_pretrained`` (refused). At every level ``use_pretrained_backbone`` is
    switched off, so no weights are downloaded."""
    family = f"transformers {cls}"
    timm_backbone = bool(values.get("use_timm_backbone", False)) or values.get("model_type") == "timm_backbone"
    backbone = values.get("backbone")
    if backbone is not None:
        if not timm_backbone:
            raise ValueError(
                f"base spec {family}: backbone {backbone!r} names a transformers backbone by Hub name, which would be "
                "fetched from the Hub; expected backbone null and a 'backbone_config' object (or a timm backbone)"
            )
        check_timm_name(backbone, "backbone", family)
    if "use_pretrained_backbone" in values:
        values["use_pretrained_backbone"] = False  # never download
    nested = values.get("backbone_config")
    if isinstance(nested, dict):
        _check_backbones(nested, cls)


def build_transformers(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild one of :data:`TRANSFORMERS_CLASSES` (random weights, no pretrained backbone) from its spec."""
    import transformers

    cls = spec.get("class")
    if cls not in TRANSFORMERS_CLASSES:
        raise ValueError(f"base spec transformers: unknown class {cls!r}; expected one of {list(TRANSFORMERS_CLASSES)}")
    config_cls = getattr(transformers, TRANSFORMERS_CLASSES[cls])
    values = spec_config(spec)
    _check_backbones(values, cls)
    config = config_cls.from_dict(values)
    return getattr(transformers, cls)(config)


class TransformersAdapter(Adapter):
    """Runs a transformers segmentation model and collects its hidden states and its decode
    head's fused feature (or, for Mask2Former/MaskFormer, makes semantic logits from its queries).

    Args:
        model: a transformers ``*ForSemanticSegmentation`` model, Mask2Former or MaskFormer.

    Shapes:
        input ``(B, C, H, W)`` -> logits as the model returns them (SegFormer
        ``(B, num_labels, H/4, W/4)``; Mask2Former ``(B, num_labels, H/4, W/4)``), features
        ``hidden{i}`` and ``decode_head`` (Mask2Former: ``encoder{i}`` and ``pixel_decoder``).
    """

    name = "transformers"

    def __init__(self, model: nn.Module) -> None:
        cls = type(model).__name__
        if cls == _ONEFORMER:
            raise TypeError(
                f"{cls}: errwrap cannot run it, because it needs tokenised text task inputs; use Mask2Former "
                "(same semantic outputs, no text), or register your own adapter that passes task_inputs"
            )
        self.queries = cls in QUERY_CLASSES
        tap = DECODE_TAPS.get(cls)
        self.tap: FeatureTap | None = None
        if tap is not None:
            try:
                self.tap = FeatureTap(model, [tap])
            except ValueError:
                logger.warning(
                    "%s has no module %r (another transformers version?); using its hidden states only", cls, tap
                )
        self.tap_name = tap if self.tap is not None else None
        high = "pixel_decoder" if self.queries else "decode_head" if self.tap is not None else None
        self.default_features: FeaturePair = (None, high)

    def preferred_features(self, features: Sequence[FeatureInfo]) -> FeaturePair:
        """``(low, high)``: low-level is the stride-4 map (else the finest coarser than 4, else
        the coarsest finer; at equal strides the deepest: UperNet's stage 1, not its patch
        embedding), high-level the decode head's feature (``"pixel_decoder"`` for queries)."""
        maps = [f for f in features if f.name not in ("decode_head", "pixel_decoder")]
        order = {f.name: i for i, f in enumerate(maps)}
        ranked = sorted(maps, key=lambda f: (f.stride < 4, abs(f.stride - 4), -order[f.name]))
        return (ranked[0].name if ranked else None), self.default_features[1]

    def feature_module(self, name: str) -> str | None:
        """``"decode_head"`` is the tapped module (:data:`DECODE_TAPS`); hidden states have none."""
        return self.tap_name if name == "decode_head" else None

    def forward(self, model: nn.Module, x: Tensor) -> BaseOutput:
        if self.queries:
            out = model(pixel_values=x, output_hidden_states=True)
            stages = getattr(out, "encoder_hidden_states", None) or ()
            features = {f"encoder{i}": h for i, h in enumerate(stages) if isinstance(h, Tensor) and h.ndim == 4}
            features["pixel_decoder"] = out.pixel_decoder_last_hidden_state
            return BaseOutput(
                semantic_logits_from_queries(out.class_queries_logits, out.masks_queries_logits), features
            )
        if self.tap is not None:
            self.tap.clear()
        out = model(pixel_values=x, output_hidden_states=True)
        hidden = getattr(out, "hidden_states", None) or ()
        features = {f"hidden{i}": h for i, h in enumerate(hidden) if isinstance(h, Tensor) and h.ndim == 4}
        if self.tap is not None:
            features["decode_head"] = next(iter(self.tap.pop().values()))
        if not features and not is_tracing():
            raise NoFeaturesError(
                f"{type(model).__name__}: its hidden states are not 4-d feature maps, so errwrap cannot use them; "
                f"tap two modules instead. {PROTOCOL_HELP}"
            )
        return BaseOutput(out.logits, features)

    def detach(self) -> None:
        if self.tap is not None:
            self.tap.remove()

    def spec(self, model: nn.Module) -> dict[str, Any] | None:
        """See :func:`transformers_spec`."""
        return transformers_spec(model)


TRANSFORMERS_FAMILY = Family("transformers", build_transformers, is_transformers_segmentation_model, transformers_spec)
