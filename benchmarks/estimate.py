"""Label-free accuracy estimates against the truth, in distribution and under corruptions.

For each data family (``errwrap.data.generated``: ``scenes``, ``aerial``, ``cells``), base and
seed, the base is trained from scratch with cross-entropy, wrapped, and its heads fine-tuned with
the base frozen (the demo's learning rates; ``finetune``'s default ``calibrate=True`` then fits the
fused temperature on the heads' first 32 training batches, so ``errwrap`` is what a user gets).
The bases are the quality benchmark's (``benchmarks/quality.py``): ``deeplabv3plus``, a small
DeepLabV3+ (resnet18, output stride 16, the demo's widths), and ``stride8``, a timm resnet18 at
output stride 8 with a 1x1 classifier that returns logits only.
Then, with the labels hidden from the estimators:

* the ATC threshold is fitted (:func:`errwrap.fit_atc`) on the labelled ``"test"`` split;
* :func:`errwrap.compare_estimates` runs on the held-out ``"val"`` split as it is (in
  distribution) and under each :class:`errwrap.data.Corrupt` shift (default: every kind at
  severity 3), applied to the ``[0, 1]`` image before normalisation;
* it runs again after :func:`errwrap.calibrate_temperature` has refitted the temperature of the
  fused probabilities on the same labelled ``"test"`` split (``errwrap+T``; the labels do not change);
* for errwrap, errwrap+T, average confidence and ATC it reports the absolute error of the data-set
  pixel accuracy and mIoU estimates, and the per-image MAE and Spearman correlation with the
  truth. errwrap's estimate describes the corrected labels, the baselines the base labels; each is
  measured against the labels it describes.

Example:
    python benchmarks/estimate.py --families scenes --seeds 0 --json estimate.json
    python benchmarks/estimate.py --families scenes aerial cells --bases stride8 --json estimate_stride8.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, finish, format_table, mean_std, setup_logging  # noqa: E402
from quality import BASES, base_logits_of, build_base  # noqa: E402

ESTIMATORS = ("errwrap", "errwrap+T", "avg_confidence", "atc")
FAMILIES = ("scenes", "aerial", "cells")
SHIFTS = ("blur", "fog", "noise", "dark", "jpeg")  # errwrap.data.CORRUPTIONS


def _pts(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def loader(
    family: str,
    num_images: int,
    size: int,
    seed: int,
    split: str,
    shift: str | None,
    severity: int,
    train: bool = False,
) -> Any:
    """A split of a generated family, corrupted (``shift``) and normalised; shuffled when ``train``."""
    from torch.utils.data import DataLoader

    from errwrap.data import IMAGENET_MEAN, IMAGENET_STD, Compose, Corrupt, Normalize, RandomHorizontalFlip, generated

    steps: list[Any] = [RandomHorizontalFlip()] if train else []
    if shift is not None:
        steps.append(Corrupt(shift, severity, seed=seed).joint)
    steps.append(Normalize(IMAGENET_MEAN, IMAGENET_STD))
    dataset = generated(family, num_images, size=size, seed=seed, split=split, transform=Compose(steps), cache=True)
    return DataLoader(
        dataset, batch_size=8, shuffle=train, drop_last=train, generator=torch.Generator().manual_seed(seed)
    )


def train_wrapper(family: str, base_kind: str, seed: int, args: argparse.Namespace) -> Any:
    """The base trained from scratch (AdamW, warm-up then poly decay) and the heads fine-tuned."""
    from errwrap import ErrorCorrectionWrapper, finetune

    train = loader(family, args.train_images, args.image_size, seed, "train", None, 0, train=True)
    base = build_base(base_kind, train.dataset.num_classes, seed)
    opt = torch.optim.AdamW(base.parameters(), lr=2e-3, weight_decay=1e-4)
    base.train()
    step = 0
    while step < args.base_steps:
        for images, labels in train:
            for group in opt.param_groups:
                group["lr"] = 2e-3 * min(1.0, (step + 1) / 20) * (1 - step / args.base_steps) ** 0.9
            loss = F.cross_entropy(base_logits_of(base, images), labels, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == args.base_steps:
                break
    base.eval()
    wrap = ErrorCorrectionWrapper(base, sample_size=args.image_size)
    heads = loader(family, args.train_images, args.image_size, seed + 1, "train", None, 0, train=True)
    finetune(
        wrap,
        heads,
        steps=args.head_steps,
        lr=5e-3,
        warmup_steps=min(50, args.head_steps // 10),
        seed=seed,
        progress=False,
        log_every=None,
    )
    return wrap.eval()


def result_rows(runs: list[dict[str, Any]], conditions: list[str]) -> list[dict[str, str]]:
    """One table row per condition and estimator: truth of the labels it describes, its estimate,
    its errors (means over the runs)."""
    rows = []
    for c in conditions:
        for e in ESTIMATORS:
            target = runs[0]["conditions"][c]["errors"][e]["target"]

            def mean(get: Any, c: str = c) -> float:
                return mean_std([get(r["conditions"][c]) for r in runs])["mean"]

            rows.append({
                "shift": c, "estimator": e, "labels": target,
                "true pixAcc": _pts(mean(lambda x, target=target: x["truth"][target]["pixel_accuracy"])),
                "estimate": _pts(mean(lambda x, e=e: x["errors"][e]["estimate_pixel_accuracy"])),
                "|err| pixAcc": _pts(mean(lambda x, e=e: x["errors"][e]["pixel_accuracy"])),
                "|err| mIoU": _pts(mean(lambda x, e=e: x["errors"][e]["miou"])),
                "img MAE": _pts(mean(lambda x, e=e: x["errors"][e]["per_image_mae"])),
                "Spearman": f"{mean(lambda x, e=e: x['errors'][e]['spearman']):.3f}",
            })  # fmt: skip
    return rows


def one_run(family: str, base_kind: str, seed: int, args: argparse.Namespace, conditions: list[str]) -> dict[str, Any]:
    """Train, fit ATC and the temperature, and compare every estimator under every condition."""
    from errwrap import calibrate_temperature, compare_estimates, fit_atc

    start = time.perf_counter()
    wrap = train_wrapper(family, base_kind, seed, args)
    seconds_train = time.perf_counter() - start

    def held_out(shift: str) -> Any:
        return loader(
            family, args.val_images, args.image_size, seed, "val", None if shift == "none" else shift, args.severity
        )

    labelled = loader(family, args.val_images, args.image_size, seed, "test", None, 0)
    atc = fit_atc(wrap, labelled)
    raw = {shift: compare_estimates(wrap, held_out(shift), atc_threshold=atc) for shift in conditions}
    temperature = calibrate_temperature(wrap, labelled).temperature
    run: dict[str, Any] = {"family": family, "base": base_kind, "seed": seed, "atc_threshold": atc,
                           "temperature": temperature, "seconds_train": round(seconds_train, 1),
                           "conditions": {}}  # fmt: skip
    for shift in conditions:
        calibrated = compare_estimates(wrap, held_out(shift), atc_threshold=atc)
        errors = dict(raw[shift].errors)
        errors["errwrap+T"] = calibrated.errors["errwrap"]
        run["conditions"][shift] = {"truth": raw[shift].truth, "errors": errors,
                                    "interval": raw[shift].estimate.interval,
                                    "interval_T": calibrated.estimate.interval,
                                    "per_image": raw[shift].per_image}  # fmt: skip
        print(f"  {shift:<6} true pixAcc fused {_pts(raw[shift].truth['fused']['pixel_accuracy'])} base "
              f"{_pts(raw[shift].truth['base']['pixel_accuracy'])}; estimates errwrap "
              f"{_pts(errors['errwrap']['estimate_pixel_accuracy'])} "
              f"errwrap+T {_pts(errors['errwrap+T']['estimate_pixel_accuracy'])} avg_conf "
              f"{_pts(errors['avg_confidence']['estimate_pixel_accuracy'])} ATC "
              f"{_pts(errors['atc']['estimate_pixel_accuracy'])}", flush=True)  # fmt: skip
    return run


def targets_of(agg: dict[str, Any], conditions: list[str], shifts: list[str]) -> list[dict[str, Any]]:
    """The issue's targets for errwrap and errwrap+T over one family's conditions."""

    def worst(e: str, m: str) -> float:
        return max(agg[c][e][m]["mean"] for c in conditions)

    targets = []
    for e in ("errwrap", "errwrap+T"):
        ind = agg["none"][e]
        worst_shift = max((agg[c][e]["pixel_accuracy"]["mean"] for c in shifts), default=float("nan"))
        low_rho = min(agg[c][e]["spearman"]["mean"] for c in conditions)
        baseline_worst = min(worst("avg_confidence", "pixel_accuracy"), worst("atc", "pixel_accuracy"))
        targets += [
            {"estimator": e, "target": "pixAcc |err| <= 1 point in distribution",
             "value": _pts(ind["pixel_accuracy"]["mean"]), "met": ind["pixel_accuracy"]["mean"] <= 0.01},
            {"estimator": e, "target": "pixAcc |err| <= 3 points under shift (worst shift)",
             "value": _pts(worst_shift), "met": worst_shift <= 0.03},
            {"estimator": e, "target": "mIoU |err| <= 3 points (worst condition)",
             "value": _pts(worst(e, "miou")), "met": worst(e, "miou") <= 0.03},
            {"estimator": e, "target": "per-image Spearman >= 0.7 (worst condition)",
             "value": f"{low_rho:.3f}", "met": low_rho >= 0.7},
            {"estimator": e, "target": "worst-case pixAcc |err| below both baselines' worst case",
             "value": f"{_pts(worst(e, 'pixel_accuracy'))} vs {_pts(worst('avg_confidence', 'pixel_accuracy'))} / "
                      f"{_pts(worst('atc', 'pixel_accuracy'))}",
             "met": worst(e, "pixel_accuracy") < baseline_worst},
        ]  # fmt: skip
    return targets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=["scenes"], choices=FAMILIES)
    parser.add_argument(
        "--bases", nargs="+", default=["deeplabv3plus"], choices=BASES, help="benchmarks/quality.py's bases"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument(
        "--val-images",
        type=int,
        default=64,
        help="held-out images per condition (and labelled images for ATC and the temperature)",
    )
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--head-steps", type=int, default=300)
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=SHIFTS, help="errwrap.data.Corrupt kinds")
    parser.add_argument("--severity", type=int, default=3, choices=range(1, 6))
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tiny data, a few steps)")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    args = parser.parse_args(argv)
    setup_logging()
    if args.tiny:
        args.seeds, args.image_size, args.train_images, args.val_images, args.base_steps, args.head_steps = (
            args.seeds[:1],
            32,
            16,
            8,
            4,
            4,
        )

    env = environment("cpu")
    start = time.perf_counter()
    conditions = ["none", *args.shifts]
    runs, aggregate, targets = [], {}, []
    groups = [f"{family}/{base_kind}" for family in args.families for base_kind in args.bases]
    for group in groups:
        family, base_kind = group.split("/")
        family_runs = []
        for seed in args.seeds:
            print(f"{family}, {base_kind}, seed {seed}: {args.image_size} px, {args.train_images} training images, "
                  f"{args.base_steps} base + {args.head_steps} head steps", flush=True)  # fmt: skip
            family_runs.append(one_run(family, base_kind, seed, args, conditions))
        runs += family_runs
        metrics = ("pixel_accuracy", "miou", "per_image_mae", "spearman")
        agg = {
            c: {
                e: {m: mean_std([r["conditions"][c]["errors"][e][m] for r in family_runs]) for m in metrics}
                for e in ESTIMATORS
            }
            for c in conditions
        }
        aggregate[group] = agg
        print(f"\n{group}: estimate vs truth on {args.val_images} held-out images per condition (shifts at severity "
              f"{args.severity}), mean over {len(family_runs)} seed(s) (points)")  # fmt: skip
        print(format_table(result_rows(family_runs, conditions)))
        family_targets = [{"family": group, **t} for t in targets_of(agg, conditions, args.shifts)]
        print(f"\n{group}: targets")
        print(format_table([{**t, "met": "yes" if t["met"] else "no"} for t in family_targets]))
        targets += family_targets
        print()

    def table(metric: str) -> dict[str, Any]:
        return {g: {c: {e: aggregate[g][c][e][metric]["mean"] for e in ESTIMATORS} for c in conditions} for g in groups}

    summary = {
        "benchmark": "estimate",
        "families": args.families,
        "bases": args.bases,
        "seeds": args.seeds,
        "conditions": conditions,
        "abs_error_pixel_accuracy": table("pixel_accuracy"),
        "abs_error_miou": table("miou"),
        "spearman": table("spearman"),
        "temperature": {
            g: mean_std([r["temperature"] for r in runs if f"{r['family']}/{r['base']}" == g])["mean"] for g in groups
        },
        "targets_met": {f"{t['family']} {t['estimator']}: {t['target']}": bool(t["met"]) for t in targets},
        "seconds": round(time.perf_counter() - start, 1),
    }
    config = {k: v for k, v in vars(args).items() if k != "json"}
    finish({**env, "config": config, "aggregate": aggregate, "runs": runs}, summary, args.json)
    return summary


if __name__ == "__main__":
    main()
