"""Small building blocks: norm and activation look-up by name, and ``ConvNormAct``.

Layers are named by plain strings (``"batchnorm"``, ``"relu"``) so that a head's configuration is
JSON data that survives ``save_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["NORM_LAYERS", "ACT_LAYERS", "make_norm", "make_act", "ConvNormAct", "resize"]

LayerSpec = str | Callable[..., nn.Module]


def _group_norm(num_channels: int, **kwargs) -> nn.GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if num_channels % g == 0)
    return nn.GroupNorm(groups, num_channels, **kwargs)


NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "batchnorm": nn.BatchNorm2d,
    "groupnorm": _group_norm,
    "instancenorm": lambda c, **kw: nn.InstanceNorm2d(c, affine=True, **kw),
    "none": lambda c, **kw: nn.Identity(),
}

ACT_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "none": nn.Identity,
}


def make_norm(spec: LayerSpec, num_channels: int, device=None, dtype=None) -> nn.Module:
    """Build a 2-d normalisation layer from a name in ``NORM_LAYERS`` or a callable ``f(C)``."""
    if isinstance(spec, str):
        if spec not in NORM_LAYERS:
            raise ValueError(f"unknown norm_layer {spec!r}; expected one of {sorted(NORM_LAYERS)}")
        return NORM_LAYERS[spec](num_channels, device=device, dtype=dtype)
    if callable(spec):
        return spec(num_channels)
    raise TypeError(f"norm_layer: expected a name or a callable, got {type(spec).__name__}")


def make_act(spec: LayerSpec) -> nn.Module:
    """Build an activation from a name in ``ACT_LAYERS`` or a zero-argument callable."""
    if isinstance(spec, str):
        if spec not in ACT_LAYERS:
            raise ValueError(f"unknown act_layer {spec!r}; expected one of {sorted(ACT_LAYERS)}")
        return ACT_LAYERS[spec]()
    if callable(spec):
        return spec()
    raise TypeError(f"act_layer: expected a name or a callable, got {type(spec).__name__}")


class ConvNormAct(nn.Sequential):
    """``Conv2d`` (no bias) -> norm -> activation, with 'same' padding.

    Shapes:
        input ``(B, in_channels, H, W)``, output ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dilation: int = 1,
        norm_layer: LayerSpec = "batchnorm",
        act_layer: LayerSpec = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            bias=False,
            device=device,
            dtype=dtype,
        )
        self.norm = make_norm(norm_layer, out_channels, device=device, dtype=dtype)
        self.act = make_act(act_layer)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize a ``B x C x h x w`` map to ``size`` (bilinear, ``align_corners=False``).

    Returns ``x`` itself when it already has that size, so same-size maps cost nothing.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
