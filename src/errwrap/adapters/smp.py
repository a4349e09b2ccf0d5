"""Adapter for segmentation_models_pytorch (SMP) ``SegmentationModel`` s: Unet, UnetPlusPlus,
FPN, DeepLabV3, DeepLabV3Plus, PSPNet, Linknet, MAnet, PAN, UPerNet, Segformer and DPT.

The adapter runs what ``SegmentationModel.forward`` runs (SMP 0.6): the input-shape check (skipped
while tracing or compiling), the encoder, the decoder and the segmentation head; it skips the
optional classification head, whose output errwrap does not use. The logits are therefore
exactly ``model(x)`` (or ``model(x)[0]`` with ``aux_params``).

Features: ``"enc0"`` ... ``"encN"`` (the encoder's outputs; ``enc0`` is the input image itself and
zero-channel placeholders are left out) and ``"decoder"`` (the decoder output that feeds the
segmentation head). Defaults: low-level = the stride-4 encoder feature, high-level = ``"decoder"``.

This module imports nothing from SMP: it works on the model instance it is given.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from torch import Tensor, nn

from .._validate import is_tracing
from .base import BaseAdapter, BaseOutput

__all__ = ["SMPAdapter", "is_smp_model", "SMP_ARCHITECTURES"]

logger = logging.getLogger(__name__)

#: SMP architectures whose spec errwrap can rebuild (``smp.create_model`` names, lower case).
SMP_ARCHITECTURES = (
    "unet",
    "unetplusplus",
    "manet",
    "linknet",
    "fpn",
    "pspnet",
    "deeplabv3",
    "deeplabv3plus",
    "pan",
    "upernet",
    "segformer",
    "dpt",
)


def is_smp_model(model: nn.Module) -> bool:
    """True for instances of SMP's ``SegmentationModel`` (without importing SMP)."""
    import sys

    base = sys.modules.get("segmentation_models_pytorch.base.model")
    return base is not None and isinstance(model, base.SegmentationModel)


def _encoder_strides(encoder: nn.Module, n: int) -> list[int]:
    strides = getattr(encoder, "output_strides", None)
    if strides is not None and len(strides) == n:
        return [int(s) for s in strides]
    output_stride = int(getattr(encoder, "output_stride", 32))
    return [min(2**i, output_stride) for i in range(n)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class SMPAdapter(BaseAdapter):
    """Runs an SMP ``SegmentationModel`` step by step to expose its encoder and decoder features.

    Args:
        model: an SMP segmentation model.

    Shapes:
        input ``(B, in_channels, H, W)`` -> logits ``(B, classes, H, W)`` and features
        ``enc{i}`` ``(B, C_i, H/s_i, W/s_i)``, ``decoder`` ``(B, C_dec, h, w)``.
    """

    name = "smp"

    def __init__(self, model: nn.Module) -> None:
        for attr in ("encoder", "decoder", "segmentation_head"):
            if not isinstance(getattr(model, attr, None), nn.Module):
                raise TypeError(f"SMPAdapter: expected an SMP SegmentationModel with .{attr}, got {type(model).__name__} without it")
        channels = list(getattr(model.encoder, "out_channels", []))
        strides = _encoder_strides(model.encoder, len(channels))
        self.keep = [i for i, c in enumerate(channels) if c > 0]
        self.dpt = hasattr(model.encoder, "has_prefix_tokens")  # DPT's encoder returns (features, prefix_tokens)
        candidates = [i for i in self.keep if i > 0] or self.keep
        at_four = [i for i in candidates if strides[i] == 4]
        low = at_four[0] if at_four else min(candidates, key=lambda i: strides[i]) if candidates else None
        self.default_features = (f"enc{low}" if low is not None else None, "decoder")
        activation = getattr(model.segmentation_head[-1], "activation", None) if isinstance(model.segmentation_head, nn.Sequential) else None
        if activation is not None and not isinstance(activation, nn.Identity):
            logger.warning(
                "SMP model %s applies %s after its last conv: errwrap reads its output as logits; build it with activation=None",
                type(model).__name__, type(activation).__name__,
            )

    def forward(self, model: nn.Module, x: Tensor) -> BaseOutput:
        if not is_tracing():
            model.check_input_shape(x)
        if self.dpt:
            encoded, prefix_tokens = model.encoder(x)
            decoded = model.decoder(encoded, prefix_tokens)
        else:
            encoded = model.encoder(x)
            decoded = model.decoder(encoded)
        logits = model.segmentation_head(decoded)
        features = {f"enc{i}": encoded[i] for i in self.keep if i < len(encoded)}
        features["decoder"] = decoded
        return BaseOutput(logits, features)

    def spec(self, model: nn.Module) -> dict[str, Any] | None:
        """``{"family": "smp", "config": {"arch": ..., **init kwargs}}`` (``encoder_weights``
        set to ``None``: the weights come from the checkpoint), or ``None`` when the model is not
        one of :data:`SMP_ARCHITECTURES` or its arguments are not JSON data."""
        arch = type(model).__name__.lower()
        config = getattr(model, "_hub_mixin_config", None)
        if arch not in SMP_ARCHITECTURES or not isinstance(config, dict):
            return None
        config = {k: _jsonable(v) for k, v in config.items() if not k.startswith("_")}
        config["encoder_weights"] = None
        try:
            json.dumps(config)
        except (TypeError, ValueError):
            logger.info("SMP model %s has non-JSON constructor arguments; no spec", type(model).__name__)
            return None
        return {"family": "smp", "config": {"arch": arch, **config}}
