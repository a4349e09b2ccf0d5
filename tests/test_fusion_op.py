import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from errwrap.heads import MixtureFusion, mixture_log_probs
from errwrap.ops.fusion import (
    FusedPrediction,
    fused_labels_and_error_prob,
    fused_mixture_log_probs,
)
from errwrap.wrapper import ErrorCorrectionWrapper

from .tiny import batch, tiny_base

CLASSES = [2, 19, 150]
DTYPES = [torch.float32, torch.bfloat16]


def _logits(num_classes, dtype=torch.float32, scale=3.0, shape=(2, 5, 7), seed=0, device="cpu", channels_last=False):
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape
    z0 = torch.randn(b, num_classes, h, w, generator=g) * scale
    z1 = torch.randn(b, num_classes, h, w, generator=g) * scale
    e = torch.randn(b, 1, h, w, generator=g) * scale
    out = [t.to(device=device, dtype=dtype) for t in (z0, z1, e)]
    if channels_last:
        out = [t.contiguous(memory_format=torch.channels_last) for t in out]
    return out


def _extreme(num_classes, dtype=torch.float32, device="cpu"):
    """Logits of +-1e4: one-hot softmaxes that disagree, and saturated error logits."""
    z0, z1, e = _logits(num_classes, scale=1.0, seed=1)
    z0 = torch.where(z0 > 0, 1e4, -1e4)
    z1 = torch.where(z1 > 0, -1e4, 1e4)
    e = torch.where(e > 0, 1e4, -1e4)
    e[..., 0, :] = 0.0  # keep some pixels where both components count
    return [t.to(device=device, dtype=dtype) for t in (z0, z1, e)]


def _grads(fn, inputs, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad_out = (
        torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out) if grad_out is None else grad_out
    )
    return out, torch.autograd.grad(out, leaves, grad_out), grad_out


def _assert_grads_close(got, want, dtype):
    for g, w in zip(got, want, strict=False):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.isfinite(g).all()
        # bf16 gradients are rounded to 8 bits of mantissa: compare relative to the gradient's size.
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6 * max(1.0, w.float().abs().max().item())
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=1e-4 if dtype == torch.float32 else 2e-2)


# --------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_torch_backend_matches_reference_forward_and_grads(num_classes, dtype, kind):
    inputs = _logits(num_classes, dtype) if kind == "random" else _extreme(num_classes, dtype)
    want, want_grads, g = _grads(mixture_log_probs, inputs)
    got, got_grads, _ = _grads(lambda *t: fused_mixture_log_probs(*t, backend="torch"), inputs, g)
    assert got.dtype == want.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    _assert_grads_close(got_grads, want_grads, dtype)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_gradcheck_float64(num_classes):
    inputs = [t.double().requires_grad_() for t in _logits(num_classes, shape=(1, 2, 3))]
    def fn(*t):
        return fused_mixture_log_probs(*t, backend="torch")

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_only_the_inputs_are_saved_for_backward():
    inputs = [t.requires_grad_() for t in _logits(19)]
    saved = {"fused": [], "reference": []}
    for name, fn in (("fused", fused_mixture_log_probs), ("reference", mixture_log_probs)):
        with torch.autograd.graph.saved_tensors_hooks(lambda t, n=name: saved[n].append(t) or t, lambda t: t):
            fn(*inputs)
    assert len(saved["fused"]) == 3
    assert {t.data_ptr() for t in saved["fused"]} == {t.data_ptr() for t in inputs}
    full = inputs[0].numel()
    assert sum(t.numel() for t in saved["reference"]) >= 4 * full  # the unfused graph keeps C-sized maps


def test_gradient_formula_on_one_pixel():
    # dz0 = g*w0 - softmax(z0)*sum(g*w0), de = (1-p)*sum(g*w1) - p*sum(g*w0), written out by hand.
    z0, z1, e = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 3.0, -1.0]), torch.tensor(0.3)
    g = torch.tensor([0.7, -1.1, 0.4])
    p = torch.sigmoid(e)
    s0, s1 = torch.softmax(z0, 0), torch.softmax(z1, 0)
    mix = (1 - p) * s0 + p * s1
    w0, w1 = (1 - p) * s0 / mix, p * s1 / mix
    want = (g * w0 - s0 * (g * w0).sum(), g * w1 - s1 * (g * w1).sum(), (1 - p) * (g * w1).sum() - p * (g * w0).sum())
    leaves = [
        z0.view(1, 3, 1, 1).requires_grad_(),
        z1.view(1, 3, 1, 1).requires_grad_(),
        e.view(1, 1, 1, 1).requires_grad_(),
    ]
    got = torch.autograd.grad(fused_mixture_log_probs(*leaves, backend="torch"), leaves, g.view(1, 3, 1, 1))
    for a, b in zip(got, want, strict=False):
        torch.testing.assert_close(a.flatten(), b.flatten().float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_classes", CLASSES)
def test_labels_and_error_prob_equal_reference(num_classes):
    z0, z1, e = _logits(num_classes, shape=(2, 9, 11))
    out = fused_labels_and_error_prob(z0, z1, e, backend="torch")
    assert isinstance(out, FusedPrediction)
    assert out.labels.dtype == torch.int64 and out.labels.shape == (2, 9, 11)
    assert out.error_prob.dtype == torch.float32 and out.error_prob.shape == (2, 9, 11)
    assert torch.equal(out.labels, mixture_log_probs(z0, z1, e).argmax(dim=1))
    # the probability that the returned label is wrong: 1 - max of the fused distribution
    torch.testing.assert_close(out.error_prob, 1.0 - mixture_log_probs(z0, z1, e).exp().amax(dim=1))
    assert out.error_prob.min() >= 0.0 and out.error_prob.max() <= 1.0 - 1.0 / num_classes + 1e-6


def test_backend_choice_and_input_checks():
    z0, z1, e = _logits(4)
    assert fused_mixture_log_probs(z0, z1, e).grad_fn is None  # no grad needed, none recorded
    with pytest.raises(ValueError, match="backend: expected one of"):
        fused_mixture_log_probs(z0, z1, e, backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="backend='triton': expected CUDA tensors"):
            fused_mixture_log_probs(z0, z1, e, backend="triton")
    with pytest.raises(ValueError, match=r"error_logits: expected shape \(2, 1, 5, 7\)"):
        fused_mixture_log_probs(z0, z1, e.expand(2, 4, 5, 7))
    with pytest.raises(ValueError, match="detail_logits: expected the shape"):
        fused_mixture_log_probs(z0, z1[:, :3], e)
    with pytest.raises(TypeError, match="base_logits: expected a floating-point BxCxHxW"):
        fused_mixture_log_probs(z0[0], z1, e)


# --------------------------------------------------------------------------- wiring in MixtureFusion
class _HostSyncs(TorchDispatchMode):
    """Records ops that copy a tensor value to the host (``.item()``, ``bool(t)``, ``nonzero``)."""

    SYNCING = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default})

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_mixture_fusion_on_cpu_uses_the_plain_ops_and_matches_the_fused_op():
    inputs = [t.requires_grad_() for t in _logits(5)]
    out = MixtureFusion()(*inputs)
    assert type(out.grad_fn).__name__ != "_MixtureLogProbsBackward"  # CPU: plain ops (faster)
    fused = fused_mixture_log_probs(*inputs, backend="torch")
    assert type(fused.grad_fn).__name__ == "_MixtureLogProbsBackward"
    torch.testing.assert_close(out, fused, atol=0, rtol=0)


@pytest.mark.slow
def test_wrapper_forward_has_no_host_syncs_and_no_graph_breaks():
    wrap = ErrorCorrectionWrapper(tiny_base(returns="mapping"))
    x, _ = batch()
    with _HostSyncs() as probe:
        torch.tensor(1.0).item()
    assert probe.seen, "the probe must see a deliberate .item()"
    for mode in (True, False):
        wrap.train(mode)
        with _HostSyncs() as syncs:
            out = wrap(x)
        assert syncs.seen == [], f"train={mode}: forward synchronised with the host via {syncs.seen}"
        out.logits.sum().backward()  # the fused op's backward runs on the wrapper's graph
        assert all(torch.isfinite(p.grad).all() for p in wrap.head_parameters() if p.grad is not None)
    explanation = torch._dynamo.explain(wrap.eval())(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_wrapper_exports_with_plain_mixture_ops():
    wrap = ErrorCorrectionWrapper(tiny_base(returns="mapping")).eval()
    x, _ = batch()
    program = torch.export.export(wrap, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "aten.logaddexp.default" in targets  # traced through mixture_log_probs, not the Function
    for got, want in zip(program.module()(x), wrap(x), strict=False):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bf16_channels_last_wrapper_end_to_end():
    reference = ErrorCorrectionWrapper(tiny_base(returns="mapping")).eval()
    wrap = ErrorCorrectionWrapper(tiny_base(returns="mapping"))
    wrap.load_state_dict(reference.state_dict())
    wrap = wrap.to(dtype=torch.bfloat16, memory_format=torch.channels_last).eval()
    x, _ = batch()
    out = wrap(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    want = reference(x)
    assert out.logits.dtype == torch.float32 and out.base_logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(2, 32, 32), atol=1e-5, rtol=0)
    assert (out.probs - want.probs).abs().max() < 0.05
    assert (out.labels == want.labels).float().mean() > 0.95
    wrap.train()
    out = wrap(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    (-out.logits.gather(1, want.labels[:, None]).mean()).backward()
    grads = [p.grad for p in wrap.head_parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------- triton backend
_TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from errwrap.heads import mixture_log_probs
    from errwrap.ops.fusion import fused_labels_and_error_prob, fused_mixture_log_probs
    from tests.test_fusion_op import _assert_grads_close, _extreme, _grads, _logits

    def check(device):
        for num_classes in (2, 19, 150):
            for dtype in (torch.float32, torch.bfloat16):
                cases = [_logits(num_classes, dtype, device=device),
                         _logits(num_classes, dtype, device=device, channels_last=True),
                         _extreme(num_classes, dtype, device=device)]
                for inputs in cases:
                    want, want_grads, g = _grads(mixture_log_probs, inputs)
                    got, got_grads, _ = _grads(lambda *t: fused_mixture_log_probs(*t, backend="triton"), inputs, g)
                    assert got.dtype == torch.float32 and torch.isfinite(got).all()
                    if inputs is cases[1]:
                        assert got.is_contiguous(memory_format=torch.channels_last)
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                    _assert_grads_close(got_grads, want_grads, dtype)
                    labels, prob = fused_labels_and_error_prob(*inputs, backend="triton")
                    top2 = want.topk(2, dim=1).values
                    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # ties may break either way
                    assert torch.equal(labels[clear], want.argmax(1)[clear])
                    torch.testing.assert_close(prob, 1.0 - want.exp().amax(1), atol=1e-5, rtol=1e-5)
    """
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
def test_triton_backend_matches_reference_on_cuda():
    pytest.importorskip("triton")
    namespace: dict = {}
    exec(_TRITON_CHECK, namespace)  # noqa: S102 - the same check source runs in the interpreter test
    namespace["check"]("cuda")


@pytest.mark.slow
def test_triton_kernels_match_reference_in_interpreter():
    """The same kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = _TRITON_CHECK + "\ncheck('cpu')\nprint('ok')\n"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize("num_classes", [19, 150])
def test_triton_kernels_compile_for_sm90_without_spills(num_classes, tmp_path):
    """Compile the kernels ahead of time for an H100 (sm_90), no GPU needed: no local memory."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from errwrap.ops import _triton_fusion as kernels
    from errwrap.ops.fusion import _launch_config

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    block_p, block_c, one_chunk, warps = _launch_config(num_classes)
    consts = {"BLOCK_P": block_p, "BLOCK_C": block_c, "ONE_CHUNK": one_chunk}
    fp32_ptrs = {"out_ptr", "g_ptr", "prob_ptr"}
    for kernel in (kernels.mixture_fwd_kernel, kernels.mixture_bwd_kernel, kernels.mixture_labels_kernel):
        signature = {}
        for name in kernel.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name == "labels_ptr":
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name in fp32_ptrs else "*bf16"
            else:
                signature[name] = "i32"
        try:
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=consts),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": warps},
            )
        except (RuntimeError, FileNotFoundError) as exc:  # no CUDA toolchain bundled with this triton
            pytest.skip(f"cannot compile for sm_90 here: {exc}")
        assert compiled.asm["cubin"]
        if os.path.exists(cuobjdump):
            cubin = tmp_path / f"{kernel.fn.__name__}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run(
                [cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
            ).stdout
            spilled = [int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", usage)]  # spills land on the stack
            assert spilled and max(spilled) == 0, f"{kernel.fn.__name__} spills registers: {usage}"
