"""The two error maps of ErrorCorrectionOutput (issue: the error map a user can trust):
``error_prob`` (the returned label is wrong) and ``base_error_prob`` (the base's label is wrong)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from errwrap import ErrorCorrectionWrapper
from errwrap.adapters import BaseOutput
from errwrap.export import InferenceModule
from errwrap.heads import mixture_log_probs
from errwrap.layers import resize
from errwrap.wrapper import binary_to_two_class
from tests.tiny import TinyBase, batch, tiny_base

SAVED_V1 = Path(__file__).parent / "data" / "saved_model_v1"


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _trained_wrap(seed: int = 0, **kwargs) -> ErrorCorrectionWrapper:
    """A wrapper whose detail head disagrees with the base on some pixels (random heads, a few
    BatchNorm updates), in eval mode."""
    torch.manual_seed(seed)
    wrap = ErrorCorrectionWrapper(tiny_base(seed), error_channels=8, detail_channels=8, **kwargs)
    with torch.no_grad():
        wrap.detail_head.classifier.weight.mul_(20.0)  # a confident detail head: corrections happen
        wrap.train()
        wrap(batch(4, 32, seed=seed)[0])
    return wrap.eval()


def _maps(out) -> dict[str, torch.Tensor]:
    return {
        "error_prob": out.error_prob,
        "base_error_prob": out.base_error_prob,
        "head_error_prob": out.head_error_prob,
    }


#: Both placements of the fusion: at the output (the default) and at the features' resolution.
PLACEMENTS = [pytest.param(False, id="fuse-at-output"), pytest.param(True, id="fuse-at-features")]


@pytest.mark.parametrize("at_features", PLACEMENTS)
def test_both_maps_are_probabilities_of_the_right_shape_and_definition(at_features):
    wrap = _trained_wrap(fuse_at_features=at_features)
    out = wrap(batch(2, 40)[0])
    for name, m in _maps(out).items():
        assert m.shape == (2, 40, 40) and m.dtype == torch.float32, name
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0, name
    p = out.logits.exp()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(2, 40, 40))
    torch.testing.assert_close(out.error_prob, 1.0 - p.amax(dim=1))
    torch.testing.assert_close(out.base_error_prob, 1.0 - p.gather(1, out.base_labels.unsqueeze(1))[:, 0])
    # max_c p_c >= p_{y0}: the returned label is never less likely than the base's
    assert bool((out.error_prob <= out.base_error_prob + 1e-6).all())
    same = out.labels == out.base_labels
    assert 0 < int(same.sum()) < same.numel(), "the fixture should change some labels"
    torch.testing.assert_close(out.error_prob[same], out.base_error_prob[same])
    assert bool((out.error_prob[~same] < out.base_error_prob[~same]).all())
    # the error map of the returned labels is the mixture's, not the error head's gate
    at = wrap._fusion_size(*_base_logits_and_low(wrap, batch(2, 40)[0]), (40, 40))
    if not at_features:
        assert at == (40, 40)
        e = out.error_logits
        torch.testing.assert_close(out.logits, mixture_log_probs(out.base_logits, out.detail_logits, e))
        return
    # at the fusion's resolution (the tiny base's low-level stride 2), and its change to the
    # base's distribution upsampled onto the base's logits
    assert at == (20, 20)
    coarse = _heads_at(wrap, batch(2, 40)[0], at)
    e = coarse.error_logits
    torch.testing.assert_close(coarse.logits, mixture_log_probs(coarse.base_logits, coarse.detail_logits, e))
    ratio = resize(coarse.logits - coarse.base_logits.log_softmax(1), (40, 40))
    torch.testing.assert_close(out.logits, (out.base_logits + ratio).log_softmax(1))
    torch.testing.assert_close(out.error_logits, resize(coarse.error_logits, (40, 40)))
    torch.testing.assert_close(out.detail_logits, resize(coarse.detail_logits, (40, 40)))


def _base_logits_and_low(wrap, images):
    out = wrap.forward_base(images)
    return out.logits, out.features[wrap.low_key]


def _heads_at(wrap, images, size):
    base_out, coarse = wrap._forward_base(images, coarse=True)
    return wrap.forward_heads(wrap._keep_used_features(base_out), size, coarse)


@pytest.mark.parametrize("logit_stride, expected", [(1, (64, 64)), (2, (32, 32)), (8, (32, 32))])
def test_fusion_at_features_runs_at_the_finer_of_the_logits_and_the_low_level_feature(logit_stride, expected):
    """The tiny base's low-level feature is at stride 2: logits at the output fuse there, as the
    default does (the same outputs); coarser logits fuse at stride 2."""
    torch.manual_seed(0)
    coarse = ErrorCorrectionWrapper(
        tiny_base(0, logit_stride=logit_stride), error_channels=8, detail_channels=8, fuse_at_features=True
    )
    fine = ErrorCorrectionWrapper(tiny_base(0, logit_stride=logit_stride), error_channels=8, detail_channels=8)
    fine.load_state_dict(coarse.state_dict())
    images = batch(2, 64, seed=5)[0]
    assert coarse.eval()._fusion_size(*_base_logits_and_low(coarse, images), (64, 64)) == expected
    a, b = coarse(images), fine.eval()(images)
    assert torch.equal(a.base_logits, b.base_logits)
    if expected == (64, 64):
        for name in a._fields:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    else:
        assert not torch.allclose(a.logits, b.logits)


class _Upsampling(nn.Module):
    """A base that upsamples its stride-4 logits to the input itself; ``give_coarse``: it says so
    (``forward_with_coarse_logits``), as errwrap's DeepLabV3+ does; ``binary``: one logit channel."""

    def __init__(self, give_coarse: bool = True, binary: bool = False) -> None:
        super().__init__()
        self.net = tiny_base(0, num_classes=1 if binary else 5)
        if give_coarse:
            self.forward_with_coarse_logits = self._with_coarse

    def _with_coarse(self, x):
        coarse, features = self.net(x)
        return BaseOutput(resize(coarse, x.shape[-2:]), dict(enumerate(features))), coarse

    def forward(self, x):
        return self._with_coarse(x)[0]


@pytest.mark.parametrize("binary", [False, True])
def test_coarse_logits_are_where_the_fusion_runs_and_ignored_when_fusing_at_the_output(binary):
    images = batch(2, 64, seed=2)[0]
    told, untold = _Upsampling(binary=binary), _Upsampling(give_coarse=False, binary=binary)
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(told, error_channels=8, detail_channels=8, fuse_at_features=True).eval()
    coarse = wrap._forward_base(images, coarse=True)[1]
    assert coarse.shape == (2, 2 if binary else 5, 16, 16)
    without = ErrorCorrectionWrapper(untold, error_channels=8, detail_channels=8, fuse_at_features=True)
    assert without._forward_base(images, coarse=True)[1] is None  # then it fuses at the logits' size
    # the tiny base's low-level feature is at stride 2, finer than its logits: the fusion runs there
    assert wrap._fusion_size(coarse, wrap.forward_base(images).features[wrap.low_key], (64, 64)) == (32, 32)
    out = wrap(images)
    logits = told(images).logits
    assert torch.equal(out.base_logits, binary_to_two_class(logits) if binary else logits)
    # fusing at the output (the default), a base that gives its coarse logits and one that does not
    # give the same outputs: the default reads nothing new
    outputs = []
    for base in (told, untold):
        old = ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8).eval()
        old.load_state_dict(wrap.state_dict())
        outputs.append(old(images))
    for name in out._fields:
        assert torch.equal(getattr(outputs[0], name), getattr(outputs[1], name)), name
    assert not torch.allclose(outputs[0].logits, out.logits)


def test_maps_come_from_one_pass_of_the_base_and_heads():
    wrap = _trained_wrap()
    calls = {"base": 0, "error": 0, "detail": 0}
    hooks = [wrap.base.register_forward_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1)),
             wrap.error_head.register_forward_hook(lambda *a: calls.__setitem__("error", calls["error"] + 1)),
             wrap.detail_head.register_forward_hook(lambda *a: calls.__setitem__("detail", calls["detail"] + 1))]
    out = wrap(batch(2, 32)[0])
    _ = out.error_prob, out.base_error_prob, out.labels, out.base_labels
    for h in hooks:
        h.remove()
    assert calls == {"base": 1, "error": 1, "detail": 1}


@pytest.mark.parametrize("at_features", PLACEMENTS)
def test_maps_do_not_depend_on_the_rest_of_the_batch(at_features):
    wrap = _trained_wrap(fuse_at_features=at_features)
    images = batch(4, 32, seed=3)[0]
    together = _maps(wrap(images))
    for i in range(4):
        alone = _maps(wrap(images[i : i + 1]))
        for name in together:
            torch.testing.assert_close(alone[name][0], together[name][i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("at_features", PLACEMENTS)
def test_temperature_applies_to_both_maps_and_keeps_the_labels(at_features):
    wrap = _trained_wrap(fuse_at_features=at_features)
    images = batch(2, 32)[0]
    cold = wrap(images)
    wrap.temperature = 3.0
    hot = wrap(images)
    assert torch.equal(hot.labels, cold.labels)
    assert float(hot.error_prob.mean()) > float(cold.error_prob.mean())
    assert not torch.allclose(hot.base_error_prob, cold.base_error_prob)
    assert float(hot.base_error_prob.min()) >= 0.0 and float(hot.base_error_prob.max()) <= 1.0
    torch.testing.assert_close(hot.head_error_prob, cold.head_error_prob)  # the gate has no temperature


class _Scaled(nn.Module):
    """TinyBase with its logits multiplied: extreme logits."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.net, self.scale = tiny_base(0), scale

    def forward(self, x):
        logits, features = self.net(x)
        return logits * self.scale, features


@pytest.mark.parametrize("at_features", PLACEMENTS)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_maps_are_finite_for_extreme_logits(scale, at_features):
    wrap = ErrorCorrectionWrapper(
        _Scaled(scale), error_channels=8, detail_channels=8, fuse_at_features=at_features
    ).eval()
    with torch.no_grad():
        wrap.detail_head.classifier.bias.fill_(1e4)
        wrap.error_head.classifier.bias.fill_(1e4)
    out = wrap(batch(2, 32)[0])
    for name, m in _maps(out).items():
        assert torch.isfinite(m).all() and float(m.min()) >= 0.0 and float(m.max()) <= 1.0, name


@pytest.mark.parametrize("at_features", PLACEMENTS)
def test_maps_in_bfloat16(at_features):
    wrap = _trained_wrap(fuse_at_features=at_features).to(torch.bfloat16)
    out = wrap(batch(2, 32)[0].to(torch.bfloat16))
    reference = _trained_wrap(fuse_at_features=at_features)(batch(2, 32)[0])
    for name, m in _maps(out).items():
        assert m.dtype == torch.float32 and torch.isfinite(m).all(), name
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0, name
        assert float((m - _maps(reference)[name]).abs().mean()) < 0.05, name


def test_export_module_returns_the_returned_label_error_map():
    wrap = _trained_wrap()
    images = batch(2, 32)[0]
    logits, error_prob = InferenceModule(wrap)(images)
    torch.testing.assert_close(error_prob, wrap(images).error_prob)


def test_saved_model_of_the_first_format_loads_and_gives_the_same_outputs():
    """tests/data/saved_model_v1 was written by tests/data/make_saved_model_v1.py (format 1)."""
    wrap = ErrorCorrectionWrapper.from_pretrained(SAVED_V1, model=TinyBase())
    expected = load_file(str(SAVED_V1 / "expected.safetensors"))
    with torch.no_grad():
        out = wrap(expected["images"])
    for name in ("logits", "base_logits", "error_logits", "detail_logits"):
        torch.testing.assert_close(getattr(out, name), expected[name], atol=1e-5, rtol=1e-5)
    p = expected["logits"].exp()
    torch.testing.assert_close(out.error_prob, 1.0 - p.amax(dim=1), atol=1e-5, rtol=1e-5)
    assert wrap.class_names == [f"class{i}" for i in range(5)]
