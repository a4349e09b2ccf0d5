"""Deployment: capability flags, each backed by a test; torch.export and ONNX of InferenceModule."""

import pytest
import torch

from errwrap import ErrorCorrectionWrapper
from errwrap.export import InferenceModule, export_onnx, export_program

from .tiny import batch, tiny_base


@pytest.fixture(params=[False, True], ids=["fuse-at-output", "fuse-at-features"])
def wrap(request):
    return ErrorCorrectionWrapper(tiny_base(returns="mapping"), fuse_at_features=request.param).eval()


def test_capability_flags_native(wrap):
    assert wrap._is_torch_compilable and wrap._is_torch_exportable and not wrap._is_torch_scriptable


def test_inference_module_outputs(wrap):
    x, _ = batch()
    logits, error_prob = InferenceModule(wrap)(x)
    out = wrap(x)
    assert torch.equal(logits, out.logits) and torch.equal(error_prob, out.error_prob)
    assert error_prob.shape == (2, 32, 32)


def test_compile_fullgraph_matches_eager(wrap):
    assert wrap._is_torch_compilable
    x, _ = batch()
    compiled = torch.compile(InferenceModule(wrap), fullgraph=True, backend="eager")
    for a, b in zip(compiled(x), InferenceModule(wrap)(x), strict=False):
        assert torch.equal(a, b)


def test_torch_export_matches_eager_with_dynamic_batch(wrap):
    assert wrap._is_torch_exportable
    x, _ = batch()
    batch_dim = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(InferenceModule(wrap), (x,), dynamic_shapes=({0: batch_dim},))
    for xx in (x, torch.randn(5, 3, 32, 32)):
        for a, b in zip(program.module()(xx), InferenceModule(wrap)(xx), strict=False):
            assert torch.allclose(a, b, atol=1e-5)


def test_torchscript_is_not_supported_as_flagged(wrap):
    assert not wrap._is_torch_scriptable
    # the error type TorchScript raises differs across torch versions (RuntimeError, NotSupportedError, ...)
    with pytest.raises(Exception):  # noqa: B017
        torch.jit.script(wrap)


@pytest.mark.slow
@pytest.mark.optional
def test_onnx_export_runs_in_onnxruntime(wrap, tmp_path, capfd):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    x, _ = batch()
    path = export_onnx(wrap, tmp_path / "errwrap.onnx", x)
    assert capfd.readouterr().out == ""  # torch.onnx's progress lines are not printed by a library
    assert [p.name for p in tmp_path.iterdir()] == ["errwrap.onnx"]
    session = ort.InferenceSession(str(path))
    for xx in (x, torch.randn(3, 3, 32, 32)):
        logits, error_prob = session.run(None, {session.get_inputs()[0].name: xx.numpy()})
        ref_logits, ref_prob = InferenceModule(wrap)(xx)
        assert logits.shape == tuple(ref_logits.shape)
        assert torch.allclose(torch.from_numpy(logits), ref_logits, atol=1e-4)
        assert torch.allclose(torch.from_numpy(error_prob), ref_prob, atol=1e-5)


def test_onnx_export_refuses_training_mode(wrap, tmp_path):
    with pytest.raises(ValueError, match="eval mode"):
        export_onnx(wrap.train(), tmp_path / "m.onnx", batch()[0])


def test_export_program_matches_eager_for_other_batch_sizes_and_refuses_training_mode(wrap):
    x, _ = batch()
    program = export_program(wrap, x)
    for xx in (x, torch.randn(3, 3, 32, 32)):
        with torch.no_grad():
            for a, b in zip(program.module()(xx), InferenceModule(wrap)(xx), strict=False):
                assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    fixed = export_program(wrap, x, dynamic_batch=False)
    with pytest.raises(AssertionError, match="size"):  # torch.export's shape guard
        fixed.module()(torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="export_program: expected the wrapper in eval mode"):
        export_program(wrap.train(), x)
    with pytest.raises(ValueError, match="sample"):
        export_program(wrap.eval(), x[0])


def _family_models():
    from .test_adapters import _plain, _segformer, _smp, _tv
    from .test_hub_families import _deeplab

    return {
        "deeplabv3plus": (_deeplab, {}),
        "smp": (lambda: _smp("unet", encoder_depth=3, decoder_channels=(16, 8, 8)), {}),
        "torchvision": (lambda: _tv("lraspp_mobilenet_v3_large"), {}),
        "transformers": (_segformer, {}),
        "hooks": (lambda: _plain("tensor"), {"low_level": "backbone.0", "high_level": "decoder"}),
    }


@pytest.mark.slow
@pytest.mark.optional
@pytest.mark.parametrize("family", ["deeplabv3plus", "smp", "torchvision", "transformers", "hooks"])
def test_capability_flags_hold_for_every_family(family):
    """docs/models.md lists the families that export; this is the test behind that list."""
    make, kwargs = _family_models()[family]
    wrap = ErrorCorrectionWrapper(make(), error_channels=8, detail_channels=8, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    reference = InferenceModule(wrap)(x)
    assert wrap._is_torch_exportable and wrap._is_torch_compilable
    program = torch.export.export(InferenceModule(wrap), (x,))
    for a, b in zip(program.module()(x), reference, strict=False):
        assert torch.allclose(a, b, atol=1e-4)
    compiled = torch.compile(InferenceModule(wrap), fullgraph=True, backend="eager")
    for a, b in zip(compiled(x), reference, strict=False):
        assert torch.allclose(a, b, atol=1e-4)
