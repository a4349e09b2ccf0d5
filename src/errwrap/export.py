"""Deployment: an inference module with a fixed ``(logits, error_prob)`` output, and ONNX export.

Example:
    >>> program = export_program(wrap.eval(), images)                  # doctest: +SKIP
    >>> logits, error_prob = program.module()(images)                  # doctest: +SKIP
    >>> export_onnx(wrap, "errwrap.onnx", images)                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import atomic_path
from ._validate import check_images

__all__ = ["InferenceModule", "export_program", "export_onnx"]

logger = logging.getLogger(__name__)


class InferenceModule(nn.Module):
    """Wraps an :class:`~errwrap.ErrorCorrectionWrapper` for deployment.

    Shapes:
        input ``(B, in_channels, H, W)`` -> ``(logits (B, C, H, W), error_prob (B, H, W))``:
        the corrected (fused) log-probabilities, whose ``argmax`` is the corrected label, and
        the probability that this corrected label is wrong (``out.error_prob``).
    """

    def __init__(self, wrapper: nn.Module) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.wrapper(x)
        return out.logits, out.error_prob


def _check_exportable(wrapper: nn.Module, sample: Tensor, what: str) -> None:
    if wrapper.training:
        raise ValueError(f"{what}: expected the wrapper in eval mode (call wrapper.eval() first)")
    check_images(sample, getattr(wrapper, "in_channels", None), name="sample")


def _batch_dim(dynamic_batch: bool) -> tuple[dict[int, object], ...] | None:
    return ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None


def export_program(wrapper: nn.Module, sample: Tensor, *, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``InferenceModule(wrapper)``: a graph to run without Python
    (``program.module()(x)``), save (``torch.export.save``) or lower (AOTInductor, ExecuTorch).

    Args:
        wrapper: the model, in eval mode (training-mode norm layers would be baked in).
        sample: an example input ``(B, C, H, W)`` of the wrapper's dtype and device; ``H`` and
            ``W`` are fixed in the graph.
        dynamic_batch: let the batch size vary (1 to 1024).

    Returns:
        The ``ExportedProgram``; its module returns ``(logits, error_prob)`` like
        :class:`InferenceModule`.

    Shapes:
        sample ``(B, C, H, W)`` -> program outputs ``(B, K, H, W)`` and ``(B, H, W)``.
    """
    _check_exportable(wrapper, sample, "export_program")
    return torch.export.export(InferenceModule(wrapper).eval(), (sample,), dynamic_shapes=_batch_dim(dynamic_batch))


def export_onnx(
    wrapper: nn.Module,
    path: str | os.PathLike,
    sample: Tensor,
    *,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
) -> Path:
    """Export ``InferenceModule(wrapper)`` to ONNX through ``torch.onnx.export(dynamo=True)``.

    The wrapper must be in eval mode (the export would otherwise bake in training-mode norm
    layers). The file is written atomically, and nothing is printed (torch's progress lines are
    turned off). Needs the ``onnx`` extra (``onnx``, ``onnxscript``).

    Args:
        wrapper: the model, in eval mode.
        path: the ``.onnx`` file to write.
        sample: an example input ``(B, C, H, W)``; ``H`` and ``W`` are fixed in the graph.
        dynamic_batch: let the batch size vary.
        opset_version: ONNX opset; ``None`` lets torch choose.

    Returns:
        The path written.
    """
    _check_exportable(wrapper, sample, "export_onnx")
    module = InferenceModule(wrapper).eval()
    dynamic_shapes = _batch_dim(dynamic_batch)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx_path = tmp.with_suffix(".onnx")
        try:
            torch.onnx.export(
                module,
                (sample,),
                str(onnx_path),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset_version,
                external_data=False,
                verbose=False,  # a library does not print its progress
            )
            os.replace(onnx_path, tmp)
        finally:
            if onnx_path.exists():
                onnx_path.unlink()
    logger.info("exported ONNX model to %s", path)
    return path
