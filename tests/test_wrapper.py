import gc
import weakref

import pytest
import torch
from torch import nn

from errwrap import ErrorCorrectionLoss, ErrorCorrectionOutput, ErrorCorrectionWrapper

from .tiny import batch, tiny_base


@pytest.mark.parametrize("logit_stride", [1, 4])
@pytest.mark.parametrize("returns", ["tuple", "mapping", "single"])
def test_output_shapes_and_dtypes(logit_stride, returns):
    wrap = ErrorCorrectionWrapper(tiny_base(num_classes=5, logit_stride=logit_stride, returns=returns))
    x, _ = batch(size=32)
    out = wrap(x)
    assert isinstance(out, ErrorCorrectionOutput)
    assert out.logits.shape == (2, 5, 32, 32)
    assert out.base_logits.shape == (2, 5, 32, 32)
    assert out.error_logits.shape == (2, 1, 32, 32)
    assert out.detail_logits.shape == (2, 5, 32, 32)
    assert all(t.dtype == torch.float32 for t in out)
    assert out.error_prob.shape == (2, 32, 32)
    assert out.labels.dtype == torch.int64 and out.labels.shape == (2, 32, 32)
    assert out.error_prob.min() >= 0.0 and out.error_prob.max() <= 1.0
    assert torch.allclose(out.probs.sum(1), torch.ones(2, 32, 32), atol=1e-5)


def test_non_square_input_and_odd_sizes():
    wrap = ErrorCorrectionWrapper(tiny_base(logit_stride=4)).eval()
    out = wrap(torch.randn(1, 3, 40, 56))
    assert out.logits.shape == (1, 5, 40, 56)
    assert wrap(torch.randn(1, 3, 37, 45)).error_logits.shape == (1, 1, 37, 45)


def test_inferred_and_chosen_features():
    wrap = ErrorCorrectionWrapper(tiny_base(returns="mapping"))
    assert (wrap.low_key, wrap.high_key) == ("low", "high")  # finest, last
    assert wrap.num_classes == 5
    assert wrap.head_config["low_channels"] == 8 and wrap.head_config["high_channels"] == 16
    chosen = ErrorCorrectionWrapper(tiny_base(returns="mapping"), low_level="mid", high_level=1)
    assert (chosen.low_key, chosen.high_key) == ("mid", "mid")
    single = ErrorCorrectionWrapper(tiny_base(returns="single"))
    assert single.low_key == single.high_key == "0"
    negative = ErrorCorrectionWrapper(tiny_base(), low_level=-2)
    assert negative.low_key == "1"


@pytest.mark.parametrize("at_features", [False, True])
def test_features_the_heads_do_not_read_are_freed_before_they_run(at_features):
    """The tiny base's middle feature feeds neither head: it must not be alive while the heads run
    (the heads' peak memory then adds nothing to the base's, docs/benchmarks.md section 1)."""
    wrap = ErrorCorrectionWrapper(tiny_base(), fuse_at_features=at_features).eval()
    assert "1" not in (wrap.low_key, wrap.high_key)
    middle, alive = [], []
    hooks = [
        wrap.base.stage2.register_forward_hook(lambda m, i, o: middle.append(weakref.ref(o))),
        wrap.error_head.register_forward_pre_hook(lambda m, i: alive.append(middle[-1]() is not None)),
    ]
    with torch.no_grad(), pytest.warns(UserWarning, match="freshly initialised"):
        wrap(batch()[0])
    for h in hooks:
        h.remove()
    assert alive == [False]


def test_feature_choice_errors_name_the_features():
    with pytest.raises(ValueError, match=r"'nope'.*\['low', 'mid', 'high'\]"):
        ErrorCorrectionWrapper(tiny_base(returns="mapping"), low_level="nope")
    with pytest.raises(ValueError, match="3 feature maps"):
        ErrorCorrectionWrapper(tiny_base(), high_level=5)


def test_base_logits_equal_unwrapped_model():
    base = tiny_base(logit_stride=1).eval()
    wrap = ErrorCorrectionWrapper(base).eval()
    x, _ = batch()
    assert torch.equal(wrap(x).base_logits, base(x)[0])
    base4 = tiny_base(logit_stride=4).eval()
    wrap4 = ErrorCorrectionWrapper(base4).eval()
    expected = nn.functional.interpolate(base4(x)[0], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(wrap4(x).base_logits, expected)


def _force_error_prob(wrap: ErrorCorrectionWrapper, value: float) -> None:
    with torch.no_grad():
        wrap.error_head.classifier.weight.zero_()
        wrap.error_head.classifier.bias.fill_(value)


def test_forced_error_probability_selects_base_or_detail_labels():
    wrap = ErrorCorrectionWrapper(tiny_base()).eval()
    x, _ = batch()
    _force_error_prob(wrap, -1e4)
    out = wrap(x)
    assert torch.equal(out.labels, out.base_labels)
    # the fused distribution is the base's: both error maps are 1 - max softmax of the base
    assert out.head_error_prob.max() == 0.0
    msp = 1 - torch.softmax(out.base_logits, 1).amax(1)
    assert torch.allclose(out.error_prob, msp, atol=1e-5) and torch.allclose(out.base_error_prob, msp, atol=1e-5)
    _force_error_prob(wrap, 1e4)
    out = wrap(x)
    assert torch.equal(out.labels, out.detail_logits.argmax(1))
    assert torch.isfinite(out.logits).all()


def test_frozen_step_changes_every_head_parameter_and_no_base_state():
    wrap = ErrorCorrectionWrapper(tiny_base(), fusion="learned").train()
    base_before = {k: v.clone() for k, v in wrap.base.state_dict().items()}
    heads_before = {n: p.detach().clone() for n, p in wrap.named_parameters() if not n.startswith("base.")}
    opt = torch.optim.SGD(wrap.head_parameters(), lr=0.1)
    x, y = batch()
    ErrorCorrectionLoss()(wrap(x), y).total.backward()
    opt.step()
    for k, v in wrap.base.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base state {k} changed"
    assert not any(m.training for m in wrap.base.modules())
    for n, p in wrap.named_parameters():
        if not n.startswith("base."):
            assert not torch.equal(p, heads_before[n]), f"head parameter {n} did not change"
        else:
            assert p.grad is None and not p.requires_grad


def test_every_head_parameter_gets_a_gradient():
    wrap = ErrorCorrectionWrapper(tiny_base(), fusion="learned").train()
    x, y = batch()
    ErrorCorrectionLoss()(wrap(x), y).total.backward()
    for n, p in wrap.named_parameters():
        if n.startswith("base."):
            continue
        assert p.grad is not None, f"{n} is unused"
        assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"


def test_thirty_steps_lower_the_loss():
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(tiny_base()).train()
    opt = torch.optim.AdamW(wrap.head_parameters(), lr=3e-3)
    loss_fn = ErrorCorrectionLoss()
    x, y = batch(n=4)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(wrap(x), y).total
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_freeze_unfreeze_and_train_mode():
    base = tiny_base()
    base.classifier.bias.requires_grad_(False)  # a user's own partial freeze
    wrap = ErrorCorrectionWrapper(base)
    assert wrap.base_frozen
    wrap.train()
    assert not wrap.base.training and wrap.error_head.training
    assert all(not p.requires_grad for p in wrap.base.parameters())
    wrap.unfreeze_base()
    assert wrap.base.training
    assert wrap.base.stem[0].weight.requires_grad and not wrap.base.classifier.bias.requires_grad
    x, y = batch()
    ErrorCorrectionLoss(w_base=1.0)(wrap(x), y).total.backward()
    assert wrap.base.stem[0].weight.grad is not None
    wrap.freeze_base()
    assert not wrap.base.training and not wrap.base.stem[0].weight.requires_grad
    unfrozen = ErrorCorrectionWrapper(tiny_base(), freeze_base=False).train()
    assert unfrozen.base.training and not unfrozen.base_frozen


def test_construction_restores_base_modes_and_is_repeatable():
    base = tiny_base().train()
    base.stage2.eval()
    torch.manual_seed(123)
    first = ErrorCorrectionWrapper(base, freeze_base=False)
    torch.manual_seed(123)
    second = ErrorCorrectionWrapper(base, freeze_base=False)
    for (n, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=False):
        assert torch.equal(a, b), n
    assert base.training and base.stem.training and not base.stage2.training
    assert base.stem[1].num_batches_tracked.item() == 0


def test_compile_fullgraph_gives_same_outputs():
    wrap = ErrorCorrectionWrapper(tiny_base(returns="mapping")).eval()
    x, _ = batch()
    compiled = torch.compile(wrap, fullgraph=True, backend="eager")
    for a, b in zip(compiled(x), wrap(x), strict=False):
        assert torch.equal(a, b)


class _Bad(nn.Module):
    def __init__(self, output):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.output = output

    def forward(self, x):
        y = self.conv(x)
        return self.output(y)


@pytest.mark.parametrize(
    "output, match",
    [
        (lambda y: y, "could not find features to tap .no 4-d feature map is produced before its classifier"),
        (lambda y: {"out": y}, "could not find features to tap"),
        (lambda y: {"masks": y}, "keys 'logits' and 'features'"),
        (lambda y: (y, y, y), "could not find features to tap"),
        (lambda y: (y, "feature"), "expected a tensor, a sequence or a mapping"),
        (lambda y: (y[:, :, 0], [y]), "4-d tensor"),
        (lambda y: (y, [y[0]]), "feature '0': expected a 4-d tensor"),
    ],
)
def test_unreadable_base_output_explains_protocol(output, match):
    with pytest.raises(TypeError, match=match) as info:
        ErrorCorrectionWrapper(_Bad(output))
    assert "low_level=" in str(info.value) or "feature" in str(info.value)


def test_num_classes_mismatch_and_bad_images():
    with pytest.raises(ValueError, match="num_classes=7.*5 channels"):
        ErrorCorrectionWrapper(tiny_base(num_classes=5), num_classes=7)
    wrap = ErrorCorrectionWrapper(tiny_base())
    with pytest.raises(ValueError, match=r"expected 3 channels .*got shape \(2, 4, 32, 32\)"):
        wrap(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="3-d shape"):
        wrap(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="dtype torch.uint8"):
        wrap(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="got ndarray"):
        import numpy as np

        wrap(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ErrorCorrectionWrapper(lambda x: x)


def test_other_channel_counts():
    wrap = ErrorCorrectionWrapper(tiny_base(in_channels=1), in_channels=1)
    assert wrap(torch.randn(2, 1, 32, 32)).logits.shape == (2, 5, 32, 32)
    inferred = ErrorCorrectionWrapper(tiny_base(in_channels=4))  # read from the first Conv2d
    assert inferred.in_channels == 4 and inferred.head_config["in_channels"] == 4
    assert inferred(torch.randn(2, 4, 32, 32)).logits.shape == (2, 5, 32, 32)


class _CoordBase(nn.Module):
    """Adds two coordinate channels inside: its first Conv2d takes 5 channels, the input 3."""

    def __init__(self):
        super().__init__()
        self.net = tiny_base(in_channels=5)

    def forward(self, x):
        b, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return self.net(torch.cat([x, ys.expand(b, 1, h, w), xs.expand(b, 1, h, w)], dim=1))


def test_in_channels_falls_back_to_three_when_the_first_conv_is_inside():
    assert ErrorCorrectionWrapper(_CoordBase()).in_channels == 3


def test_one_channel_logits_are_binary_segmentation(tmp_path):
    base = tiny_base(num_classes=1).eval()
    wrap = ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8)
    assert wrap.binary and wrap.num_classes == 2 and wrap.head_config["num_classes"] == 2
    x, labels = batch(n=2, size=32, num_classes=2)
    with torch.no_grad():
        out = wrap(x)
        z = nn.functional.interpolate(base(x)[0], size=(32, 32), mode="bilinear", align_corners=False)
    assert out.logits.shape == out.base_logits.shape == (2, 2, 32, 32)
    assert torch.allclose(out.base_logits.softmax(1)[:, 1], torch.sigmoid(z[:, 0]), atol=1e-6)
    assert torch.equal(out.base_labels, (z[:, 0] > 0).long())
    assert torch.allclose(out.probs.sum(1), torch.ones(2, 32, 32), atol=1e-5)
    wrap.train()
    loss = ErrorCorrectionLoss()(wrap(x), labels).total
    loss.backward()
    assert torch.isfinite(loss) and wrap.detail_head.classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_classes=3.*2 channels"):
        ErrorCorrectionWrapper(base, num_classes=3)
    assert ErrorCorrectionWrapper(base, num_classes=2).binary
    wrap.eval().save_pretrained(tmp_path)
    again = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=tiny_base(num_classes=1)).eval()
    with torch.no_grad():
        assert again.binary and torch.equal(again(x).logits, wrap(x).logits)


def test_base_whose_logits_change_channels_at_run_time():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            y = self.conv(x)
            return (y if self.calls == 1 else y[:, :3]), [y]

    wrap = ErrorCorrectionWrapper(Flaky())
    with pytest.raises(ValueError, match=r"base logits: expected 4 channels"):
        wrap(torch.randn(1, 3, 16, 16))


def test_probe_failure_suggests_sample_size():
    class NeedsBig(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            if x.shape[-1] < 100:
                raise RuntimeError("input too small")
            y = self.conv(x)
            return y, [y]

    with pytest.raises(RuntimeError, match="sample_size"):
        ErrorCorrectionWrapper(NeedsBig())
    assert ErrorCorrectionWrapper(NeedsBig(), sample_size=128).num_classes == 2


def test_wrapper_keeps_no_reference_cycles_to_base_hooks():
    base = tiny_base()
    wrap = ErrorCorrectionWrapper(base)
    del wrap
    gc.collect()
    assert not base._forward_hooks and not base._forward_pre_hooks


def test_register_adapter_as_class_decorator():
    from errwrap.adapters import BaseAdapter, BaseOutput, register_adapter, unregister_adapter

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return {"scores": self.conv(x)}

    @register_adapter("odd-family", lambda m: isinstance(m, Odd))
    class OddAdapter(BaseAdapter):
        name = "odd-family"

        def forward(self, model, x):
            y = model(x)["scores"]
            return BaseOutput(y, {"0": y})

    try:
        wrap = ErrorCorrectionWrapper(Odd())
        assert isinstance(wrap.adapter, OddAdapter)
        assert wrap(torch.randn(1, 3, 16, 16)).logits.shape == (1, 4, 16, 16)
    finally:
        unregister_adapter("odd-family")


def test_fresh_heads_warn_once_unless_trained_or_loaded():
    import warnings

    x = torch.randn(1, 3, 32, 32)
    wrap = ErrorCorrectionWrapper(tiny_base()).eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        wrap(x)
        wrap(x)
    fresh = [w for w in caught if "freshly initialised" in str(w.message)]
    assert len(fresh) == 1 and fresh[0].category is UserWarning
    assert fresh[0].filename == __file__  # it points at the user's line, not at torch or errwrap
    for prepare in (lambda w: w.train(), lambda w: w.load_state_dict(wrap.state_dict())):
        other = ErrorCorrectionWrapper(tiny_base())
        prepare(other)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            other.eval()(x)
        assert not [w for w in caught if "freshly initialised" in str(w.message)]


def test_images_are_cast_to_the_model_dtype():
    wrap = ErrorCorrectionWrapper(tiny_base()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wrap(x.double()).logits, wrap(x).logits)
        half = ErrorCorrectionWrapper(tiny_base()).to(torch.bfloat16).eval()
        out = half(x)
    assert out.base_logits.dtype == torch.bfloat16 and out.labels.shape == (1, 32, 32)


@pytest.mark.parametrize("logit_stride", [1, 4])
def test_inference_mode_and_channels_last_give_the_training_path_outputs(logit_stride):
    """Under ``torch.inference_mode`` the wrapper shares the base's softmax and mixes in
    probability space; with gradients on it runs the log-space ops: both give one answer, and
    so does a channels-last wrapper on channels-last images."""
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(tiny_base(num_classes=4, logit_stride=logit_stride)).eval()
    wrap.train().eval()  # no fresh-heads warning
    for p in wrap.head_parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, _ = batch(num_classes=4)
    reference = wrap(x)  # gradients on: the log-space path
    assert reference.logits.requires_grad
    with torch.inference_mode():
        fast = wrap(x)
        wrap.to(memory_format=torch.channels_last)
        last = wrap(x.contiguous(memory_format=torch.channels_last))
    for out in (fast, last):
        for name in ("logits", "base_logits", "error_logits", "detail_logits"):
            assert torch.allclose(getattr(out, name), getattr(reference, name).detach(), atol=1e-5), name
        assert torch.equal(out.labels, reference.labels)
        assert torch.allclose(out.error_prob, reference.error_prob.detach(), atol=1e-6)
