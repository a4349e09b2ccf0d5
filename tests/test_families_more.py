"""Model families beyond the core adapter tests: every SMP architecture and other encoder families,
SMP head activations, MobileViT, ViT-token transformers (BEiT, Data2VecVision), the query-based
Mask2Former / MaskFormer, torchvision's MobileNetV3 DeepLabV3 with its auxiliary head, and timm
user models with torchvision-style outputs. Each wraps a tiny seeded random model on 64x64 inputs."""

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from errwrap import ErrorCorrectionWrapper
from errwrap.adapters import HooksAdapter
from errwrap.adapters.specs import build_base, family_spec
from errwrap.adapters.transformers import semantic_logits_from_queries

from .test_adapters import _check_wrapped, _same_architecture, _train_heads

SIZE = 64


def _assert_same(a, b):
    """Equal state dicts and bitwise equal outputs in eval mode on a 64x64 batch (ViT-style
    models here are built for 64x64 inputs)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, a.in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for ta, tb in zip(a.eval()(x), b.eval()(x), strict=False):
            assert torch.equal(ta, tb)


def _wrap(model, **kwargs):
    return ErrorCorrectionWrapper(model, error_channels=8, detail_channels=8, **kwargs)


def _round_trip(wrap, tmp_path, make):
    """Saved and loaded twice, rebuilt from config.json and into a fresh ``model=``: equal outputs."""
    wrap.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["base"] is not None
    for loaded in (
        ErrorCorrectionWrapper.from_pretrained(tmp_path),
        ErrorCorrectionWrapper.from_pretrained(tmp_path, model=make()),
    ):
        assert type(loaded.base) is type(wrap.base) and (loaded.low_key, loaded.high_key) == (
            wrap.low_key,
            wrap.high_key,
        )
        _assert_same(wrap, loaded)


# ---------------------------------------------------------------------------------------- SMP
SMP_MORE = {
    "unetplusplus": ("resnet18", {"encoder_depth": 3, "decoder_channels": (16, 8, 8)}),
    "manet": ("resnet18", {"encoder_depth": 3, "decoder_channels": (16, 8, 8), "decoder_pab_channels": 8}),
    "linknet": ("resnet18", {"encoder_depth": 3}),
    "deeplabv3": ("resnet18", {"decoder_channels": 16, "encoder_output_stride": 8}),
    "upernet": ("resnet18", {"decoder_channels": 16, "encoder_depth": 4}),
    "unet": ("tu-mobilenetv3_small_100", {"decoder_channels": (16, 8, 8, 8, 8)}),
    "fpn": ("tu-convnext_atto", {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}),
    "segformer": ("mit_b0", {"decoder_segmentation_channels": 16, "in_channels": 4}),
    "deeplabv3plus": ("efficientnet-b0", {"decoder_channels": 16, "in_channels": 1, "aux_params": {"classes": 2}}),
}


def _smp(arch, encoder, seed=0, **kwargs):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(seed)
    kwargs.setdefault("classes", 5)
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, **kwargs).eval()


@pytest.mark.parametrize("case", list(SMP_MORE))
def test_smp_architectures_and_encoders(case):
    encoder, kwargs = SMP_MORE[case]
    model = _smp(case, encoder, **kwargs)
    wrap = _wrap(model)
    in_channels = kwargs.get("in_channels", 3)
    assert wrap.adapter.name == "smp" and wrap.in_channels == in_channels
    x = torch.randn(2, in_channels, SIZE, SIZE)
    with torch.no_grad():
        reference = model(x)
    reference = reference[0] if isinstance(reference, tuple) else reference  # aux_params: (masks, labels)
    _check_wrapped(wrap, reference, x, 5)
    features = wrap.forward_base(x).features
    if case in ("unet", "manet", "linknet"):  # full-resolution decoder output: the stride-4 block instead
        assert wrap.low_key == "enc2" and wrap.high_key.startswith("decoder.blocks.")
        assert features[wrap.high_key].shape[-2:] == (SIZE // 4, SIZE // 4)
    else:
        assert (wrap.low_key, wrap.high_key) == ("enc2", "decoder")
    assert features["enc2"].shape[-2:] == (SIZE // 4, SIZE // 4)
    assert _same_architecture(build_base(json.loads(json.dumps(wrap.adapter.spec(model)))), model)


def test_smp_pan_needs_a_larger_probe_and_says_so():
    model = _smp("pan", "resnet18", decoder_channels=16)
    with pytest.raises(RuntimeError, match="sample_size="):
        _wrap(model)
    wrap = _wrap(model, sample_size=128)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        _check_wrapped(wrap, model(x), x, 5)


@pytest.mark.parametrize(
    ("activation", "to_output"), [("sigmoid", lambda z: torch.sigmoid(z[:, 1:])), ("softmax2d", lambda z: z.softmax(1))]
)
def test_smp_logits_are_read_before_the_heads_activation(activation, to_output):
    """``activation="sigmoid"`` (binary, one channel) or ``"softmax2d"``: the base logits are the
    values before the activation, so the activation of them is exactly the model's output."""
    classes = 1 if activation == "sigmoid" else 4
    model = _smp(
        "unet", "resnet18", classes=classes, activation=activation, encoder_depth=3, decoder_channels=(16, 8, 8)
    )
    wrap = _wrap(model)
    assert wrap.num_classes == max(classes, 2)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = wrap.eval()(x)
        torch.testing.assert_close(to_output(out.base_logits), model(x), rtol=1e-5, atol=1e-6)
    assert float(out.error_prob.min()) >= 0.0 and float(out.error_prob.max()) <= 1.0


@pytest.mark.parametrize(
    ("encoder", "low", "channels_first"),
    [("tu-convnext_atto", "enc0", True), ("tu-vit_tiny_patch16_224", "reassemble0", False)],
)
def test_smp_dpt_low_level_is_at_stride_4(encoder, low, channels_first):
    """DPT's encoder gives no input image as enc0; a ViT encoder is at stride 16 throughout, so the
    decoder's first reassembled map (stride 4) is the low-level feature, read by a removable hook."""
    extra = {"decoder_readout": "ignore"} if channels_first else {"dynamic_img_size": True}
    model = _smp("dpt", encoder, **extra)
    wrap = _wrap(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        _check_wrapped(wrap, model(x), x, 5)
        features = wrap.forward_base(x).features
    assert wrap.low_key == low and features[low].shape[-2:] == (SIZE // 4, SIZE // 4)
    block = model.decoder.reassemble_blocks[0]
    assert len(block._forward_hooks) == (0 if channels_first else 1)
    wrap.adapter.detach()
    assert not block._forward_hooks


# ---------------------------------------------------------------------------------- torchvision
def test_torchvision_mobilenet_deeplabv3_with_aux_head(tmp_path):
    segmentation = pytest.importorskip("torchvision.models.segmentation")

    def make():
        torch.manual_seed(0)
        return segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=4, aux_loss=True
        ).eval()

    model = make()
    wrap = _wrap(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        _check_wrapped(wrap, model(x)["out"], x, 4)
        features = wrap.forward_base(x).features
    assert features["low"].shape[-2:] == (SIZE // 4, SIZE // 4)
    assert wrap.adapter.spec(model)["config"] == {
        "name": "deeplabv3_mobilenet_v3_large",
        "num_classes": 4,
        "aux_loss": True,
    }
    _round_trip(wrap.eval(), tmp_path, make)


# ---------------------------------------------------------------------------------- transformers
def _mobilevit(version, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if version == 1:
        config = transformers.MobileViTConfig(
            image_size=SIZE, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
            num_attention_heads=2, aspp_out_channels=16, num_labels=4,
        )  # fmt: skip
        return transformers.MobileViTForSemanticSegmentation(config).eval()
    config = transformers.MobileViTV2Config(image_size=SIZE, width_multiplier=0.25, aspp_out_channels=16, num_labels=4)
    return transformers.MobileViTV2ForSemanticSegmentation(config).eval()


@pytest.mark.parametrize("version", [1, 2])
def test_mobilevit_taps_its_aspp_output(version):
    model = _mobilevit(version)
    wrap = _wrap(model)
    assert wrap.adapter.name == "transformers" and (wrap.low_key, wrap.high_key) == ("hidden1", "decode_head")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        _check_wrapped(wrap, reference, x, 4)
        features = wrap.forward_base(x).features
        # dropout is off in eval
        assert torch.equal(model.segmentation_head.classifier(features["decode_head"]), reference)
    assert features["hidden1"].shape[-2:] == (SIZE // 4, SIZE // 4)
    assert _same_architecture(build_base(json.loads(json.dumps(wrap.adapter.spec(model)))), model)


def _beit(kind, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "beit": (transformers.BeitConfig, transformers.BeitForSemanticSegmentation),
        "data2vec": (transformers.Data2VecVisionConfig, transformers.Data2VecVisionForSemanticSegmentation),
    }[kind]
    config = config_cls(
        image_size=SIZE, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=37, out_indices=[0, 1, 2, 3], pool_scales=[1, 2], num_labels=4, auxiliary_channels=8,
        use_auxiliary_head=True,
    )  # fmt: skip
    return model_cls(config).eval()


@pytest.mark.parametrize("kind", ["beit", "data2vec"])
def test_vit_token_models_are_tapped_and_rebuilt_from_their_spec(kind, tmp_path):
    """BEiT-style hidden states are tokens: the wrapper taps the stride-4 FPN map and the UperNet
    head's fused feature (not the auxiliary head's), and the hooked model still has a spec."""
    model = _beit(kind)
    wrap = _wrap(model)
    assert isinstance(wrap.adapter, HooksAdapter)
    assert wrap.low_key.endswith("fpn1") and wrap.high_key == "decode_head.fpn_bottleneck"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        _check_wrapped(wrap, model(pixel_values=x).logits, x, 4)
        assert wrap.forward_base(x).features[wrap.low_key].shape[-2:] == (SIZE // 4, SIZE // 4)
    assert wrap.adapter.spec(model) == family_spec(model) and family_spec(model)["class"] == type(model).__name__
    _round_trip(wrap.eval(), tmp_path, lambda: _beit(kind, seed=3))


def test_smp_model_tapped_with_hooks_keeps_its_spec(tmp_path):
    model = _smp("unet", "resnet18", encoder_depth=3, decoder_channels=(16, 8, 8))
    wrap = _wrap(model, adapter="hooks", low_level="encoder.layer1", high_level="decoder")
    assert wrap.adapter.spec(model)["family"] == "smp"
    _round_trip(
        wrap.eval(), tmp_path, lambda: _smp("unet", "resnet18", seed=4, encoder_depth=3, decoder_channels=(16, 8, 8))
    )


# ------------------------------------------------------------------- Mask2Former / MaskFormer
def _query_model(kind, seed=0):
    pytest.importorskip("scipy")  # transformers' Hungarian matcher
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    swin = transformers.SwinConfig(
        image_size=SIZE, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    if kind == "mask2former":
        config = transformers.Mask2FormerConfig(
            backbone_config=swin, num_queries=6, hidden_dim=32, feature_size=32, mask_feature_size=32,
            encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
            num_labels=4,
        )  # fmt: skip
        return transformers.Mask2FormerForUniversalSegmentation(config).eval()
    decoder = {"model_type": "detr", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
               "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
               "num_queries": 6}  # fmt: skip
    config = transformers.MaskFormerConfig(
        backbone_config=swin, fpn_feature_size=32, mask_feature_size=32, decoder_config=decoder, num_labels=4
    )
    return transformers.MaskFormerForInstanceSegmentation(config).eval()


def test_semantic_logits_from_queries_by_hand():
    # one query, class probabilities [0.5, 0.25, 0.25 (no object)], mask probability 0.5
    class_logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    mask_logits = torch.zeros(1, 1, 2, 3)
    logits = semantic_logits_from_queries(class_logits, mask_logits)
    assert logits.shape == (1, 2, 2, 3)
    torch.testing.assert_close(logits.exp(), torch.tensor([0.25, 0.125]).view(1, 2, 1, 1).expand(1, 2, 2, 3))
    torch.testing.assert_close(logits.softmax(1)[:, 0], torch.full((1, 2, 3), 2 / 3))
    # a pixel no query covers gives finite logits
    assert torch.isfinite(semantic_logits_from_queries(class_logits, torch.full((1, 1, 1, 1), -1e4))).all()


@pytest.mark.parametrize("kind", ["mask2former", "maskformer"])
def test_query_models_give_semantic_logits(kind, tmp_path):
    model = _query_model(kind)
    wrap = _wrap(model)
    assert wrap.adapter.name == "transformers" and (wrap.low_key, wrap.high_key) == ("encoder0", "pixel_decoder")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(pixel_values=x)
        base = wrap.forward_base(x)
    # the per-pixel score of post_process_semantic_segmentation, at the masks' resolution, one query at a time
    queries = range(out.class_queries_logits.shape[1])
    scores = sum(
        out.class_queries_logits[:, q].softmax(-1)[:, :-1, None, None] * out.masks_queries_logits[:, q, None].sigmoid()
        for q in queries
    )
    assert base.logits.shape == (2, 4, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(base.logits.exp(), scores, rtol=1e-5, atol=1e-7)
    assert base.features["encoder0"].shape[-2:] == (SIZE // 4, SIZE // 4)
    _check_wrapped(wrap, base.logits, x, 4)
    _round_trip(wrap.eval(), tmp_path, lambda: _query_model(kind, seed=2))


@pytest.mark.slow
def test_mask2former_head_training_keeps_base_frozen():
    _train_heads(_wrap(_query_model("mask2former")), steps=10, num_classes=4, size=SIZE)


def test_oneformer_is_refused_with_a_reason():
    pytest.importorskip("scipy")
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinConfig(image_size=SIZE, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    config = transformers.OneFormerConfig(
        backbone_config=swin, num_queries=6, hidden_dim=32, conv_dim=32, mask_dim=32, encoder_feedforward_dim=32,
        dim_feedforward=32, encoder_layers=1, decoder_layers=2, text_encoder_num_layers=1, text_encoder_width=32,
        query_dec_layers=1, num_attention_heads=2, num_labels=4, is_training=False,
    )  # fmt: skip
    with pytest.raises(TypeError, match="task inputs.*Mask2Former"):
        _wrap(transformers.OneFormerForUniversalSegmentation(config).eval())


# ------------------------------------------------------------------- timm user models
class TimmSeg(nn.Module):
    """A timm ``features_only`` backbone with a small head; torchvision-style outputs without
    being torchvision: ``OrderedDict(out=, aux=)``, logits at ``1/down`` of the input."""

    def __init__(self, encoder: str, down: int = 1, returns: str = "ordered") -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(encoder, features_only=True, pretrained=False)
        channels = self.backbone.feature_info.channels()
        self.fuse = nn.Sequential(
            nn.Conv2d(channels[-1] + channels[1], 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.classifier = nn.Conv2d(16, 4, 1)
        self.aux = nn.Conv2d(channels[-2], 4, 1)
        self.down, self.returns = down, returns

    def forward(self, x):
        features = self.backbone(x)
        high = F.interpolate(features[-1], size=features[1].shape[-2:], mode="bilinear", align_corners=False)
        size = (x.shape[-2] // self.down, x.shape[-1] // self.down)
        logits = F.interpolate(
            self.classifier(self.fuse(torch.cat([high, features[1]], 1))),
            size=size,
            mode="bilinear",
            align_corners=False,
        )
        aux = F.interpolate(self.aux(features[-2]), size=size, mode="bilinear", align_corners=False)
        return OrderedDict(out=logits, aux=aux) if self.returns == "ordered" else {"logits": logits, "aux": aux}


@pytest.mark.parametrize(("encoder", "down", "returns", "low"), [
    ("resnet18", 8, "ordered", "backbone.layer1"),
    ("mobilenetv3_small_100", 4, "logits", "backbone.blocks.0"),
    ("convnext_atto", 1, "ordered", "backbone.stages_0"),
])  # fmt: skip
def test_timm_user_models_with_aux_outputs(encoder, down, returns, low, tmp_path):
    pytest.importorskip("timm")

    def make(seed=0):
        torch.manual_seed(seed)
        return TimmSeg(encoder, down, returns).eval()

    model = make()
    wrap = _wrap(model)
    assert isinstance(wrap.adapter, HooksAdapter) and (wrap.low_key, wrap.high_key) == (low, "fuse")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        output = model(x)
        _check_wrapped(wrap, output["out" if returns == "ordered" else "logits"], x, 4)
    wrap.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["base"] is None
    with pytest.raises(ValueError, match="model="):
        ErrorCorrectionWrapper.from_pretrained(tmp_path)
    _assert_same(wrap.eval(), ErrorCorrectionWrapper.from_pretrained(tmp_path, model=make(seed=1)))
