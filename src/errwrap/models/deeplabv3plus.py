"""DeepLabv3+ (Chen et al., ECCV 2018) on any timm encoder, speaking errwrap's native protocol.

The network: a timm encoder created with ``features_only=True`` (dilated to output stride 8 or 16
where timm supports it), an ASPP module on the last stage, and the DeepLabv3+ decoder that fuses
the ASPP output, upsampled to stride 4, with a 1x1-reduced stride-4 encoder feature through two
3x3 convolutions. A dropout and a 1x1 classifier follow; logits are upsampled (bilinear) to the
input resolution.

``forward`` returns :class:`~errwrap.adapters.BaseOutput` ``(logits, {"low": ..., "high": ...})``:

- ``"low"``: the encoder's stride-4 feature as the encoder gives it (before the 48-channel
  reduction), the detail head's input;
- ``"high"``: the decoder's fused feature at stride 4 (after the two 3x3 convolutions, before the
  dropout and the classifier), the error head's input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._protocol import BaseOutput
from ..layers import ConvNormAct, resize

__all__ = ["ASPP", "DeepLabV3Plus", "default_atrous_rates"]

logger = logging.getLogger(__name__)

OUTPUT_STRIDES = (8, 16, 32)


def default_atrous_rates(output_stride: int) -> tuple[int, int, int]:
    """The DeepLabv3/v3+ papers' ASPP rates: ``(6, 12, 18)`` at output stride 16, doubled at 8
    (``(12, 24, 36)``), halved at 32 (``(3, 6, 9)``)."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride: expected one of {OUTPUT_STRIDES}, got {output_stride}")
    scale = 16 // output_stride if output_stride <= 16 else 0.5
    return tuple(int(r * scale) for r in (6, 12, 18))  # type: ignore[return-value]


class _ImagePooling(nn.Sequential):
    """Global average pooling -> 1x1 conv-norm-act, broadcast back to the input size."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: str, act_layer: str) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return super().forward(x).expand(-1, -1, size[0], size[1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per atrous rate and an
    image-pooling branch, concatenated and projected by a 1x1 conv-norm-act.

    Args:
        in_channels: channels of the input feature.
        out_channels: channels of every branch and of the output.
        atrous_rates: dilation of each 3x3 branch.
        norm_layer, act_layer: names from ``errwrap.layers``.

    Shapes:
        input ``(B, in_channels, h, w)`` -> output ``(B, out_channels, h, w)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        atrous_rates: Sequence[int] = (6, 12, 18),
        *,
        norm_layer: str = "batchnorm",
        act_layer: str = "relu",
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [
            ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        ]
        for rate in atrous_rates:
            branches.append(
                ConvNormAct(
                    in_channels, out_channels, 3, dilation=int(rate), norm_layer=norm_layer, act_layer=act_layer
                )
            )
        branches.append(_ImagePooling(in_channels, out_channels, norm_layer, act_layer))
        self.branches = nn.ModuleList(branches)
        self.project = ConvNormAct(
            out_channels * len(branches), out_channels, 1, norm_layer=norm_layer, act_layer=act_layer
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def _create_encoder(encoder_name: str, in_channels: int, output_stride: int, pretrained: bool) -> nn.Module:
    kwargs: dict[str, Any] = {"features_only": True, "pretrained": pretrained, "in_chans": in_channels}
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    import timm  # heavy: imported when an encoder is built, so importing errwrap stays cheap

    try:
        return timm.create_model(encoder_name, **kwargs)
    except (TypeError, AssertionError, ValueError) as exc:
        if output_stride != 32 and "output_stride" in str(exc):
            raise ValueError(
                f"encoder_name={encoder_name!r}: this timm encoder cannot be dilated to output_stride={output_stride} "
                f"({type(exc).__name__}: {exc}); expected an encoder that supports output_stride (ResNet, "
                "EfficientNet, "
                "MobileNetV3, ConvNeXt, RegNet, ...), or pass output_stride=32 to run ASPP on its undilated last stage"
            ) from exc
        raise


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ on a timm encoder; returns logits at the input resolution and the features
    errwrap's heads use.

    Args:
        encoder_name: a timm model name that supports ``features_only=True`` (e.g.
            ``"resnet50"``, ``"efficientnet_b0"``, ``"mobilenetv3_large_100"``, ``"convnext_tiny"``).
        num_classes: number of classes.
        in_channels: channels of the input images.
        output_stride: stride of the encoder's last feature: 16 or 8 (dilated through timm's
            ``output_stride=``), or 32 for encoders that cannot be dilated.
        atrous_rates: ASPP dilation rates; ``None`` gives the paper's convention for the
            output stride (``(6, 12, 18)`` at 16, ``(12, 24, 36)`` at 8).
        aspp_channels: width of the ASPP branches and of its output.
        decoder_channels: width of the decoder's two 3x3 convolutions.
        low_level_channels: channels the stride-4 encoder feature is reduced to (48 in the paper).
        dropout: probability of the dropout before the classifier (Monte Carlo dropout samples it).
        pretrained: load timm's pretrained encoder weights (downloads; ``False`` for none).
        norm_layer, act_layer: names from ``errwrap.layers`` used by ASPP and the decoder.

    Shapes:
        input ``(B, in_channels, H, W)`` with ``H`` and ``W`` divisible by ``output_stride`` ->
        :class:`~errwrap.adapters.BaseOutput` with logits ``(B, num_classes, H, W)`` and features
        ``"low"`` ``(B, C_enc, H/4, W/4)`` and ``"high"`` ``(B, decoder_channels, H/4, W/4)``.

    Example:
        >>> model = DeepLabV3Plus("resnet18", num_classes=5).eval()
        >>> logits, features = model(torch.randn(1, 3, 64, 64))
        >>> tuple(logits.shape), tuple(features["low"].shape), tuple(features["high"].shape)
        ((1, 5, 64, 64), (1, 64, 16, 16), (1, 256, 16, 16))
    """

    def __init__(
        self,
        encoder_name: str = "resnet50",
        num_classes: int = 19,
        in_channels: int = 3,
        output_stride: int = 16,
        atrous_rates: Sequence[int] | None = None,
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        low_level_channels: int = 48,
        dropout: float = 0.1,
        pretrained: bool = False,
        norm_layer: str = "batchnorm",
        act_layer: str = "relu",
    ) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride: expected one of {OUTPUT_STRIDES}, got {output_stride}")
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        rates = tuple(int(r) for r in (default_atrous_rates(output_stride) if atrous_rates is None else atrous_rates))
        if not rates or any(r < 1 for r in rates):
            raise ValueError(f"atrous_rates: expected positive integers, got {atrous_rates}")

        self.encoder = _create_encoder(encoder_name, in_channels, output_stride, pretrained)
        feature_info: Any = self.encoder.feature_info  # timm's FeatureInfo
        reductions = list(feature_info.reduction())
        channels = list(feature_info.channels())
        if reductions[-1] != output_stride:
            raise ValueError(
                f"encoder_name={encoder_name!r}: expected its last feature at stride {output_stride}, got stride "
                f"{reductions[-1]} (feature strides {reductions}); this encoder ignores output_stride"
            )
        if 4 not in reductions:
            raise ValueError(
                f"encoder_name={encoder_name!r}: expected a stride-4 feature for the decoder, got feature strides "
                f"{reductions}"
            )
        self.low_index = max(i for i, r in enumerate(reductions) if r == 4)
        self.high_index = len(reductions) - 1
        self.low_encoder_channels = channels[self.low_index]
        fmt = getattr(self.encoder, "output_fmt", "NCHW")
        self.nhwc_features = getattr(fmt, "value", fmt) == "NHWC"  # e.g. Swin: permuted to NCHW in forward

        self.aspp = ASPP(channels[-1], aspp_channels, rates, norm_layer=norm_layer, act_layer=act_layer)
        self.reduce = ConvNormAct(
            channels[self.low_index], low_level_channels, 1, norm_layer=norm_layer, act_layer=act_layer
        )
        self.decoder = nn.Sequential(
            ConvNormAct(
                aspp_channels + low_level_channels, decoder_channels, 3, norm_layer=norm_layer, act_layer=act_layer
            ),
            ConvNormAct(decoder_channels, decoder_channels, 3, norm_layer=norm_layer, act_layer=act_layer),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

        self.num_classes = num_classes
        self.output_stride = output_stride
        self.config: dict[str, Any] = {
            "encoder_name": encoder_name,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "output_stride": output_stride,
            "atrous_rates": list(rates),
            "aspp_channels": aspp_channels,
            "decoder_channels": decoder_channels,
            "low_level_channels": low_level_channels,
            "dropout": dropout,
            "pretrained": pretrained,
            "norm_layer": norm_layer,
            "act_layer": act_layer,
        }

    def errwrap_spec(self) -> dict[str, Any]:
        """JSON description from which :func:`errwrap.adapters.specs.build_base` rebuilds this
        architecture (weights not included)."""
        return {"family": "errwrap.DeepLabV3Plus", "config": dict(self.config)}

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder, ASPP and decoder: ``(low, high)``, the stride-4 encoder feature and the fused
        decoder feature, both at ``(H/4, W/4)``."""
        features = self.encoder(x)
        low, last = features[self.low_index], features[self.high_index]
        if self.nhwc_features:
            low, last = low.permute(0, 3, 1, 2), last.permute(0, 3, 1, 2)
        context = self.aspp(last)
        context = resize(context, low.shape[-2:])
        high = self.decoder(torch.cat([context, self.reduce(low)], dim=1))
        return low, high

    def forward_head(self, high: Tensor) -> Tensor:
        """Dropout and 1x1 classifier on the fused feature: logits at ``(H/4, W/4)``."""
        return self.classifier(self.dropout(high))

    def forward(self, x: Tensor) -> BaseOutput:
        return self.forward_with_coarse_logits(x)[0]

    def forward_with_coarse_logits(self, x: Tensor) -> tuple[BaseOutput, Tensor]:
        """:meth:`forward`'s output and the stride-4 logits it upsamples (errwrap's wrapper
        fuses at them with ``fuse_at_features=True``)."""
        low, high = self.forward_features(x)
        coarse = self.forward_head(high)
        return BaseOutput(resize(coarse, x.shape[-2:]), {"low": low, "high": high}), coarse

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"encoder_name={c['encoder_name']!r}, num_classes={c['num_classes']}, "
            f"output_stride={c['output_stride']}, atrous_rates={c['atrous_rates']}"
        )
