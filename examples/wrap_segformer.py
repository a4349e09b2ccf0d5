"""Wrap a Hugging Face transformers SegFormer and read its error map (needs `pip install errwrap[transformers]`).

    python examples/wrap_segformer.py

Builds a small SegFormer from a config with random weights, so it runs offline. With a trained
checkpoint use SegformerForSemanticSegmentation.from_pretrained(...) instead. SegFormer's logits
come at 1/4 of the input size; errwrap returns every map at the input size.
"""

import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from errwrap import ErrorCorrectionWrapper


def main() -> None:
    torch.manual_seed(0)
    config = SegformerConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8],
                             decoder_hidden_size=64, num_labels=150)
    model = SegformerForSemanticSegmentation(config).eval()
    wrap = ErrorCorrectionWrapper(model)  # the transformers adapter: hidden states + decode head feature
    print(f"adapter {wrap.adapter.name!r}: low-level feature {wrap.low_key!r}, high-level {wrap.high_key!r}")
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = wrap.eval()(images)
        native = model(pixel_values=images).logits
    print(
        f"SegFormer logits {tuple(native.shape)} -> errwrap maps {tuple(out.logits.shape)}, error_prob "
        f"{tuple(out.error_prob.shape)}"
    )


if __name__ == "__main__":
    main()
