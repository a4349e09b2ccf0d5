"""Temperature scaling of the fused probabilities (errwrap.calibration)."""

import json
import math

import pytest
import torch

from errwrap import ErrorCorrectionWrapper, calibrate_temperature
from errwrap.calibration import fit_temperature
from errwrap.hub import CONFIG_NAME

from .tiny import batch, tiny_base


def test_fit_recovers_the_temperature_of_overconfident_log_probs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 5, generator=g) * 2
    labels = torch.distributions.Categorical(logits=logits).sample()  # labels drawn from softmax(logits)
    overconfident = torch.log_softmax(logits * 3.0, dim=1)  # what a model 3x too sharp would say
    fit = fit_temperature(overconfident, labels)
    assert fit.temperature == pytest.approx(3.0, rel=0.05)
    assert fit.nll_after < fit.nll_before and fit.pixels == 20_000
    best = min(
        torch.log_softmax(overconfident / t, 1).gather(1, labels[:, None]).neg().mean().item() for t in (2.8, 3.0, 3.2)
    )
    assert fit.nll_after <= best + 1e-4
    with pytest.raises(ValueError, match="at least one labelled pixel"):
        fit_temperature(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))


def test_calibrated_wrapper_keeps_labels_and_round_trips(tmp_path):
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(tiny_base(), error_channels=8, detail_channels=8).eval()
    loader = [batch(n=2, size=32, seed=s) for s in range(3)] + [
        (torch.randn(1, 3, 32, 32), torch.full((1, 32, 32), 255))
    ]
    x = loader[0][0]
    with torch.no_grad():
        before = wrap(x)
    fit = calibrate_temperature(wrap, loader, max_pixels=3000)
    assert wrap.temperature == fit.temperature != 1.0 and fit.pixels == 3000
    assert fit.nll_after < fit.nll_before and not wrap.training
    with torch.no_grad():
        after = wrap(x)
    assert torch.equal(after.labels, before.labels) and torch.equal(after.head_error_prob, before.head_error_prob)
    # the error maps come from the calibrated distribution
    assert not torch.allclose(after.error_prob, before.error_prob)
    assert torch.allclose(after.error_prob, 1 - after.probs.amax(1), atol=1e-6)
    assert torch.allclose(after.probs.sum(1), torch.ones(2, 32, 32), atol=1e-5)
    assert torch.allclose(after.logits, torch.log_softmax(before.logits / fit.temperature, 1), atol=1e-5)
    wrap.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["heads"]["temperature"] == pytest.approx(fit.temperature)
    again = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=tiny_base())
    with torch.no_grad():
        assert again.temperature == pytest.approx(fit.temperature) and torch.allclose(again(x).logits, after.logits)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["heads"]["temperature"] = -1.0
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="heads.temperature must be a positive number"):
        ErrorCorrectionWrapper.from_pretrained(tmp_path, model=tiny_base())
    fresh = tmp_path / "fresh"
    ErrorCorrectionWrapper(tiny_base()).save_pretrained(fresh)  # T = 1 is not written
    assert "temperature" not in json.loads((fresh / CONFIG_NAME).read_text())["heads"]


def test_bad_inputs_are_refused_and_leave_the_temperature():
    wrap = ErrorCorrectionWrapper(tiny_base())
    wrap.temperature = 2.0
    with pytest.raises(ValueError, match="no labelled pixels"):
        calibrate_temperature(wrap, [(torch.randn(1, 3, 32, 32), torch.full((1, 32, 32), 255))])
    assert wrap.temperature == 2.0
    with pytest.raises(ValueError, match="labels of batch 0"):
        calibrate_temperature(wrap, [(torch.randn(1, 3, 32, 32), torch.full((1, 32, 32), 9))])
    assert wrap.temperature == 2.0 and math.isfinite(wrap.temperature)
