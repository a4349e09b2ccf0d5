"""Edge cases and numerics across the public API (see docs/robustness.md)."""

import pytest
import torch

from errwrap import ErrorCorrectionLoss, ErrorCorrectionWrapper

from .tiny import batch, tiny_base


def test_channels_last_and_non_contiguous_inputs_match():
    wrap = ErrorCorrectionWrapper(tiny_base()).eval()
    x, _ = batch()
    ref = wrap(x)
    for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert not variant.is_contiguous()
        for a, b in zip(wrap(variant), ref, strict=False):
            assert torch.allclose(a, b, atol=1e-5)


def test_channels_last_model():
    wrap = ErrorCorrectionWrapper(tiny_base()).eval()
    x, _ = batch()
    ref = wrap(x)
    wrap = wrap.to(memory_format=torch.channels_last)
    for a, b in zip(wrap(x.to(memory_format=torch.channels_last)), ref, strict=False):
        assert torch.allclose(a, b, atol=1e-5)


def test_batch_size_one_trains_with_batchnorm_heads():
    wrap = ErrorCorrectionWrapper(tiny_base()).train()
    x, y = batch(n=1)
    loss = ErrorCorrectionLoss()(wrap(x), y).total
    loss.backward()
    assert torch.isfinite(loss)


def test_single_value_per_channel_gets_clear_error_or_groupnorm_works():
    wrap = ErrorCorrectionWrapper(tiny_base()).train()
    with pytest.raises(ValueError, match="groupnorm"):
        wrap(torch.randn(1, 3, 8, 8))  # high-level feature 1x1
    gn = ErrorCorrectionWrapper(tiny_base(), norm_layer="groupnorm").train()
    assert gn(torch.randn(1, 3, 8, 8)).logits.shape == (1, 5, 8, 8)
    assert wrap.eval()(torch.randn(1, 3, 8, 8)).logits.shape == (1, 5, 8, 8)


def test_nan_images_propagate_in_forward_and_are_refused_by_the_loss():
    wrap = ErrorCorrectionWrapper(tiny_base()).eval()
    x, y = batch()
    x[0, :, 5, 5] = float("nan")
    out = wrap(x)
    assert torch.isnan(out.base_logits[0]).any()  # propagated, not hidden
    assert torch.isfinite(out.logits[1]).all()  # the other image is untouched
    with pytest.raises(ValueError, match="base logits: expected finite values"):
        ErrorCorrectionLoss()(out, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_base_logits_keep_fused_output_finite(dtype):
    from errwrap.heads import mixture_log_probs

    g = torch.Generator().manual_seed(0)
    z0 = (torch.randn(2, 19, 8, 8, generator=g).sign() * 1e4).to(dtype)
    z1 = (torch.randn(2, 19, 8, 8, generator=g) * 1e4).to(dtype)
    e = (torch.randn(2, 1, 8, 8, generator=g) * 1e4).to(dtype)
    log_p = mixture_log_probs(z0, z1, e)
    assert torch.isfinite(log_p).all()
    assert torch.allclose(log_p.exp().sum(1), torch.ones(2, 8, 8), atol=1e-5)


def test_losses_finite_when_a_class_is_absent():
    wrap = ErrorCorrectionWrapper(tiny_base(num_classes=6)).train()
    x, _ = batch()
    y = torch.zeros(2, 32, 32, dtype=torch.long)  # only class 0 present
    losses = ErrorCorrectionLoss(w_base=1.0)(wrap(x), y)
    assert all(torch.isfinite(t) for t in losses)


def test_bf16_autocast_close_to_fp32():
    wrap = ErrorCorrectionWrapper(tiny_base()).eval()
    x, _ = batch()
    ref = wrap(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrap(x)
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(2, 32, 32), atol=1e-3)
    # documented tolerance (docs/robustness.md): probabilities within 0.05, error prob within 0.05
    assert (out.probs - ref.probs).abs().max() < 0.05
    assert (out.error_prob - ref.error_prob).abs().max() < 0.05


def test_bf16_weights_end_to_end():
    wrap = ErrorCorrectionWrapper(tiny_base()).to(torch.bfloat16).eval()
    out = wrap(batch()[0].to(torch.bfloat16))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert out.base_logits.dtype == torch.bfloat16


def test_bit_flipped_weights_are_refused(tmp_path):
    wrap = ErrorCorrectionWrapper(tiny_base()).eval()
    wrap.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(8, len(data), (40,), generator=g).tolist()
    positions += torch.randint(8, 8 + header_len, (20,), generator=g).tolist()
    refused = loaded = 0
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        path.write_bytes(bytes(flipped))
        try:
            other = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=tiny_base())
        except ValueError as exc:
            assert "model.safetensors" in str(exc)
            refused += 1
        else:
            # only a flip that leaves the tensors identical (e.g. header padding) may load
            for k, v in other.state_dict().items():
                assert torch.equal(v, wrap.state_dict()[k]), f"flip at byte {pos} loaded changed weights"
            loaded += 1
    assert refused >= 50


def test_oversized_header_is_refused(tmp_path):
    wrap = ErrorCorrectionWrapper(tiny_base())
    wrap.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="larger than"):
        ErrorCorrectionWrapper.from_pretrained(tmp_path, model=tiny_base())


def test_every_test_named_in_docs_robustness_exists():
    """docs/robustness.md maps each guarantee to tests: every test it names must exist (a bare
    ``test_x`` refers to the last ``tests/file.py`` named before it on the page)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "robustness.md").read_text(encoding="utf-8")
    current, named, missing = None, 0, []
    for match in re.finditer(r"`(tests/[\w/]+\.py)::(\w+)`|`(test_\w+)`", text):
        current = match.group(1) or current
        name = match.group(2) or match.group(3)
        named += 1
        if current is None or f"def {name}(" not in (root / current).read_text(encoding="utf-8"):
            missing.append(f"{current}::{name}")
    assert named > 20 and missing == []
