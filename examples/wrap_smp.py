"""Wrap a segmentation_models_pytorch model and read its error map (needs `pip install errwrap[smp]`).

    python examples/wrap_smp.py

Uses random weights (encoder_weights=None) so it runs offline; with a trained model the error map
means something only after the heads are fine-tuned (see examples/finetune_scenes.py).
"""

import segmentation_models_pytorch as smp
import torch

from errwrap import ErrorCorrectionWrapper


def main() -> None:
    torch.manual_seed(0)
    model = smp.Unet("resnet34", encoder_weights=None, classes=19).eval()
    wrap = ErrorCorrectionWrapper(model)  # the SMP adapter is chosen automatically
    print(f"adapter {wrap.adapter.name!r}: low-level feature {wrap.low_key!r}, high-level {wrap.high_key!r}")
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        out = wrap.eval()(images)
        reference = model(images)
    assert torch.equal(out.base_logits, reference), "base logits must equal the unwrapped model's"
    print(
        f"error_prob {tuple(out.error_prob.shape)}, mean {out.error_prob.mean():.3f}; corrected labels "
        f"{tuple(out.labels.shape)}"
    )
    print(
        f"heads add {sum(p.numel() for p in wrap.head_parameters()) / 1e6:.2f} M parameters to "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M"
    )


if __name__ == "__main__":
    main()
