"""Writes tests/data/saved_model_v1/: a model directory of errwrap's saved format as of
2026-12 (config.json + model.safetensors + README.md, custom base = tests.tiny.TinyBase(seed=0)),
and expected.safetensors: fixed images and the four output tensors this version produced.

tests/test_error_maps.py loads the directory with today's code and checks that the outputs are
unchanged. Rerun this script only on purpose (a deliberate change of the format or outputs), and
say why in the commit.

    python tests/data/make_saved_model_v1.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from tests.tiny import batch, tiny_base  # noqa: E402

from errwrap import ErrorCorrectionLoss, ErrorCorrectionWrapper  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(tiny_base(0), error_channels=8, detail_channels=8, project_features=False)
    opt = torch.optim.Adam(wrap.head_parameters(), 1e-2)
    wrap.train()
    for step in range(5):  # a few steps, so that norm statistics and weights are not the initial ones
        images, labels = batch(4, 32, seed=step)
        loss = ErrorCorrectionLoss()(wrap(images), labels).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    wrap.eval()
    out_dir = wrap.save_pretrained(HERE / "saved_model_v1", class_names=[f"class{i}" for i in range(5)])
    images, _ = batch(3, 32, seed=123)
    with torch.no_grad():
        out = wrap(images)
    save_file(
        {"images": images, **{k: v.contiguous() for k, v in out._asdict().items()}},
        str(out_dir / "expected.safetensors"),
    )
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
