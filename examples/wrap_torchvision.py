"""Wrap a torchvision segmentation model (DeepLabV3, FCN or LRASPP) and read its error map.

    python examples/wrap_torchvision.py

Random weights (weights=None, weights_backbone=None), so it runs offline.
"""

import torch
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

from errwrap import ErrorCorrectionWrapper


def main() -> None:
    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    wrap = ErrorCorrectionWrapper(model)  # the torchvision adapter: "out" logits, layer features
    print(f"adapter {wrap.adapter.name!r}: low-level feature {wrap.low_key!r}, high-level {wrap.high_key!r}")
    images = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        out = wrap.eval()(images)
        reference = model(images)["out"]
    assert torch.equal(out.base_logits, reference), "base logits must equal the model's 'out'"
    print(f"error_prob {tuple(out.error_prob.shape)}, corrected labels {tuple(out.labels.shape)}")


if __name__ == "__main__":
    main()
