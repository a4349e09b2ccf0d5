"""Quality of the error map and of the correction on the built-in Scenes, over several seeds.

For each seed, ``errwrap.demo.run_demo`` builds training and held-out ``Scenes`` splits, trains a
small DeepLabV3+ from scratch, wraps it, fine-tunes the heads with the base frozen, and runs
``errwrap.evaluate`` on the held-out split with baselines MSP, entropy and MC dropout (T = 10).
This script gathers, as mean +- sample std over the seeds: the error head's AUROC, AUPR-Error
and FPR95 against the baselines, base and fused mIoU, and ECE before (base softmax) and after
(fused probabilities) the correction; then checks the targets.

Each seed's model is kept in ``--out/seed<k>/model`` (``mc_dropout.py --model`` can reuse it).

Example:
    python benchmarks/quality.py --seeds 0 1 2 --minutes 3 --json quality.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bar_plot, demo_config, environment, finish, format_table, mean_std, scenes_val_loader  # noqa: E402

SCORES = ("error_head", "msp", "entropy", "mc_dropout")
METRICS = ("auroc", "aupr_error", "fpr95")


def _pm(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} +- {100 * stats['std']:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=3.0, help="run_demo budget per seed")
    parser.add_argument("--encoder", default=None, help="base encoder (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=None, help="Scenes image size (default 96)")
    parser.add_argument("--no-mc-dropout", action="store_true", help="skip the MC dropout baseline")
    parser.add_argument("--out", default="bench-quality", help="folder for each seed's demo output and model")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tiny data, a few steps, 2 seeds)")
    parser.add_argument("--plot", metavar="PNG", help="write a bar plot of the error-detection metrics")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        args.seeds, args.minutes = args.seeds[:2], 0.05
    from errwrap import ErrorCorrectionWrapper, calibrate_temperature, evaluate
    from errwrap.demo import run_demo

    env = environment("cpu")
    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        cfg = demo_config(args.minutes, seed, args.tiny, mc_dropout=not args.no_mc_dropout, encoder=args.encoder, image_size=args.image_size)
        print(f"seed {seed}: run_demo ({args.minutes} min, {cfg.encoder}, {cfg.image_size} px, {cfg.train_images}/{cfg.val_images} images)", flush=True)
        result = run_demo(Path(args.out) / f"seed{seed}", cfg, say=lambda m: print("  " + m, flush=True))
        rep = result.report
        # temperature of the fused probabilities, fitted on a disjoint "test" split of the same size,
        # then the fused ECE on the held-out split again (labels, error map and mIoU do not change)
        wrap = ErrorCorrectionWrapper.from_pretrained(result.out_dir / "model")
        fit = calibrate_temperature(wrap, scenes_val_loader(cfg.val_images, cfg.image_size, seed, 8, split="test"))
        calibrated = evaluate(wrap, scenes_val_loader(cfg.val_images, cfg.image_size, seed, 8), baselines=())
        print(f"  fused temperature {fit.temperature:.3f} (fitted on {cfg.val_images} test-split images): fused ECE "
              f"{100 * rep.calibration['fused'].ece:.2f} -> {100 * calibrated.calibration['fused'].ece:.2f}", flush=True)
        runs.append({
            "seed": seed, "base_steps": result.base_steps, "head_steps": result.head_steps, "seconds": round(result.seconds, 1),
            "error_detection": {k: {m: getattr(v, m) for m in (*METRICS, "error_rate")} for k, v in rep.error_detection.items()},
            "miou": {"base": rep.base.miou, "fused": rep.fused.miou},
            "ece": {"base": rep.calibration["base"].ece, "fused": rep.calibration["fused"].ece, "fused_calibrated": calibrated.calibration["fused"].ece},
            "temperature": fit.temperature,
            "report": rep.to_dict(), "config": vars(cfg),
        })  # fmt: skip
    scores = [s for s in SCORES if s in runs[0]["error_detection"]]
    agg = {s: {m: mean_std([r["error_detection"][s][m] for r in runs]) for m in METRICS} for s in scores}
    miou = {k: mean_std([r["miou"][k] for r in runs]) for k in ("base", "fused")}
    gain = mean_std([r["miou"]["fused"] - r["miou"]["base"] for r in runs])
    ece = {k: mean_std([r["ece"][k] for r in runs]) for k in ("base", "fused", "fused_calibrated")}
    temperature = mean_std([r["temperature"] for r in runs])
    error_rate = mean_std([r["error_detection"]["error_head"]["error_rate"] for r in runs])

    n = len(runs)
    print(f"\nerror detection on the held-out split, mean +- std over {n} seeds (errors = wrong base labels, {100 * error_rate['mean']:.1f}% of pixels)")
    print(format_table([{"score": s, **{name: _pm(agg[s][m]) for name, m in (("AUROC", "auroc"), ("AUPR-Error", "aupr_error"), ("FPR95", "fpr95"))}} for s in scores]))
    print(f"\nsegmentation and calibration, mean +- std over {n} seeds")
    print(format_table([
        {"": "base", "mIoU": _pm(miou["base"]), "ECE": _pm(ece["base"])},
        {"": "fused (corrected)", "mIoU": _pm(miou["fused"]), "ECE": _pm(ece["fused"])},
        {"": f"fused, temperature {temperature['mean']:.2f}", "mIoU": "(same)", "ECE": _pm(ece["fused_calibrated"])},
        {"": "fused - base", "mIoU": _pm(gain), "ECE": ""},
    ]))  # fmt: skip
    per_seed = [{"seed": r["seed"], "base steps": r["base_steps"], "head steps": r["head_steps"], "s": r["seconds"],
                 "AUPR-E head": f"{100 * r['error_detection']['error_head']['aupr_error']:.2f}", "AUPR-E msp": f"{100 * r['error_detection']['msp']['aupr_error']:.2f}",
                 "FPR95 head": f"{100 * r['error_detection']['error_head']['fpr95']:.2f}", "FPR95 msp": f"{100 * r['error_detection']['msp']['fpr95']:.2f}",
                 "mIoU base": f"{100 * r['miou']['base']:.2f}", "mIoU fused": f"{100 * r['miou']['fused']:.2f}"} for r in runs]  # fmt: skip
    print("\nper seed")
    print(format_table(per_seed))

    head, msp = agg["error_head"], agg["msp"]
    d_aupr = head["aupr_error"]["mean"] - msp["aupr_error"]["mean"]
    d_fpr = head["fpr95"]["mean"] - msp["fpr95"]["mean"]
    targets = [
        {"target": "AUPR-Error: error head >= MSP + 5 points", "value": f"{100 * d_aupr:+.2f} points", "met": d_aupr >= 0.05},
        {"target": "FPR95: error head <= MSP - 5 points", "value": f"{100 * d_fpr:+.2f} points", "met": d_fpr <= -0.05},
        {"target": "mIoU: fused >= base + 1.0 point", "value": f"{100 * gain['mean']:+.2f} points", "met": gain["mean"] >= 0.01},
    ]
    if "mc_dropout" in agg:
        d_mc = head["aupr_error"]["mean"] - agg["mc_dropout"]["aupr_error"]["mean"]
        targets.append({"target": "AUPR-Error: error head >= MC dropout T=10", "value": f"{100 * d_mc:+.2f} points", "met": d_mc >= 0})
    targets.append({"target": "(no target) ECE fused vs base", "value": f"{100 * (ece['fused']['mean'] - ece['base']['mean']):+.2f} points", "met": "-"})
    targets.append({"target": "(no target) ECE fused + temperature vs base", "value": f"{100 * (ece['fused_calibrated']['mean'] - ece['base']['mean']):+.2f} points", "met": "-"})
    print(f"\ntargets (differences of the means over {n} seeds)")
    print(format_table([{**t, "met": t["met"] if isinstance(t["met"], str) else ("yes" if t["met"] else "no")} for t in targets]))
    if args.plot:
        groups = ["AUROC", "AUPR-Error", "FPR95 (lower is better)"]
        series = {s: [100 * agg[s][m]["mean"] for m in METRICS] for s in scores}
        errors = {s: [100 * agg[s][m]["std"] for m in METRICS] for s in scores}
        bar_plot(args.plot, f"error detection on held-out Scenes, mean +- std over {n} seeds (%)", groups, series, errors=errors, value_format="{:.1f}")
        print(f"wrote {args.plot}")
    summary = {
        "benchmark": "quality",
        "seeds": args.seeds,
        "aupr_error": {s: agg[s]["aupr_error"]["mean"] for s in scores},
        "fpr95": {s: agg[s]["fpr95"]["mean"] for s in scores},
        "auroc": {s: agg[s]["auroc"]["mean"] for s in scores},
        "miou_base": miou["base"]["mean"],
        "miou_fused": miou["fused"]["mean"],
        "ece_base": ece["base"]["mean"],
        "ece_fused": ece["fused"]["mean"],
        "ece_fused_calibrated": ece["fused_calibrated"]["mean"],
        "temperature": temperature["mean"],
        "targets_met": {t["target"]: t["met"] for t in targets if not isinstance(t["met"], str)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    aggregate = {"error_detection": agg, "miou": miou, "miou_gain": gain, "ece": ece, "error_rate": error_rate}
    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    finish({**env, "config": config, "aggregate": aggregate, "runs": runs}, summary, args.json)
    return summary


if __name__ == "__main__":
    main()
