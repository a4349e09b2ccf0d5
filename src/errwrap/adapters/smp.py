"""Adapter for segmentation_models_pytorch (SMP) ``SegmentationModel`` s: Unet, UnetPlusPlus,
FPN, DeepLabV3, DeepLabV3Plus, PSPNet, Linknet, MAnet, PAN, UPerNet, Segformer and DPT.

The adapter runs what ``SegmentationModel.forward`` runs (SMP 0.6): the input-shape check (skipped
while tracing or compiling), the encoder, the decoder and the segmentation head; it skips the
optional classification head, whose output errwrap does not use, and the head's final
activation when the model was built with one (``activation="sigmoid"`` and so on). The logits are
therefore exactly ``model(x)`` (or ``model(x)[0]`` with ``aux_params``) for ``activation=None``, and
the values before the activation otherwise.

Features: ``"enc0"`` ... ``"encN"`` (the encoder's outputs; for CNN encoders ``enc0`` is the input
image itself; zero-channel placeholders are left out) and ``"decoder"`` (the decoder output that
feeds the segmentation head). Defaults: low-level = the stride-4 encoder feature, high-level =
``"decoder"``. A DPT with a ViT encoder (every stage at stride 16) also gives ``"reassemble0"``,
its decoder's first reassembled map (stride 4, read by a forward hook), and uses it as low-level.

This module imports nothing from SMP: it works on the model instance it is given.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from torch import Tensor, nn

from .._validate import is_tracing
from .base import BaseAdapter, BaseOutput
from .hooks import FeatureTap

__all__ = ["SMPAdapter", "is_smp_model", "smp_spec", "SMP_ARCHITECTURES"]

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


def smp_spec(model: nn.Module) -> dict[str, Any] | None:
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
        candidates = [i for i in self.keep if strides[i] > 1] or self.keep  # not the input image (enc0 of CNN encoders)
        at_four = [i for i in candidates if strides[i] == 4]
        low = f"enc{at_four[0]}" if at_four else f"enc{min(candidates, key=lambda i: strides[i])}" if candidates else None
        self.tap: FeatureTap | None = None
        if self.dpt and not at_four and isinstance(getattr(model.decoder, "reassemble_blocks", None), nn.ModuleList):
            # a ViT encoder has no stride-4 map: DPT's first reassembled map (upsampled to stride 4) is its early feature
            self.tap = FeatureTap(model, ["decoder.reassemble_blocks.0"])
            low = "reassemble0"
        self.default_features = (low, "decoder")
        # Unet, MAnet, Linknet: the decoder ends at full resolution, where the error head's 3x3
        # convolutions would cost ~50% of the base's FLOPs. Their decoder blocks are tapped too
        # (features "decoder.blocks.{i}"), and the first forward makes the stride-4 block the
        # default high-level feature, the resolution DeepLabV3+'s decoder output has.
        blocks = getattr(model.decoder, "blocks", None)
        self.block_tap = FeatureTap(model, [f"decoder.blocks.{i}" for i in range(len(blocks))]) if isinstance(blocks, nn.ModuleList) and len(blocks) else None
        self._choose_high = self.block_tap is not None
        head = model.segmentation_head
        activation = getattr(head[-1] if isinstance(head, nn.Sequential) else head, "activation", None)
        # SMP's SegmentationHead is Sequential(conv, upsampling, Activation): run it without the activation.
        self.skip_activation = isinstance(head, nn.Sequential) and activation is not None and not isinstance(activation, nn.Identity)
        if self.skip_activation:
            logger.info("SMP model %s applies %s after its last conv: errwrap reads the logits before it", type(model).__name__, type(activation).__name__)
        elif activation is not None and not isinstance(activation, nn.Identity):
            logger.warning(
                "SMP model %s applies %s to its output: errwrap reads that output as logits; build it with activation=None",
                type(model).__name__, type(activation).__name__,
            )

    def forward(self, model: nn.Module, x: Tensor) -> BaseOutput:
        if not is_tracing():
            model.check_input_shape(x)
        if self.tap is not None:
            self.tap.clear()
        if self.block_tap is not None:
            self.block_tap.clear()
        if self.dpt:
            encoded, prefix_tokens = model.encoder(x)
            decoded = model.decoder(encoded, prefix_tokens)
        else:
            encoded = model.encoder(x)
            decoded = model.decoder(encoded)
        if self.skip_activation:
            logits = decoded
            for layer in list(model.segmentation_head)[:-1]:
                logits = layer(logits)
        else:
            logits = model.segmentation_head(decoded)
        features = {f"enc{i}": encoded[i] for i in self.keep if i < len(encoded)}
        if self.tap is not None:
            features["reassemble0"] = self.tap.pop()["decoder.reassemble_blocks.0"]
        if self.block_tap is not None:
            features.update(self.block_tap.pop())
            if self._choose_high and not is_tracing():
                self._choose_high = False
                self._prefer_stride4_block(features, decoded, x.shape[-2])
        features["decoder"] = decoded
        return BaseOutput(logits, features)

    def _prefer_stride4_block(self, features: dict[str, Tensor], decoded: Tensor, height: int) -> None:
        if round(height / decoded.shape[-2]) >= 4:
            return
        at_four = [n for n in features if n.startswith("decoder.blocks.") and round(height / features[n].shape[-2]) == 4]
        if at_four:
            self.default_features = (self.default_features[0], at_four[0])

    def detach(self) -> None:
        if self.tap is not None:
            self.tap.remove()
        if self.block_tap is not None:
            self.block_tap.remove()

    def spec(self, model: nn.Module) -> dict[str, Any] | None:
        """See :func:`smp_spec`."""
        return smp_spec(model)
