"""The error head's map against Monte Carlo dropout (T = 10 and T = 20) on the same base.

The model is a small DeepLabV3+ trained on the built-in ``Scenes`` by ``errwrap.demo.run_demo``
(base trained from scratch, heads fine-tuned with the base frozen), or one saved by it
(``--model DIR``, e.g. a ``model/`` folder written by ``benchmarks/quality.py``).

Speed: in interleaved rounds, on the same batch, time

* ``errwrap``: one wrapper forward and what a user reads from it (corrected labels, both error maps);
* ``errwrap error map``: the base plus the error head only;
* ``mc_dropout T``: ``MCDropoutScore(T)`` as ``errwrap.evaluate`` runs it: one deterministic base
  pass (the prediction being judged) plus ``T`` passes of the whole base with dropout on.

Speed is measured at the data's image size and at ``--time-size`` (a larger input; weights
do not matter for time). Quality: ``errwrap.evaluate`` on the held-out split with baselines MSP,
entropy and MC dropout (predictive entropy over the T passes) for each T.

Example:
    python benchmarks/mc_dropout.py --minutes 2 --json mc.json
    python benchmarks/mc_dropout.py --model bench-quality/seed0/model
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    bar_plot,
    demo_config,
    environment,
    finish,
    format_table,
    interleaved_times,
    quartiles,
    scenes_val_loader,
)

TARGET_SPEEDUP = 9.0


def _load_or_train(args: argparse.Namespace, say: Any) -> tuple[Any, dict[str, Any]]:
    from errwrap import ErrorCorrectionWrapper

    if args.model:
        wrap = ErrorCorrectionWrapper.from_pretrained(args.model).eval()
        settings: dict[str, Any] = {"model": str(args.model)}
        metrics = Path(args.model).parent / "metrics.json"
        if metrics.exists():  # the data settings of the run that trained it
            demo = json.loads(metrics.read_text()).get("demo", {})
            settings.update(
                {
                    k: demo[k]
                    for k in ("seed", "image_size", "val_images", "encoder", "base_steps", "head_steps")
                    if k in demo
                }
            )
        return wrap, settings
    from errwrap.demo import run_demo

    cfg = demo_config(args.minutes, args.seed, args.tiny, mc_dropout=False)
    say(f"training with errwrap.demo.run_demo ({args.minutes} min budget, {cfg.encoder}, {cfg.image_size} px)")
    result = run_demo(Path(args.out) / "demo", cfg, say=lambda m: say("  " + m))
    wrap = ErrorCorrectionWrapper.from_pretrained(result.out_dir / "model").eval()
    settings = {
        **vars(cfg),
        "base_steps": result.base_steps,
        "head_steps": result.head_steps,
        "train_seconds": round(result.seconds, 1),
    }
    return wrap, settings


def _timing(wrap: Any, x: torch.Tensor, Ts: list[int], repeats: int, warmup: int) -> dict[str, Any]:
    from errwrap.scores import MCDropoutScore

    def errwrap_full() -> Any:
        with torch.no_grad():
            out = wrap(x)
            return out.labels, out.error_prob, out.base_error_prob

    def error_only() -> Any:
        with torch.no_grad():
            out = wrap.forward_base(x)
            return torch.sigmoid(wrap.error_head(out.features[wrap.high_key], out.logits))

    fns = {"errwrap": errwrap_full, "errwrap error map": error_only}
    for T in Ts:
        score = MCDropoutScore(T=T)
        fns[f"mc_dropout T={T}"] = lambda s=score: s(wrap, x).score
    times = interleaved_times(fns, repeats, warmup)
    n = x.shape[0]
    out = {name: {k: (v / n if k != "n" else v) for k, v in quartiles(ts).items()} for name, ts in times.items()}
    for T in Ts:
        name = f"mc_dropout T={T}"
        ratios = [m / e for m, e in zip(times[name], times["errwrap"], strict=False)]
        out[name]["speedup_vs_errwrap"] = quartiles(ratios)["median"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model", metavar="DIR", help="a saved wrapper (save_pretrained folder); default: train one with run_demo"
    )
    parser.add_argument("--minutes", type=float, default=2.0, help="run_demo budget when training")
    parser.add_argument("--seed", type=int, default=0, help="run_demo seed (and held-out split) when training")
    parser.add_argument("--T", nargs="+", type=int, default=[10, 20], help="MC dropout passes")
    parser.add_argument(
        "--time-size", nargs=2, type=int, default=[256, 512], metavar=("H", "W"), help="second input size timed"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--out", default="bench-mc-dropout", help="folder for the trained model")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tiny data, a few steps)")
    parser.add_argument("--plot", metavar="PNG", help="write a bar plot of time per image")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        args.minutes, args.repeats, args.warmup, args.time_size, args.T = 0.05, 2, 0, [64, 64], [2, 3]
    say = print
    env = environment("cpu")
    start = time.perf_counter()
    wrap, settings = _load_or_train(args, say)
    from errwrap import evaluate

    size = int(settings.get("image_size", 96))
    n_val = int(settings.get("val_images", 120))
    loader = scenes_val_loader(n_val, size, int(settings.get("seed", args.seed)), batch_size=8)
    say(f"evaluating on {n_val} held-out Scenes images of {size} px")
    reports = {}
    for i, T in enumerate(args.T):
        baselines = ("msp", "entropy", "mc_dropout") if i == 0 else ("mc_dropout",)
        reports[T] = evaluate(wrap, loader, baselines=baselines, mc_dropout_T=T)
    first = reports[args.T[0]]
    scores = {name: r for name, r in first.error_detection.items()}
    for T, rep in reports.items():
        scores[f"mc_dropout T={T}"] = rep.error_detection["mc_dropout"]
    scores.pop("mc_dropout")

    say(
        f"timing at {size}x{size} (batch 8) and {args.time_size[0]}x{args.time_size[1]} (batch 1), {args.repeats} "
        "interleaved rounds"
    )
    images = torch.stack([loader.dataset[i][0] for i in range(min(8, n_val))])
    timing = {
        f"{size}x{size}": _timing(wrap, images, args.T, args.repeats, args.warmup),
        f"{args.time_size[0]}x{args.time_size[1]}": _timing(
            wrap, torch.randn(1, 3, *args.time_size), args.T, args.repeats, args.warmup
        ),
    }

    rows = []
    for name, r in scores.items():
        tname = name if name.startswith("mc_dropout") else ("errwrap" if name == "error_head" else None)
        row = {
            "score": name,
            "AUROC": f"{100 * r.auroc:.2f}",
            "AUPR-Error": f"{100 * r.aupr_error:.2f}",
            "FPR95": f"{100 * r.fpr95:.2f}",
        }
        for key, t in timing.items():
            row[f"ms/img {key}"] = f"{1000 * t[tname]['median']:.1f}" if tname else "(base + softmax)"
        rows.append(row)
    print()
    print(format_table(rows))
    speed_rows = [{"size": key, "variant": name, "ms/img median": f"{1000 * t['median']:.2f}",
                   "IQR ms": f"{1000 * t['iqr']:.2f}",
                   "x errwrap": f"{t.get('speedup_vs_errwrap', 1.0):.2f}" if name != "errwrap error map" else "-"}
                  for key, tt in timing.items() for name, t in tt.items()]  # fmt: skip
    print()
    print(format_table(speed_rows))

    t10 = args.T[0]
    speedups = {key: tt[f"mc_dropout T={t10}"]["speedup_vs_errwrap"] for key, tt in timing.items()}
    aupr_err, aupr_mc = scores["error_head"].aupr_error, scores[f"mc_dropout T={t10}"].aupr_error
    targets = [
        {
            "target": f"errwrap >= {TARGET_SPEEDUP:g}x faster than MC dropout T={t10} ({key})",
            "value": f"{s:.2f}x",
            "met": "yes" if s >= TARGET_SPEEDUP else "no",
        }
        for key, s in speedups.items()
    ]
    targets.append(
        {
            "target": f"AUPR-Error: error head >= MC dropout T={t10}",
            "value": f"{100 * aupr_err:.2f} vs {100 * aupr_mc:.2f}",
            "met": "yes" if aupr_err >= aupr_mc else "no",
        }
    )
    print()
    print(format_table(targets))
    if args.plot:
        groups = list(timing)
        names = ["errwrap", "errwrap error map", *(f"mc_dropout T={T}" for T in args.T)]
        bar_plot(
            args.plot,
            "milliseconds per image (median; CPU)",
            groups,
            {n: [1000 * timing[g][n]["median"] for g in groups] for n in names},
            value_format="{:.0f}",
        )
        print(f"wrote {args.plot}")
    summary = {
        "benchmark": "mc_dropout",
        "T": args.T,
        "speedup_vs_mc_T10": speedups,
        "aupr_error": {name: r.aupr_error for name, r in scores.items()},
        "speed_target_met": all(s >= TARGET_SPEEDUP for s in speedups.values()),
        "aupr_target_met": aupr_err >= aupr_mc,
        "seconds": round(time.perf_counter() - start, 1),
    }
    result = {**env, "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")}, "model": settings,
              "reports": {str(T): rep.to_dict() for T, rep in reports.items()},
              "timing_s_per_image": timing}  # fmt: skip
    finish(result, summary, args.json)
    return summary


if __name__ == "__main__":
    main()
