"""Recipe: fine-tune errwrap's heads on Cityscapes (or ADE20K) on top of a trained network.

Needs the data on disk (nothing is downloaded) and a trained segmentation network. The network
is built here with segmentation_models_pytorch's DeepLabV3+ (``pip install errwrap[smp]``) and
its weights are read from ``--base-weights`` (a ``state_dict`` in .safetensors); replace
``build_base`` with your own model as needed.

One GPU::

    python examples/finetune_cityscapes.py --data /data/cityscapes --base-weights dlv3p_city.safetensors \\
        --out runs/city-heads

Several GPUs (batch size is per process)::

    torchrun --nproc_per_node 4 examples/finetune_cityscapes.py --data /data/cityscapes \\
        --base-weights dlv3p_city.safetensors --batch-size 2 --out runs/city-heads

ADE20K: ``--dataset ade20k --crop 512 --num-classes 150``. Interrupted runs continue with
``--resume latest``.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

from errwrap import ErrorCorrectionLoss, ErrorCorrectionWrapper
from errwrap.data import (
    ADE20K,
    Cityscapes,
    ColorJitter,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    make_loader,
)
from errwrap.training import finetune


def build_base(num_classes: int, weights: str) -> torch.nn.Module:
    import segmentation_models_pytorch as smp
    from safetensors.torch import load_file

    model = smp.DeepLabV3Plus(encoder_name="resnet101", encoder_weights=None, classes=num_classes)
    model.load_state_dict(load_file(weights), strict=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Cityscapes root (leftImg8bit/, gtFine/) or ADE20K root")
    parser.add_argument("--dataset", choices=("cityscapes", "ade20k"), default="cityscapes")
    parser.add_argument("--base-weights", required=True, help="the trained base network's state_dict (.safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint directory")
    parser.add_argument("--crop", type=int, default=None, help="crop side (default 768 Cityscapes, 512 ADE20K)")
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--joint", action="store_true", help="also fine-tune the base (w_base=1)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--resume", default=None, help="a checkpoint directory or 'latest'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if "LOCAL_RANK" in os.environ:  # started by torchrun
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    crop = args.crop or (768 if args.dataset == "cityscapes" else 512)
    transform = Compose([
        RandomScale(0.5, 2.0),
        RandomCrop(crop, ignore_index=255),
        RandomHorizontalFlip(),
        ColorJitter(0.2, 0.2, 0.2),
        Normalize(),
    ])
    dataset_cls = Cityscapes if args.dataset == "cityscapes" else ADE20K
    train = dataset_cls(args.data, "train", transform=transform)
    loader = make_loader(
        train, args.batch_size, seed=args.seed, num_workers=args.workers, pin_memory=device.type == "cuda"
    )

    base = build_base(train.num_classes, args.base_weights).to(device)
    wrapper = ErrorCorrectionWrapper(base, sample_size=256)
    loss = ErrorCorrectionLoss(w_base=1.0 if args.joint else 0.0)
    result = finetune(
        wrapper, loader, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, schedule="poly",
        precision=args.precision, seed=args.seed, loss=loss, checkpoint_dir=args.out, checkpoint_every=1000,
        resume=args.resume,
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        wrapper.save_pretrained(
            os.path.join(args.out, "final"), heads_only=not args.joint, class_names=train.class_names
        )
        logging.info("done: %d steps, last checkpoint %s", result.step, result.checkpoint)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
