"""The three heads of the method: error prediction, detail re-labelling, and fusion.

See docs/method.md for which choices are the paper's and which are errwrap's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import is_tracing
from .layers import ConvNormAct, LayerSpec, resize

_LOG_EPS = math.log(1e-12)
#: Smallest normal float32: a mixture probability below it lost precision (or underflowed to 0) in
#: :func:`mixture_log_probs_inference`, which then recomputes those pixels in log space.
_TINY = torch.finfo(torch.float32).tiny

__all__ = [
    "confidence_cues",
    "mixture_log_probs",
    "mixture_log_probs_inference",
    "ErrorHead",
    "DetailHead",
    "MixtureFusion",
    "LearnedFusion",
    "build_fusion",
]


def confidence_cues(probs: Tensor, log_probs: Tensor | None = None) -> Tensor:
    """Per-pixel confidence cues of a softmax map: max probability, top-2 margin, and entropy
    normalised by ``log(C)`` (all in ``[0, 1]``).

    Args:
        probs: class probabilities.
        log_probs: ``log(probs)`` when the caller has it (e.g. a ``log_softmax``): the entropy then
            reads it instead of taking another logarithm.

    Shapes:
        probs, log_probs ``(B, C, H, W)`` with ``C >= 2`` -> ``(B, 3, H, W)``.
    """
    # max and masked max instead of topk(2): 2-3x faster on CPU for C in 11..19; a tie for the
    # top class gives margin 0, as topk would.
    max_prob = probs.amax(dim=1, keepdim=True)
    is_max = probs == max_prob
    second = torch.where(is_max, -1.0, probs).amax(dim=1, keepdim=True)
    second = torch.where(is_max.sum(dim=1, keepdim=True) > 1, max_prob, second)
    margin = max_prob - second
    # log(p) floored at log(1e-12), as for probabilities clamped to 1e-12: 0 * log(0) stays 0.
    log_probs = torch.log(probs.clamp_min(1e-12)) if log_probs is None else log_probs.clamp_min(_LOG_EPS)
    entropy = -log_probs.mul_(probs).sum(dim=1, keepdim=True)
    entropy = entropy / math.log(probs.shape[1])
    return torch.cat([max_prob, margin, entropy], dim=1)


def mixture_log_probs(base_logits: Tensor, detail_logits: Tensor, error_logits: Tensor) -> Tensor:
    """Fused log-probabilities of the paper's mixture
    ``p = (1 - p_err) * softmax(base) + p_err * softmax(detail)``, with ``p_err = sigmoid(error)``.

    Computed in log space, ``logsumexp(logsigmoid(-e) + log_softmax(z0), logsigmoid(e) +
    log_softmax(z1))``, so it stays finite for logits as large as ``±1e4`` and never takes
    ``log(0)``. Half-precision inputs are computed (and returned) in float32.

    Shapes:
        base_logits, detail_logits ``(B, C, H, W)``; error_logits ``(B, 1, H, W)``;
        returns ``(B, C, H, W)``.

    Example:
        >>> z0, z1, e = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8), torch.randn(2, 1, 8, 8)
        >>> mixture_log_probs(z0, z1, e).exp().sum(1).allclose(torch.ones(2, 8, 8))
        True
    """
    dtype = torch.promote_types(base_logits.dtype, torch.float32)
    keep = F.logsigmoid(-error_logits.to(dtype)) + F.log_softmax(base_logits.to(dtype), dim=1)
    change = F.logsigmoid(error_logits.to(dtype)) + F.log_softmax(detail_logits.to(dtype), dim=1)
    return torch.logaddexp(keep, change)


def mixture_log_probs_inference(base_logits: Tensor, base_probs: Tensor, detail_logits: Tensor, error_logits: Tensor) -> Tensor:
    """:func:`mixture_log_probs` for inference, from the base's probabilities already computed.

    Mixes in probability space, ``log(sigmoid(-e) * p0 + sigmoid(e) * softmax(z1))``, in place:
    one logarithm instead of :func:`mixture_log_probs`'s two log-sigmoids, two log-softmaxes and
    a ``logaddexp`` per class, and one ``B x C x H x W`` buffer instead of five. Both terms are
    non-negative and each is exact to float32 rounding, so the result equals the log-space one
    to float32 tolerance wherever the mixture probability is a normal float (``>= 1.2e-38``);
    pixels with a smaller probability (logits tens of units apart) are recomputed with
    :func:`mixture_log_probs`. Not for training: no gradient flows through the in-place ops.

    Shapes:
        base_logits, base_probs (``softmax(base_logits)`` in float32), detail_logits
        ``(B, C, H, W)``; error_logits ``(B, 1, H, W)``; returns ``(B, C, H, W)`` float32.
    """
    error = error_logits.float()
    mixed = torch.softmax(detail_logits.float(), dim=1).mul_(torch.sigmoid(error))
    mixed = mixed.addcmul_(base_probs, torch.sigmoid(-error))
    underflow = mixed < _TINY if bool(mixed.amin() < _TINY) else None
    log_probs = mixed.log_()
    if underflow is not None:  # rare: recompute, in log space, the pixels that underflowed
        log_probs = torch.where(underflow, mixture_log_probs(base_logits, detail_logits, error_logits), log_probs)
    return log_probs


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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected >= 1, got {num_blocks}")
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior: expected a probability in (0, 1), got {prior}")
        dd = {"device": device, "dtype": dtype}
        in_channels = feature_channels + num_classes + 3
        blocks = [ConvNormAct(in_channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)]
        blocks += [
            ConvNormAct(channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)
            for _ in range(num_blocks - 1)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(channels, 1, 1, **dd)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.constant_(self.classifier.bias, math.log(prior / (1.0 - prior)))
        # Full-resolution skip from the base's own confidence cues (max probability, margin,
        # entropy), added after upsampling: the conv body sees only the high-level feature's
        # resolution, which blurs errors on thin parts and boundaries. It starts as the
        # max-softmax baseline (error logit falls with the max probability, 0 at 0.5), so the
        # head starts from what MSP knows and learns what it misses.
        self.refine = nn.Conv2d(3, 1, 1, **dd)
        with torch.no_grad():
            self.refine.weight.copy_(torch.tensor([-8.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.refine.bias.fill_(4.0)

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
        weight, bias = self.refine.weight.float(), self.refine.bias.float()
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected >= 1, got {num_blocks}")
        dd = {"device": device, "dtype": dtype}
        reduce_channels = reduce_channels or channels
        self.reduce = ConvNormAct(high_channels, reduce_channels, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
        in_channels = low_channels + reduce_channels + 1
        blocks = [ConvNormAct(in_channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)]
        blocks += [
            ConvNormAct(channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)
            for _ in range(num_blocks - 1)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(channels, num_classes, 1, **dd)

    def forward(self, low: Tensor, high: Tensor, error_prob: Tensor) -> Tensor:
        high = resize(self.reduce(high), low.shape[-2:])
        x = torch.cat([low, high.to(low.dtype), error_prob.to(low.dtype)], dim=1)
        return self.classifier(self.blocks(x))


class MixtureFusion(nn.Module):
    """Stage (iii), the paper's mixture: no parameters, see :func:`mixture_log_probs`.

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
        from .ops.fusion import fused_mixture_log_probs  # heads <- ops.fusion imports heads

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
        nn.init.zeros_(self.gate.bias)

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
