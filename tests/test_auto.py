"""Feature discovery for networks that return logits only (errwrap.adapters.auto)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from errwrap import ErrorCorrectionWrapper
from errwrap.adapters import HooksAdapter
from errwrap.adapters.auto import NoFeaturesError, choose_feature_modules, record_module_outputs
from errwrap.losses import ErrorCorrectionLoss

SIZE = 64


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class EncoderDecoder(nn.Module):
    """Encoder to stride 16, a decoder at stride 4 with a skip, a classifier, upsampled logits;
    optionally an auxiliary head that runs after the main one, and a log-softmax output."""

    def __init__(
        self,
        num_classes: int = 5,
        width: int = 16,
        aux: bool = False,
        log_softmax: bool = False,
        returns: str = "tensor",
    ):
        super().__init__()
        self.stem = _block(3, 8, 2)
        self.layer1 = nn.Sequential(_block(8, 12, 2), _block(12, 12, 1))
        self.layer2 = _block(12, 16, 2)
        self.layer3 = _block(16, 24, 2)
        self.decoder = nn.Sequential(nn.Conv2d(24 + 12, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.aux = nn.Conv2d(24, num_classes, 1) if aux else None
        self.log_softmax, self.returns = log_softmax, returns

    def forward(self, x):
        f1 = self.layer1(self.stem(x))
        f3 = self.layer3(self.layer2(f1))
        up = F.interpolate(f3, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.decoder(torch.cat([up, f1], 1)))
        aux = self.aux(f3) if self.aux is not None else None  # after the main head, as many models do in eval mode
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.log_softmax:
            logits = torch.log_softmax(logits, 1)
        if self.returns == "aux":
            return logits, F.interpolate(aux, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.returns == "none":
            return logits, None
        if self.returns == "triple":
            return logits, logits, logits
        return {"out": logits} if self.returns == "mapping" else logits


def _model(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return EncoderDecoder(**kwargs).eval()


def test_logits_only_model_is_wrapped_with_discovered_taps(caplog):
    model = _model()
    with caplog.at_level(logging.INFO, logger="errwrap.adapters.auto"):
        wrap = ErrorCorrectionWrapper(model, error_channels=8, detail_channels=8)
    assert isinstance(wrap.adapter, HooksAdapter)
    assert (wrap.low_key, wrap.high_key) == ("layer1", "decoder")
    assert (wrap.head_config["low_channels"], wrap.head_config["high_channels"]) == (12, 16)
    assert "low_level='layer1'" in caplog.text and "high_level='decoder'" in caplog.text
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = wrap(x)
        assert torch.equal(out.base_logits, model(x))
    assert out.logits.shape == (2, 5, SIZE, SIZE) and out.error_prob.shape == (2, SIZE, SIZE)
    assert float(out.error_prob.min()) >= 0.0 and float(out.error_prob.max()) <= 1.0
    wrap.train()
    labels = torch.randint(0, 5, (2, SIZE, SIZE))
    ErrorCorrectionLoss()(wrap(x), labels).total.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in wrap.named_parameters()
        if p.requires_grad and "refine" not in n
    )
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs", [{"aux": True}, {"log_softmax": True}, {"returns": "mapping"}, {"width": 5}])
def test_the_classifier_is_the_one_that_makes_the_logits(kwargs):
    """An auxiliary head run after the main one, a log-softmax output, a mapping output, and a
    decoder as wide as the number of classes all leave the choice unchanged."""
    model = _model(**kwargs)
    low, high = choose_feature_modules(model, torch.randn(1, 3, SIZE, SIZE))
    assert (low, high) == ("layer1", "decoder")


def test_recording_leaves_no_hooks_and_counts_calls():
    model = _model()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        out, records = record_module_outputs(model, x)
        assert torch.equal(out, model(x))
    assert all(not m._forward_hooks for m in model.modules())
    by_name = {r.name: r for r in records}
    assert by_name["layer1"].shape == (1, 12, 16, 16) and by_name["layer1"].calls == 1
    assert [r.order for r in records] == sorted(r.order for r in records)
    assert by_name["layer1.0"].order < by_name["layer1"].order  # hooks fire when a module returns


class SharedAndPooled(nn.Module):
    """A ReLU module used twice (so it is no feature), and a squeeze-excitation branch whose
    1x1 maps must not end the stride-4 stage."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 4, 1)
        self.relu = nn.ReLU()
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.stage1 = nn.Conv2d(8, 8, 3, 1, 1)
        self.down = nn.Conv2d(8, 16, 3, 2, 1)
        self.classifier = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        f = self.relu(self.stem(x))
        f = self.stage1(f * self.squeeze(f))
        return self.classifier(self.relu(self.down(f)))


def test_shared_modules_and_pooled_maps_are_skipped():
    low, high = choose_feature_modules(SharedAndPooled().eval(), torch.randn(1, 3, SIZE, SIZE))
    assert (low, high) == ("stage1", "down")


class NoFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        return x.mean(1, keepdim=True) * self.scale


def test_no_usable_features_is_a_clear_error():
    with pytest.raises(NoFeaturesError, match="low_level=.*high_level="):
        ErrorCorrectionWrapper(NoFeatures())


def test_timm_encoder_with_own_head():
    timm = pytest.importorskip("timm")

    class TimmSeg(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.backbone = timm.create_model(name, features_only=True, pretrained=False)
            self.fuse = nn.Conv2d(self.backbone.feature_info.channels()[-1], 32, 1)
            self.cls = nn.Conv2d(32, 7, 1)

        def forward(self, x):
            logits = self.cls(torch.relu(self.fuse(self.backbone(x)[-1])))
            return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}

    expected = {"resnet18": "backbone.layer1", "efficientnet_b0": "backbone.blocks.1"}
    for name, low in expected.items():
        torch.manual_seed(0)
        wrap = ErrorCorrectionWrapper(TimmSeg(name).eval(), error_channels=8, detail_channels=8)
        assert (wrap.low_key, wrap.high_key) == (low, "fuse")
        with torch.no_grad():
            out = wrap(torch.randn(1, 3, SIZE, SIZE))
        assert out.logits.shape == (1, 7, SIZE, SIZE)


def test_discovered_taps_survive_a_save_and_load(tmp_path):
    model = _model()
    wrap = ErrorCorrectionWrapper(model, error_channels=8, detail_channels=8).eval()
    wrap.save_pretrained(tmp_path)
    again = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=_model()).eval()
    assert (again.low_key, again.high_key) == ("layer1", "decoder")
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(wrap(x).logits, again(x).logits)


@pytest.mark.parametrize("returns", ["aux", "none", "triple"])
def test_logits_with_auxiliary_outputs_are_not_features(returns):
    """(logits, aux_logits), (logits, None) and longer tuples: the auxiliary logits must not be
    taken for a feature map; the wrapper discovers features instead."""
    wrap = ErrorCorrectionWrapper(_model(aux=True, returns=returns), error_channels=8, detail_channels=8)
    assert isinstance(wrap.adapter, HooksAdapter)
    assert (wrap.low_key, wrap.high_key) == ("layer1", "decoder")


class LinearHead(nn.Module):
    """A linear classifier on channels-last features: its (B, H, W, C) tensors are no maps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 4, 1)
        self.body = nn.Conv2d(8, 8, 3, 1, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        logits = self.head(self.body(self.stem(x)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_channels_last_tensors_are_not_taken_for_feature_maps():
    wrap = ErrorCorrectionWrapper(LinearHead().eval(), error_channels=8, detail_channels=8)
    assert (wrap.low_key, wrap.high_key) == ("stem", "body")
    with torch.no_grad():
        out = wrap(torch.randn(1, 3, 32, 48))
    assert out.logits.shape == (1, 3, 32, 48)
