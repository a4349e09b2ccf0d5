"""The three heads of the method: error prediction, detail re-labelling, and fusion.

See docs/method.md for which choices are the paper's and which are errwrap's own. The math
(:func:`mixture_log_probs`, :func:`confidence_cues`) lives in :mod:`errwrap.functional`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._validate import is_tracing
from .functional import confidence_cues, mixture_log_probs, mixture_log_probs_inference
from .layers import ConvNormAct, LayerSpec, resize
from .ops.fusion import fused_mixture_log_probs

__all__ = [
    "confidence_cues",  # from errwrap.functional, re-exported (documented here)
    "mixture_log_probs",  # from errwrap.functional, re-exported (documented here)
    "mixture_log_probs_inference",  # from errwrap.functional, re-exported
    "ErrorHead",
    "DetailHead",
    "MixtureFusion",
    "LearnedFusion",
    "build_fusion",
]


class ErrorHead(nn.Module):
    """Stage (i): predicts the logit of "the base network's label is wrong" for every pixel.

    Input is the high-level feature concatenated with the base's softmax (resized to the
    feature) and three confidence cues of it (max probability, margin, entropy). The base logits
    are detached: the error head never trains the base.

    Args:
        feature_channels: channels of the high-level feature ``F_h``.
        num_classes: number of classes ``C`` of the base logits.
        channels: width of the conv blocks.
        num_blocks: number of 3x3 conv-norm-act blocks.
        norm_layer: normalisation, a name from ``errwrap.layers.NORM_LAYERS``.
        act_layer: activation, a name from ``errwrap.layers.ACT_LAYERS``.
        prior: initial error probability; the classifier's bias starts at ``logit(prior)``.
        project: reduce the feature to ``channels`` with a 1x1 conv-norm-act before the 3x3
            blocks (the wrapper's default: the first 3x3 block then reads ``channels + C + 3``
            channels instead of ``feature_channels + C + 3``, about a third of the cost on a
            256-channel decoder feature). ``False`` is the architecture of earlier saved models.

    Shapes:
        feature ``(B, feature_channels, h, w)``, base_logits ``(B, C, h0, w0)`` ->
        error logits ``(B, 1, h, w)``.
    """

    def __init__(
        self,
        feature_channels: int,
        num_classes: int,
        channels: int = 64,
        num_blocks: int = 2,
        *,
        norm_layer: LayerSpec = "batchnorm",
        act_layer: LayerSpec = "relu",
        prior: float = 0.1,
        project: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected >= 1, got {num_blocks}")
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior: expected a probability in (0, 1), got {prior}")
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        # Registered only when used, so the state dicts of earlier (unprojected) heads keep their keys.
        self.project: nn.Module | None = (
            ConvNormAct(feature_channels, channels, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
            if project
            else None
        )
        in_channels = (channels if project else feature_channels) + num_classes + 3
        blocks = [ConvNormAct(in_channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)]
        blocks += [
            ConvNormAct(channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)
            for _ in range(num_blocks - 1)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(channels, 1, 1, **dd)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.constant_(self.classifier.bias, math.log(prior / (1.0 - prior)))  # type: ignore[arg-type]
        # Full-resolution skip from the base's own confidence cues (max probability, margin,
        # entropy), added after upsampling: the conv body sees only the high-level feature's
        # resolution, which blurs errors on thin parts and boundaries. It starts as the
        # max-softmax baseline (error logit falls with the max probability, 0 at 0.5), so the
        # head starts from what MSP knows and learns what it misses.
        self.refine = nn.Conv2d(3, 1, 1, **dd)
        with torch.no_grad():
            self.refine.weight.copy_(torch.tensor([-8.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.refine.bias.fill_(4.0)  # type: ignore[union-attr]

    def forward(self, feature: Tensor, base_logits: Tensor, base_probs: Tensor | None = None) -> Tensor:
        """Error logits at the feature's resolution.

        Args:
            feature: the high-level feature.
            base_logits: the base's logits (detached here).
            base_probs: ``softmax(base_logits)`` in float32 when the caller has it (computed once
                for the error head, the cues and the fusion).
        """
        probs = torch.softmax(base_logits.detach().float(), dim=1) if base_probs is None else base_probs
        probs = resize(probs, feature.shape[-2:])
        cues = confidence_cues(probs)
        if self.project is not None:
            feature = self.project(feature)
        x = torch.cat([feature, probs.to(feature.dtype), cues.to(feature.dtype)], dim=1)
        return self.classifier(self.blocks(x))

    def forward_refine(self, error_logits: Tensor, base_logits: Tensor, cues: Tensor | None = None) -> Tensor:
        """Add the full-resolution cue skip to error logits already resized to ``base_logits``.

        Args:
            error_logits: the error head's logits, resized to ``base_logits``.
            base_logits: the base's logits (detached here).
            cues: ``confidence_cues`` of ``softmax(base_logits)`` when the caller has them.

        Shapes:
            error_logits ``(B, 1, H, W)``, base_logits ``(B, C, H, W)``, cues ``(B, 3, H, W)`` ->
            ``(B, 1, H, W)``.
        """
        if cues is None:
            cues = confidence_cues(torch.softmax(base_logits.detach().float(), dim=1))
        # self.refine as a weighted sum: a 3->1 1x1 convolution at full resolution is ~50x
        # slower on CPU (oneDNN) than these element-wise ops.
        weight, bias = self.refine.weight.float(), self.refine.bias.float()  # type: ignore[union-attr]
        skip = (cues * weight.view(1, 3, 1, 1)).sum(dim=1, keepdim=True) + bias.view(1, 1, 1, 1)
        return error_logits + skip.to(error_logits.dtype)


class DetailHead(nn.Module):
    """Stage (ii): re-determines labels from high-resolution low-level features.

    Input is the low-level feature, the high-level feature reduced by a 1x1 conv and upsampled,
    and the error probability at the low-level resolution (which tells the head where to look).

    Args:
        low_channels: channels of the low-level feature ``F_l``.
        high_channels: channels of the high-level feature ``F_h``.
        num_classes: number of classes ``C``.
        channels: width of the 3x3 conv blocks.
        num_blocks: number of 3x3 conv-norm-act blocks.
        reduce_channels: width ``F_h`` is reduced to; defaults to ``channels``.
        norm_layer: normalisation, a name from ``errwrap.layers.NORM_LAYERS``.
        act_layer: activation, a name from ``errwrap.layers.ACT_LAYERS``.
        project: reduce ``F_l`` to ``channels`` with a 1x1 conv-norm-act before the 3x3 blocks,
            as ``F_h`` is (the wrapper's default; ``False`` is the architecture of earlier
            saved models).

    Shapes:
        low ``(B, low_channels, hl, wl)``, high ``(B, high_channels, hh, wh)``,
        error_prob ``(B, 1, hl, wl)`` -> detail logits ``(B, C, hl, wl)``.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        channels: int = 64,
        num_blocks: int = 2,
        *,
        reduce_channels: int | None = None,
        norm_layer: LayerSpec = "batchnorm",
        act_layer: LayerSpec = "relu",
        project: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected >= 1, got {num_blocks}")
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        reduce_channels = reduce_channels or channels
        self.reduce = ConvNormAct(high_channels, reduce_channels, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.project: nn.Module | None = (
            ConvNormAct(low_channels, channels, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
            if project
            else None
        )
        in_channels = (channels if project else low_channels) + reduce_channels + 1
        blocks = [ConvNormAct(in_channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)]
        blocks += [
            ConvNormAct(channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)
            for _ in range(num_blocks - 1)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(channels, num_classes, 1, **dd)

    def forward(self, low: Tensor, high: Tensor, error_prob: Tensor) -> Tensor:
        high = resize(self.reduce(high), low.shape[-2:])
        if self.project is not None:
            low = self.project(low)
        x = torch.cat([low, high.to(low.dtype), error_prob.to(low.dtype)], dim=1)
        return self.classifier(self.blocks(x))


class MixtureFusion(nn.Module):
    """Stage (iii), the paper's mixture: no parameters, see :func:`~errwrap.functional.mixture_log_probs`.

    Shapes:
        base_logits, detail_logits ``(B, C, H, W)``, error_logits ``(B, 1, H, W)`` ->
        fused log-probabilities ``(B, C, H, W)``.
    """

    def forward(
        self,
        base_logits: Tensor,
        detail_logits: Tensor,
        error_logits: Tensor,
        base_probs: Tensor | None = None,
    ) -> Tensor:
        """Fused log-probabilities. ``base_probs`` (``softmax(base_logits)`` in float32), when
        given, lets inference without gradients on the CPU take the faster
        :func:`mixture_log_probs_inference`."""
        # Compilers and tracers get the plain ops (inductor fuses them itself), and so does the
        # CPU, where the plain ops are 10-20% faster to train than the memory-light custom
        # function; eager CUDA runs the fused op (Triton when available), see errwrap.ops.fusion.
        if is_tracing() or not base_logits.is_cuda:
            if base_probs is not None and not torch.is_grad_enabled() and not is_tracing():
                return mixture_log_probs_inference(base_logits, base_probs, detail_logits, error_logits)
            return mixture_log_probs(base_logits, detail_logits, error_logits)
        return fused_mixture_log_probs(base_logits, detail_logits, error_logits)


class LearnedFusion(nn.Module):
    """Stage (iii), learned gate: ``gate = e + conv([e, softmax(z0), softmax(z1)])``, then the
    mixture with ``sigmoid(gate)`` in place of ``p_err``.

    The conv starts at zero, so an untrained ``LearnedFusion`` equals :class:`MixtureFusion`
    exactly; training moves the gate where the error head alone is not the best mixing weight.

    Shapes:
        as :class:`MixtureFusion`.
    """

    def __init__(
        self,
        num_classes: int,
        kernel_size: int = 3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = nn.Conv2d(2 * num_classes + 1, 1, kernel_size, padding=kernel_size // 2, device=device, dtype=dtype)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # type: ignore[arg-type]

    def forward(
        self,
        base_logits: Tensor,
        detail_logits: Tensor,
        error_logits: Tensor,
        base_probs: Tensor | None = None,
    ) -> Tensor:
        dtype = self.gate.weight.dtype
        x = torch.cat(
            [
                error_logits.to(dtype),
                torch.softmax(base_logits.to(dtype), dim=1),
                torch.softmax(detail_logits.to(dtype), dim=1),
            ],
            dim=1,
        )
        gate = error_logits + self.gate(x).to(error_logits.dtype)
        return mixture_log_probs(base_logits, detail_logits, gate)


def build_fusion(kind: str, num_classes: int, device=None, dtype=None) -> nn.Module:
    """``"mixture"`` (the paper's, default) or ``"learned"`` (a gate that starts as the mixture)."""
    if kind == "mixture":
        return MixtureFusion()
    if kind == "learned":
        return LearnedFusion(num_classes, device=device, dtype=dtype)
    raise ValueError(f"fusion: expected 'mixture' or 'learned', got {kind!r}")
