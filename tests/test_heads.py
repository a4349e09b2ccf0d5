import math

import pytest
import torch

from errwrap.heads import (
    DetailHead,
    ErrorHead,
    LearnedFusion,
    MixtureFusion,
    confidence_cues,
    mixture_log_probs,
    mixture_log_probs_inference,
)


def test_confidence_cues_values():
    probs = torch.tensor([0.7, 0.2, 0.1]).view(1, 3, 1, 1)
    cues = confidence_cues(probs)[0, :, 0, 0]
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert torch.allclose(cues, torch.tensor([0.7, 0.5, entropy]), atol=1e-6)


def test_confidence_cues_uniform_and_one_hot():
    uniform = torch.full((1, 4, 2, 2), 0.25)
    one_hot = torch.zeros(1, 4, 2, 2)
    one_hot[:, 2] = 1.0
    assert torch.allclose(confidence_cues(uniform)[:, 2], torch.ones(1, 2, 2))
    assert torch.allclose(confidence_cues(one_hot), torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))


@pytest.mark.parametrize("num_classes", [2, 19, 150])
def test_confidence_cues_margin_matches_top2_and_ties(num_classes):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, num_classes, 5, 5) * 3, dim=1)
    probs[0, :2, 0, 0] = 0.5  # an exact tie for the top class
    probs[0, 2:, 0, 0] = 0.0
    top2 = probs.topk(2, dim=1).values
    margin = confidence_cues(probs)[:, 1]
    assert torch.allclose(margin, top2[:, 0] - top2[:, 1], atol=1e-7)
    assert float(margin[0, 0, 0]) == 0.0


@pytest.mark.parametrize("num_classes", [2, 19, 150])
def test_mixture_is_normalised_distribution(num_classes):
    torch.manual_seed(0)
    z0, z1 = torch.randn(2, num_classes, 4, 4) * 3, torch.randn(2, num_classes, 4, 4) * 3
    e = torch.randn(2, 1, 4, 4)
    log_p = mixture_log_probs(z0, z1, e)
    p_err = torch.sigmoid(e)
    expected = (1 - p_err) * torch.softmax(z0, 1) + p_err * torch.softmax(z1, 1)
    assert torch.allclose(log_p.exp(), expected, atol=1e-6)
    assert torch.allclose(log_p.exp().sum(1), torch.ones(2, 4, 4), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixture_finite_for_extreme_logits(dtype):
    z0 = torch.tensor([1e4, -1e4, 0.0]).view(1, 3, 1, 1).to(dtype)
    z1 = torch.tensor([-1e4, 1e4, -1e4]).view(1, 3, 1, 1).to(dtype)
    for e in (-1e4, 0.0, 1e4):
        log_p = mixture_log_probs(z0, z1, torch.full((1, 1, 1, 1), e, dtype=dtype))
        assert torch.isfinite(log_p).all()
        assert log_p.dtype == torch.float32
        assert torch.allclose(log_p.exp().sum(1), torch.ones(1, 1, 1))


def test_mixture_limits_give_base_or_detail_labels():
    torch.manual_seed(1)
    z0, z1 = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    never = mixture_log_probs(z0, z1, torch.full((2, 1, 8, 8), -float("inf")))
    always = mixture_log_probs(z0, z1, torch.full((2, 1, 8, 8), float("inf")))
    assert torch.equal(never.argmax(1), z0.argmax(1))
    assert torch.equal(always.argmax(1), z1.argmax(1))
    assert torch.allclose(never, torch.log_softmax(z0, 1), atol=1e-6)


def test_mixture_gradient_finite_at_extremes():
    z0 = torch.tensor([1e4, -1e4]).view(1, 2, 1, 1).requires_grad_()
    z1 = torch.tensor([-1e4, 1e4]).view(1, 2, 1, 1).requires_grad_()
    e = torch.full((1, 1, 1, 1), 3.0, requires_grad=True)
    mixture_log_probs(z0, z1, e)[:, 0].sum().backward()
    for t in (z0, z1, e):
        assert torch.isfinite(t.grad).all()


def test_learned_fusion_starts_as_mixture_and_learns():
    torch.manual_seed(0)
    z0, z1, e = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 1, 8, 8)
    fusion = LearnedFusion(4)
    assert torch.equal(fusion(z0, z1, e), MixtureFusion()(z0, z1, e))
    fusion(z0, z1, e).sum().backward()
    assert fusion.gate.weight.grad.abs().sum() > 0


def test_error_head_shapes_and_prior():
    head = ErrorHead(16, 5, channels=8, prior=0.2).eval()
    feature, logits = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 16, 16)
    out = head(feature, logits)
    assert out.shape == (2, 1, 4, 4)
    assert head.classifier.bias.item() == pytest.approx(math.log(0.2 / 0.8))
    with pytest.raises(ValueError, match="prior"):
        ErrorHead(16, 5, prior=1.5)


def test_error_head_does_not_backprop_into_base_logits():
    head = ErrorHead(16, 5, channels=8)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    head(torch.randn(2, 16, 4, 4), logits).sum().backward()
    assert logits.grad is None


def test_detail_head_shapes():
    head = DetailHead(8, 16, 7, channels=12, num_blocks=3)
    out = head(torch.randn(2, 8, 16, 16), torch.randn(2, 16, 4, 4), torch.rand(2, 1, 16, 16))
    assert out.shape == (2, 7, 16, 16)
    assert len(head.blocks) == 3


def test_projected_heads_read_the_reduced_features_and_train_the_reduction():
    """project=True: a 1x1 conv-norm-act takes each feature to the head's width before the 3x3
    blocks; outputs keep their shapes and the reductions receive gradients."""
    error = ErrorHead(256, 5, channels=8, project=True)
    detail = DetailHead(96, 256, 5, channels=8, project=True)
    assert error.blocks[0].conv.in_channels == 8 + 5 + 3 and detail.blocks[0].conv.in_channels == 8 + 8 + 1
    assert error.project.conv.in_channels == 256 and detail.project.conv.in_channels == 96
    high, low = torch.randn(2, 256, 4, 4), torch.randn(2, 96, 16, 16)
    e = error(high, torch.randn(2, 5, 16, 16))
    d = detail(low, high, torch.sigmoid(torch.nn.functional.interpolate(e, size=(16, 16))).detach())
    assert e.shape == (2, 1, 4, 4) and d.shape == (2, 5, 16, 16)
    (e.sum() + d.sum()).backward()
    for head in (error, detail):
        grad = head.project.conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    # The unprojected heads (saved models without project_features) have no such module.
    assert ErrorHead(256, 5, channels=8).project is None
    assert not any("project" in name for name, _ in DetailHead(96, 256, 5).named_modules())


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm", "instancenorm", "none"])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_heads_with_configurable_layers(norm, act):
    head = ErrorHead(6, 3, channels=8, norm_layer=norm, act_layer=act)
    assert head(torch.randn(2, 6, 4, 4), torch.randn(2, 3, 4, 4)).shape == (2, 1, 4, 4)


def test_unknown_layer_names_are_refused():
    with pytest.raises(ValueError, match="norm_layer"):
        ErrorHead(6, 3, norm_layer="layernorm2000")
    with pytest.raises(ValueError, match="act_layer"):
        DetailHead(6, 6, 3, act_layer="swishy")


def test_confidence_cues_from_log_probs_equal_the_plain_ones():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 6, 5) * 4
    logits[0, :, 0, 0] = torch.tensor([60.0, -60.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # probabilities below 1e-12
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    assert torch.allclose(confidence_cues(probs, log_probs), confidence_cues(probs), atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 5.0, 40.0, 1e4])
@pytest.mark.parametrize("num_classes", [2, 19])
def test_inference_mixture_equals_log_space_mixture(scale, num_classes):
    """The probability-space mixture equals the log-space one to float32 tolerance, including
    pixels whose probabilities underflow (recomputed in log space) and saturated error logits."""
    torch.manual_seed(0)
    z0, z1 = torch.randn(2, num_classes, 6, 6) * scale, torch.randn(2, num_classes, 6, 6) * scale
    e = torch.randn(2, 1, 6, 6) * scale
    e[0, 0, 0, 0], e[0, 0, 0, 1] = 40.0, -40.0  # sigmoid rounds to 1 (or 0) in float32
    expected = mixture_log_probs(z0, z1, e)
    got = mixture_log_probs_inference(z0, torch.softmax(z0, dim=1), z1, e)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16])  # a few entries (recomputed alone) or many (the whole map)
def test_inference_mixture_recomputes_the_underflowed_entries_exactly(dtype, rows):
    """Some pixels underflow (confident base and detail), the rest do not: the underflowed
    entries get the log-space values, the others stay the probability-space ones."""
    torch.manual_seed(1)
    z0, z1, e = torch.randn(1, 5, 32, 8), torch.randn(1, 5, 32, 8), torch.randn(1, 1, 32, 8)
    z0[..., :rows, :] *= 300.0
    z1[..., :rows, :] = z0[..., :rows, :]  # both agree, far apart: entries near exp(-300) underflow
    z0, z1, e = z0.to(dtype), z1.to(dtype), e.to(dtype)
    probs = torch.softmax(z0.float(), dim=1)
    mixed = (torch.sigmoid(-e.float()) * probs + torch.sigmoid(e.float()) * torch.softmax(z1.float(), dim=1))
    underflow = mixed < torch.finfo(torch.float32).tiny
    assert underflow.any() and not underflow[..., rows:, :].any()
    assert (underflow.float().mean() > 0.05) == (rows == 16)  # the two branches
    got = mixture_log_probs_inference(z0, probs, z1, e)
    expected = mixture_log_probs(z0, z1, e)
    assert torch.isfinite(got).all() and (got[underflow] < -80).all()
    assert torch.allclose(got[underflow], expected[underflow], rtol=1e-6, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_mixture_fusion_takes_the_inference_path_only_without_gradients():
    torch.manual_seed(0)
    z0, z1, e = torch.randn(1, 5, 4, 4), torch.randn(1, 5, 4, 4), torch.randn(1, 1, 4, 4)
    p0 = torch.softmax(z0, dim=1)
    fusion = MixtureFusion()
    with torch.no_grad():
        fast = fusion(z0, z1, e, p0)
    e.requires_grad_(True)
    slow = fusion(z0, z1, e, p0)
    assert slow.requires_grad and not fast.requires_grad
    assert torch.allclose(fast, slow.detach(), atol=1e-6)
