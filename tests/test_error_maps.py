"""The two error maps of ErrorCorrectionOutput (issue: the error map a user can trust):
``error_prob`` (the returned label is wrong) and ``base_error_prob`` (the base's label is wrong)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from errwrap import ErrorCorrectionWrapper
from errwrap.export import InferenceModule
from errwrap.heads import mixture_log_probs
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


def test_both_maps_are_probabilities_of_the_right_shape_and_definition():
    wrap = _trained_wrap()
    out = wrap(batch(2, 40)[0])
    for name, m in _maps(out).items():
        assert m.shape == (2, 40, 40) and m.dtype == torch.float32, name
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0, name
    p = out.logits.exp()
    torch.testing.assert_close(out.error_prob, 1.0 - p.amax(dim=1))
    torch.testing.assert_close(out.base_error_prob, 1.0 - p.gather(1, out.base_labels.unsqueeze(1))[:, 0])
    # max_c p_c >= p_{y0}: the returned label is never less likely than the base's
    assert bool((out.error_prob <= out.base_error_prob + 1e-6).all())
    same = out.labels == out.base_labels
    assert 0 < int(same.sum()) < same.numel(), "the fixture should change some labels"
    torch.testing.assert_close(out.error_prob[same], out.base_error_prob[same])
    assert bool((out.error_prob[~same] < out.base_error_prob[~same]).all())
    # the error map of the returned labels is the mixture's, not the error head's gate
    e = out.error_logits
    torch.testing.assert_close(out.logits, mixture_log_probs(out.base_logits, out.detail_logits, e))


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


def test_maps_do_not_depend_on_the_rest_of_the_batch():
    wrap = _trained_wrap()
    images = batch(4, 32, seed=3)[0]
    together = _maps(wrap(images))
    for i in range(4):
        alone = _maps(wrap(images[i : i + 1]))
        for name in together:
            torch.testing.assert_close(alone[name][0], together[name][i], atol=1e-5, rtol=1e-5)


def test_temperature_applies_to_both_maps_and_keeps_the_labels():
    wrap = _trained_wrap()
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


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_maps_are_finite_for_extreme_logits(scale):
    wrap = ErrorCorrectionWrapper(_Scaled(scale), error_channels=8, detail_channels=8).eval()
    with torch.no_grad():
        wrap.detail_head.classifier.bias.fill_(1e4)
        wrap.error_head.classifier.bias.fill_(1e4)
    out = wrap(batch(2, 32)[0])
    for name, m in _maps(out).items():
        assert torch.isfinite(m).all() and float(m.min()) >= 0.0 and float(m.max()) <= 1.0, name


def test_maps_in_bfloat16():
    wrap = _trained_wrap().to(torch.bfloat16)
    out = wrap(batch(2, 32)[0].to(torch.bfloat16))
    reference = _trained_wrap()(batch(2, 32)[0])
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
