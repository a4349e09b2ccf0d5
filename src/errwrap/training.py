"""``finetune``: one plain training loop for :class:`~errwrap.ErrorCorrectionWrapper`.

AdamW, linear warm-up then a poly or cosine schedule, gradient accumulation, gradient clipping,
bf16/fp16 mixed precision, checkpoints that resume to the same run, a clear stop on a non-finite
loss, optional validation, and DistributedDataParallel when ``torch.distributed`` is
initialised (``torchrun``). Nothing else: no callbacks, no trainer object.

A checkpoint is a directory ``step-000123/`` under ``checkpoint_dir`` with

- ``model.safetensors``: ``wrapper.state_dict()`` (without the ``base.`` keys when the base is
  frozen: only what training changes);
- ``state.pt``: optimizer, scheduler, grad-scaler and RNG states, the step and the position in
  the loader, the history. It is errwrap's own training state and is read back with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers;

and ``checkpoint_dir/latest`` names the newest one. Each directory is written as
``step-000123.tmp`` and renamed when complete, and ``latest`` is replaced atomically last, so an
interrupted write never leaves a half checkpoint where ``resume`` would look.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._io import check_writable, load_safetensors, load_state_strict, replace_directory, save_safetensors, tensor_bytes, write_text_atomic
from ._validate import check_images, input_dtype, split_batch
from .data.loader import _checked_num_classes, _explain_batch_error
from .losses import ErrorCorrectionLoss

__all__ = ["FinetuneResult", "NonFiniteLossError", "finetune", "lr_factor", "load_checkpoint_weights"]

logger = logging.getLogger(__name__)

SCHEDULES = ("poly", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
STATE_FORMAT = 1
_TERMS = ("error", "detail", "fused", "base")


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
            f"non-finite loss at step {step}: term {term!r} is {values.get(term)} ({shown}); the optimizer did not step "
            f"and {where}. Lower lr, use precision='fp32' or 'bf16', or check the inputs and labels of this batch"
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


def lr_factor(step: int, steps: int, warmup_steps: int = 0, schedule: str = "poly", power: float = 0.9) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up from
    ``1 / warmup_steps`` to 1, then ``(1 - t) ** power`` (poly) or ``(1 + cos(pi t)) / 2``
    (cosine) with ``t`` going from 0 to 1 over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    if schedule == "poly":
        return (1.0 - t) ** power
    return 0.5 * (1.0 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------- small helpers
def _distributed() -> tuple[bool, int, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _wrapper_device(wrapper: nn.Module) -> torch.device:
    param = next(iter(wrapper.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class _Batches:
    """Cycles over a loader forever; epoch ``e`` starts by seeding torch (and the sampler's and
    loader's own generators) with ``seed + e`` and calling ``sampler.set_epoch(e)``, so its
    order depends on ``(seed, e)`` only and a resumed run can rebuild it and skip ahead."""

    def __init__(self, loader: Iterable, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.loader, self.seed = loader, seed
        self.epoch, self.position = epoch, position
        self._it: Iterator | None = None

    def _samplers(self) -> list[Any]:
        found = [getattr(self.loader, "sampler", None)]
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        found.append(getattr(batch_sampler, "sampler", None))
        return [s for s in found if s is not None]

    def _start_epoch(self) -> None:
        torch.manual_seed(self.seed + self.epoch)
        for sampler in self._samplers():
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            if isinstance(getattr(sampler, "generator", None), torch.Generator):
                sampler.generator.manual_seed(self.seed + self.epoch)
        if isinstance(getattr(self.loader, "generator", None), torch.Generator):
            self.loader.generator.manual_seed(self.seed + self.epoch)
        self._it = iter(self.loader)

    def skip_to_position(self) -> None:
        """Rebuild the current epoch's iterator and consume the batches already used."""
        self._start_epoch()
        assert self._it is not None
        for used in range(self.position):
            try:
                next(self._it)
            except StopIteration:
                raise ValueError(
                    f"resume: the checkpoint stopped after batch {self.position} of epoch {self.epoch}, but train_loader now "
                    f"yields only {used} batches per epoch; resume with the same data, batch size and drop_last"
                ) from None

    def __next__(self) -> Any:
        if self._it is None:
            self._start_epoch()
        assert self._it is not None
        try:
            batch = next(self._it)
        except StopIteration:
            if self.position == 0:
                raise ValueError("train_loader yielded no batches; expected at least one per epoch") from None
            self.epoch, self.position = self.epoch + 1, 0
            self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                raise ValueError("train_loader yielded no batches; expected at least one per epoch") from None
        self.position += 1
        return batch


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint_weights(wrapper: nn.Module, base_trained: bool) -> dict[str, Tensor]:
    return {k: v for k, v in wrapper.state_dict().items() if base_trained or not k.startswith("base.")}


def _write_checkpoint(directory: Path, step: int, weights: dict[str, Tensor], state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    tmp = directory / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors(weights, tmp / "model.safetensors", metadata={"format": "pt", "library": "errwrap", "step": str(step)})
    torch.save(state, tmp / "state.pt")
    replace_directory(tmp, final)  # an existing checkpoint of this step is swapped out in one step, never first removed
    write_text_atomic(directory / "latest", final.name + "\n")
    return final


#: What ``state.pt`` must hold, and of which types.
_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": int, "step": int, "steps": int, "epoch": int, "position": int, "base_trained": bool, "optimizer": dict,
    "scheduler": dict, "scaler": dict, "rng": list, "history": str, "validation": str,
}  # fmt: skip


def _read_state(path: Path) -> dict[str, Any]:
    """``state.pt`` read with ``weights_only=True`` and checked key by key (errors name the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises many kinds for a damaged or hostile file)
        raise ValueError(f"{path}: not an errwrap training state ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected errwrap training state format {STATE_FORMAT}, got {found!r}")
    wrong = [f"{k} (expected {t.__name__ if isinstance(t, type) else t})" for k, t in _STATE_TYPES.items() if not isinstance(state.get(k), t)]
    negative = [k for k in ("step", "steps", "epoch", "position") if isinstance(state.get(k), int) and state[k] < 0]
    if wrong or negative or not state["rng"]:
        raise ValueError(f"{path}: damaged training state: missing or invalid {wrong + negative or ['rng']}")
    return state


def _pointed(pointer: Path) -> str:
    """The checkpoint a ``latest`` file names: only ``step-NNNNNN`` (a name in the same
    directory), so the pointer cannot send a resume to another directory."""
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not re.fullmatch(r"step-\d{6,}", name):
        raise ValueError(f"{pointer}: expected the name of a checkpoint in the same directory, such as 'step-000123', got {name[:80]!r}")
    return name


def _resolve_resume(resume: str | os.PathLike, checkpoint_dir: Path | None) -> Path | None:
    if str(resume) == "latest":
        if checkpoint_dir is None:
            raise ValueError("resume='latest': expected checkpoint_dir to be given, got None")
        pointer = checkpoint_dir / "latest"
        if not pointer.is_file():
            logger.info("resume='latest': no checkpoint in %s yet; starting from step 0", checkpoint_dir)
            return None
        return checkpoint_dir / _pointed(pointer)
    path = Path(resume)
    if path.is_file() and path.name in ("latest", "model.safetensors", "state.pt"):
        path = path.parent  # a file of a checkpoint (or the 'latest' pointer): use its directory
    if (path / "latest").is_file() and not (path / "state.pt").is_file():
        path = path / _pointed(path / "latest")
    if not (path / "state.pt").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"resume: expected a checkpoint directory with model.safetensors and state.pt (or a checkpoint_dir with a 'latest' file), got {path}")
    return path


def load_checkpoint_weights(wrapper: nn.Module, checkpoint: str | os.PathLike) -> list[str]:
    """Load a checkpoint's ``model.safetensors`` into ``wrapper`` and return the loaded keys.

    A heads-only checkpoint (frozen-base training) leaves the base as it is. Keys the wrapper
    does not have raise ``ValueError``; so do missing head keys and wrong shapes, all checked
    before any tensor is copied (a failed load leaves ``wrapper`` unchanged).
    """
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: expected {path}, which does not exist")
    param = next(iter(wrapper.parameters()), None)
    tensors, _ = load_safetensors(path, device=param.device if param is not None else "cpu")
    heads = [k for k in wrapper.state_dict() if not k.startswith("base.")]
    return load_state_strict(wrapper, tensors, str(path), required=heads)


# ---------------------------------------------------------------------------- validation
def _run_validation(wrapper: nn.Module, val_fn: Callable[[nn.Module], dict] | None, val_loader: Iterable | None) -> dict[str, Any]:
    if val_fn is None:
        try:
            from .evaluation import evaluate  # noqa: PLC0415 (optional module, imported when needed)
        except ImportError as exc:
            raise ImportError(f"val_loader given but errwrap.evaluation.evaluate could not be imported ({exc}); pass val_fn= instead") from exc

        def val_fn(model: nn.Module) -> dict:
            report = evaluate(model, val_loader)
            return report.to_dict() if hasattr(report, "to_dict") else dict(report)

    was_training = wrapper.training
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    saved = (random.getstate(), np.random.get_state())
    wrapper.eval()
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            result = val_fn(wrapper)
    finally:
        wrapper.train(was_training)
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    if not isinstance(result, dict):
        raise TypeError(f"validation: expected a dict of metrics, got {type(result).__name__}")
    return result


def _to_json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ---------------------------------------------------------------------------- the loop
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
    # ------------------------------------------------------------ arguments
    for name, value, low in (("steps", steps, 1), ("accumulate", accumulate, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    for name, value in (("checkpoint_every", checkpoint_every), ("val_every", val_every), ("log_every", log_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    for name, value, rule in (("lr", lr, "> 0"), ("weight_decay", weight_decay, ">= 0"), ("clip_grad_norm", clip_grad_norm, "> 0 (None: no clipping)")):
        if name == "clip_grad_norm" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number {rule}, got {value!r}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr, weight_decay: expected lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
    if clip_grad_norm is not None and clip_grad_norm <= 0:
        raise ValueError(f"clip_grad_norm: expected a positive number or None, got {clip_grad_norm}")
    if not hasattr(wrapper, "freeze_base") or not hasattr(wrapper, "unfreeze_base"):
        raise TypeError(f"wrapper: expected an ErrorCorrectionWrapper, got {type(wrapper).__name__}")
    _checked_num_classes(train_loader, int(wrapper.num_classes), "train_loader")
    _record_preprocessing(wrapper, train_loader)
    if val_loader is not None:
        _checked_num_classes(val_loader, int(wrapper.num_classes), "val_loader")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise NotADirectoryError(f"checkpoint_dir: expected a directory (existing or not), got the file {checkpoint_dir}")

    distributed, rank, world = _distributed()
    current = _wrapper_device(wrapper)
    target = torch.device(device) if device is not None else current
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target != current:
        logger.info("finetune: moving the wrapper from %s to %s", current, target)
        wrapper.to(target)
    if precision == "fp16" and target.type != "cuda":
        raise ValueError(f"precision='fp16': expected a CUDA device (fp16 needs GradScaler on GPU), got {target}; use 'bf16' on CPU")

    loss_fn = loss if loss is not None else ErrorCorrectionLoss()
    base_trained = float(getattr(loss_fn, "w_base", 0.0)) > 0
    if base_trained and wrapper.base_frozen:
        logger.info("finetune: loss has w_base > 0; unfreezing the base for joint training")
        wrapper.unfreeze_base()
    elif not base_trained and not wrapper.base_frozen:
        logger.info("finetune: loss has w_base = 0; freezing the base, training the heads only")
        wrapper.freeze_base()
    params = [p for p in wrapper.parameters() if p.requires_grad]
    dtype = input_dtype(wrapper)  # float64 or float16 images run in the model's dtype
    if not params:
        raise ValueError("wrapper: no parameter requires grad; nothing to train")
    if checkpoint_dir is not None and _distributed()[1] == 0:  # room for one checkpoint (weights, AdamW moments), twice over
        need = 2 * (tensor_bytes(_checkpoint_weights(wrapper, base_trained).values()) + 2 * tensor_bytes(params))
        check_writable(checkpoint_dir, need, "checkpoint_dir")

    # ------------------------------------------------------------ optimizer, schedule, precision
    _seed_everything(seed)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup_steps, schedule))
    scaler = torch.amp.GradScaler(target.type if target.type == "cuda" else "cpu", enabled=precision == "fp16")
    autocast: Callable[[], Any] = (
        (lambda: torch.autocast(target.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16))
        if precision != "fp32"
        else contextlib.nullcontext
    )

    # ------------------------------------------------------------ resume
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    step, history, validation = 0, [], []
    batches = _Batches(train_loader, seed)
    last_checkpoint: Path | None = None
    rng_to_restore: dict[str, Any] | None = None
    if resume is not None:
        path = _resolve_resume(resume, ckpt_root)
        if path is not None:
            state = _read_state(path / "state.pt")
            if bool(state["base_trained"]) != base_trained:
                raise ValueError(f"{path}: saved with base_trained={state['base_trained']}, but this run has base_trained={base_trained} (loss.w_base)")
            optimizer.load_state_dict(state["optimizer"])  # the optimizer is this run's own: the wrapper is loaded last
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            load_checkpoint_weights(wrapper, path)
            step = int(state["step"])
            history = json.loads(state["history"])
            validation = json.loads(state["validation"])
            batches.epoch, batches.position = int(state["epoch"]), int(state["position"])
            rngs = state["rng"]
            rng_to_restore = rngs[rank] if len(rngs) == world else rngs[0]
            if len(rngs) != world:
                logger.warning("resume: checkpoint was written by %d process(es), this run has %d; every rank restores rank 0's RNG", len(rngs), world)
            if int(state["steps"]) != steps:
                logger.warning("resume: the checkpoint's run had steps=%d, this one has steps=%d; the schedule follows the new value", state["steps"], steps)
            last_checkpoint = path
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, step, batches.epoch, batches.position)
    if rng_to_restore is not None:
        batches.skip_to_position()
        _set_rng_state(rng_to_restore)

    model: nn.Module = wrapper
    if distributed:
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        model = DistributedDataParallel(wrapper, device_ids=[target.index] if target.type == "cuda" else None)

    show_bar = rank == 0 and (progress if progress is not None else sys.stderr.isatty())
    bar = None
    if show_bar:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=steps, initial=step, desc="finetune", dynamic_ncols=True, file=sys.stderr)

    def save(at_step: int) -> Path | None:
        nonlocal last_checkpoint
        if ckpt_root is None:
            return None
        rngs = [_rng_state()]
        if distributed:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        final = ckpt_root / f"step-{at_step:06d}"
        if rank == 0:
            state = {
                "format": STATE_FORMAT,
                "step": at_step,
                "steps": steps,
                "epoch": batches.epoch,
                "position": batches.position,
                "base_trained": base_trained,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "history": json.dumps(history),
                "validation": json.dumps(validation),
            }
            weights = _checkpoint_weights(wrapper, base_trained)
            try:
                final = _write_checkpoint(ckpt_root, at_step, weights, state)
            except OSError as exc:
                if at_step != steps:
                    raise  # the previous checkpoint is intact; resume from it
                final = _write_checkpoint(Path(tempfile.mkdtemp(prefix="errwrap-checkpoint-")), at_step, weights, state)
                warnings.warn(
                    f"finetune: could not write the last checkpoint to {ckpt_root} ({exc}); it was written to {final} "
                    "instead (resume= or load_checkpoint_weights read it). Move it before the temporary directory is cleaned",
                    RuntimeWarning,
                    stacklevel=3,
                )
            logger.info("checkpoint: %s", final)
        if distributed:
            dist.barrier()
        last_checkpoint = final
        return final

    def validate(at_step: int) -> None:
        result = _run_validation(wrapper, val_fn, val_loader)
        validation.append({"step": at_step, **_to_json_safe(result)})
        logger.info("validation at step %d: %s", at_step, result)

    validating = val_fn is not None or val_loader is not None
    was_training = wrapper.training
    model.train()
    try:
        while step < steps:
            start = time.perf_counter()
            sums = dict.fromkeys(("loss", *_TERMS), 0.0)
            images_seen = 0
            for micro in range(accumulate):
                try:
                    batch = next(batches)
                except RuntimeError as exc:
                    raise _explain_batch_error(exc, "train_loader") from exc
                images, labels = split_batch(batch, name="train_loader batch")
                check_images(images, getattr(wrapper, "in_channels", None), name="train_loader images")
                images = images.to(target, dtype=dtype, non_blocking=True)
                if isinstance(labels, Tensor):
                    labels = labels.to(target, non_blocking=True)
                sync = model.no_sync() if distributed and micro < accumulate - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        out = model(images)
                        terms = loss_fn(out, labels)
                    total = terms.total if hasattr(terms, "total") else terms
                    parts = [total] + [getattr(terms, t, total.new_zeros(())) for t in _TERMS]
                    values_t = torch.stack([p.detach().float() for p in parts])
                    if distributed:
                        dist.all_reduce(values_t)
                        values_t /= world
                    values = dict(zip(("total", *_TERMS), values_t.tolist()))
                    if not all(math.isfinite(v) for v in values.values()):
                        bad = next((t for t in (*_TERMS, "total") if not math.isfinite(values[t])))
                        raise NonFiniteLossError(step + 1, bad, values, last_checkpoint)
                    scaler.scale(total / accumulate).backward()
                sums["loss"] += values["total"] / accumulate
                for t in _TERMS:
                    sums[t] += values[t] / accumulate
                images_seen += int(images.shape[0])
            grad_norm = float("nan")
            if clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            used_lr = float(scheduler.get_last_lr()[0])
            scheduler.step()
            step += 1
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            elapsed = time.perf_counter() - start
            record = {"step": step, **sums, "lr": used_lr, "grad_norm": grad_norm, "images_per_s": images_seen * world / max(elapsed, 1e-9)}
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss']:.3f}", err=f"{sums['error']:.3f}", fused=f"{sums['fused']:.3f}", ips=f"{record['images_per_s']:.0f}")
            if rank == 0 and log_every is not None and (step % log_every == 0 or step == steps):
                logger.info(
                    "step %d/%d loss %.4f (error %.4f, detail %.4f, fused %.4f, base %.4f) lr %.3g, %.1f images/s",
                    step, steps, sums["loss"], sums["error"], sums["detail"], sums["fused"], sums["base"], used_lr, record["images_per_s"],
                )
            if validating and ((val_every is not None and step % val_every == 0) or step == steps):
                validate(step)
            if checkpoint_every is not None and step % checkpoint_every == 0 and step != steps:
                save(step)
        if ckpt_root is not None and (last_checkpoint is None or last_checkpoint.name != f"step-{step:06d}"):
            save(step)
    finally:
        if bar is not None:
            bar.close()
        wrapper.train(was_training)
    return FinetuneResult(history, step, last_checkpoint, validation)


def _record_preprocessing(wrapper: nn.Module, loader: Iterable) -> None:
    """Set ``wrapper.preprocessing`` from an ``errwrap.data.Normalize`` in ``loader.dataset``'s
    transform (directly or inside a ``Compose``) when the wrapper has none, so that a saved model
    says how its images were normalised; warn when the wrapper records other statistics."""
    from .data.transforms import Compose, Normalize  # noqa: PLC0415

    transform = getattr(getattr(loader, "dataset", None), "transform", None)
    chain = list(transform.transforms) if isinstance(transform, Compose) else [transform]
    found = [t for t in chain if isinstance(t, Normalize)]
    if len(found) != 1 or not hasattr(wrapper, "preprocessing"):
        return
    seen = {"mean": [float(v) for v in found[0].mean], "std": [float(v) for v in found[0].std]}
    if wrapper.preprocessing is None:
        wrapper.preprocessing = seen
        logger.info("finetune: recorded the loader's Normalize as wrapper.preprocessing %s", seen)
    elif {k: [float(v) for v in wrapper.preprocessing[k]] for k in ("mean", "std")} != seen:
        warnings.warn(f"finetune: the loader normalises with {seen}, but wrapper.preprocessing is {wrapper.preprocessing}; "
                      "save_pretrained records the latter", UserWarning, stacklevel=3)
