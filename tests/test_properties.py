"""Property-based tests (hypothesis) over shapes, strides, class counts and ignore_index."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from errwrap.heads import mixture_log_probs
from errwrap.losses import ErrorCorrectionLoss, error_loss, error_target
from errwrap.wrapper import ErrorCorrectionOutput

cases = st.fixed_dictionaries(
    {
        "b": st.integers(1, 3),
        "c": st.integers(2, 12),
        "h": st.integers(1, 9),
        "w": st.integers(1, 9),
        "stride": st.sampled_from([1, 2, 4]),
        "ignore_index": st.sampled_from([255, -1, 100]),
        "ignored": st.floats(0.0, 1.0),
        "seed": st.integers(0, 2**16),
        "scale": st.sampled_from([1.0, 10.0, 1e4]),
    }
)


def _make(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, c, h, w = case["b"], case["c"], case["h"] * case["stride"], case["w"] * case["stride"]
    labels = torch.randint(0, c, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < case["ignored"]] = case["ignore_index"]
    z0 = torch.randn(b, c, case["h"], case["w"], generator=g) * case["scale"]
    z0_full = torch.nn.functional.interpolate(z0, size=(h, w), mode="bilinear", align_corners=False)
    z1 = (torch.randn(b, c, h, w, generator=g) * case["scale"]).requires_grad_()
    e = (torch.randn(b, 1, h, w, generator=g) * case["scale"]).requires_grad_()
    out = ErrorCorrectionOutput(mixture_log_probs(z0_full, z1, e), z0_full, e, z1)
    return out, labels, z0


@settings(max_examples=60, deadline=None)
@given(cases)
def test_losses_are_finite_non_negative_and_respect_ignore(case):
    out, labels, _ = _make(case)
    losses = ErrorCorrectionLoss(w_base=1.0, ignore_index=case["ignore_index"])(out, labels)
    for term in losses:
        assert torch.isfinite(term) and term >= 0
    if bool((labels == case["ignore_index"]).all()):
        assert losses.total.item() == 0.0
    losses.total.backward()
    assert torch.isfinite(out.error_logits.grad).all() and torch.isfinite(out.detail_logits.grad).all()
    # ignored pixels get no gradient at all
    ignored = labels == case["ignore_index"]
    assert (out.detail_logits.grad.abs().sum(1)[ignored] == 0).all()
    assert (out.error_logits.grad[:, 0][ignored] == 0).all()


@settings(max_examples=60, deadline=None)
@given(cases)
def test_error_target_values_and_resizing(case):
    _, labels, z0 = _make(case)
    target = error_target(z0, labels, case["ignore_index"])
    assert target.shape == labels.shape
    ignored = labels == case["ignore_index"]
    assert (target[ignored] == case["ignore_index"]).all()
    assert set(target[~ignored].unique().tolist()) <= {0, 1}


@settings(max_examples=40, deadline=None)
@given(cases, st.sampled_from(["balanced_bce", "bce", "focal"]))
def test_error_loss_modes_finite(case, mode):
    out, labels, z0 = _make(case)
    target = error_target(z0, labels, case["ignore_index"])
    loss = error_loss(out.error_logits, target, case["ignore_index"], mode=mode)
    assert torch.isfinite(loss) and loss >= 0


@settings(max_examples=40, deadline=None)
@given(cases)
def test_fused_distribution_normalised(case):
    out, _, _ = _make(case)
    assert torch.isfinite(out.logits).all()
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(out.logits.shape[0], *out.logits.shape[2:]), atol=1e-5)
