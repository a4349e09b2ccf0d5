"""``finetune``: one plain training loop for :class:`~errwrap.ErrorCorrectionWrapper`.

The function reads as checks -> build -> restore -> loop of steps; each part lives next door:
:mod:`._setup` (checks, device, what trains), :mod:`.optim` (AdamW, schedule, precision),
:mod:`.checkpoint` (format, save policy, resume), :mod:`._batches` (batches and RNG) and
:mod:`._validation`. This module holds the step itself and the progress report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import _distributed
from .._validate import input_dtype
from ..calibration import calibrate_temperature
from ._batches import Batches, rng_state, seed_everything, set_rng_state
from ._setup import check_arguments, check_data, check_room, place, select_trained
from ._validation import validate
from .augment import PhotometricAugment, build_augment
from .checkpoint import CheckpointSaver, Run, restore
from .optim import build_optimizer, build_precision

__all__ = ["FinetuneResult", "NonFiniteLossError", "finetune"]

logger = logging.getLogger("errwrap.training")

_TERMS = ("error", "detail", "fused", "base")
#: Batches of the training loader (epoch 0's order) on which ``finetune(calibrate=True)`` fits the
#: fused temperature.
CALIBRATION_BATCHES = 32


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised before the optimizer steps.

    Attributes:
        step: the (1-based) optimizer step being computed.
        term: the first non-finite term (``"error"``, ``"detail"``, ``"fused"``, ``"base"`` or
            ``"total"``).
        values: every term's value at that micro-batch.
        checkpoint: the last checkpoint written (intact), or ``None``.
    """

    def __init__(self, step: int, term: str, values: dict[str, float], checkpoint: Path | None) -> None:
        self.step, self.term, self.values, self.checkpoint = step, term, values, checkpoint
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        where = f"the last checkpoint, {checkpoint}, is intact" if checkpoint else "no checkpoint was written"
        super().__init__(
            f"non-finite loss at step {step}: term {term!r} is {values.get(term)} ({shown}); the optimizer did not "
            f"step and {where}. Lower lr, use precision='fp32' or 'bf16', or check the inputs and labels of this batch"
        )


class FinetuneResult(NamedTuple):
    """What :func:`finetune` returns.

    Attributes:
        history: one dict per optimizer step: ``step``, ``loss`` (the total) and each term
            (``error``, ``detail``, ``fused``, ``base``; means over the step's micro-batches and,
            when distributed, over ranks), ``lr``, ``grad_norm``, ``images_per_s``.
        step: the number of optimizer steps done.
        checkpoint: the last checkpoint directory written, or ``None``.
        validation: one dict per validation: ``{"step": s, **metrics}``.
    """

    history: list[dict[str, float]]
    step: int
    checkpoint: Path | None
    validation: list[dict[str, Any]]


def _calibrate(wrapper: Any, loader: Iterable, seed: int, device: torch.device) -> None:
    """Fit ``wrapper.temperature`` on the first :data:`CALIBRATION_BATCHES` batches of the
    loader's epoch-0 order (the RNG state is kept); it stays 1, with a warning, when it cannot.

    Under torchrun every rank fits on its share and all keep the mean of the ranks that could fit;
    a rank whose fit failed still joins that mean (it warns), so no rank waits for it."""
    state = rng_state()
    batches = Batches(loader, seed)
    count = min(CALIBRATION_BATCHES, len(loader)) if isinstance(loader, Sized) else CALIBRATION_BATCHES
    error: ValueError | None = None
    try:
        fit = calibrate_temperature(wrapper, (next(batches) for _ in range(count)), device=device)
        total, fitted, pixels = fit.temperature, 1.0, float(fit.pixels)
    except ValueError as exc:  # no labelled pixels, or a temperature out of range: the heads stay trained
        error, total, fitted, pixels = exc, 0.0, 0.0, 0.0
    finally:
        set_rng_state(state)
    if _distributed.is_initialized():
        total, fitted, pixels = _distributed.sum_over_processes([total, fitted, pixels])
    if fitted == 0:
        warnings.warn(f"finetune: the temperature was not calibrated ({error}); it stays 1", UserWarning, stacklevel=3)
        wrapper.temperature = 1.0
        return
    if error is not None:
        warnings.warn(
            f"finetune: this process could not fit the temperature ({error}); it keeps the mean of the "
            f"{fitted:.0f} processes that did",
            UserWarning,
            stacklevel=3,
        )
    wrapper.temperature = total / fitted
    logger.info("calibrated the fused temperature on %d training pixels: %.4f", pixels, wrapper.temperature)


@dataclasses.dataclass
class _Stepper:
    """One optimizer step of ``run``: ``accumulate`` micro-batches forward and backward, the
    gradients clipped, AdamW and the schedule stepped; the step's record appended to the history."""

    run: Run
    model: nn.Module  # the wrapper, or DistributedDataParallel around it
    loss_fn: nn.Module
    autocast: Callable[[], Any]
    params: list[Tensor]
    device: torch.device
    dtype: torch.dtype
    accumulate: int
    clip_grad_norm: float | None
    augment: str | None = None
    seed: int = 0
    _augmenter: PhotometricAugment | None = None
    _augment_checked: bool = False

    def _augmented(self, images: Tensor, micro: int) -> Tensor:
        """``images`` through the photometric augmentation, drawn from ``(seed, step, micro, rank)``
        alone, so a resumed run augments its batches as the uninterrupted run did."""
        if self.augment is None:
            return images
        if not self._augment_checked:
            stats = self.run.augment_stats  # restored from a checkpoint: the statistics the run started with
            if stats is not None:
                self._augmenter = PhotometricAugment(stats["mean"], stats["std"])
            else:
                self._augmenter = build_augment(self.augment, self.run.wrapper, images)
                if self._augmenter is not None:
                    self.run.augment_stats = {"mean": list(self._augmenter.mean), "std": list(self._augmenter.std)}
            self._augment_checked = True
        if self._augmenter is None:
            return images
        entropy = [self.seed, self.run.step, micro, _distributed.rank()]
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        return self._augmenter(images, generator)

    def _micro_batch(self, micro: int) -> tuple[dict[str, float], int]:
        """Forward and backward one batch; its loss terms (means over ranks) and its number of images."""
        run = self.run
        images, labels = run.batches.next_on(self.device, self.dtype, getattr(run.wrapper, "in_channels", None))
        images = self._augmented(images, micro)
        accumulating = micro < self.accumulate - 1  # DDP syncs the gradients at the step's last micro-batch only
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        sync = ddp.no_sync() if ddp is not None and accumulating else contextlib.nullcontext()
        with sync:
            with self.autocast():
                out = self.model(images)
                terms = self.loss_fn(out, labels)
            total = terms.total if hasattr(terms, "total") else terms
            parts = [total] + [getattr(terms, t, total.new_zeros(())) for t in _TERMS]
            values_t = torch.stack([p.detach().float() for p in parts])
            if _distributed.is_initialized():
                _distributed.all_reduce_sum(values_t).div_(_distributed.world_size())
            values = dict(zip(("total", *_TERMS), values_t.tolist(), strict=False))
            if not all(math.isfinite(v) for v in values.values()):
                bad = next(t for t in (*_TERMS, "total") if not math.isfinite(values[t]))
                raise NonFiniteLossError(run.step + 1, bad, values, run.checkpoint)
            run.scaler.scale(total / self.accumulate).backward()
        return values, int(images.shape[0])

    def step(self) -> dict[str, float]:
        """Do one optimizer step; its record (also appended to ``run.history``)."""
        run = self.run
        start = time.perf_counter()
        sums = dict.fromkeys(("loss", *_TERMS), 0.0)
        images_seen = 0
        for micro in range(self.accumulate):
            values, images = self._micro_batch(micro)
            sums["loss"] += values["total"] / self.accumulate
            for t in _TERMS:
                sums[t] += values[t] / self.accumulate
            images_seen += images
        grad_norm = float("nan")
        if self.clip_grad_norm is not None:
            run.scaler.unscale_(run.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm))
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        used_lr = float(run.scheduler.get_last_lr()[0])
        run.scheduler.step()
        run.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        images_per_s = images_seen * _distributed.world_size() / max(time.perf_counter() - start, 1e-9)
        record = {"step": run.step, **sums, "lr": used_lr, "grad_norm": grad_norm, "images_per_s": images_per_s}
        run.history.append(record)
        return record


class _Progress:
    """The tqdm bar (rank 0; ``progress=None``: when stderr is a terminal) and the INFO lines
    every ``log_every`` steps and at the last (rank 0)."""

    def __init__(self, steps: int, initial: int, progress: bool | None, log_every: int | None) -> None:
        self.steps, self.log_every, self.rank = steps, log_every, _distributed.rank()
        show = self.rank == 0 and (progress if progress is not None else sys.stderr.isatty())
        self.bar: tqdm | None = None
        if show:
            self.bar = tqdm(total=steps, initial=initial, desc="finetune", dynamic_ncols=True, file=sys.stderr)

    def update(self, r: dict[str, float]) -> None:
        """Show the record ``r`` of one optimizer step."""
        step = int(r["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{r['loss']:.3f}", err=f"{r['error']:.3f}", fused=f"{r['fused']:.3f}",
                ips=f"{r['images_per_s']:.0f}",
            )  # fmt: skip
        if self.rank == 0 and self.log_every is not None and (step % self.log_every == 0 or step == self.steps):
            logger.info(
                "step %d/%d loss %.4f (error %.4f, detail %.4f, fused %.4f, base %.4f) lr %.3g, %.1f images/s",
                step, self.steps, r["loss"], r["error"], r["detail"], r["fused"], r["base"], r["lr"], r["images_per_s"],
            )  # fmt: skip

    def close(self) -> None:
        """Close the bar, if any."""
        if self.bar is not None:
            self.bar.close()


def finetune(
    wrapper: nn.Module,
    train_loader: Iterable,
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_steps: int = 0,
    schedule: str = "poly",
    accumulate: int = 1,
    clip_grad_norm: float | None = 1.0,
    precision: str = "fp32",
    seed: int = 0,
    augment: str | None = "photometric",
    calibrate: bool = True,
    loss: nn.Module | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike | None = None,
    val_loader: Iterable | None = None,
    val_every: int | None = None,
    val_fn: Callable[[nn.Module], dict] | None = None,
    progress: bool | None = None,
    log_every: int | None = 50,
) -> FinetuneResult:
    """Train an :class:`~errwrap.ErrorCorrectionWrapper` for ``steps`` optimizer steps.

    With the default loss (``w_base = 0``) the base is frozen (``wrapper.freeze_base()``) and
    only the heads train; a loss with ``w_base > 0`` calls ``wrapper.unfreeze_base()`` and trains
    everything (joint fine-tuning). Either change of the wrapper's freezing is logged. A
    ``Normalize`` in the loader's dataset transform is recorded as ``wrapper.preprocessing`` when
    that is ``None`` (``save_pretrained`` writes it; the CLI applies it).

    The loader is cycled (epochs) until ``steps`` optimizer steps, of ``accumulate`` batches
    each, are done. Epoch ``e`` is ordered by ``seed + e`` (torch's global RNG, and the
    ``generator`` of the sampler and of the loader when they have one, are seeded with it; a
    ``DistributedSampler`` gets ``set_epoch(e)``), so a run is repeatable and ``resume``
    reproduces the uninterrupted run: same batches, same loss history, same weights (to float
    tolerance). Resuming skips the batches already used in the current epoch by reading them.

    Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in
    ``DistributedDataParallel``; give each rank its share of the data with a
    ``DistributedSampler`` (:func:`errwrap.data.make_loader` does). Only rank 0 writes
    checkpoints, logs and shows the bar; logged losses are means over ranks.

    Args:
        wrapper: the model; trained in place. Its train/eval mode is restored at the end.
        train_loader: yields ``(images, labels, ...)`` tuples or lists, or dicts with an image
            key (``"image"``, ``"images"``, ``"pixel_values"``, ``"img"``) and a label key
            (``"label"``, ``"labels"``, ``"mask"``, ``"masks"``, ``"target"``, ``"targets"``);
            labels ``(B, H, W)`` or ``(B, 1, H, W)`` of any integer dtype. Batches of different
            sizes (a last partial batch) are fine; images of different sizes need
            ``batch_size=1`` or a transform to one size (``errwrap.data.RandomCrop``). A dataset
            whose ``num_classes`` differs from the wrapper's is refused (``ValueError``).
        steps: total optimizer steps (including those of a resumed run).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        warmup_steps: linear warm-up steps.
        schedule: ``"poly"`` (power 0.9, the DeepLab schedule) or ``"cosine"``.
        accumulate: batches per optimizer step (gradient accumulation).
        clip_grad_norm: clip the global gradient norm to this value; ``None``: no clipping.
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU or GPU) or ``"fp16"`` (autocast and
            ``GradScaler``, GPU only).
        seed: seeds torch, ``random`` and numpy at the start, and each epoch's order.
        augment: ``"photometric"`` (default): half of the training images, drawn anew at each
            step, get a random gain, gamma, contrast and saturation
            (:class:`~errwrap.training.augment.PhotometricAugment`, in pixel space through
            ``wrapper.preprocessing``), so the heads also learn how the base fails under other
            light; ``None``: the batches as the loader gives them. Without
            ``wrapper.preprocessing`` (recorded from the loader's ``Normalize``: errwrap's,
            torchvision's or albumentations'), images outside ``[0, 1]`` are read through the
            first batch's per-channel range, and a ``UserWarning`` says so.
        calibrate: after the last step, fit the temperature of the fused probabilities
            (:func:`~errwrap.calibrate_temperature`) on the first ``CALIBRATION_BATCHES`` (32)
            batches of the training loader, as the loader gives them (no augmentation), and set
            ``wrapper.temperature`` (saved by ``save_pretrained``); under ``torchrun`` the mean
            of the ranks' fits. The heads' training pulls the error maps toward ranking errors,
            not toward calibrated probabilities, and leaves them underconfident; the heads are
            small, so their own training images fit the same temperature as held-out ones did
            in the benchmarks (docs/training.md). The final validation and checkpoint come after
            it. ``False``: temperature 1, or what :func:`~errwrap.calibrate_temperature` fits on
            data of your choice afterwards.
        loss: an :class:`~errwrap.ErrorCorrectionLoss` (default: ``ErrorCorrectionLoss()``).
        device: where to train; default: the wrapper's device. Given and different, the wrapper
            is moved there (logged). Batches are moved to it.
        checkpoint_dir: where checkpoints go (``None``: none are written). Before the first
            step it must be writable with room for two checkpoints (``OSError`` otherwise); if
            the last checkpoint cannot be written there, it goes to a new temporary directory,
            named in a ``RuntimeWarning`` and in the result's ``checkpoint``.
        checkpoint_every: write one every this many steps; one is always written at the end.
        resume: a checkpoint directory (or a file in it, such as its ``model.safetensors``), a
            ``checkpoint_dir`` or its ``latest`` file (the newest checkpoint), or ``"latest"``
            (the newest under ``checkpoint_dir``; starts from scratch when there is none).
        val_loader: validate with ``errwrap.evaluation.evaluate(wrapper, val_loader)``.
        val_every: validate every this many steps (and at the end); default: at the end only.
        val_fn: ``val_fn(wrapper) -> dict`` instead of ``evaluate``. It runs under
            ``torch.no_grad()`` with the wrapper in eval mode and with the RNG states saved
            and restored around it, so validating does not change the training run.
        progress: show a tqdm bar; ``None``: when stderr is a terminal.
        log_every: log the losses every this many steps (``logging`` INFO); ``None``: never.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        NonFiniteLossError: a loss term became NaN or infinite (names step and term).
        ValueError: an argument is out of range (e.g. ``precision="fp16"`` without CUDA).

    Example:
        >>> from errwrap.data import Scenes, make_loader              # doctest: +SKIP
        >>> loader = make_loader(Scenes(512, size=96), batch_size=8)   # doctest: +SKIP
        >>> result = finetune(wrapper, loader, steps=200)              # doctest: +SKIP
        >>> result.history[-1]["fused"]                                # doctest: +SKIP
    """
    # ------------------------------------------------------------ checks
    check_arguments(
        steps=steps, accumulate=accumulate, warmup_steps=warmup_steps, checkpoint_every=checkpoint_every,
        val_every=val_every, log_every=log_every, schedule=schedule, precision=precision, lr=lr,
        weight_decay=weight_decay, clip_grad_norm=clip_grad_norm, augment=augment, calibrate=calibrate,
    )  # fmt: skip
    check_data(wrapper, train_loader, val_loader, checkpoint_dir)

    # ------------------------------------------------------------ build: device, what trains, optimizer, precision
    target = place(wrapper, device, precision)
    loss_fn, base_trained, params = select_trained(wrapper, loss)
    check_room(checkpoint_dir, wrapper, base_trained, params)
    seed_everything(seed)
    optimizer, scheduler = build_optimizer(
        params, lr=lr, weight_decay=weight_decay, steps=steps, warmup_steps=warmup_steps, schedule=schedule
    )
    scaler, autocast = build_precision(precision, target)
    run = Run(wrapper, optimizer, scheduler, scaler, Batches(train_loader, seed), base_trained, steps)

    # ------------------------------------------------------------ restore
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    restore(run, resume, ckpt_root)

    # ------------------------------------------------------------ the loop of steps
    model: nn.Module = wrapper
    if _distributed.is_initialized():
        model = DistributedDataParallel(wrapper, device_ids=[target.index] if target.type == "cuda" else None)
    stepper = _Stepper(
        run, model, loss_fn, autocast, params, target, input_dtype(wrapper), accumulate, clip_grad_norm, augment, seed
    )
    saver = CheckpointSaver(ckpt_root, checkpoint_every)
    shown = _Progress(steps, run.step, progress, log_every)
    validating = val_fn is not None or val_loader is not None
    was_training = wrapper.training
    model.train()
    calibrated = False  # tried, whether or not it could fit
    try:
        while run.step < steps:
            shown.update(stepper.step())
            if calibrate and run.step == steps:
                _calibrate(wrapper, train_loader, seed, target)
                calibrated = True
            if validating and ((val_every is not None and run.step % val_every == 0) or run.step == steps):
                run.validation.append(validate(wrapper, run.step, val_fn, val_loader))
            if saver.due(run):
                saver.save(run)
        if calibrate and not calibrated:  # a resumed run that had already done its steps
            _calibrate(wrapper, train_loader, seed, target)
        if saver.missing_last(run):
            saver.save(run)
    finally:
        shown.close()
        wrapper.train(was_training)
    return FinetuneResult(run.history, run.step, run.checkpoint, run.validation)
