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
Unet, MAnet and Linknet also give their decoder blocks' outputs (``"decoder.blocks.{i}"``); when
the decoder ends finer than stride 4, the stride-4 block is the high-level default
(:meth:`SMPAdapter.preferred_features`).

The adapter and the matcher import nothing from SMP: they work on the model instance they are
given; :func:`build_smp` imports SMP to rebuild a model from its spec.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .._validate import is_tracing
from .base import Adapter, BaseOutput
from .features import FeatureInfo, FeaturePair
from .hooks import FeatureTap
from .registry import Family
from .specs import check_model_name, check_timm_name, spec_config

__all__ = ["SMPAdapter", "is_smp_model", "smp_spec", "build_smp", "SMP_ARCHITECTURES", "SMP_FAMILY"]

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


def build_smp(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild an SMP model (``encoder_weights=None``) from its spec; the architecture is one of
    :data:`SMP_ARCHITECTURES` and the encoder one SMP or timm knows."""
    import segmentation_models_pytorch as smp

    config = spec_config(spec)
    arch = str(config.pop("arch", "")).lower()
    if arch not in SMP_ARCHITECTURES:
        raise ValueError(f"base spec smp: unknown arch {arch!r}; expected one of {list(SMP_ARCHITECTURES)}")
    activation = config.get("activation")
    if activation is not None and not isinstance(activation, str):
        raise ValueError(f"base spec smp: activation must be a name or null, got {type(config['activation']).__name__}")
    encoder = check_model_name(config.get("encoder_name", "resnet34"), "encoder_name", "smp")
    if encoder.startswith("tu-"):
        check_timm_name(encoder[3:], "encoder_name", "smp")
    elif encoder not in smp.encoders.get_encoder_names():
        raise ValueError(
            f"base spec smp: encoder_name {encoder!r} is not an encoder this SMP {smp.__version__} knows "
            "(smp.encoders.get_encoder_names(), or 'tu-' and a timm name)"
        )
    config["encoder_weights"] = None
    return smp.create_model(arch, **config)


class SMPAdapter(Adapter):
    """Runs an SMP ``SegmentationModel`` step by step to expose its encoder and decoder features.

    Args:
        model: an SMP segmentation model.

    Shapes:
        input ``(B, in_channels, H, W)`` -> logits ``(B, classes, H, W)`` and features
        ``enc{i}`` ``(B, C_i, H/s_i, W/s_i)``, ``decoder`` ``(B, C_dec, h, w)``.
    """

    name = "smp"

    def __init__(self, model: Any) -> None:
        for attr in ("encoder", "decoder", "segmentation_head"):
            if not isinstance(getattr(model, attr, None), nn.Module):
                raise TypeError(
                    f"SMPAdapter: expected an SMP SegmentationModel with .{attr}, got {type(model).__name__} without it"
                )
        channels = list(getattr(model.encoder, "out_channels", []))
        strides = _encoder_strides(model.encoder, len(channels))
        self.keep = [i for i, c in enumerate(channels) if c > 0]
        self.dpt = hasattr(model.encoder, "has_prefix_tokens")  # DPT's encoder returns (features, prefix_tokens)
        candidates = [i for i in self.keep if strides[i] > 1] or self.keep  # not the input image (enc0 of CNN encoders)
        at_four = [i for i in candidates if strides[i] == 4]
        low = (
            f"enc{at_four[0]}" if at_four else f"enc{min(candidates, key=lambda i: strides[i])}" if candidates else None
        )
        self.tap: FeatureTap | None = None
        if self.dpt and not at_four and isinstance(getattr(model.decoder, "reassemble_blocks", None), nn.ModuleList):
            # a ViT encoder has no stride-4 map: DPT's first reassembled map (upsampled to stride 4) is
            # its early feature
            self.tap = FeatureTap(model, ["decoder.reassemble_blocks.0"])
            low = "reassemble0"
        self.default_features: FeaturePair = (low, "decoder")
        # Unet, MAnet, Linknet: the decoder ends at full resolution, where the error head's 3x3
        # convolutions would cost ~50% of the base's FLOPs. Their decoder blocks are tapped too
        # (features "decoder.blocks.{i}"); see preferred_features.
        blocks = getattr(model.decoder, "blocks", None)
        n_blocks = len(blocks) if isinstance(blocks, nn.ModuleList) else 0
        self.block_tap = FeatureTap(model, [f"decoder.blocks.{i}" for i in range(n_blocks)]) if n_blocks else None
        head = model.segmentation_head
        activation = getattr(head[-1] if isinstance(head, nn.Sequential) else head, "activation", None)
        # SMP's SegmentationHead is Sequential(conv, upsampling, Activation): run it without the activation.
        self.skip_activation = (
            isinstance(head, nn.Sequential) and activation is not None and not isinstance(activation, nn.Identity)
        )
        if self.skip_activation:
            logger.info(
                "SMP model %s applies %s after its last conv: errwrap reads the logits before it",
                type(model).__name__,
                type(activation).__name__,
            )
        elif activation is not None and not isinstance(activation, nn.Identity):
            logger.warning(
                "SMP model %s applies %s to its output: errwrap reads that output as logits; build it with "
                "activation=None",
                type(model).__name__, type(activation).__name__,
            )

    def forward(self, model: Any, x: Tensor) -> BaseOutput:
        return self.forward_with_coarse_logits(model, x)[0]

    def forward_with_coarse_logits(self, model: Any, x: Tensor) -> tuple[BaseOutput, Tensor | None]:
        """Also the logits before the segmentation head's upsampling (DeepLabV3+, FPN, PSPNet,
        SegFormer: stride 4 or 8), ``None`` when the head has none (Unet)."""
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
        head = model.segmentation_head
        coarse = None
        if isinstance(head, nn.Sequential):  # SegmentationHead: conv, upsampling (or Identity), activation
            layers = list(head)[:-1] if self.skip_activation else list(head)
            logits = decoded
            for layer in layers:
                if isinstance(layer, nn.Upsample) and coarse is None and logits is not decoded:
                    coarse = logits  # DeepLabV3+'s stride-4 logits: the wrapper fuses there
                logits = layer(logits)
        else:
            logits = head(decoded)
        features = {f"enc{i}": encoded[i] for i in self.keep if i < len(encoded)}
        if self.tap is not None:
            features["reassemble0"] = self.tap.pop()["decoder.reassemble_blocks.0"]
        if self.block_tap is not None:
            features.update(self.block_tap.pop())
        features["decoder"] = decoded
        return BaseOutput(logits, features), coarse

    def preferred_features(self, features: Sequence[FeatureInfo]) -> FeaturePair:
        """:attr:`default_features`, except that when the decoder ends finer than stride 4
        (Unet, MAnet, Linknet: full resolution), the first decoder block at stride 4 is the
        high-level feature, the resolution DeepLabV3+'s decoder output has."""
        low, high = self.default_features
        decoder = next((f for f in features if f.name == "decoder"), None)
        if decoder is not None and decoder.stride < 4:
            at_four = [f.name for f in features if f.name.startswith("decoder.blocks.") and f.stride == 4]
            if at_four:
                high = at_four[0]
        return low, high

    def feature_module(self, name: str) -> str | None:
        """``"decoder"`` and ``"decoder.blocks.{i}"`` are module names; ``"reassemble0"`` is DPT's
        ``decoder.reassemble_blocks.0``; encoder stages have none."""
        if name == "decoder" or name.startswith("decoder.blocks."):
            return name
        return "decoder.reassemble_blocks.0" if name == "reassemble0" else None

    def detach(self) -> None:
        if self.tap is not None:
            self.tap.remove()
        if self.block_tap is not None:
            self.block_tap.remove()

    def spec(self, model: nn.Module) -> dict[str, Any] | None:
        """See :func:`smp_spec`."""
        return smp_spec(model)


SMP_FAMILY = Family("smp", build_smp, is_smp_model, smp_spec)
