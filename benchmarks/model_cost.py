"""Parameter count and forward FLOPs of errwrap's DeepLabV3Plus next to SMP's DeepLabV3Plus.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass (batch 1,
eval mode, no gradients); it counts convolutions and matrix products as 2 FLOPs per
multiply-accumulate and ignores element-wise operations (norms, activations, resizing). By
default the models are built and run on the ``meta`` device, which gives the same counts as a
real run (they depend on shapes only) in about a second; ``--device cpu`` runs for real.

Example:
    python benchmarks/model_cost.py --encoder resnet50 --height 512 --width 1024 --json cost.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count(build: Callable[[], nn.Module], x_shape: tuple[int, ...], device: str) -> dict[str, float]:
    with torch.device(device):
        model = build().eval()
    x = torch.zeros(x_shape, device=device)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    flops = counter.get_total_flops()
    return {"params": params, "params_m": params / 1e6, "gflops": flops / 1e9, "gmacs": flops / 2e9}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet50", help="timm / SMP encoder name")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--device", default="meta", help="meta (shape-only, fast), cpu or cuda")
    parser.add_argument("--no-smp", action="store_true", help="skip SMP (when it is not installed)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    from errwrap.models import DeepLabV3Plus

    shape = (1, 3, args.height, args.width)
    builds: dict[str, Callable[[], nn.Module]] = {
        "errwrap.DeepLabV3Plus": lambda: DeepLabV3Plus(
            args.encoder, args.num_classes, output_stride=args.output_stride
        ),
    }
    if not args.no_smp:
        import segmentation_models_pytorch as smp

        def smp_build(**kw):
            return lambda: smp.DeepLabV3Plus(
                args.encoder,
                encoder_weights=None,
                encoder_output_stride=args.output_stride,
                classes=args.num_classes,
                **kw,
            )

        builds["smp.DeepLabV3Plus (separable ASPP, default)"] = smp_build()
        builds["smp.DeepLabV3Plus (decoder_aspp_separable=False)"] = smp_build(decoder_aspp_separable=False)

    rows = {name: count(build, shape, args.device) for name, build in builds.items()}
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("timm", "segmentation_models_pytorch"):
        if mod in sys.modules:
            versions[mod] = sys.modules[mod].__version__
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "input": list(shape),
        "encoder": args.encoder,
        "output_stride": args.output_stride,
        "num_classes": args.num_classes,
        "device": args.device,
        "versions": versions,
        "models": rows,
    }
    width = max(len(n) for n in rows)
    print(
        f"input {shape}, encoder {args.encoder}, output stride {args.output_stride}, {args.num_classes} classes, "
        f"device {args.device}"
    )
    print(f"{'model':<{width}}  {'params (M)':>10}  {'GFLOPs':>8}  {'GMACs':>8}")
    for name, r in rows.items():
        print(f"{name:<{width}}  {r['params_m']:>10.2f}  {r['gflops']:>8.1f}  {r['gmacs']:>8.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
