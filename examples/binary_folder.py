"""Binary segmentation from a folder of images and 0/255 masks, with an SMP ``Unet(classes=1)``
(needs ``pip install errwrap[smp]``).

    python examples/binary_folder.py --images data/images --masks data/masks --out runs/binary
    python examples/binary_folder.py --out runs/binary          # makes a tiny synthetic folder first

Binary masks are usually saved as 0 (background) and 255 (foreground); 255 is also errwrap's
``ignore_index``, so the folder is read with ``label_map={255: 1}``. Without it errwrap refuses the
masks rather than train on background alone. The base uses random weights here so that the script
runs offline: pass ``--base-weights`` (a ``state_dict`` in safetensors) for your trained Unet.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from PIL import Image
from torch.utils.data import DataLoader

import errwrap
from errwrap import ErrorCorrectionWrapper
from errwrap.data import Compose, Normalize, RandomCrop, RandomHorizontalFlip, SegmentationFolder, make_loader


def synthetic_folder(root: Path, n: int = 8, size: int = 64) -> tuple[Path, Path]:
    """``n`` noisy RGB JPEGs, each with a darker rectangle, and its 0/255 PNG mask."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        top, left = rng.integers(0, size // 2, 2)
        mask = np.zeros((size, size), np.uint8)
        mask[top : top + size // 2, left : left + size // 2] = 255
        image = rng.integers(100, 256, (size, size, 3), dtype=np.uint8)
        image[mask > 0] //= 3
        Image.fromarray(image).save(root / "images" / f"sample{i:03d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"sample{i:03d}.png")
    return root / "images", root / "masks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None, help="images directory (default: a synthetic folder)")
    parser.add_argument("--masks", type=Path, default=None, help="0/255 masks with the images' file stems")
    parser.add_argument("--base-weights", type=Path, default=None, help="your trained Unet's state_dict (.safetensors)")
    parser.add_argument("--crop", type=int, default=64, help="training crop (default: 64)")
    parser.add_argument("--steps", type=int, default=20, help="head training steps (default: 20)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="where the model is saved")
    args = parser.parse_args()

    images, masks = args.images, args.masks
    if images is None or masks is None:
        images, masks = synthetic_folder(Path(tempfile.mkdtemp(prefix="errwrap-binary-")))
        print(f"no --images/--masks: wrote a synthetic folder to {images.parent}")

    train = SegmentationFolder(
        images,
        masks,
        num_classes=2,
        class_names=["background", "foreground"],
        label_map={255: 1},
        transform=Compose([RandomCrop(args.crop), RandomHorizontalFlip(), Normalize()]),
    )
    val = SegmentationFolder(images, masks, num_classes=2, class_names=["background", "foreground"], label_map={255: 1},
                             transform=Normalize())

    torch.manual_seed(0)
    base = smp.Unet("resnet18", encoder_weights=None, classes=1)
    if args.base_weights is not None:
        from safetensors.torch import load_file

        base.load_state_dict(load_file(args.base_weights))
    wrap = ErrorCorrectionWrapper(base)  # one logit channel: classes 0 (background) and 1 (foreground)
    errwrap.finetune(wrap, make_loader(train, args.batch_size), steps=args.steps, progress=False)
    # batch_size=1: the images of a real folder rarely share one size
    report = errwrap.evaluate(wrap, DataLoader(val, batch_size=1))
    print(report.table())
    wrap.save_pretrained(args.out, class_names=train.class_names, metrics=report.to_dict())
    print(f"saved to {args.out}; try: errwrap predict --model {args.out} {images} --out {args.out}/predictions")


if __name__ == "__main__":
    main()
