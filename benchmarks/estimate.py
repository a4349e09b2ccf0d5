"""Label-free accuracy estimates against the truth, in distribution and under simple shifts.

For each seed, ``errwrap.demo.run_demo`` trains a small DeepLabV3+ on the built-in ``Scenes`` and
fine-tunes the heads with the base frozen (the quality benchmark's setup, with a short schedule by
default). Then, with the labels hidden from the estimators:

* the ATC threshold is fitted (:func:`errwrap.fit_atc`) on the labelled ``"test"`` split;
* :func:`errwrap.compare_estimates` runs on the held-out ``"val"`` split as it is (in
  distribution) and under each shift: ``blur`` (Gaussian blur, sigma 1.5 px) and ``noise``
  (additive Gaussian noise, std 0.08), applied to the ``[0, 1]`` image before normalisation;
* it runs again after :func:`errwrap.calibrate_temperature` has fitted the temperature of the fused
  probabilities on the same labelled ``"test"`` split (``errwrap+T``; the labels do not change);
* for errwrap, errwrap+T, average confidence and ATC it reports the absolute error of the data-set pixel
  accuracy and mIoU estimates, and the per-image MAE and Spearman correlation with the truth.
  errwrap's estimate describes the corrected labels, the baselines the base labels; each is
  measured against the labels it describes.

``errwrap.data`` had no corruption transform when this was written, so the two shifts are defined
here (``blur``, ``noise`` below).

Example:
    python benchmarks/estimate.py --seeds 0 --json estimate.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_config, environment, finish, format_table, mean_std, setup_logging  # noqa: E402

ESTIMATORS = ("errwrap", "errwrap+T", "avg_confidence", "atc")
SHIFTS = ("none", "blur", "noise")


def blur(image: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Separable Gaussian blur of a ``(3, H, W)`` image (reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = torch.nn.functional.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return out[0]


class Shift:
    """A joint transform that corrupts the image (seeded per image for ``noise``) and keeps the label."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.seed, self.count = kind, seed, 0

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "blur":
            image = blur(image)
        elif self.kind == "noise":
            g = torch.Generator().manual_seed(self.seed * 100003 + self.count)
            self.count += 1
            image = (image + 0.08 * torch.randn(image.shape, generator=g)).clamp(0.0, 1.0)
        return image, label


def val_loader(num_images: int, size: int, seed: int, split: str, shift: str) -> Any:
    """The held-out ``Scenes`` split, shifted, normalised, in fixed order."""
    from torch.utils.data import DataLoader

    from errwrap.data import IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, Scenes

    transform = Compose([Shift(shift, seed), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return DataLoader(Scenes(num_images, size=size, seed=seed, split=split, transform=transform), batch_size=8, shuffle=False)


def _pts(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def result_rows(runs: list[dict[str, Any]], conditions: list[str]) -> list[dict[str, str]]:
    """One table row per condition and estimator: truth of the labels it describes, its estimate,
    its errors (means over the runs)."""
    rows = []
    for c in conditions:
        for e in ESTIMATORS:
            target = runs[0]["conditions"][c]["errors"][e]["target"]

            def mean(get: Any) -> float:
                return mean_std([get(r["conditions"][c]) for r in runs])["mean"]

            rows.append({
                "shift": c, "estimator": e, "labels": target,
                "true pixAcc": _pts(mean(lambda x: x["truth"][target]["pixel_accuracy"])),
                "estimate": _pts(mean(lambda x: x["errors"][e]["estimate_pixel_accuracy"])),
                "|err| pixAcc": _pts(mean(lambda x: x["errors"][e]["pixel_accuracy"])),
                "|err| mIoU": _pts(mean(lambda x: x["errors"][e]["miou"])),
                "img MAE": _pts(mean(lambda x: x["errors"][e]["per_image_mae"])),
                "Spearman": f"{mean(lambda x: x['errors'][e]['spearman']):.3f}",
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=64, help="held-out images per condition (and for fitting ATC)")
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--head-steps", type=int, default=300)
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS[1:]), choices=SHIFTS[1:])
    parser.add_argument("--out", default="bench-estimate", help="folder for each seed's demo output and model")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tiny data, a few steps)")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    args = parser.parse_args(argv)
    setup_logging()
    if args.tiny:
        args.seeds, args.image_size, args.train_images, args.val_images, args.base_steps, args.head_steps = args.seeds[:1], 32, 16, 8, 4, 4
    from errwrap import ErrorCorrectionWrapper, calibrate_temperature, compare_estimates, fit_atc
    from errwrap.demo import run_demo

    env = environment("cpu")
    start = time.perf_counter()
    conditions = ["none", *args.shifts]
    runs = []
    for seed in args.seeds:
        cfg = demo_config(5.0, seed, args.tiny, mc_dropout=False, image_size=args.image_size, train_images=args.train_images,
                          val_images=args.val_images, base_steps=args.base_steps, head_steps=args.head_steps)  # fmt: skip
        print(f"seed {seed}: run_demo ({cfg.encoder}, {cfg.image_size} px, {cfg.train_images} training images, "
              f"{cfg.base_steps} base + {cfg.head_steps} head steps)", flush=True)  # fmt: skip
        result = run_demo(Path(args.out) / f"seed{seed}", cfg, say=lambda m: None)
        wrap = ErrorCorrectionWrapper.from_pretrained(result.out_dir / "model")
        labelled = val_loader(args.val_images, args.image_size, seed, "test", "none")
        atc = fit_atc(wrap, labelled)
        run: dict[str, Any] = {"seed": seed, "atc_threshold": atc, "seconds_demo": round(result.seconds, 1), "conditions": {}}
        comparisons = {shift: compare_estimates(wrap, val_loader(args.val_images, args.image_size, seed, "val", shift), atc_threshold=atc) for shift in conditions}
        run["temperature"] = calibrate_temperature(wrap, labelled).temperature
        for shift in conditions:
            comparison = comparisons[shift]
            calibrated = compare_estimates(wrap, val_loader(args.val_images, args.image_size, seed, "val", shift), atc_threshold=atc)
            errors = dict(comparison.errors)
            errors["errwrap+T"] = calibrated.errors["errwrap"]
            run["conditions"][shift] = {"truth": comparison.truth, "errors": errors, "interval": comparison.estimate.interval,
                                        "interval_T": calibrated.estimate.interval, "per_image": comparison.per_image}  # fmt: skip
            print(f"  {shift:<6} true pixAcc fused {_pts(comparison.truth['fused']['pixel_accuracy'])} base "
                  f"{_pts(comparison.truth['base']['pixel_accuracy'])}; estimates errwrap "
                  f"{_pts(errors['errwrap']['estimate_pixel_accuracy'])} errwrap+T {_pts(errors['errwrap+T']['estimate_pixel_accuracy'])} "
                  f"avg_conf {_pts(errors['avg_confidence']['estimate_pixel_accuracy'])} ATC {_pts(errors['atc']['estimate_pixel_accuracy'])}", flush=True)  # fmt: skip
        runs.append(run)

    metrics = ("pixel_accuracy", "miou", "per_image_mae", "spearman")
    agg = {c: {e: {m: mean_std([r["conditions"][c]["errors"][e][m] for r in runs]) for m in metrics} for e in ESTIMATORS} for c in conditions}
    rows = result_rows(runs, conditions)
    print(f"\nestimate vs truth on {args.val_images} held-out images per condition, mean over {len(runs)} seed(s) (points)")
    print(format_table(rows))

    def worst(e: str, m: str) -> float:
        return max(agg[c][e][m]["mean"] for c in conditions)

    targets = []
    for e in ("errwrap", "errwrap+T"):
        ind, shifted = agg["none"][e], [agg[c][e] for c in args.shifts]
        worst_shift = max((a["pixel_accuracy"]["mean"] for a in shifted), default=float("nan"))
        low_rho = min(agg[c][e]["spearman"]["mean"] for c in conditions)
        baseline_worst = min(worst("avg_confidence", "pixel_accuracy"), worst("atc", "pixel_accuracy"))
        targets += [
            {"estimator": e, "target": "pixAcc |err| <= 1 point in distribution", "value": _pts(ind["pixel_accuracy"]["mean"]), "met": ind["pixel_accuracy"]["mean"] <= 0.01},
            {"estimator": e, "target": "pixAcc |err| <= 3 points under shift (worst shift)", "value": _pts(worst_shift), "met": worst_shift <= 0.03},
            {"estimator": e, "target": "mIoU |err| <= 3 points (worst condition)", "value": _pts(worst(e, "miou")), "met": worst(e, "miou") <= 0.03},
            {"estimator": e, "target": "per-image Spearman >= 0.7 (worst condition)", "value": f"{low_rho:.3f}", "met": low_rho >= 0.7},
            {"estimator": e, "target": "worst-case pixAcc |err| below both baselines' worst case",
             "value": f"{_pts(worst(e, 'pixel_accuracy'))} vs {_pts(worst('avg_confidence', 'pixel_accuracy'))} / {_pts(worst('atc', 'pixel_accuracy'))}",
             "met": worst(e, "pixel_accuracy") < baseline_worst},
        ]  # fmt: skip
    print("\ntargets")
    print(format_table([{**t, "met": "yes" if t["met"] else "no"} for t in targets]))
    summary = {
        "benchmark": "estimate",
        "seeds": args.seeds,
        "conditions": conditions,
        "abs_error_pixel_accuracy": {c: {e: agg[c][e]["pixel_accuracy"]["mean"] for e in ESTIMATORS} for c in conditions},
        "abs_error_miou": {c: {e: agg[c][e]["miou"]["mean"] for e in ESTIMATORS} for c in conditions},
        "spearman": {c: {e: agg[c][e]["spearman"]["mean"] for e in ESTIMATORS} for c in conditions},
        "temperature": mean_std([r["temperature"] for r in runs])["mean"],
        "targets_met": {f"{t['estimator']}: {t['target']}": bool(t["met"]) for t in targets},
        "seconds": round(time.perf_counter() - start, 1),
    }
    config = {k: v for k, v in vars(args).items() if k != "json"}
    finish({**env, "config": config, "aggregate": agg, "runs": runs}, summary, args.json)
    return summary


if __name__ == "__main__":
    main()
