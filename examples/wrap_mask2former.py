"""Wrap a Hugging Face Mask2Former and read its error map (needs `pip install errwrap[transformers] scipy`).

    python examples/wrap_mask2former.py

Mask2Former predicts class/mask query pairs, not per-pixel logits. errwrap turns them into
semantic logits as Mask2FormerImageProcessor.post_process_semantic_segmentation does (at 1/4 of
the input size) and returns every map at the input size. Built from a config with random weights,
so it runs offline; with a trained checkpoint use Mask2FormerForUniversalSegmentation.from_pretrained(...).
"""

import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

from errwrap import ErrorCorrectionWrapper


def main() -> None:
    torch.manual_seed(0)
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_queries=20,
        hidden_dim=64,
        feature_size=64,
        mask_feature_size=64,
        encoder_layers=1,
        decoder_layers=2,
        num_labels=19,
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    wrap = ErrorCorrectionWrapper(model)  # the transformers adapter: backbone stages + pixel decoder feature
    print(f"adapter {wrap.adapter.name!r}: low-level feature {wrap.low_key!r}, high-level {wrap.high_key!r}")
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = wrap.eval()(images)
        queries = model(pixel_values=images)
    print(
        f"Mask2Former queries {tuple(queries.class_queries_logits.shape)} and masks "
        f"{tuple(queries.masks_queries_logits.shape)} "
        f"-> errwrap maps {tuple(out.logits.shape)}, error_prob {tuple(out.error_prob.shape)}"
    )


if __name__ == "__main__":
    main()
