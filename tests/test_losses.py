import math

import pytest
import torch

from errwrap.losses import (
    ErrorCorrectionLoss,
    balanced_pos_weight,
    base_ce,
    detail_loss,
    error_loss,
    error_target,
    fused_nll,
)
from errwrap.wrapper import ErrorCorrectionOutput


def _logits_for(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float() * 5.0


def test_error_target_hand_built_with_ignore():
    pred = torch.tensor([[[0, 1, 2], [2, 2, 0]]])
    labels = torch.tensor([[[0, 2, 2], [255, 1, 0]]])
    target = error_target(_logits_for(pred, 3), labels, ignore_index=255)
    assert target.dtype == torch.int64
    assert target.tolist() == [[[0, 1, 0], [255, 1, 0]]]


def test_error_target_resizes_logits_to_labels():
    pred = torch.tensor([[[0, 1], [1, 0]]])
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    target = error_target(_logits_for(pred, 2), labels)
    assert target.shape == (1, 4, 4)
    # top-left and bottom-right quadrants predict 0 (correct), the others 1 (errors)
    assert target[0, 0, 0] == 0 and target[0, 0, 3] == 1 and target[0, 3, 0] == 1 and target[0, 3, 3] == 0


def test_balanced_pos_weight_hand_computed():
    target = torch.tensor([[[1, 0, 0, 0], [0, 0, 255, 1]]])
    assert balanced_pos_weight(target).item() == pytest.approx(5 / 2)
    assert balanced_pos_weight(torch.zeros(1, 2, 2, dtype=torch.long)).item() == 1.0
    many_neg = torch.zeros(1, 1, 1000, dtype=torch.long)
    many_neg[0, 0, 0] = 1
    assert balanced_pos_weight(many_neg, max_weight=50.0).item() == 50.0


def test_balanced_bce_hand_computed():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 1, 1, 4)
    target = torch.tensor([[[1, 0, 0, 255]]])
    w = 2.0  # two negatives, one positive
    expected = (w * -math.log(torch.sigmoid(torch.tensor(0.5)).item())
                - math.log(1 - torch.sigmoid(torch.tensor(-1.0)).item())
                - math.log(1 - torch.sigmoid(torch.tensor(2.0)).item())) / 3
    assert error_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    plain = error_loss(logits, target, mode="bce").item()
    assert plain == pytest.approx(expected - (w - 1) * -math.log(torch.sigmoid(torch.tensor(0.5)).item()) / 3, rel=1e-6)


def test_focal_loss_down_weights_easy_pixels():
    logits = torch.tensor([4.0, -4.0, 0.0]).view(1, 1, 1, 3)
    target = torch.tensor([[[1, 0, 1]]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.view(3), target.view(3).float(), reduction="none")
    p_t = torch.exp(-bce)
    expected = ((1 - p_t) ** 2 * bce).mean().item()
    assert error_loss(logits, target, mode="focal", gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    assert error_loss(logits, target, mode="focal").item() < error_loss(logits, target, mode="bce").item()


def test_detail_loss_weights_errors():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # predicts 0 then 1
    labels = torch.tensor([[[0, 0]]])
    target = torch.tensor([[[0, 1]]])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").view(2)
    expected = (ce[0] * 1 + ce[1] * 5) / 6
    assert detail_loss(logits, labels, target, focus=4.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert detail_loss(logits, labels, target, focus=0.0).item() == pytest.approx(ce.mean().item(), rel=1e-6)


def test_fused_nll_and_base_ce_match_torch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    labels = torch.randint(0, 4, (2, 5, 5))
    labels[0, 0] = 255
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert fused_nll(torch.log_softmax(logits, 1), labels).item() == pytest.approx(ref.item(), rel=1e-6)
    assert base_ce(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def _output(num_classes=4, size=6, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(2, num_classes, size, size, generator=g)
    z1 = torch.randn(2, num_classes, size, size, generator=g).requires_grad_(requires_grad)
    e = torch.randn(2, 1, size, size, generator=g).requires_grad_(requires_grad)
    from errwrap.heads import mixture_log_probs

    return ErrorCorrectionOutput(mixture_log_probs(z0, z1, e), z0, e, z1)


def test_all_ignored_batch_gives_zero_finite_loss_and_zero_grads():
    out = _output()
    labels = torch.full((2, 6, 6), 255, dtype=torch.long)
    losses = ErrorCorrectionLoss(w_base=1.0)(out, labels)
    for term in losses:
        assert torch.isfinite(term) and term.item() == 0.0
    losses.total.backward()
    assert out.error_logits.grad is not None and torch.count_nonzero(out.error_logits.grad) == 0


def test_loss_terms_and_weights():
    out = _output()
    labels = torch.randint(0, 4, (2, 6, 6), generator=torch.Generator().manual_seed(3))
    losses = ErrorCorrectionLoss(w_err=2.0, w_detail=0.5, w_fused=1.0, w_base=0.0)(out, labels)
    assert losses.base.item() == 0.0
    expected = 2.0 * losses.error + 0.5 * losses.detail + losses.fused
    assert losses.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert ErrorCorrectionLoss(w_base=1.0)(out, labels).base.item() > 0
    assert ErrorCorrectionLoss(error_mode="focal")(out, labels).error.item() > 0


def test_loss_refuses_bad_labels():
    out = _output()
    loss = ErrorCorrectionLoss()
    with pytest.raises(TypeError, match="integer tensor of class indices"):
        loss(out, torch.zeros(2, 6, 6))
    with pytest.raises(ValueError, match=r"shape BxHxW, got shape \(2, 2, 6, 6\)"):
        loss(out, torch.zeros(2, 2, 6, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"spatial size \(6, 6\)"):
        loss(out, torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values in \[0, 4\) or ignore_index=255, got \[4, 7\]"):
        bad = torch.zeros(2, 6, 6, dtype=torch.long)
        bad[0, 0, 0], bad[1, 1, 1], bad[1, 2, 2] = 7, 4, 255
        loss(out, bad)
    with pytest.raises(ValueError, match="batch size 2"):
        loss(out, torch.zeros(3, 6, 6, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_loss_accepts_any_integer_dtype_and_a_channel_dimension(dtype):
    out = _output()
    labels = torch.randint(0, 4, (2, 6, 6), generator=torch.Generator().manual_seed(1))
    labels[0, 0] = 255
    expected = ErrorCorrectionLoss(w_base=1.0)(out, labels)
    for form in (labels.to(dtype), labels.to(dtype)[:, None]):
        got = ErrorCorrectionLoss(w_base=1.0)(out, form)
        for a, b in zip(got, expected, strict=False):
            assert a.item() == b.item()
    unchecked = ErrorCorrectionLoss(validate=False)(out, labels.to(dtype)[:, None])
    assert unchecked.total.item() == ErrorCorrectionLoss()(out, labels).total.item()


def test_label_errors_say_what_the_labels_look_like():
    out = _output()
    loss = ErrorCorrectionLoss()
    labels = torch.randint(0, 4, (2, 6, 6), generator=torch.Generator().manual_seed(1))
    one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"one-hot targets with 4 channels\? pass class indices: labels.argmax\(1\)"):
        loss(out, one_hot)
    with pytest.raises(TypeError, match=r"fractions in \[0, 1\].*ToTensor"):
        loss(out, labels.float() / 255)  # a mask scaled like an image
    with pytest.raises(TypeError, match=r"use labels.long\(\)"):
        loss(out, labels.float())  # whole numbers in a float tensor
    with pytest.raises(TypeError, match="binary mask"):
        loss(out, labels > 1)
    with pytest.raises(ValueError, match=r"labels\[None\]"):
        loss(out, labels[0])


def test_loss_refuses_bad_configuration():
    with pytest.raises(ValueError, match="error_mode"):
        ErrorCorrectionLoss(error_mode="dice")
    with pytest.raises(ValueError, match="w_detail"):
        ErrorCorrectionLoss(w_detail=-1.0)
