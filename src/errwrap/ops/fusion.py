"""The mixture fusion as one memory-light op: forward, analytic backward, and labels only.

:func:`~errwrap.functional.mixture_log_probs` written with PyTorch ops materialises several
``B x C x H x W`` float32 intermediates (two log-softmaxes, two shifted terms, the output), and
autograd keeps them for the backward. At full resolution (``C`` up to 150, 1024 x 2048) that is
most of the fusion's time and memory. :func:`fused_mixture_log_probs` computes the same values
with an ``autograd.Function`` that saves only its three inputs and recomputes in the backward,
with the gradient in closed form. With ``a = log(1 - p) + log_softmax(z0)``,
``b = log p + log_softmax(z1)``, ``L = logaddexp(a, b)`` and the posterior responsibilities
``w0 = exp(a - L)``, ``w1 = exp(b - L)`` (so ``w0 + w1 = 1``), for an upstream gradient ``g``::

    dz0 = g * w0 - softmax(z0) * sum_c(g * w0)
    dz1 = g * w1 - softmax(z1) * sum_c(g * w1)
    de  = (1 - p) * sum_c(g * w1) - p * sum_c(g * w0)

Backends: ``"torch"`` (PyTorch ops, any device), ``"triton"`` (one fused kernel per direction on
CUDA tensors, reading the logits once and writing the output once; see ``_triton_fusion``), and
``"auto"`` (Triton for CUDA tensors when Triton imports, PyTorch otherwise).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import describe, is_tracing
from ..functional import mixture_log_probs

__all__ = [
    "BACKENDS",
    "FusedPrediction",
    "fused_labels_and_error_prob",
    "fused_mixture_log_probs",
    "triton_available",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
_MAX_ONE_CHUNK = 128  # classes held in registers at once; more classes are walked in chunks
_CHUNK = 64


class FusedPrediction(NamedTuple):
    """Inference-only result of the fusion.

    Attributes:
        labels: corrected labels, ``argmax`` of the fused distribution, ``(B, H, W)`` int64.
        error_prob: probability that ``labels`` is wrong, ``1 - max_c p_c`` of the fused
            distribution (as :attr:`errwrap.ErrorCorrectionOutput.error_prob`), ``(B, H, W)`` float32.
    """

    labels: Tensor
    error_prob: Tensor


# --------------------------------------------------------------------------- dispatch
@functools.lru_cache(maxsize=1)
def _triton_module() -> Any:
    """The kernels' module, or ``None`` when Triton cannot be imported."""
    try:
        from . import _triton_fusion
    except Exception as exc:  # noqa: BLE001 - ImportError, or a Triton that fails to initialise
        logger.debug("Triton fusion kernels unavailable: %s", exc)
        return None
    return _triton_fusion


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str = "cuda") -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA, or any device under Triton's
    ``TRITON_INTERPRET=1`` CPU interpreter)."""
    device = torch.device(device)
    if device.type != "cuda" and not _interpreting():
        return False
    return _triton_module() is not None


def _resolve_backend(backend: str, logits: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    device = logits.device
    if backend == "auto":
        # The kernels compute in float32: float64 stays on the PyTorch path, which keeps float64.
        use_triton = device.type == "cuda" and logits.dtype != torch.float64 and triton_available(device)
        return "triton" if use_triton else "torch"
    if backend == "triton" and not triton_available(device):
        raise ValueError(
            f"backend='triton': expected CUDA tensors and an importable triton, got tensors on {device}"
            f"{'' if _triton_module() is not None else ' and no triton'}; use backend='torch' or 'auto'"
        )
    return backend


def _check_inputs(base_logits: Any, detail_logits: Any, error_logits: Any) -> None:
    """Shape-only checks (no device synchronisation), skipped while tracing."""
    if is_tracing():
        return
    for name, t in (("base_logits", base_logits), ("detail_logits", detail_logits), ("error_logits", error_logits)):
        if not isinstance(t, Tensor) or t.ndim != 4 or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point BxCxHxW tensor, got {describe(t)}")
    if detail_logits.shape != base_logits.shape:
        raise ValueError(
            f"detail_logits: expected the shape of base_logits {tuple(base_logits.shape)}, got "
            f"{tuple(detail_logits.shape)}"
        )
    b, _, h, w = base_logits.shape
    if tuple(error_logits.shape) != (b, 1, h, w):
        raise ValueError(f"error_logits: expected shape {(b, 1, h, w)}, got {tuple(error_logits.shape)}")
    if len({base_logits.device, detail_logits.device, error_logits.device}) != 1:
        raise ValueError(
            f"expected all logits on one device, got {base_logits.device}, {detail_logits.device}, "
            f"{error_logits.device}"
        )


def _compute_dtype(base_logits: Tensor) -> torch.dtype:
    # The same rule as mixture_log_probs: float32 math for half inputs, float64 kept.
    return torch.promote_types(base_logits.dtype, torch.float32)


# --------------------------------------------------------------------------- torch backend
def _torch_backward(grad: Tensor, z0: Tensor, z1: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form gradient with PyTorch ops (differentiable, so double backward works).

    Uses ``b - a = e + log_softmax(z1) - log_softmax(z0)`` (since ``log p - log(1 - p) = e``), so
    ``w1 = sigmoid(b - a)`` and ``w0 = 1 - w1`` need no log-sigmoids."""
    dtype = _compute_dtype(z0)
    grad, z0, z1, e = grad.to(dtype), z0.to(dtype), z1.to(dtype), e.to(dtype)
    log_s0 = F.log_softmax(z0, dim=1)
    log_s1 = F.log_softmax(z1, dim=1)
    g_w1 = grad * torch.sigmoid(log_s1 - log_s0 + e)
    g_w0 = grad - g_w1
    sum0 = g_w0.sum(dim=1, keepdim=True)
    sum1 = g_w1.sum(dim=1, keepdim=True)
    p = torch.sigmoid(e)
    d_z0 = g_w0 - log_s0.exp() * sum0
    d_z1 = g_w1 - log_s1.exp() * sum1
    d_e = (1 - p) * sum1 - p * sum0
    return d_z0, d_z1, d_e


# --------------------------------------------------------------------------- triton backend
def _pixel_strides(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` (made dense if needed) and its (batch, channel, flat-pixel) strides."""
    _, _, h, w = t.shape
    if h > 1 and w > 1 and t.stride(2) != w * t.stride(3):
        t = t.contiguous()
    pixel = t.stride(3) if w > 1 else t.stride(2)
    return t, (t.stride(0), t.stride(1), pixel)


def _launch_config(num_classes: int) -> tuple[int, int, bool, int]:
    """``(BLOCK_P, BLOCK_C, ONE_CHUNK, num_warps)``: tiles of about 2048 logits per input, 8 warps.

    Chosen offline, not tuned on a GPU: compiled ahead of time for sm_90, the kernels use 47-75
    registers per thread for C=19 and C=150 and spill nothing (docs/gpu.md: what is left to tune)."""
    full = _next_power_of_2(num_classes)
    one_chunk = full <= _MAX_ONE_CHUNK
    block_c = full if one_chunk else _CHUNK
    block_p = max(16, min(256, 2048 // block_c))
    return block_p, block_c, one_chunk, 8


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _triton_forward(z0: Tensor, z1: Tensor, e: Tensor) -> Tensor:
    kernels = _triton_module()
    b, c, h, w = z0.shape
    z0, s0 = _pixel_strides(z0)
    z1, s1 = _pixel_strides(z1)
    e, se = _pixel_strides(e)
    out = torch.empty_like(z0, dtype=_compute_dtype(z0))
    out, so = _pixel_strides(out)
    block_p, block_c, one_chunk, warps = _launch_config(c)
    grid = (_cdiv(h * w, block_p), b)
    kernels.mixture_fwd_kernel[grid](
        z0, z1, e, out, c, h * w, *s0, *s1, se[0], se[2], *so,
        BLOCK_P=block_p, BLOCK_C=block_c, ONE_CHUNK=one_chunk, num_warps=warps,
    )
    return out


def _triton_backward(grad: Tensor, z0: Tensor, z1: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    kernels = _triton_module()
    b, c, h, w = z0.shape
    grad, sg = _pixel_strides(grad)
    z0, s0 = _pixel_strides(z0)
    z1, s1 = _pixel_strides(z1)
    e, se = _pixel_strides(e)
    d_z0, d_z1, d_e = torch.empty_like(z0), torch.empty_like(z1), torch.empty_like(e)
    _, sd0 = _pixel_strides(d_z0)
    _, sd1 = _pixel_strides(d_z1)
    _, sde = _pixel_strides(d_e)
    block_p, block_c, one_chunk, warps = _launch_config(c)
    grid = (_cdiv(h * w, block_p), b)
    kernels.mixture_bwd_kernel[grid](
        grad, z0, z1, e, d_z0, d_z1, d_e, c, h * w,
        *sg, *s0, *s1, se[0], se[2], *sd0, *sd1, sde[0], sde[2],
        BLOCK_P=block_p, BLOCK_C=block_c, ONE_CHUNK=one_chunk, num_warps=warps,
    )
    return d_z0, d_z1, d_e


def _triton_labels(z0: Tensor, z1: Tensor, e: Tensor) -> FusedPrediction:
    kernels = _triton_module()
    b, c, h, w = z0.shape
    z0, s0 = _pixel_strides(z0)
    z1, s1 = _pixel_strides(z1)
    e, se = _pixel_strides(e)
    labels = torch.empty(b, h, w, dtype=torch.int64, device=z0.device)
    prob = torch.empty(b, h, w, dtype=torch.float32, device=z0.device)
    block_p, block_c, one_chunk, warps = _launch_config(c)
    grid = (_cdiv(h * w, block_p), b)
    kernels.mixture_labels_kernel[grid](
        z0, z1, e, labels, prob, c, h * w, *s0, *s1, se[0], se[2],
        BLOCK_P=block_p, BLOCK_C=block_c, ONE_CHUNK=one_chunk, num_warps=warps,
    )
    return FusedPrediction(labels, prob)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- autograd
class _MixtureLogProbs(torch.autograd.Function):
    """Forward saves only ``(z0, z1, e)``; backward recomputes (closed-form gradient)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z0: Tensor, z1: Tensor, e: Tensor, backend: str) -> Tensor:
        if backend == "triton":
            return _triton_forward(z0, z1, e)
        return mixture_log_probs(z0, z1, e)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        z0, z1, e, backend = inputs
        ctx.save_for_backward(z0, z1, e)
        ctx.backend = backend

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        z0, z1, e = ctx.saved_tensors
        # A graph for double backward needs differentiable ops: the torch recompute gives one.
        if ctx.backend == "triton" and not torch.is_grad_enabled():
            d_z0, d_z1, d_e = _triton_backward(grad, z0, z1, e)
        else:
            d_z0, d_z1, d_e = _torch_backward(grad, z0, z1, e)
        needs = ctx.needs_input_grad
        return (
            d_z0.to(z0.dtype) if needs[0] else None,
            d_z1.to(z1.dtype) if needs[1] else None,
            d_e.to(e.dtype) if needs[2] else None,
            None,
        )


# --------------------------------------------------------------------------- public API
def fused_mixture_log_probs(
    base_logits: Tensor,
    detail_logits: Tensor,
    error_logits: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Fused log-probabilities of the paper's mixture, equal to
    :func:`~errwrap.functional.mixture_log_probs` but without its saved intermediates.

    Saves only the three inputs for the backward and recomputes there (closed-form gradient, see
    the module docstring). Half-precision inputs are read as they are and computed in float32;
    the result is float32 (float64 for float64 inputs), like the reference. Under
    ``torch.compile`` / ``torch.export`` / tracing, call :func:`mixture_log_probs` instead and let
    the compiler fuse it (``MixtureFusion`` does this).

    Args:
        base_logits: base network logits ``z0``.
        detail_logits: detail head logits ``z1``.
        error_logits: error logit ``e``; ``p_err = sigmoid(e)``.
        backend: ``"auto"`` (Triton for CUDA tensors that are not float64 when Triton imports,
            else PyTorch), ``"torch"``, or ``"triton"`` (CUDA tensors; float32 math).

    Shapes:
        base_logits, detail_logits ``(B, C, H, W)``; error_logits ``(B, 1, H, W)``;
        returns ``(B, C, H, W)`` (the Triton backend keeps the memory format of ``base_logits``).

    Example:
        >>> z0, z1, e = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8), torch.randn(2, 1, 8, 8)
        >>> torch.allclose(fused_mixture_log_probs(z0, z1, e), mixture_log_probs(z0, z1, e))
        True
    """
    _check_inputs(base_logits, detail_logits, error_logits)
    chosen = _resolve_backend(backend, base_logits)
    return _MixtureLogProbs.apply(base_logits, detail_logits, error_logits, chosen)


@torch.no_grad()
def fused_labels_and_error_prob(
    base_logits: Tensor,
    detail_logits: Tensor,
    error_logits: Tensor,
    *,
    backend: str = "auto",
) -> FusedPrediction:
    """Corrected labels and error probability without returning the ``C``-channel output
    (inference only, no gradients).

    The Triton backend never materialises the fused map: it writes one int64 label and one
    float32 probability per pixel. The PyTorch backend computes the full map and takes its
    ``argmax``, so it costs what :func:`mixture_log_probs` costs.

    Args:
        base_logits, detail_logits, error_logits: as :func:`fused_mixture_log_probs`.
        backend: as :func:`fused_mixture_log_probs`.

    Shapes:
        inputs as :func:`fused_mixture_log_probs` -> labels ``(B, H, W)`` int64,
        error_prob ``(B, H, W)`` float32.
    """
    _check_inputs(base_logits, detail_logits, error_logits)
    if _resolve_backend(backend, base_logits) == "triton":
        return _triton_labels(base_logits, detail_logits, error_logits)
    best, labels = mixture_log_probs(base_logits, detail_logits, error_logits).max(dim=1)
    return FusedPrediction(labels, (1.0 - best.float().exp()).clamp_(0.0, 1.0))
