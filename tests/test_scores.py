import logging
import math

import pytest
import torch
from torch import nn

from errwrap import ErrorCorrectionWrapper
from errwrap.scores import (
    EntropyScore,
    ErrorHeadScore,
    MCDropoutScore,
    MSPScore,
    build_score,
    entropy_score,
    find_classifier,
    msp_score,
)

from .tiny import batch, tiny_base


class DropoutBase(nn.Module):
    """Native-protocol base with its own Dropout2d before the classifier; logits at stride 2."""

    def __init__(self, p: float = 0.5, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout2d(p)
        self.classifier = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.body(f1)
        return self.classifier(self.drop(f2)), [f1, f2]


def _wrap(base):
    torch.manual_seed(0)
    return ErrorCorrectionWrapper(base).eval()


def _count_base_calls(base):
    calls = []
    handle = base.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_msp_and_entropy_values():
    uniform = torch.zeros(1, 4, 2, 2)
    assert torch.allclose(msp_score(uniform), torch.full((1, 2, 2), 0.75))
    assert torch.allclose(entropy_score(uniform), torch.ones(1, 2, 2))
    sure = torch.tensor([50.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    assert msp_score(sure).item() < 1e-6 and entropy_score(sure).item() < 1e-6
    logits = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    p = torch.softmax(logits.flatten(), 0)
    assert msp_score(logits).item() == pytest.approx(1 - p.max().item())
    assert entropy_score(logits).item() == pytest.approx(-(p * p.log()).sum().item() / math.log(3), rel=1e-6)


def test_scores_at_input_resolution_and_in_unit_interval():
    wrap = _wrap(tiny_base(logit_stride=4))
    x, _ = batch(size=32)
    base_logits = wrap(x).base_logits
    for score in (ErrorHeadScore(), MSPScore(), EntropyScore(), MCDropoutScore(T=3)):
        out = score(wrap, x)
        assert out.score.shape == (2, 32, 32) and out.base_logits.shape == (2, 5, 32, 32)
        assert 0 <= out.score.min() and out.score.max() <= 1
        assert not out.score.requires_grad
        # every score judges the same deterministic base prediction
        assert torch.equal(out.prediction, base_logits.argmax(1))


def test_error_head_score_is_base_error_prob_and_reuses_output():
    wrap = _wrap(tiny_base())
    x, _ = batch()
    out = wrap(x)
    assert torch.equal(ErrorHeadScore()(wrap, x).score, out.base_error_prob)
    calls, handle = _count_base_calls(wrap.base)
    assert torch.equal(ErrorHeadScore()(wrap, x, output=out).score, out.base_error_prob)
    assert torch.equal(MSPScore()(wrap, x, base_logits=out.base_logits).score, msp_score(out.base_logits))
    handle.remove()
    assert calls == []  # nothing was recomputed


def test_mc_dropout_T1_without_dropout_reproduces_msp_and_entropy(caplog):
    wrap = _wrap(tiny_base(logit_stride=2))  # the tiny base has no dropout: one is inserted
    x, _ = batch()
    with caplog.at_level(logging.INFO, logger="errwrap.scores"):
        mc = MCDropoutScore(T=1, p=0.0, statistic="entropy")(wrap, x)
    assert "no dropout layer" in caplog.text and "'classifier'" in caplog.text
    assert torch.allclose(mc.score, EntropyScore()(wrap, x).score, atol=1e-6)
    mc_msp = MCDropoutScore(T=1, p=0.0, statistic="msp")(wrap, x)
    assert torch.allclose(mc_msp.score, MSPScore()(wrap, x).score, atol=1e-6)
    assert torch.equal(MCDropoutScore(T=1, p=0.5, statistic="variance")(wrap, x).score, torch.zeros(2, 32, 32))
    assert len(wrap.base.classifier._forward_pre_hooks) == 0  # the inserted dropout is gone


def test_mc_dropout_ignores_base_dropout_with_p_0():
    """A base whose dropout layers have p = 0 gets dropout inserted before its classifier, instead
    of T identical passes that would silently reproduce the entropy score."""
    wrap = _wrap(DropoutBase(p=0.0))
    x, _ = batch(size=32)
    mc = MCDropoutScore(T=4, p=0.3)(wrap, x)
    assert not torch.allclose(mc.score, EntropyScore()(wrap, x).score, atol=1e-3)


@pytest.mark.parametrize("make_base", [lambda: DropoutBase(p=0.5), lambda: tiny_base(logit_stride=2)], ids=["own-dropout", "inserted"])
def test_mc_dropout_varies_with_seed_and_restores_state(make_base):
    wrap = _wrap(make_base())
    wrap.base.train()  # even a base in train mode keeps its norm layers in eval during the passes
    stats = {k: v.clone() for k, v in wrap.base.state_dict().items()}
    modes = {name: m.training for name, m in wrap.named_modules()}
    x, _ = batch(size=32)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = MCDropoutScore(T=4, seed=0, p=0.3)(wrap, x).score
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    b = MCDropoutScore(T=4, seed=0, p=0.3)(wrap, x).score
    c = MCDropoutScore(T=4, seed=1, p=0.3)(wrap, x).score
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, EntropyScore()(wrap.eval(), x).score)
    wrap.base.train()
    assert {name: m.training for name, m in wrap.named_modules()} == modes
    assert all(torch.equal(v, stats[k]) for k, v in wrap.base.state_dict().items())  # BN stats unchanged


@pytest.mark.parametrize("T", [1, 3, 8])
def test_mc_dropout_cost_is_T_base_passes(T):
    wrap = _wrap(tiny_base())
    x, _ = batch()
    calls, handle = _count_base_calls(wrap.base)
    base_logits = wrap(x).base_logits
    calls.clear()
    MCDropoutScore(T=T)(wrap, x, base_logits=base_logits)
    assert len(calls) == T
    calls.clear()
    MCDropoutScore(T=T)(wrap, x)
    assert len(calls) == T + 1  # plus the deterministic pass for the judged prediction
    handle.remove()


def test_find_classifier_and_errors():
    assert find_classifier(tiny_base(num_classes=5), 5) == "classifier"
    wrap = _wrap(tiny_base(num_classes=5))
    x, _ = batch()
    with pytest.raises(ValueError, match="classifier="):
        MCDropoutScore(T=2, classifier=None)._install_dropout(nn.Sequential(nn.Conv2d(3, 4, 1)), 5)
    out = MCDropoutScore(T=2, classifier="stage3")(wrap, x)  # an explicit insertion point works too
    assert out.score.shape == (2, 32, 32)
    with pytest.raises(ValueError, match="T"):
        MCDropoutScore(T=0)
    with pytest.raises(ValueError, match="statistic"):
        MCDropoutScore(statistic="mutual")
    with pytest.raises(ValueError, match="p"):
        MCDropoutScore(p=1.0)
    assert isinstance(build_score("msp"), MSPScore)
    assert build_score("mc_dropout", T=2).T == 2
    with pytest.raises(ValueError, match="unknown name"):
        build_score("odin")
