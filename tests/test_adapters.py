import ast
import gc
import json
import pathlib
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import errwrap.adapters
from errwrap.adapters import (
    PROTOCOL_HELP,
    Adapter,
    BaseAdapter,
    BaseOutput,
    Family,
    FeatureInfo,
    NativeAdapter,
    SMPAdapter,
    TransformersAdapter,
    choose_default_features,
    family_spec,
    feature_info,
    find_adapter,
    register_adapter,
    register_family,
    registered_adapters,
    registered_families,
    unregister_adapter,
    unregister_family,
)
from errwrap.adapters.hooks import FeatureTap, HooksAdapter, logits_from_output
from errwrap.adapters.select import choose_features, probe, select_adapter
from errwrap.adapters.specs import BASE_FAMILIES, build_base
from errwrap.adapters.transformers import DECODE_TAPS
from errwrap.losses import ErrorCorrectionLoss
from errwrap.models import DeepLabV3Plus
from errwrap.wrapper import ErrorCorrectionWrapper

from .tiny import TinyBase, batch

SIZE = 64


def _at_input(logits, size=(SIZE, SIZE)):
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _check_wrapped(wrap, reference_logits, x, num_classes):
    """Shapes at input resolution and base logits equal to the unwrapped model's."""
    wrap.eval()
    with torch.no_grad():
        out = wrap(x)
    b, _, h, w = x.shape
    assert out.logits.shape == out.base_logits.shape == out.detail_logits.shape == (b, num_classes, h, w)
    assert out.error_logits.shape == (b, 1, h, w)
    assert torch.equal(out.base_logits, _at_input(reference_logits, (h, w)))
    return out


def _train_heads(wrap, steps=20, num_classes=5, size=32):
    """20 AdamW steps on the heads only: the loss drops and the base stays bitwise unchanged."""
    images, labels = batch(n=2, size=size, num_classes=num_classes, seed=1)
    before = {k: v.clone() for k, v in wrap.base.state_dict().items()}
    opt = torch.optim.AdamW(wrap.head_parameters(), lr=1e-3)
    loss_fn = ErrorCorrectionLoss()
    wrap.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(wrap(images), labels).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = wrap.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert losses[-1] < losses[0]
    return losses


def _same_architecture(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


# ---------------------------------------------------------------------------------------- SMP
def _smp(arch, seed=0, **kwargs):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(seed)
    return smp.create_model(arch, encoder_name="resnet18", encoder_weights=None, classes=5, **kwargs).eval()


SMP_CASES = {
    "unet": {"encoder_depth": 3, "decoder_channels": (16, 8, 8)},
    "fpn": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
    "deeplabv3plus": {"decoder_channels": 16},
    "segformer": {"decoder_segmentation_channels": 16},
    "pspnet": {"decoder_channels": 16},
}


@pytest.mark.parametrize("arch", list(SMP_CASES))
def test_smp_outputs_features_and_spec(arch):
    model = _smp(arch, **SMP_CASES[arch])
    wrap = ErrorCorrectionWrapper(model)
    assert wrap.adapter.name == "smp"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model(x)
    _check_wrapped(wrap, reference, x, 5)
    features = wrap.forward_base(x).features
    assert list(features)[-1] == "decoder"
    if arch == "unet":  # its decoder ends at full resolution: the stride-4 decoder block is the high-level default
        assert wrap.high_key == "decoder.blocks.0" and features["decoder.blocks.0"].shape[-2:] == (SIZE // 4, SIZE // 4)
    else:
        assert wrap.high_key == "decoder"
    assert wrap.low_key == "enc2" and features["enc2"].shape[-2:] == (SIZE // 4, SIZE // 4)
    assert torch.equal(features["enc0"], x)
    coarse = wrap.adapter.call_with_coarse_logits(model, x)[1]
    if arch in ("deeplabv3plus", "fpn", "segformer", "pspnet"):  # heads ending in an upsampling: read before it
        up = next(m for m in model.segmentation_head if isinstance(m, nn.Upsample))
        with torch.no_grad():
            assert coarse is not None and coarse.shape[:2] == (2, 5) and torch.equal(up(coarse), reference)
    else:
        assert coarse is None
    spec = json.loads(json.dumps(wrap.adapter.spec(model)))
    assert spec["family"] == "smp" and spec["config"]["arch"] == arch and spec["config"]["encoder_weights"] is None
    assert _same_architecture(build_base(spec), model)


def test_smp_aux_head_and_input_check():
    model = _smp("fpn", aux_params={"classes": 3}, **SMP_CASES["fpn"])
    wrap = ErrorCorrectionWrapper(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        masks, _ = model(x)
    _check_wrapped(wrap, masks, x, 5)
    with pytest.raises(RuntimeError, match="divisible by 32"):
        wrap.forward_base(torch.randn(1, 3, 40, 40))  # SMP's own input check, replicated


@pytest.mark.slow
def test_smp_head_training_keeps_base_frozen():
    wrap = ErrorCorrectionWrapper(_smp("unet", **SMP_CASES["unet"]), error_channels=16, detail_channels=16)
    _train_heads(wrap)


def test_smp_module_names_need_hooks_adapter():
    model = _smp("unet", **SMP_CASES["unet"])
    wrap = ErrorCorrectionWrapper(model, adapter="hooks", low_level="encoder.layer1", high_level="decoder")
    assert isinstance(wrap.adapter, HooksAdapter)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        _check_wrapped(wrap, model(x), x, 5)
    with pytest.raises(ValueError, match="adapter='hooks'"):
        ErrorCorrectionWrapper(model, low_level="encoder.layer1")


# ---------------------------------------------------------------------------------- torchvision
def _tv(name, seed=0, **kwargs):
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(seed)
    return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=5, **kwargs).eval()


@pytest.mark.parametrize(
    ("name", "kwargs", "keys"),
    [
        ("lraspp_mobilenet_v3_large", {}, ["low", "high"]),
        ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}, ["low", "backbone", "high"]),
        pytest.param("fcn_resnet50", {}, ["low", "backbone", "high"], marks=pytest.mark.slow),
    ],
)
def test_torchvision_outputs_features_and_spec(name, kwargs, keys):
    model = _tv(name, **kwargs)
    wrap = ErrorCorrectionWrapper(model, error_channels=16, detail_channels=16)
    assert wrap.adapter.name == "torchvision"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model(x)["out"]
    _check_wrapped(wrap, reference, x, 5)
    features = wrap.forward_base(x).features
    assert list(features) == keys and (wrap.low_key, wrap.high_key) == ("low", "high")
    stride = 8 if name.startswith("lraspp") else 4
    assert features["low"].shape[-2:] == (SIZE // stride, SIZE // stride)
    coarse = wrap.adapter.call_with_coarse_logits(model, x)[1]  # before the model's own upsampling: stride 8 or 16
    assert coarse.shape[-1] < SIZE and torch.equal(_at_input(coarse), reference)
    if "backbone" in features:
        last_conv = list(model.classifier.children())[-1]
        with torch.no_grad():
            assert torch.equal(_at_input(last_conv(features["high"])), reference)
    spec = wrap.adapter.spec(model)
    expected = (
        {"name": name, "num_classes": 5}
        if name.startswith("lraspp")
        else {"name": name, "num_classes": 5, "aux_loss": kwargs.get("aux_loss", False)}
    )
    assert spec == {"family": "torchvision", "config": expected}
    assert _same_architecture(build_base(spec), model)


@pytest.mark.slow
def test_torchvision_head_training_keeps_base_frozen():
    wrap = ErrorCorrectionWrapper(_tv("lraspp_mobilenet_v3_large"), error_channels=16, detail_channels=16)
    _train_heads(wrap)


# ---------------------------------------------------------------------------------- transformers
def _segformer(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.SegformerConfig(
        num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16, num_labels=5,
    )  # fmt: skip
    return transformers.SegformerForSemanticSegmentation(config).eval()


def _upernet(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    backbone = transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=16, num_labels=5, use_auxiliary_head=False
    )
    return transformers.UperNetForSemanticSegmentation(config).eval()


@pytest.mark.parametrize(("make", "low"), [(_segformer, "hidden0"), (_upernet, "hidden1")])
def test_transformers_outputs_features_and_spec(make, low):
    model = make()
    tapped = dict(model.named_modules())[DECODE_TAPS[type(model).__name__]]
    wrap = ErrorCorrectionWrapper(model, error_channels=16, detail_channels=16)
    assert wrap.adapter.name == "transformers"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model(pixel_values=x).logits
    _check_wrapped(wrap, reference, x, 5)
    features = wrap.forward_base(x).features
    assert (wrap.low_key, wrap.high_key) == (low, "decode_head")
    assert features[low].shape[-2:] == (SIZE // 4, SIZE // 4)
    assert features["decode_head"].shape == (2, 16, SIZE // 4, SIZE // 4)
    # the fused feature is the classifier's input (dropout is off in eval)
    if type(model).__name__.startswith("Segformer"):
        with torch.no_grad():
            assert torch.equal(model.decode_head.classifier(features["decode_head"]), reference)
    spec = json.loads(json.dumps(wrap.adapter.spec(model)))
    assert spec["family"] == "transformers" and spec["class"] == type(model).__name__
    assert _same_architecture(build_base(spec), model)
    assert len(tapped._forward_hooks) == 1
    wrap.adapter.detach()
    assert not tapped._forward_hooks


def _dpt(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=SIZE,
        patch_size=16,
        neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=32, backbone_out_indices=[0, 1, 2, 3], num_labels=5,
    )  # fmt: skip
    return transformers.DPTForSemanticSegmentation(config).eval()


def test_transformers_vit_tokens_get_discovered_taps():
    """DPT's hidden states are tokens, not maps: the wrapper taps its neck and head instead
    (the stride-4 reassembled map, and the input of the main classifier, not the auxiliary one)."""
    model = _dpt()
    wrap = ErrorCorrectionWrapper(model, error_channels=16, detail_channels=16)
    assert isinstance(wrap.adapter, HooksAdapter)
    assert (wrap.low_key, wrap.high_key) == ("neck.reassemble_stage.layers.0", "head.head.3")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        features = wrap.forward_base(x).features
        assert torch.equal(model.head.head[4:](features["head.head.3"]), reference)
    assert features["neck.reassemble_stage.layers.0"].shape[-2:] == (SIZE // 4, SIZE // 4)
    _check_wrapped(wrap, reference, x, 5)


def test_transformers_head_training_keeps_base_frozen():
    wrap = ErrorCorrectionWrapper(_segformer(), error_channels=16, detail_channels=16)
    _train_heads(wrap)


# ---------------------------------------------------------------------------------- hooks
class PlainNet(nn.Module):
    """A network errwrap has no adapter for: returns logits only (or a mapping/tuple)."""

    def __init__(self, returns="tensor", num_classes=5):
        super().__init__()
        self.returns = returns
        self.backbone = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU()),
            nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()),
        )
        self.decoder = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        logits = F.interpolate(
            self.classifier(self.decoder(self.backbone(x))), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        if self.returns == "mapping":
            return {"out": logits, "aux": logits}
        if self.returns == "tuple":
            return logits, "something else"
        if self.returns == "string":
            return "not logits"
        return logits


def _plain(returns="tensor", seed=0):
    torch.manual_seed(seed)
    return PlainNet(returns).eval()


@pytest.mark.parametrize("returns", ["tensor", "mapping", "tuple"])
def test_hooks_adapter_from_module_names(returns):
    model = _plain(returns)
    wrap = ErrorCorrectionWrapper(
        model, low_level="backbone.0", high_level="decoder", error_channels=8, detail_channels=8
    )
    assert isinstance(wrap.adapter, HooksAdapter)
    assert (wrap.low_key, wrap.high_key) == ("backbone.0", "decoder")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = logits_from_output(model(x))
        features = wrap.forward_base(x).features
        assert torch.equal(features["backbone.0"], model.backbone[0](x))
    _check_wrapped(wrap, reference, x, 5)
    assert features["decoder"].shape == (2, 16, SIZE // 8, SIZE // 8)


def test_hooks_one_module_feeds_both_heads():
    wrap = ErrorCorrectionWrapper(_plain(), high_level="decoder", error_channels=8, detail_channels=8)
    assert (wrap.low_key, wrap.high_key) == ("decoder", "decoder")


def test_hooks_head_training_keeps_base_frozen():
    wrap = ErrorCorrectionWrapper(
        _plain(), low_level="backbone.0", high_level="decoder", error_channels=8, detail_channels=8
    )
    _train_heads(wrap)


def test_hooks_removed_on_detach_and_on_garbage_collection():
    model = _plain()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
    wrap = ErrorCorrectionWrapper(model, low_level="backbone.1", high_level="decoder")
    assert len(model.backbone[1]._forward_hooks) == 1 and len(model.decoder._forward_hooks) == 1
    wrap.adapter.detach()
    assert not model.backbone[1]._forward_hooks and not model.decoder._forward_hooks
    wrap.adapter.detach()  # idempotent

    wrap = ErrorCorrectionWrapper(model, low_level="backbone.1", high_level="decoder")
    with torch.no_grad():
        wrap(x)
    assert len(model.decoder._forward_hooks) == 1
    del wrap
    gc.collect()
    assert all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_unknown_module_name_lists_close_names():
    with pytest.raises(ValueError, match=r"close names: \['decoder'") as info:
        ErrorCorrectionWrapper(_plain(), adapter="hooks", low_level="backbone.0", high_level="decodr")
    assert "high_level='decodr'" in str(info.value)
    with pytest.raises(ValueError, match="module name"):
        ErrorCorrectionWrapper(_plain(), low_level="backbone.0", high_level=0)


def test_unreadable_output_explains_the_protocol():
    with pytest.raises(TypeError) as info:
        ErrorCorrectionWrapper(_plain("string"))
    assert PROTOCOL_HELP in str(info.value) and "low_level=" in str(info.value)
    with pytest.raises(TypeError) as info:  # logits only, and an index the wrapper cannot map to a module
        ErrorCorrectionWrapper(_plain("tensor"), low_level=0)
    assert PROTOCOL_HELP in str(info.value)
    with pytest.raises(TypeError, match="logits_fn"):
        ErrorCorrectionWrapper(_plain("string"), low_level="backbone.0", high_level="decoder")


def test_logits_fn_and_feature_tap():
    model = _plain("string")
    adapter = HooksAdapter(model, "backbone.0", "decoder", logits_fn=lambda out: model.last_logits)
    model.register_forward_hook(lambda m, a, o: setattr(m, "last_logits", m.classifier(m.decoder(m.backbone(a[0])))))
    out = adapter(model, torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 5, 4, 4) and list(out.features) == ["backbone.0", "decoder"]
    tap = FeatureTap(model, ["backbone.2"])
    assert tap.active
    del tap
    gc.collect()
    assert not model.backbone[2]._forward_hooks


# ---------------------------------------------------------------------------------- registry
class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, 2, 1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return {"masks": self.head(self.body(x))}


class MyNetAdapter(BaseAdapter):
    name = "mynet"

    def forward(self, model, x):
        feature = model.body(x)
        return BaseOutput(model.head(feature), {"body": feature})


def test_register_and_unregister_an_adapter():
    register_adapter("mynet", lambda m: isinstance(m, MyNet), lambda model: MyNetAdapter())
    try:
        assert registered_adapters()[0] == "mynet"  # user adapters (priority 0) before the built-ins (-10)
        torch.manual_seed(0)
        model = MyNet().eval()
        wrap = ErrorCorrectionWrapper(model, error_channels=8, detail_channels=8)
        assert isinstance(wrap.adapter, MyNetAdapter) and wrap.head_config["adapter"] == "mynet"
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            _check_wrapped(wrap, model(x)["masks"], x, 3)
    finally:
        unregister_adapter("mynet")
    assert "mynet" not in registered_adapters()
    assert isinstance(find_adapter(MyNet()), NativeAdapter)


def test_user_adapter_wins_over_builtin():
    model = _plain()
    smp_model = _smp("unet", **SMP_CASES["unet"])
    register_adapter("my-smp", lambda m: type(m).__name__ == "Unet", lambda model: MyNetAdapter())
    try:
        assert isinstance(find_adapter(smp_model), MyNetAdapter)
    finally:
        unregister_adapter("my-smp")
    assert find_adapter(smp_model).name == "smp" and isinstance(find_adapter(model), NativeAdapter)


def test_importing_errwrap_imports_no_model_family():
    code = (
        "import sys, errwrap, errwrap.adapters; "
        "print([m for m in ('segmentation_models_pytorch', 'transformers', 'torchvision.models.segmentation') if m in "
        "sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- build_base
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"family": "os.system", "config": {}}, "unknown family 'os.system'"),
        ({"family": "smp", "config": {"arch": "evilnet"}}, "unknown arch 'evilnet'"),
        ({"family": "torchvision", "config": {"name": "resnet50"}}, "unknown name 'resnet50'"),
        ({"family": "torchvision", "config": {"name": "fcn_resnet50", "weights": "DEFAULT"}}, "unknown config keys"),
        ({"family": "transformers", "class": "AutoModel", "config": {}}, "unknown class 'AutoModel'"),
        (
            {"family": "errwrap.DeepLabV3Plus", "config": {"encoder_name": "resnet18", "code": "x"}},
            "unknown config keys",
        ),
        ({"family": "smp"}, "'config' mapping"),
    ],
)
def test_build_base_allow_list(spec, match):
    with pytest.raises(ValueError, match=match):
        build_base(spec)


def test_build_base_never_downloads():
    spec = {
        "family": "errwrap.DeepLabV3Plus",
        "config": {"encoder_name": "resnet18", "num_classes": 3, "pretrained": True},
    }
    assert build_base(spec).config["pretrained"] is False


# ------------------------------------------------------------------- one suite, every family
# Every family fixture runs through the same checks (SMP's BaseModelTester, kornia's BaseTester):
# the adapter's output, the probe's FeatureInfo list, the pure default-feature rule, the wrapper's
# shapes and error maps, and (where the family has one) the spec round trip.
def _tiny_native():
    torch.manual_seed(0)
    return TinyBase(num_classes=5).eval()


def _timm_deeplab():
    torch.manual_seed(0)
    return DeepLabV3Plus("resnet18", num_classes=5, aspp_channels=16, decoder_channels=16, low_level_channels=8).eval()


#: family -> (model factory, wrapper kwargs, adapter class name, whether the family rebuilds from a spec)
FAMILIES = {
    "native": (_tiny_native, {}, "NativeAdapter", False),
    "timm": (_timm_deeplab, {}, "NativeAdapter", True),
    "hooks": (lambda: _plain("mapping"), {"low_level": "backbone.0", "high_level": "decoder"}, "HooksAdapter", False),
    "discovered": (lambda: _plain("tensor"), {}, "HooksAdapter", False),
    "torchvision": (lambda: _tv("lraspp_mobilenet_v3_large"), {}, "TorchvisionSegmentationAdapter", True),
    "smp": (lambda: _smp("unet", **SMP_CASES["unet"]), {}, "SMPAdapter", True),
    "transformers": (_segformer, {}, "TransformersAdapter", True),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """``(name, model, wrapper, probe)`` for one family: the wrapper built with the family's kwargs
    and the probe result of a fresh adapter on a 64x64 input."""
    make, kwargs, _, _ = FAMILIES[request.param]
    model = make()
    wrap = ErrorCorrectionWrapper(model, error_channels=8, detail_channels=8, **kwargs).eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    found = probe(wrap.adapter, model, x)
    return request.param, model, wrap, found


def test_family_adapter_output_has_logits_and_features(family):
    name, model, wrap, _ = family
    assert type(wrap.adapter).__name__ == FAMILIES[name][2]
    assert isinstance(wrap.adapter, Adapter) and isinstance(wrap.adapter, BaseAdapter)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = wrap.adapter(model, x)
    assert isinstance(out, BaseOutput)
    assert out.logits.ndim == 4 and out.logits.shape[:2] == (2, 5)
    assert out.features and all(f.ndim == 4 and f.shape[0] == 2 for f in out.features.values())


def test_family_feature_info_matches_the_tensors(family):
    _, model, wrap, found = family
    assert found.adapter is wrap.adapter  # the probe keeps the adapter that ran
    features = found.output.features
    assert [f.name for f in found.features] == list(features)
    for info in found.features:
        tensor = features[info.name]
        assert info.channels == tensor.shape[1] and info.size == tuple(tensor.shape[-2:])
        assert info.stride == max(1, round(max(SIZE / tensor.shape[-2], SIZE / tensor.shape[-1])))
        if info.module is not None:  # a module name the adapter knows produced it
            assert info.module in dict(model.named_modules())
    assert found.features == feature_info(features, (SIZE, SIZE), wrap.adapter.feature_module)


def test_family_default_features_are_the_pure_rules_answer(family):
    name, _, wrap, found = family
    preferred = wrap.adapter.preferred_features(found.features)
    expected = choose_default_features(found.features, preferred)
    if not FAMILIES[name][1]:  # no features named by the user: the defaults are what the wrapper took
        assert (wrap.low_key, wrap.high_key) == expected
    assert choose_features(wrap.adapter, found.features) == expected
    assert wrap.adapter.preferred_features(found.features) == preferred  # forwards ran since: same answer
    infos = {f.name: f for f in found.features}
    assert wrap.head_config["low_channels"] == infos[wrap.low_key].channels
    assert wrap.head_config["high_channels"] == infos[wrap.high_key].channels


def test_family_wrapper_forward_shapes_and_error_maps(family):
    _, _, wrap, _ = family
    x = torch.randn(2, 3, SIZE, SIZE)
    fresh = pytest.warns(UserWarning, match="freshly initialised") if wrap._fresh_heads else nullcontext()
    with torch.no_grad(), fresh:
        out = wrap(x)
    assert out.logits.shape == out.base_logits.shape == out.detail_logits.shape == (2, 5, SIZE, SIZE)
    assert out.error_logits.shape == (2, 1, SIZE, SIZE)
    for prob in (out.error_prob, out.base_error_prob, out.head_error_prob):
        assert prob.shape == (2, SIZE, SIZE) and prob.min() >= 0 and prob.max() <= 1
    assert torch.allclose(out.probs.sum(1), torch.ones(2, SIZE, SIZE), atol=1e-5)


def test_family_spec_round_trip(family):
    name, model, wrap, _ = family
    spec = wrap.adapter.spec(model)
    assert spec == family_spec(model)
    if not FAMILIES[name][3]:
        assert spec is None
        return
    spec = json.loads(json.dumps(spec))
    assert spec["family"] in registered_families()
    assert _same_architecture(build_base(spec), model)


# ------------------------------------------------------------------- the pure rule, by hand
def _info(name, channels, stride, module=None):
    return FeatureInfo(name, channels, stride, (SIZE // stride, SIZE // stride), module)


def test_choose_default_features_by_hand():
    infos = [_info("a", 8, 8), _info("b", 16, 4), _info("c", 32, 4), _info("d", 64, 16)]
    assert choose_default_features(infos, (None, None)) == ("b", "d")  # finest (first of equals), last
    assert choose_default_features(infos, ("c", "a")) == ("c", "a")
    assert choose_default_features(infos, ("gone", "gone")) == ("b", "d")
    with pytest.raises(ValueError, match="at least one feature"):
        choose_default_features([], (None, None))


def test_smp_prefers_the_stride4_decoder_block_only_when_the_decoder_is_finer():
    adapter = SMPAdapter(_smp("unet", **SMP_CASES["unet"]))  # no forward has run
    low = adapter.default_features[0]
    blocks = [_info("enc2", 64, 4), _info("decoder.blocks.0", 16, 4), _info("decoder.blocks.1", 8, 2)]
    assert adapter.preferred_features(blocks + [_info("decoder", 8, 1)]) == (low, "decoder.blocks.0")
    assert adapter.preferred_features(blocks + [_info("decoder", 8, 4)]) == (low, "decoder")


def test_transformers_low_level_is_ranked_from_feature_info():
    adapter = TransformersAdapter(_segformer())  # no forward has run
    ranked = [_info("hidden0", 8, 2), _info("hidden1", 16, 8), _info("decode_head", 16, 4)]
    assert adapter.preferred_features(ranked) == ("hidden1", "decode_head")  # the coarser-than-4 one before stride 2
    equal = [_info("hidden0", 8, 4), _info("hidden1", 16, 4), _info("hidden2", 24, 2)]
    assert adapter.preferred_features(equal) == ("hidden1", "decode_head")  # at equal strides the deepest
    adapter.detach()


# ------------------------------------------------------------------- interface and registries
def test_adapter_interface_and_alias():
    assert BaseAdapter is Adapter
    with pytest.raises(TypeError):
        Adapter()  # forward is abstract
    adapter = MyNetAdapter()
    assert adapter.default_features == (None, None)
    assert adapter.preferred_features([_info("body", 6, 2)]) == (None, None)
    assert adapter.feature_module("body") is None and adapter.spec(MyNet()) is None


def test_select_adapter_errors_are_unchanged():
    with pytest.raises(TypeError, match="expected a BaseAdapter, an adapter name or None, got int"):
        select_adapter(_plain(), 3, None, None)
    with pytest.raises(ValueError, match="unknown name 'nope'"):
        select_adapter(_plain(), "nope", None, None)
    assert isinstance(select_adapter(_plain(), None, None, None), NativeAdapter)
    assert isinstance(select_adapter(_plain(), None, "backbone.0", None), HooksAdapter)


def test_register_a_family_for_specs():
    def build(spec):
        torch.manual_seed(0)
        return _tiny_native()

    def spec(model):
        return {"family": "test.tiny", "config": {}}

    family = Family("test.tiny", build, matches=lambda m: isinstance(m, TinyBase), spec=spec)
    register_family(family)
    try:
        assert "test.tiny" in registered_families() and "test.tiny" in BASE_FAMILIES
        model = _tiny_native()
        assert family_spec(model) == {"family": "test.tiny", "config": {}}
        assert _same_architecture(build_base(family_spec(model)), model)
    finally:
        unregister_family("test.tiny")
    assert "test.tiny" not in BASE_FAMILIES and family_spec(_tiny_native()) is None
    with pytest.raises(ValueError, match="unknown family 'test.tiny'"):
        build_base({"family": "test.tiny", "config": {}})


def test_adapters_import_no_family_module_back():
    """Only the package and builtin.py import the family modules; no adapters module imports
    errwrap inside a function (third-party optional packages only)."""
    root = pathlib.Path(errwrap.adapters.__file__).parent
    families = {"smp", "torchvision", "transformers", "deeplab"}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and path.stem not in ("__init__", "builtin"):
                assert node.module not in families, f"{path.name} imports the family module {node.module}"
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom):
                    where = f"{path.name}:{node.lineno} imports errwrap in a function"
                    assert node.level == 0 and not node.module.startswith("errwrap"), where
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                    assert all(not n.startswith("errwrap") and n != "sys" for n in names), f"{path.name}:{node.lineno}"
