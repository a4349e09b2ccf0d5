import logging
import math

import pytest
import torch
from torch import nn

from errwrap import ErrorCorrectionWrapper
from errwrap.scores import (
    EnergyScore,
    EnsembleScore,
    EntropyScore,
    ErrorHeadScore,
    ErrwrapScore,
    MaxLogitScore,
    MCDropoutScore,
    MSPScore,
    TemperatureMSPScore,
    build_score,
    energy_score,
    entropy_score,
    find_classifier,
    max_logit_score,
    msp_score,
    squash,
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
        assert out.score.min() >= 0 and out.score.max() <= 1
        assert not out.score.requires_grad
        # every score judges the same deterministic base prediction
        assert torch.equal(out.prediction, base_logits.argmax(1))


def test_error_head_score_is_base_error_prob_and_reuses_output():
    wrap = _wrap(tiny_base())
    x, _ = batch()
    with torch.no_grad():  # as the scores run: inference without gradients (the same to 1e-6 with them)
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


@pytest.mark.parametrize(
    "make_base", [lambda: DropoutBase(p=0.5), lambda: tiny_base(logit_stride=2)], ids=["own-dropout", "inserted"]
)
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


# ---------------------------------------------------------------------------- more baselines
class LogitsBase(nn.Module):
    """Native-protocol base whose logits are its input images (``in_channels = C``), times ``scale``."""

    def __init__(self, num_classes: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.feat = nn.Conv2d(num_classes, 8, 1)
        self.classifier = nn.Identity()

    def forward(self, x):
        f = torch.relu(self.feat(x))
        return self.classifier(x * self.scale), [f, f]


def test_max_logit_and_energy_values_and_ranges():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.4, 0.3], [-3.0, -4.0, -5.0]]).T.reshape(1, 3, 1, 3)
    ml = max_logit_score(logits)[0, 0]
    assert ml.tolist() == pytest.approx(
        [squash(torch.tensor(-2.0)).item(), squash(torch.tensor(-0.5)).item(), squash(torch.tensor(3.0)).item()]
    )
    assert squash(torch.tensor(0.0)).item() == 0.5 and squash(torch.tensor(-10.0)).item() == 0.25
    assert ml[0] < ml[1] < ml[2]  # a smaller max logit is more suspicious
    en = energy_score(logits)[0, 0]
    free_energy = -torch.logsumexp(logits[0, :, 0], dim=0)
    assert torch.allclose(en, squash(free_energy))
    assert en[0] < en[1] < en[2]
    # the squash is increasing and keeps values hundreds of logits apart distinct
    z = torch.tensor([-500.0, -100.0, -10.0, 0.0, 10.0, 100.0, 500.0])
    assert (squash(z).diff() > 0).all() and squash(z).min() > 0 and squash(z).max() < 1
    bins = (squash(z.double()) * 10_000).long()  # ErrorDetectionMetrics' default bins
    assert len(set(bins.tolist())) == len(z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_baseline_scores_finite_for_extreme_and_bf16_logits(dtype):
    logits = torch.tensor([1e4, -1e4, 0.0, 1e4]).view(1, 4, 1, 1).expand(2, 4, 3, 3).to(dtype)
    logits = torch.cat([logits, -logits], dim=0)
    for fn in (msp_score, entropy_score, max_logit_score, energy_score):
        s = fn(logits)
        assert s.dtype == torch.float32 and s.shape == (4, 3, 3)
        assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1, fn.__name__
    wrap = _wrap(LogitsBase(num_classes=4))
    x = logits[:, :, :2, :2].contiguous().float().repeat(1, 1, 8, 8)
    for score in (TemperatureMSPScore(0.5), EnsembleScore([LogitsBase(), LogitsBase()], "mutual_information"),
                  ErrwrapScore("base"), ErrwrapScore("returned")):
        s = score(wrap, x).score
        assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1, repr(score)


def test_new_scores_through_the_interface():
    wrap = _wrap(tiny_base(logit_stride=4))
    x, _ = batch(size=32)
    with torch.no_grad():  # as the scores run: inference without gradients (the same to 1e-6 with them)
        out = wrap(x)
    ml = MaxLogitScore()(wrap, x, base_logits=out.base_logits)
    assert torch.equal(ml.score, max_logit_score(out.base_logits)) and torch.equal(ml.prediction, out.base_labels)
    assert torch.equal(EnergyScore()(wrap, x).score, energy_score(out.base_logits))
    assert torch.allclose(TemperatureMSPScore(1.0)(wrap, x).score, MSPScore()(wrap, x).score)
    t2 = TemperatureMSPScore(2.0)(wrap, x, base_logits=out.base_logits)
    assert torch.allclose(t2.score, msp_score(out.base_logits / 2)) and torch.equal(t2.prediction, out.base_labels)
    base = ErrwrapScore("base")(wrap, x, output=out)
    returned = ErrwrapScore("returned")(wrap, x)
    assert torch.equal(base.score, out.base_error_prob) and torch.equal(base.prediction, out.base_labels)
    assert torch.equal(returned.score, out.error_prob) and torch.equal(returned.prediction, out.labels)
    assert (ErrwrapScore("base").name, ErrwrapScore("returned").name) == ("base_error_prob", "error_prob")
    for name, cls in (("max_logit", MaxLogitScore), ("energy", EnergyScore)):
        assert isinstance(build_score(name), cls) and build_score(name).name == name
    assert build_score("temperature_msp", temperature=2.0).temperature == 2.0
    with pytest.raises(TypeError, match=r"'temperature_msp'.*TemperatureMSPScore.fit"):
        build_score("temperature_msp")  # an unfitted temperature would silently be MSP
    with pytest.raises(TypeError, match=r"'ensemble'.*bases="):
        build_score("ensemble")
    assert build_score("errwrap").kind == "base" and build_score("base_error_prob").name == "base_error_prob"
    assert build_score("error_prob").kind == "returned"
    assert build_score("ensemble", bases=[tiny_base()]).bases[0].classifier.out_channels == 5
    with pytest.raises(ValueError, match="kind"):
        ErrwrapScore("fused")
    with pytest.raises(ValueError, match="temperature"):
        TemperatureMSPScore(0.0)


def test_ensemble_of_identical_bases_equals_msp_and_its_prediction_is_the_mean_argmax():
    wrap = _wrap(tiny_base(seed=0, logit_stride=4))
    x, _ = batch(size=32)
    msp = MSPScore()(wrap, x)
    same = EnsembleScore([tiny_base(seed=0, logit_stride=4).eval() for _ in range(3)])(wrap, x)
    assert torch.allclose(same.score, msp.score, atol=1e-6) and torch.equal(same.prediction, msp.prediction)
    mi = EnsembleScore([tiny_base(seed=0, logit_stride=4).eval() for _ in range(3)], "mutual_information")(wrap, x)
    assert mi.score.abs().max() < 1e-5  # identical members never disagree
    members = [tiny_base(seed=s, logit_stride=4).eval() for s in (1, 2, 3)]
    ens = EnsembleScore(members, "mutual_information")(wrap, x)
    with torch.no_grad():
        probs = [
            torch.softmax(nn.functional.interpolate(m(x)[0], size=(32, 32), mode="bilinear", align_corners=False), 1)
            for m in members
        ]
    mean = torch.stack(probs).mean(0)
    assert torch.equal(ens.prediction, mean.argmax(1))
    assert ens.score.max() > 1e-4 and ens.score.max() <= 1
    calls, handle = _count_base_calls(members[0])
    EnsembleScore(members)(wrap, x)
    handle.remove()
    assert len(calls) == 1
    members[0].train()
    EnsembleScore(members)(wrap, x)
    assert members[0].training  # modes restored
    with pytest.raises(ValueError, match="classes"):
        EnsembleScore([tiny_base(num_classes=5), tiny_base(num_classes=3)])(wrap, x)
    with pytest.raises(TypeError, match="non-empty list"):
        EnsembleScore([])


def test_temperature_fit_recovers_a_known_temperature():
    torch.manual_seed(0)
    true_t, C = 2.5, 4
    g = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(4):
        z = 3.0 * torch.randn(4, C, 16, 16, generator=g)
        probs = torch.softmax(z / true_t, dim=1).permute(0, 2, 3, 1).reshape(-1, C)
        labels = torch.multinomial(probs, 1, generator=g).view(4, 16, 16)
        loader.append((z, labels))
    wrap = _wrap(LogitsBase(num_classes=C))
    score = TemperatureMSPScore.fit(wrap, loader)
    assert abs(score.temperature - true_t) / true_t < 0.10
    assert score.fit_result.nll_after < score.fit_result.nll_before
    assert abs(TemperatureMSPScore.fit(wrap, loader, max_pixels=2000).temperature - true_t) / true_t < 0.10
    with pytest.raises(ValueError, match="no labelled pixels"):
        TemperatureMSPScore.fit(wrap, [(z, torch.full_like(labels, 255))])


def test_every_score_runs_on_a_bf16_wrapper_and_returns_float32_in_range():
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(tiny_base()).eval().to(torch.bfloat16)
    x, _ = batch()
    x = x.to(torch.bfloat16)
    member = tiny_base(seed=1).to(torch.bfloat16)
    scores = (MSPScore(), EntropyScore(), MaxLogitScore(), EnergyScore(), TemperatureMSPScore(0.7),
              EnsembleScore([member, tiny_base(seed=2).to(torch.bfloat16)], "mutual_information"),
              ErrwrapScore("base"), ErrwrapScore("returned"), ErrorHeadScore())
    for score in scores:
        out = score(wrap, x)
        assert out.score.dtype == torch.float32 and out.score.shape == (2, 32, 32), repr(score)
        assert torch.isfinite(out.score).all() and out.score.min() >= 0 and out.score.max() <= 1, repr(score)
