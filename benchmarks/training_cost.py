"""Cost of a training step: heads-only fine-tuning and joint fine-tuning against training the base.

Three steps on the same batch, timed in interleaved rounds (median of ``--repeats``):

* ``base``: one ordinary training step of the base alone: forward in train mode, cross-entropy
  on its logits, backward, AdamW step over all its parameters;
* ``heads``: one errwrap fine-tuning step with the base frozen (``freeze_base()``: the base runs
  in eval mode under ``no_grad``), the three heads forward and backward through
  ``ErrorCorrectionLoss()``, AdamW step over ``head_parameters()``;
* ``joint``: one joint step (``unfreeze_base()``, ``ErrorCorrectionLoss(w_base=1)``), AdamW over
  every parameter.

Targets: ``heads`` <= 0.6 x ``base``; ``joint`` <= 1.25 x ``base``.

Example:
    python benchmarks/training_cost.py --encoder resnet50 --size 256 256 --batch 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bar_plot, environment, finish, format_table, interleaved_times, quartiles, setup_logging  # noqa: E402

TARGET_HEADS = 0.6
TARGET_JOINT = 1.25


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet50", help="timm encoder of errwrap's DeepLabV3Plus (OS16)")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--size", nargs=2, type=int, default=[256, 256], metavar=("H", "W"), help="crop size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64, help="error_channels = detail_channels")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (resnet18, 64x64, batch 2)")
    parser.add_argument("--plot", metavar="PNG", help="write a bar plot of the step times")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    args = parser.parse_args(argv)
    setup_logging(random_heads=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.encoder, args.size, args.batch, args.repeats, args.warmup, args.width = "resnet18", [64, 64], 2, 2, 1, 16

    from errwrap import ErrorCorrectionWrapper
    from errwrap.losses import ErrorCorrectionLoss
    from errwrap.models import DeepLabV3Plus

    env = environment("cpu")
    torch.manual_seed(0)
    base = DeepLabV3Plus(args.encoder, args.num_classes, output_stride=16)
    wrap = ErrorCorrectionWrapper(base, error_channels=args.width, detail_channels=args.width)
    x = torch.randn(args.batch, 3, *args.size)
    y = torch.randint(0, args.num_classes, (args.batch, *args.size))
    base_params = list(base.parameters())
    head_params = list(wrap.head_parameters())
    opt_base = torch.optim.AdamW(base_params, lr=1e-6)
    opt_heads = torch.optim.AdamW(head_params, lr=1e-6)
    opt_joint = torch.optim.AdamW([*base_params, *head_params], lr=1e-6)
    heads_loss, joint_loss = ErrorCorrectionLoss(), ErrorCorrectionLoss(w_base=1.0)

    def base_step() -> None:
        wrap.unfreeze_base()
        base.train()
        logits = base(x).logits
        loss = F.cross_entropy(logits, y, ignore_index=255)
        opt_base.zero_grad(set_to_none=True)
        loss.backward()
        opt_base.step()

    def heads_step() -> None:
        wrap.freeze_base()
        wrap.train()
        loss = heads_loss(wrap(x), y).total
        opt_heads.zero_grad(set_to_none=True)
        loss.backward()
        opt_heads.step()

    def joint_step() -> None:
        wrap.unfreeze_base()
        wrap.train()
        loss = joint_loss(wrap(x), y).total
        opt_joint.zero_grad(set_to_none=True)
        loss.backward()
        opt_joint.step()

    print(f"errwrap training-step cost: DeepLabV3Plus({args.encoder}, OS16), "
          f"batch {args.batch} of {args.size[0]}x{args.size[1]}, "
          f"head width {args.width}, {args.repeats} interleaved rounds after {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    times = interleaved_times({"base": base_step, "heads": heads_step, "joint": joint_step}, args.repeats, args.warmup)
    stats = {name: quartiles(ts) for name, ts in times.items()}
    ratios = {
        name: quartiles([t / b for t, b in zip(times[name], times["base"], strict=False)])
        for name in ("heads", "joint")
    }
    trained = {"base": base_params, "heads": head_params}  # any other step trains both
    rows = [
        {"step": name, "s/step (median)": f"{s['median']:.3f}", "IQR s": f"{s['iqr']:.3f}",
         "x base step": f"{ratios[name]['median']:.3f}" if name in ratios else "1.000",
         "trained params M":
             f"{sum(p.numel() for p in trained.get(name, [*base_params, *head_params])) / 1e6:.2f}"}
        for name, s in stats.items()
    ]  # fmt: skip
    print()
    print(format_table(rows))
    heads_r, joint_r = ratios["heads"]["median"], ratios["joint"]["median"]
    targets = [
        {
            "target": f"heads-only step <= {TARGET_HEADS} x base step",
            "value": f"{heads_r:.3f}",
            "met": "yes" if heads_r <= TARGET_HEADS else "no",
        },
        {
            "target": f"joint step <= {TARGET_JOINT} x base step",
            "value": f"{joint_r:.3f}",
            "met": "yes" if joint_r <= TARGET_JOINT else "no",
        },
    ]
    print()
    print(format_table(targets))
    if args.plot:
        bar_plot(args.plot, f"seconds per training step (median; DeepLabV3Plus {args.encoder}, batch {args.batch}, "
                            f"{args.size[0]}x{args.size[1]}, CPU)",
                 list(stats), {"s/step": [s["median"] for s in stats.values()]},
                 errors={"s/step": [s["iqr"] / 2 for s in stats.values()]})  # fmt: skip
        print(f"wrote {args.plot}")
    summary = {"benchmark": "training_cost", "encoder": args.encoder, "heads_ratio": heads_r, "joint_ratio": joint_r,
               "heads_target_met": heads_r <= TARGET_HEADS, "joint_target_met": joint_r <= TARGET_JOINT,
               "seconds_per_step": {k: v["median"] for k, v in stats.items()}}  # fmt: skip
    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    finish({**env, "config": config, "steps_s": stats, "ratios": ratios, "times_s": times}, summary, args.json)
    return summary


if __name__ == "__main__":
    main()
