"""Adapter for Hugging Face transformers ``*ForSemanticSegmentation`` models.

The adapter calls ``model(pixel_values=x, output_hidden_states=True)`` and reads ``.logits``
unchanged (SegFormer's are at 1/4 of the input resolution; the wrapper resizes them).

Features: ``"hidden0"`` ... (the encoder/backbone hidden states that are 4-d maps) and, for the
classes in :data:`DECODE_TAPS`, ``"decode_head"``: the decode head's fused feature read by a
forward hook (SegFormer: after ``linear_fuse``, batch norm and ReLU, before dropout and the
classifier; UperNet: the output of ``fpn_bottleneck``). Defaults: low-level = the stride-4 stage,
high-level = ``"decode_head"``. Tested with SegFormer and UperNet; other classes work when their
hidden states are 4-d maps.

This module imports nothing from transformers until :meth:`TransformersAdapter.spec` is called.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from torch import Tensor, nn

from .._validate import is_tracing
from .base import PROTOCOL_HELP, BaseAdapter, BaseOutput, NoFeaturesError
from .hooks import FeatureTap

__all__ = ["TransformersAdapter", "is_transformers_segmentation_model", "DECODE_TAPS", "TRANSFORMERS_CLASSES"]

logger = logging.getLogger(__name__)

#: module whose output is the decode head's fused feature, and the default low-level hidden state.
DECODE_TAPS: dict[str, tuple[str, str]] = {
    "SegformerForSemanticSegmentation": ("decode_head.activation", "hidden0"),
    "UperNetForSemanticSegmentation": ("decode_head.fpn_bottleneck", "hidden1"),
}

#: classes (and their config classes) whose spec errwrap can rebuild.
TRANSFORMERS_CLASSES: dict[str, str] = {
    "SegformerForSemanticSegmentation": "SegformerConfig",
    "UperNetForSemanticSegmentation": "UperNetConfig",
}


def is_transformers_segmentation_model(model: nn.Module) -> bool:
    """True for transformers ``PreTrainedModel`` s whose class name ends in
    ``ForSemanticSegmentation`` (without importing transformers)."""
    utils = sys.modules.get("transformers.modeling_utils")
    return utils is not None and isinstance(model, utils.PreTrainedModel) and type(model).__name__.endswith("ForSemanticSegmentation")


class TransformersAdapter(BaseAdapter):
    """Runs a transformers semantic-segmentation model and collects its hidden states and its
    decode head's fused feature.

    Args:
        model: a transformers ``*ForSemanticSegmentation`` model.

    Shapes:
        input ``(B, C, H, W)`` -> logits as the model returns them (SegFormer
        ``(B, num_labels, H/4, W/4)``), features ``hidden{i}`` and ``decode_head``.
    """

    name = "transformers"

    def __init__(self, model: nn.Module) -> None:
        cls = type(model).__name__
        tap, low = DECODE_TAPS.get(cls, (None, None))
        self.tap: FeatureTap | None = None
        if tap is not None:
            try:
                self.tap = FeatureTap(model, [tap])
            except ValueError:
                logger.warning("%s has no module %r (another transformers version?); using its hidden states only", cls, tap)
                tap = None
        self.default_features = (low, "decode_head" if tap is not None else None)

    def forward(self, model: nn.Module, x: Tensor) -> BaseOutput:
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
        """``{"family": "transformers", "class": ..., "config": model.config.to_dict()}`` for the
        classes in :data:`TRANSFORMERS_CLASSES`, else ``None``."""
        cls = type(model).__name__
        if cls not in TRANSFORMERS_CLASSES:
            return None
        config = model.config.to_dict()
        try:
            json.dumps(config)
        except (TypeError, ValueError):
            logger.info("%s: its config is not JSON data; no spec", cls)
            return None
        return {"family": "transformers", "class": cls, "config": config}
