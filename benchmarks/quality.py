"""Quality of errwrap's error maps and correction over data families, base architectures, shifts
and seeds, against the free and the costly baselines, reported cell by cell and by the worst cell.

For every data family (``errwrap.data.GENERATED``: generated scenes, aerial tiles, cells), every
base architecture and every seed, the script

1. trains a small base from scratch on the family's training split (plain cross-entropy):
   ``deeplabv3plus`` is errwrap's DeepLabV3+ (resnet18, output stride 16, a stride-4 decoder that
   returns its features); ``stride8`` is a timm resnet18 cut after its third stage, dilated to
   output stride 8, with a 1x1 classifier: logits only, no decoder, so errwrap taps two of its
   modules itself. With ``--ensemble K`` it trains K - 1 more bases of the same kind from other
   seeds for the deep-ensemble baseline;
2. wraps the base with ``ErrorCorrectionWrapper(base)`` and trains the heads with
   ``errwrap.finetune(wrap, loader, steps=--head-steps)``: every other setting is the default,
   as a user would run it;
3. fits the temperature of the temperature-scaled MSP baseline on a disjoint labelled split;
4. evaluates on the held-out split as it is (``clean``) and under each corruption of
   ``errwrap.data.CORRUPTIONS`` at ``--severity`` (shifts neither the base nor the heads saw).

In each cell (family, base, condition) it measures, exactly (every pixel, sorted scores):

- errors of the **base's labels**: AUROC, AUPR-Error and FPR95 of ``out.base_error_prob``, of the
  error head alone (``out.head_error_prob``, the paper's map), and of the baselines MSP, entropy,
  max-logit, energy, temperature-scaled MSP, MC dropout (T = 10) and the deep ensemble;
- errors of the **returned labels**: AURC and E-AURC of ``(out.labels, out.error_prob)`` against
  ``(base labels, MSP)`` and ``(ensemble labels, ensemble confidence)``;
- mIoU of the base, of ``out.labels`` and of the ensemble.

Then it checks the targets in every cell and prints the worst cell of each.

Example (the published run, about 1 h on 2 CPU cores)::

    python benchmarks/quality.py --seeds 0 1 --json quality.json --plot risk_coverage.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, finish, format_table, mean_std  # noqa: E402

BASES = ("deeplabv3plus", "stride8")
BASE_SCORES = (
    "errwrap",
    "error_head",
    "msp",
    "entropy",
    "max_logit",
    "energy",
    "temperature_msp",
    "mc_dropout",
    "ensemble",
)
TARGETS = {
    "aupr": "AUPR-Error of out.base_error_prob >= MSP + 5 points",
    "aurc": "AURC of (out.labels, out.error_prob) <= 0.8 x AURC of (base labels, MSP)",
    "miou": "mIoU of out.labels >= base + 1 point (clean), >= base - 0.5 point (shifted)",
}


class Stride8(nn.Module):
    """A base without a decoder: timm resnet18 up to its third stage at output stride 8, and a
    1x1 classifier; returns logits only (at stride 8)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        import timm

        self.encoder = timm.create_model(
            "resnet18", pretrained=False, features_only=True, out_indices=(3,), output_stride=8
        )
        self.classifier = nn.Conv2d(self.encoder.feature_info.channels()[-1], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x)[-1])


def build_base(kind: str, num_classes: int, seed: int) -> nn.Module:
    from errwrap.models import DeepLabV3Plus

    torch.manual_seed(seed)
    if kind == "deeplabv3plus":
        return DeepLabV3Plus(
            "resnet18",
            num_classes=num_classes,
            output_stride=16,
            aspp_channels=64,
            decoder_channels=64,
            low_level_channels=24,
        )
    if kind == "stride8":
        return Stride8(num_classes)
    raise ValueError(f"base: expected one of {BASES}, got {kind!r}")


def base_logits_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def train_base(model: nn.Module, loader: DataLoader, steps: int, lr: float) -> nn.Module:
    """Cross-entropy from scratch: AdamW, 20 warm-up steps, then poly decay."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    step = 0
    while step < steps:
        for images, labels in loader:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps) ** 0.9
            loss = F.cross_entropy(base_logits_of(model, images), labels, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return model.eval()


def _miou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    cm = np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    present = cm.sum(1) > 0
    return float(np.mean(inter[present] / np.maximum(union[present], 1)))


def evaluate_condition(
    wrap, scores: dict[str, Any], ensemble: Any, loader: DataLoader, num_classes: int
) -> dict[str, Any]:
    """Every pixel's scores and errors under one condition, then the exact metrics."""
    from errwrap.metrics import exact_error_detection, exact_risk_coverage, image_aurc, risk_coverage_curve

    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in (*BASE_SCORES, "returned", "truth", "base_pred", "pred", "ens_pred")
    }
    per_image: dict[str, list[float]] = {k: [] for k in ("returned_mean", "returned_err", "msp_mean", "base_err")}
    with torch.no_grad():
        for images, labels in loader:
            out = wrap(images)
            valid = labels != 255
            z0 = out.base_logits
            values = {"errwrap": out.base_error_prob, "error_head": out.head_error_prob}
            for name, score in scores.items():
                values[name] = score(wrap, images, base_logits=z0, output=out).score
            ens = ensemble(wrap, images, base_logits=z0, output=out) if ensemble is not None else None
            if ens is not None:
                values["ensemble"] = ens.score
                cols["ens_pred"].append(ens.prediction[valid].numpy())
            for name, v in values.items():
                cols[name].append(v.float()[valid].numpy())
            cols["returned"].append(out.error_prob[valid].numpy())
            cols["truth"].append(labels[valid].numpy())
            cols["base_pred"].append(out.base_labels[valid].numpy())
            cols["pred"].append(out.labels[valid].numpy())
            for i in range(images.shape[0]):
                v = valid[i]
                per_image["returned_mean"].append(float(out.error_prob[i][v].mean()))
                per_image["returned_err"].append(float((out.labels[i] != labels[i])[v].float().mean()))
                per_image["msp_mean"].append(float(values["msp"][i][v].mean()))
                per_image["base_err"].append(float((out.base_labels[i] != labels[i])[v].float().mean()))
    a = {k: np.concatenate(v) for k, v in cols.items() if v}
    base_err, ret_err = a["base_pred"] != a["truth"], a["pred"] != a["truth"]
    judged = {"errwrap": ("returned", ret_err), "base_msp": ("msp", base_err)}
    if ensemble is not None:
        judged["ensemble"] = ("ensemble", a["ens_pred"] != a["truth"])
    detection = {}
    for name in BASE_SCORES:
        if name in a:
            r = exact_error_detection(a[name], base_err if name != "ensemble" else judged["ensemble"][1])
            detection[name] = {"auroc": r.auroc, "aupr_error": r.aupr_error, "fpr95": r.fpr95}
    rc = {k: exact_risk_coverage(a[score], err) for k, (score, err) in judged.items()}
    curves = {}
    for k, (score, err) in judged.items():
        coverage, risk = risk_coverage_curve(a[score], err)
        keep = np.unique(np.linspace(0, len(coverage) - 1, min(len(coverage), 400)).round().astype(int))
        curves[k] = (coverage[keep].tolist(), risk[keep].tolist())
    return {
        "error_rate": {k: float(err.mean()) for k, (_, err) in judged.items()}
        | {"base": float(base_err.mean()), "returned": float(ret_err.mean())},
        "detection": detection,
        "aurc": {k: v.aurc for k, v in rc.items()},
        "eaurc": {k: v.eaurc for k, v in rc.items()},
        "curves": curves,
        "image_aurc": {
            "errwrap": image_aurc(per_image["returned_mean"], per_image["returned_err"]).aurc,
            "base_msp": image_aurc(per_image["msp_mean"], per_image["base_err"]).aurc,
        },
        "miou": {
            k: _miou(a[p], a["truth"], num_classes)
            for k, p in (("base", "base_pred"), ("errwrap", "pred"), ("ensemble", "ens_pred"))
            if p in a
        },
    }


def run_cell(family: str, base_kind: str, seed: int, args: argparse.Namespace, say) -> dict[str, Any]:
    """Train (base, ensemble members, heads) for one (family, base, seed), then every condition."""
    import errwrap
    from errwrap import ErrorCorrectionWrapper
    from errwrap.data import (
        CORRUPTIONS,
        IMAGENET_MEAN,
        IMAGENET_STD,
        Compose,
        Corrupt,
        Normalize,
        RandomHorizontalFlip,
        generated,
    )
    from errwrap.scores import EnsembleScore, TemperatureMSPScore, build_score

    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    size = args.image_size

    def loader(split: str, n: int, train: bool = False, corrupt: Any = None, seed_offset: int = 0) -> DataLoader:
        steps = [RandomHorizontalFlip()] if train else []
        if corrupt is not None:
            steps.append(corrupt.joint)
        ds = generated(family, n, size=size, seed=seed + 1000 * seed_offset, split=split,
                       transform=Compose([*steps, norm]), cache=True)  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=args.batch_size, shuffle=train, drop_last=train, generator=g)

    t0 = time.perf_counter()
    train = loader("train", args.train_images, train=True)
    num_classes = train.dataset.num_classes
    members = []
    for k in range(args.ensemble if seed in args.ensemble_seeds else 1):
        members.append(
            train_base(build_base(base_kind, num_classes, seed + 1000 * k), train, args.base_steps, args.base_lr)
        )
    base = members[0]
    say(f"  bases trained ({len(members)}, {time.perf_counter() - t0:.0f}s)")
    options: dict[str, Any] = {}
    if args.head_width is not None:
        options.update(error_channels=args.head_width, detail_channels=args.head_width)
    if args.head_fusion == "features":
        options["fuse_at_features"] = True
    wrap = ErrorCorrectionWrapper(base, **options)
    extra: dict[str, Any] = {} if args.head_augment == "default" else {"augment": None}
    if args.head_focus is not None:
        extra["loss"] = errwrap.ErrorCorrectionLoss(focus=args.head_focus)
    heads = train if args.head_data == "train" else loader("train", args.train_images, train=True, seed_offset=1)
    errwrap.finetune(wrap, heads, steps=args.head_steps, progress=False, log_every=None, **extra)
    wrap.eval()
    say(f"  heads trained ({time.perf_counter() - t0:.0f}s)")
    temp_msp = TemperatureMSPScore.fit(wrap, loader("test", args.val_images))
    scores = {
        "msp": build_score("msp"),
        "entropy": build_score("entropy"),
        "max_logit": build_score("max_logit"),
        "energy": build_score("energy"),
        "temperature_msp": temp_msp,
        "mc_dropout": build_score("mc_dropout", T=10, seed=seed),
    }
    ensemble = EnsembleScore(members) if len(members) > 1 else None
    conditions = {
        "clean": None,
        **{kind: Corrupt(kind, args.severity, seed=seed) for kind in (args.shifts or CORRUPTIONS)},
    }
    results = {}
    for name, corrupt in conditions.items():
        results[name] = evaluate_condition(
            wrap, scores, ensemble, loader("val", args.val_images, corrupt=corrupt), num_classes
        )
        r = results[name]
        say(
            f"  {name:6s} base err {100 * r['error_rate']['base']:5.1f}%  mIoU {100 * r['miou']['base']:.1f} -> "
            f"{100 * r['miou']['errwrap']:.1f}  "
            f"AUPR-E errwrap {100 * r['detection']['errwrap']['aupr_error']:.1f} msp "
            f"{100 * r['detection']['msp']['aupr_error']:.1f}  "
            f"AURC {100 * r['aurc']['errwrap']:.2f} vs {100 * r['aurc']['base_msp']:.2f}"
        )
    return {"family": family, "base": base_kind, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
            "temperature_msp": temp_msp.temperature, "conditions": results}  # fmt: skip


def cell_checks(condition: str, r: dict[str, Any]) -> dict[str, float]:
    """The three target margins of one cell (>= 0 means met)."""
    need = 0.01 if condition == "clean" else -0.005
    return {
        "aupr": r["detection"]["errwrap"]["aupr_error"] - r["detection"]["msp"]["aupr_error"] - 0.05,
        "aurc": 0.8 * r["aurc"]["base_msp"] - r["aurc"]["errwrap"],
        "miou": r["miou"]["errwrap"] - r["miou"]["base"] - need,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds per cell (family, base, condition), the table rows and the worst cells."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        for cond, r in run["conditions"].items():
            cells.setdefault((run["family"], run["base"], cond), []).append(r)
    rows, margins = [], {}
    for (family, base, cond), rs in cells.items():
        m = lambda f, rs=rs: mean_std([f(r) for r in rs])["mean"]  # noqa: E731
        checks = {k: m(lambda r, k=k, cond=cond: cell_checks(cond, r)[k]) for k in TARGETS}
        margins[(family, base, cond)] = checks
        rows.append({
            "family": family, "base": base, "condition": cond,
            "err base": f"{100 * m(lambda r: r['error_rate']['base']):.1f}",
            "err out": f"{100 * m(lambda r: r['error_rate']['returned']):.1f}",
            "mIoU base": f"{100 * m(lambda r: r['miou']['base']):.1f}",
            "mIoU out": f"{100 * m(lambda r: r['miou']['errwrap']):.1f}",
            "mIoU ens": f"{100 * m(lambda r: r['miou'].get('ensemble')):.1f}",
            **{
                f"AP {s}": f"{100 * m(lambda r, s=s: r['detection'].get(s, {}).get('aupr_error')):.1f}"
                for s in BASE_SCORES
            },
            "AURC out": f"{100 * m(lambda r: r['aurc']['errwrap']):.2f}",
            "AURC msp": f"{100 * m(lambda r: r['aurc']['base_msp']):.2f}",
            "AURC ens": f"{100 * m(lambda r: r['aurc'].get('ensemble')):.2f}",
            "img AURC out": f"{100 * m(lambda r: r['image_aurc']['errwrap']):.2f}",
            "img AURC msp": f"{100 * m(lambda r: r['image_aurc']['base_msp']):.2f}",
        })  # fmt: skip
    worst = {}
    for key in TARGETS:
        cell = min(margins, key=lambda c: margins[c][key])
        met = sum(margins[c][key] >= 0 for c in margins)
        worst[key] = {"cell": "/".join(cell), "margin": margins[cell][key], "cells_met": met, "cells": len(margins)}
    return {"rows": rows, "worst": worst, "margins": {"/".join(k): v for k, v in margins.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from errwrap.data import CORRUPTIONS, GENERATED

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=list(GENERATED), choices=list(GENERATED))
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--shifts", nargs="+", default=list(CORRUPTIONS), choices=list(CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=3, help="severity of the corruptions, 1..5")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--val-images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--base-steps", type=int, default=500)
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--head-steps", type=int, default=600, help="errwrap.finetune steps (its defaults otherwise)")
    parser.add_argument(
        "--head-augment", choices=("default", "none"), default="default",
        help="finetune's augment: its default ('photometric'), or none (the A/B of docs/benchmarks.md section 4)",
    )  # fmt: skip
    parser.add_argument(
        "--head-data", choices=("train", "heldout"), default="train",
        help="train the heads on the base's own training images, or on as many other images of the family "
        "(drawn with another seed) that the base never saw",
    )  # fmt: skip
    parser.add_argument(
        "--head-width", type=int, default=None,
        help="error_channels and detail_channels of the heads (default: the wrapper's defaults)",
    )  # fmt: skip
    parser.add_argument(
        "--head-fusion", choices=("default", "features"), default="default",
        help="where the wrapper fuses: its default (the output's resolution), or at the features' "
        "(fuse_at_features=True, the A/B of docs/benchmarks.md section 4)",
    )  # fmt: skip
    parser.add_argument(
        "--head-focus", type=float, default=None,
        help="focus of the detail loss (extra weight of the base's wrong pixels; default: ErrorCorrectionLoss's, 4)",
    )  # fmt: skip
    parser.add_argument("--ensemble", type=int, default=3, help="bases in the deep ensemble (1: none)")
    parser.add_argument(
        "--ensemble-seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds whose cells train the ensemble (it costs K base trainings)",
    )
    parser.add_argument(
        "--cells-dir",
        metavar="DIR",
        help="keep each (family, base, seed) result here as JSON and reuse it when present "
        "(to resume, or to run families in parallel processes and aggregate with a last run)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="seconds-long smoke run (one family, one base, a few steps)"
    )
    parser.add_argument("--plot", metavar="PNG", help="risk-coverage plot of the worst AURC cell")
    parser.add_argument("--json", metavar="PATH", help="write every cell as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        args.families, args.bases, args.shifts, args.seeds = (
            args.families[:1],
            args.bases[:1],
            args.shifts[:1],
            args.seeds[:1],
        )
        args.image_size, args.train_images, args.val_images, args.base_steps, args.head_steps, args.ensemble = (
            32,
            16,
            4,
            3,
            3,
            2,
        )
        args.ensemble_seeds = args.seeds
    env = environment("cpu")
    start = time.perf_counter()
    runs = []
    cells_dir = Path(args.cells_dir) if args.cells_dir else None
    for family in args.families:
        for base in args.bases:
            for seed in args.seeds:
                cached = cells_dir / f"{family}-{base}-seed{seed}.json" if cells_dir else None
                if cached is not None and cached.exists():
                    print(f"{family} / {base} / seed {seed}: from {cached}", flush=True)
                    runs.append(json.loads(cached.read_text()))
                    continue
                print(f"{family} / {base} / seed {seed}", flush=True)
                runs.append(run_cell(family, base, seed, args, say=lambda m: print(m, flush=True)))
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(json.dumps(runs[-1]))
    summary = summarize(runs)
    print(
        f"\nevery cell, mean over seeds {args.seeds} (%; AP = AUPR-Error of the base's errors; errwrap = "
        "out.base_error_prob, "
        "error_head = the error head alone; AURC of returned labels: out = (out.labels, out.error_prob), msp = (base "
        "labels, MSP))"
    )
    print(format_table(summary["rows"]))
    print("\ntargets, worst cell over families x bases x conditions")
    table = [{"target": TARGETS[k], "worst cell": w["cell"], "margin": f"{100 * w['margin']:+.2f}",
              "cells met": f"{w['cells_met']}/{w['cells']}",
              "met": "yes" if w["margin"] >= 0 else "no"} for k, w in summary["worst"].items()]  # fmt: skip
    print(format_table(table))
    if args.plot:
        from errwrap.viz import risk_coverage_plot

        cell = summary["worst"]["aurc"]["cell"].split("/")
        run = next(r for r in runs if (r["family"], r["base"]) == tuple(cell[:2]))
        curves = run["conditions"][cell[2]]["curves"]
        names = {
            "errwrap": "errwrap (out.labels, out.error_prob)",
            "base_msp": "base (labels, MSP)",
            "ensemble": f"ensemble of {args.ensemble}",
        }
        risk_coverage_plot(
            {names[k]: (np.asarray(c), np.asarray(r)) for k, (c, r) in curves.items()},
            args.plot,
            title=f"risk-coverage, worst AURC cell {'/'.join(cell)} seed {run['seed']}",
        )
        print(f"wrote {args.plot}")
    out = {
        "benchmark": "quality",
        "worst": summary["worst"],
        "targets": TARGETS,
        "targets_met": {k: w["margin"] >= 0 for k, w in summary["worst"].items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    for run in runs:
        for r in run["conditions"].values():
            r.pop("curves", None)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    finish({**env, "config": config, "cells": summary, "runs": runs}, out, args.json)
    return out


if __name__ == "__main__":
    main()
