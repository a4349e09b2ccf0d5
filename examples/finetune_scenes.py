"""Quick, runnable example (about half a minute on an idle 2-core CPU, a few minutes on a busy one; no data to
download):

1. train a small segmentation network on errwrap's generated Scenes for a few hundred steps;
2. wrap it with ErrorCorrectionWrapper and fine-tune the three heads with the base frozen;
3. compare mIoU of the base and of the corrected output, and how well the error map finds the
   base's mistakes (AUROC), on a held-out split.

    python examples/finetune_scenes.py                 # defaults
    python examples/finetune_scenes.py --base-steps 1500 --head-steps 600   # longer
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from errwrap import ErrorCorrectionLoss, ErrorCorrectionWrapper, evaluate
from errwrap.data import Scenes, make_loader
from errwrap.training import finetune


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallSegNet(nn.Module):
    """A small encoder with a stride-8 context stage; logits at stride 4. Returns
    ``(logits, [low, high])``: errwrap's native protocol."""

    def __init__(self, num_classes: int, width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(3, width, 2), conv_bn_relu(width, width))
        self.low = nn.Sequential(conv_bn_relu(width, 2 * width, 2), conv_bn_relu(2 * width, 2 * width))  # stride 4
        self.high = nn.Sequential(
            conv_bn_relu(2 * width, 4 * width, 2), conv_bn_relu(4 * width, 4 * width, dilation=2)
        )  # stride 8
        self.fuse = conv_bn_relu(6 * width, 2 * width)
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor):
        low = self.low(self.stem(x))
        high = self.high(low)
        up = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([low, up], 1))), [low, high]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=1024)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--head-steps", type=int, default=150)
    parser.add_argument("--head-lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    train = Scenes(args.train_images, size=args.size, seed=args.seed, split="train", cache=True)
    val = Scenes(args.val_images, size=args.size, seed=args.seed, split="val", cache=True)
    loader = make_loader(train, args.batch_size, seed=args.seed)
    val_loader = make_loader(val, args.batch_size, shuffle=False, drop_last=False)

    # 1. The "existing model": a small network trained with cross-entropy.
    start = time.perf_counter()
    base = SmallSegNet(Scenes.num_classes)
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.base_steps)
    base.train()
    step = 0
    while step < args.base_steps:
        for images, labels in loader:
            logits, _ = base(images)
            loss = F.cross_entropy(
                F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False),
                labels,
                ignore_index=255,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == args.base_steps:
                break
    logging.info("base trained: %d steps in %.1f s, last loss %.3f", step, time.perf_counter() - start, loss.item())

    # 2. Wrap it and fine-tune the heads (base frozen: the default loss has w_base = 0).
    wrapper = ErrorCorrectionWrapper(base, error_channels=32, detail_channels=32)
    before = evaluate(wrapper, val_loader)
    start = time.perf_counter()
    result = finetune(
        wrapper,
        loader,
        steps=args.head_steps,
        lr=args.head_lr,
        warmup_steps=10,
        loss=ErrorCorrectionLoss(),
        seed=args.seed,
        log_every=50,
    )
    logging.info("heads fine-tuned: %d steps in %.1f s", result.step, time.perf_counter() - start)
    after = evaluate(wrapper, val_loader)

    print(f"validation ({len(val)} images of {args.size}x{args.size}):")
    print(after.table())
    print(
        f"untrained heads: corrected mIoU {before.fused.miou:.3f}, error-map AUROC "
        f"{before.error_detection['error_head'].auroc:.3f}"
    )


if __name__ == "__main__":
    main()
