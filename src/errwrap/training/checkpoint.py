"""Training checkpoints: their format, when and where they are written, and resuming from one.

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

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import _distributed
from .._io import load_safetensors, load_state_strict, replace_directory, save_safetensors, write_text_atomic
from .._utils import module_device
from ._batches import Batches, rng_state, set_rng_state

__all__ = [
    "STATE_FORMAT",
    "CheckpointSaver",
    "Run",
    "checkpoint_weights",
    "load_checkpoint_weights",
    "read_state",
    "resolve_resume",
    "restore",
]

logger = logging.getLogger("errwrap.training")  # the package's one logger (the CLI prints its INFO lines)

STATE_FORMAT = 1

#: What ``state.pt`` must hold, and of which types.
_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": int, "step": int, "steps": int, "epoch": int, "position": int, "base_trained": bool, "optimizer": dict,
    "scheduler": dict, "scaler": dict, "rng": list, "history": str, "validation": str,
}  # fmt: skip


@dataclasses.dataclass
class Run:
    """The objects of one training run that a checkpoint saves and a resume restores.

    Attributes:
        wrapper: the model being trained.
        optimizer, scheduler, scaler: the run's AdamW, learning-rate schedule and grad scaler.
        batches: the loader's cycle (its epoch and position are saved).
        base_trained: whether the base trains too (else checkpoints hold the heads only).
        steps: the run's total optimizer steps.
        step: optimizer steps done.
        history: one dict per optimizer step.
        validation: one dict per validation.
        checkpoint: the last checkpoint written or resumed from, or ``None``.
        augment_stats: the ``{"mean", "std"}`` the photometric augmentation reads pixels with
            (saved, so a resumed run augments as the uninterrupted run, even when they were
            guessed from the first batch), or ``None``.
    """

    wrapper: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    batches: Batches
    base_trained: bool
    steps: int
    step: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    validation: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checkpoint: Path | None = None
    augment_stats: dict[str, list[float]] | None = None

    def training_state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """The content of ``state.pt`` at this step, with every rank's RNG states ``rngs``."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "steps": self.steps,
            "epoch": self.batches.epoch,
            "position": self.batches.position,
            "base_trained": self.base_trained,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "history": json.dumps(self.history),
            "validation": json.dumps(self.validation),
            "augment": json.dumps(self.augment_stats),
        }


def checkpoint_weights(wrapper: nn.Module, base_trained: bool) -> dict[str, Tensor]:
    """The tensors a checkpoint saves: the whole state dict, or without ``base.`` keys when the base is frozen."""
    return {k: v for k, v in wrapper.state_dict().items() if base_trained or not k.startswith("base.")}


def _write_checkpoint(directory: Path, step: int, weights: dict[str, Tensor], state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    tmp = directory / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    metadata = {"format": "pt", "library": "errwrap", "step": str(step)}
    save_safetensors(weights, tmp / "model.safetensors", metadata=metadata)
    torch.save(state, tmp / "state.pt")
    replace_directory(tmp, final)  # an existing checkpoint of this step is swapped out in one step, never first removed
    write_text_atomic(directory / "latest", final.name + "\n")
    return final


class CheckpointSaver:
    """When and where the checkpoints of one run are written.

    Every ``every`` steps (not at the last step) and once at the end (unless one of that step
    exists); only rank 0 writes, every rank contributes its RNG states. When the last checkpoint
    cannot be written to ``root`` it goes to a new temporary directory, named in a
    ``RuntimeWarning``; an earlier failure raises (the previous checkpoint is intact).

    Args:
        root: ``checkpoint_dir``; ``None``: nothing is written.
        every: ``checkpoint_every``; ``None``: only at the end.
    """

    def __init__(self, root: Path | None, every: int | None) -> None:
        self.root, self.every = root, every

    def due(self, run: Run) -> bool:
        """Whether a periodic checkpoint is due after ``run.step``."""
        return self.every is not None and run.step % self.every == 0 and run.step != run.steps

    def missing_last(self, run: Run) -> bool:
        """Whether the end of the run still needs its checkpoint."""
        return self.root is not None and (run.checkpoint is None or run.checkpoint.name != f"step-{run.step:06d}")

    def save(self, run: Run) -> Path | None:
        """Write ``run``'s checkpoint of its current step (on rank 0; every rank waits for it)
        and set ``run.checkpoint``; ``None`` when there is no ``root``."""
        if self.root is None:
            return None
        rngs = _distributed.gather_objects(rng_state())
        final = self.root / f"step-{run.step:06d}"
        if _distributed.rank() == 0:
            state, weights = run.training_state(rngs), checkpoint_weights(run.wrapper, run.base_trained)
            try:
                final = _write_checkpoint(self.root, run.step, weights, state)
            except OSError as exc:
                if run.step != run.steps:
                    raise  # the previous checkpoint is intact; resume from it
                fallback = Path(tempfile.mkdtemp(prefix="errwrap-checkpoint-"))
                final = _write_checkpoint(fallback, run.step, weights, state)
                warnings.warn(
                    f"finetune: could not write the last checkpoint to {self.root} ({exc}); it was written to {final} "
                    "instead (resume= or load_checkpoint_weights read it). Move it before the temporary directory is "
                    "cleaned",
                    RuntimeWarning,
                    stacklevel=3,  # finetune's caller
                )
            logger.info("checkpoint: %s", final)
        _distributed.barrier()
        run.checkpoint = final
        return final


def read_state(path: Path) -> dict[str, Any]:
    """``state.pt`` read with ``weights_only=True`` and checked key by key (errors name the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises many kinds for a damaged or hostile file)
        first = str(exc).splitlines()[0][:200]
        raise ValueError(f"{path}: not an errwrap training state ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected errwrap training state format {STATE_FORMAT}, got {found!r}")
    wrong = [
        f"{k} (expected {t.__name__ if isinstance(t, type) else t})"
        for k, t in _STATE_TYPES.items()
        if not isinstance(state.get(k), t)
    ]
    negative = [k for k in ("step", "steps", "epoch", "position") if isinstance(state.get(k), int) and state[k] < 0]
    if wrong or negative or not state["rng"]:
        raise ValueError(f"{path}: damaged training state: missing or invalid {wrong + negative or ['rng']}")
    return state


def _pointed(pointer: Path) -> str:
    """The checkpoint a ``latest`` file names: only ``step-NNNNNN`` (a name in the same
    directory), so the pointer cannot send a resume to another directory."""
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not re.fullmatch(r"step-\d{6,}", name):
        raise ValueError(
            f"{pointer}: expected the name of a checkpoint in the same directory, such as 'step-000123', "
            f"got {name[:80]!r}"
        )
    return name


def resolve_resume(resume: str | os.PathLike, checkpoint_dir: Path | None) -> Path | None:
    """The checkpoint directory ``resume`` names (see :func:`~errwrap.training.finetune`), or
    ``None`` for ``"latest"`` when ``checkpoint_dir`` holds none yet."""
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
        raise FileNotFoundError(
            "resume: expected a checkpoint directory with model.safetensors and state.pt (or a checkpoint_dir with a "
            f"'latest' file), got {path}"
        )
    return path


def load_checkpoint_weights(wrapper: nn.Module, checkpoint: str | os.PathLike) -> list[str]:
    """Load a checkpoint's ``model.safetensors`` into ``wrapper`` and return the loaded keys.

    A heads-only checkpoint (frozen-base training) leaves the base as it is. Keys the wrapper
    does not have raise ``ValueError``; so do missing head keys and wrong shapes, all checked
    before any tensor is copied (a failed load leaves ``wrapper`` unchanged).

    Args:
        wrapper: the model to load into, in place.
        checkpoint: a checkpoint directory (``step-000123/``).

    Returns:
        The loaded keys, sorted.
    """
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: expected {path}, which does not exist")
    tensors, _ = load_safetensors(path, device=module_device(wrapper))
    heads = [k for k in wrapper.state_dict() if not k.startswith("base.")]
    return load_state_strict(wrapper, tensors, str(path), required=heads)


def restore(run: Run, resume: str | os.PathLike | None, checkpoint_dir: Path | None) -> None:
    """Resume ``run`` from the checkpoint ``resume`` names: optimizer, scheduler and scaler
    states, then the weights, the step, history and validation, the loader's position (its
    batches already used are read again and dropped) and this rank's RNG states. Nothing
    happens for ``None``, or for ``"latest"`` when there is no checkpoint yet."""
    path = resolve_resume(resume, checkpoint_dir) if resume is not None else None
    if path is None:
        return
    state = read_state(path / "state.pt")
    if bool(state["base_trained"]) != run.base_trained:
        raise ValueError(
            f"{path}: saved with base_trained={state['base_trained']}, but this run has "
            f"base_trained={run.base_trained} (loss.w_base)"
        )
    run.optimizer.load_state_dict(state["optimizer"])  # the optimizer is this run's own: the wrapper is loaded last
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    load_checkpoint_weights(run.wrapper, path)
    run.step = int(state["step"])
    run.history = json.loads(state["history"])
    run.validation = json.loads(state["validation"])
    if isinstance(state.get("augment"), str):  # checkpoints before the augmentation have none
        run.augment_stats = json.loads(state["augment"])
    run.batches.epoch, run.batches.position = int(state["epoch"]), int(state["position"])
    rank, world = _distributed.rank_and_world()
    rngs = state["rng"]
    if len(rngs) != world:
        logger.warning(
            "resume: checkpoint was written by %d process(es), this run has %d; every rank restores rank 0's RNG",
            len(rngs), world,
        )  # fmt: skip
    if int(state["steps"]) != run.steps:
        logger.warning(
            "resume: the checkpoint's run had steps=%d, this one has steps=%d; the schedule follows the new value",
            state["steps"], run.steps,
        )  # fmt: skip
    run.checkpoint = path
    batches = run.batches
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, run.step, batches.epoch, batches.position)
    run.batches.skip_to_position()
    set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
