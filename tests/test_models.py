import json

import pytest
import torch

from errwrap.adapters.specs import build_base
from errwrap.models import ASPP, DeepLabV3Plus, default_atrous_rates
from errwrap.wrapper import ErrorCorrectionWrapper

SMALL = {"aspp_channels": 16, "decoder_channels": 16, "low_level_channels": 8}


def _model(encoder="resnet18", output_stride=16, seed=0, **kwargs):
    torch.manual_seed(seed)
    return DeepLabV3Plus(encoder, num_classes=5, output_stride=output_stride, **{**SMALL, **kwargs})


@pytest.mark.parametrize("encoder", ["resnet18", "mobilenetv3_small_050", "convnext_atto"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_shapes_at_input_resolution_and_stride4(encoder, output_stride):
    model = _model(encoder, output_stride).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 5, 64, 96)
    assert list(features) == ["low", "high"]
    assert features["low"].shape[-2:] == (16, 24)
    assert features["low"].shape[1] == model.low_encoder_channels
    assert features["high"].shape == (2, 16, 16, 24)
    assert model.encoder.feature_info.reduction()[-1] == output_stride


def test_high_is_the_classifier_input():
    model = _model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, features = model(x)
        low, high = model.forward_features(x)
        head = model.forward_head(features["high"])
    assert torch.equal(high, features["high"]) and torch.equal(low, features["low"])
    expected = torch.nn.functional.interpolate(head, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(logits, expected)


def test_atrous_rates_follow_the_paper():
    assert default_atrous_rates(16) == (6, 12, 18)
    assert default_atrous_rates(8) == (12, 24, 36)
    for os_, rates in ((16, [6, 12, 18]), (8, [12, 24, 36])):
        model = _model(output_stride=os_)
        assert model.config["atrous_rates"] == rates
        dilations = [b.conv.dilation[0] for b in model.aspp.branches[1:-1]]
        assert dilations == rates
    assert _model(atrous_rates=(2, 4)).config["atrous_rates"] == [2, 4]


def test_aspp_shapes_and_pooling_branch():
    aspp = ASPP(8, 4, (1, 2)).eval()
    out = aspp(torch.randn(2, 8, 5, 7))
    assert out.shape == (2, 4, 5, 7)
    assert len(aspp.branches) == 4  # 1x1, two atrous, image pooling


def test_spec_rebuilds_identical_architecture():
    model = _model("mobilenetv3_small_050", output_stride=8, dropout=0.2).eval()
    spec = model.errwrap_spec()
    assert spec["family"] == "errwrap.DeepLabV3Plus"
    spec = json.loads(json.dumps(spec))  # plain JSON data
    rebuilt = build_base(spec)
    assert rebuilt.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x).logits, model(x).logits)


def test_dropout_before_classifier_samples_in_train_mode():
    model = _model(dropout=0.5)
    assert model.dropout.p == 0.5
    model.eval()
    model.dropout.train()  # Monte Carlo dropout: only the dropout samples
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x).logits, model(x).logits
    assert not torch.equal(a, b)
    model.dropout.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)


def test_bad_arguments():
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabV3Plus("resnet18", 5, output_stride=4)
    with pytest.raises(ValueError, match="dropout"):
        DeepLabV3Plus("resnet18", 5, dropout=1.0)
    with pytest.raises(ValueError, match="output_stride=32"):
        DeepLabV3Plus("swin_tiny_patch4_window7_224", 5, output_stride=16)


@pytest.mark.slow
def test_undilated_output_stride_32_on_nhwc_encoder():
    torch.manual_seed(0)
    model = DeepLabV3Plus("swin_tiny_patch4_window7_224", 3, output_stride=32, **SMALL).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 3, 224, 224)
    assert features["low"].shape == (1, 96, 56, 56)


def test_wrapper_uses_low_and_high():
    model = _model().eval()
    wrap = ErrorCorrectionWrapper(model)
    assert wrap.adapter.name == "native"
    assert (wrap.low_key, wrap.high_key) == ("low", "high")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = wrap.eval()(x)
        assert torch.equal(out.base_logits, model(x).logits)
    assert out.logits.shape == out.detail_logits.shape == (2, 5, 64, 64)
    assert out.error_logits.shape == (2, 1, 64, 64)
    assert wrap.adapter.spec(model) == model.errwrap_spec()
