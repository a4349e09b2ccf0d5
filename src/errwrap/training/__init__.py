"""``errwrap.training``: one plain fine-tuning loop for :class:`~errwrap.ErrorCorrectionWrapper`.

AdamW, linear warm-up then a poly or cosine schedule, gradient accumulation, gradient clipping,
bf16/fp16 mixed precision, checkpoints that resume to the same run, a clear stop on a non-finite
loss, optional validation, and DistributedDataParallel when ``torch.distributed`` is
initialised (``torchrun``). Nothing else: no callbacks, no trainer object.

Modules: :mod:`.loop` (:func:`finetune` and its step), :mod:`.checkpoint` (the checkpoint format,
when checkpoints are written, resuming), :mod:`.optim` (AdamW, :func:`lr_factor`, precision),
``_batches`` (the loader cycled in a repeatable order, RNG states), ``_setup`` (argument checks,
device, which part trains) and ``_validation``.
"""

# importable from here as before the split, outside the API (``x as x`` marks a re-export)
from .checkpoint import STATE_FORMAT as STATE_FORMAT
from .checkpoint import _write_checkpoint as _write_checkpoint
from .checkpoint import load_checkpoint_weights
from .loop import FinetuneResult, NonFiniteLossError, finetune
from .optim import PRECISIONS as PRECISIONS
from .optim import SCHEDULES as SCHEDULES
from .optim import lr_factor

__all__ = ["FinetuneResult", "NonFiniteLossError", "finetune", "lr_factor", "load_checkpoint_weights"]
