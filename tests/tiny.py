"""Tiny seeded base networks speaking errwrap's native protocol, shared by the core tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyBase(nn.Module):
    """Three stride-2 conv stages with BatchNorm; logits at ``logit_stride`` (1, 2, 4 or 8).

    ``returns`` picks the output form: ``"tuple"`` -> (logits, [f1, f2, f3]),
    ``"mapping"`` -> {"logits", "features": {"low", "mid", "high"}}, ``"single"`` ->
    (logits, f3) with one feature map.
    """

    def __init__(
        self, num_classes: int = 5, logit_stride: int = 4, returns: str = "tuple", in_channels: int = 3
    ) -> None:
        super().__init__()
        self.logit_stride = logit_stride
        self.returns = returns
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor):
        f1 = self.stem(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        logits = self.classifier(f3)
        h, w = x.shape[-2] // self.logit_stride, x.shape[-1] // self.logit_stride
        logits = nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        if self.returns == "mapping":
            return {"logits": logits, "features": {"low": f1, "mid": f2, "high": f3}}
        if self.returns == "single":
            return logits, f3
        return logits, [f1, f2, f3]


def tiny_base(seed: int = 0, **kwargs) -> TinyBase:
    torch.manual_seed(seed)
    return TinyBase(**kwargs)


def batch(n: int = 2, size: int = 32, num_classes: int = 5, seed: int = 0, ignore_index: int = 255):
    """A fixed batch of images and labels, with a few ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, num_classes, (n, size, size), generator=g)
    labels[:, :2, :2] = ignore_index
    return images, labels
