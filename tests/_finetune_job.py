"""A small fine-tuning job run as a subprocess by tests/test_interruption.py.

Usage: python tests/_finetune_job.py CHECKPOINT_DIR OUT_FILE STEPS [resume] [slow]
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from errwrap import ErrorCorrectionWrapper, finetune  # noqa: E402
from tests.tiny import tiny_base  # noqa: E402


def main() -> None:
    ckpt, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    resume = "latest" if "resume" in sys.argv[4:] else None
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(tiny_base(), error_channels=8, detail_channels=8)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2, 32, 32), generator=g)) for _ in range(5)]
    if "slow" in sys.argv[4:]:  # give the test time to kill us between checkpoints
        wrap.error_head.register_forward_hook(lambda *args: time.sleep(0.3))
    result = finetune(
        wrap, data, steps=steps, lr=1e-2, seed=0, checkpoint_dir=ckpt, checkpoint_every=2, resume=resume, progress=False
    )
    torch.save({"state": {k: v for k, v in wrap.state_dict().items() if not k.startswith("base.")},
                "losses": [h["loss"] for h in result.history]}, out)


if __name__ == "__main__":
    main()
