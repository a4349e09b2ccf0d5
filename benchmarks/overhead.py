"""Overhead of ErrorCorrectionWrapper over its base: latency, peak memory, parameters, FLOPs.

For each base network, one run times, in interleaved rounds (after warm-up rounds):

* ``base``: ``wrapper.forward_base(x)`` (the base network through its adapter), its logits
  resized to the input and their ``argmax``: the labels a user of the base alone gets (taken
  with ``errwrap.functional.class_labels``, the wrapper's own, 3x faster than ``argmax(1)`` on
  the CPU, so the base is not slowed by a slower argmax than the wrapper's);
* ``error@W``: ``base`` plus the error head of width ``W`` and its map resized to the input
  (the base's labels and ``out.head_error_prob``, the paper's stage (i) alone, without the
  refinement at the output's resolution);
* ``all@W``: the full wrapper forward (error, detail and fusion heads, width ``W`` for both the
  error and the detail head) and what a user reads from it: ``out.labels``, ``out.error_prob``
  (the returned labels' error map) and ``out.base_error_prob``;
* ``features@W`` (with ``--fuse-at-features``): ``all@W`` with the same heads built with
  ``fuse_at_features=True``, fusing at the features' resolution (docs/method.md);

for every width ``W`` in ``--widths`` (64 is errwrap's default). Latency is the median of the
rounds, with the inter-quartile range; the overhead ratio is the median of the per-round
ratios (each round runs every variant once, in a rotated order).

Every variant runs under ``torch.inference_mode()``, the deployment path (see docs/inference.md).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one call minus the memory allocated
before it. On the CPU, torch keeps no allocator statistics, so the script reports the peak of
the bytes of tensors created during the call that are alive at once (a ``TorchDispatchMode``
that follows every storage until it is freed): the working memory of activations and
temporaries, without weights, allocator overhead or oneDNN scratch space.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one call (2 FLOPs per multiply-add;
convolutions and matrix products only). Parameters: the base's, and the heads' added on top.

Example:
    python benchmarks/overhead.py                      # CPU defaults, 256x512
    python benchmarks/overhead.py --models smp_deeplabv3plus_resnet50 smp_unet_resnet34 --size 256 512 --size 512 1024
    python benchmarks/overhead.py --device cuda --dtype bf16 --compile --channels-last \\
        --models deeplabv3plus_resnet101 --size 1024 2048 --batch 1 8
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from errwrap.functional import class_labels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    TensorMemory,
    bar_plot,
    environment,
    finish,
    format_table,
    interleaved_times,
    quartiles,
    setup_logging,
    synchronize,
)

NUM_CLASSES = 19
TARGET_ERROR = 1.05
TARGET_PARAMS = 0.05
#: Latency target of all heads (x base) per base: ResNet-50 bases carry the heads more easily than
#: light bases, whose own cost is close to the heads'.
TARGET_ALL = {"deeplabv3plus_resnet50": 1.12, "smp_deeplabv3plus_resnet50": 1.12, "deeplabv3plus_resnet101": 1.12}
TARGET_ALL_LIGHT = 1.3
#: Peak-memory target (x base) of all heads on the ResNet-50 bases.
TARGET_MEMORY = 1.15


def _dlv3p(encoder: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from errwrap.models import DeepLabV3Plus

        return DeepLabV3Plus(encoder, NUM_CLASSES, output_stride=16, **kw)

    return build


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, classes=NUM_CLASSES)


def _smp_dlv3p() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus("resnet50", encoder_weights=None, classes=NUM_CLASSES)


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import segmentation

        return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)

    return build


def _segformer_b0() -> nn.Module:
    import transformers

    config = transformers.SegformerConfig(  # the sizes of nvidia/mit-b0, random weights
        num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], hidden_sizes=[32, 64, 160, 256],
        num_attention_heads=[1, 2, 5, 8], decoder_hidden_size=256, num_labels=NUM_CLASSES,
    )  # fmt: skip
    return transformers.SegformerForSemanticSegmentation(config)


MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "deeplabv3plus_resnet50": ("errwrap DeepLabV3Plus, resnet50, OS16", _dlv3p("resnet50")),
    "deeplabv3plus_mobilenetv3": (
        "errwrap DeepLabV3Plus, mobilenetv3_large_100, OS16",
        _dlv3p("mobilenetv3_large_100"),
    ),
    "smp_deeplabv3plus_resnet50": ("SMP DeepLabV3Plus, resnet50", _smp_dlv3p),
    "smp_unet_resnet34": ("SMP Unet, resnet34", _smp_unet),
    "tv_lraspp_mobilenetv3": ("torchvision lraspp_mobilenet_v3_large", _tv("lraspp_mobilenet_v3_large")),
    "tv_deeplabv3_resnet50": ("torchvision deeplabv3_resnet50 (OS8)", _tv("deeplabv3_resnet50")),
    "segformer_b0": ("transformers SegFormer, mit-b0 sizes", _segformer_b0),
    "deeplabv3plus_resnet101": ("errwrap DeepLabV3Plus, resnet101, OS16", _dlv3p("resnet101")),
    "tiny_deeplabv3plus_resnet18": (
        "errwrap DeepLabV3Plus, resnet18, 32-wide ASPP/decoder (smoke test)",
        _dlv3p("resnet18", aspp_channels=32, decoder_channels=32, low_level_channels=16),
    ),
}
CPU_MODELS = [
    "deeplabv3plus_resnet50",
    "smp_deeplabv3plus_resnet50",
    "deeplabv3plus_mobilenetv3",
    "smp_unet_resnet34",
    "tv_lraspp_mobilenetv3",
    "segformer_b0",
]
REFERENCE = "deeplabv3plus_resnet50"  # the parameter target is relative to this base


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _reference_params() -> int:
    with torch.device("meta"):
        return _count_params(MODELS[REFERENCE][1]())


def _target_all(key: str) -> float:
    return TARGET_ALL.get(key, TARGET_ALL_LIGHT)


def _variants(
    wrappers: dict[int, nn.Module], x: torch.Tensor, autocast: Any, at_features: dict[int, nn.Module]
) -> dict[str, Callable[[], Any]]:
    first = next(iter(wrappers.values()))
    size = x.shape[-2:]

    def resize(t: torch.Tensor) -> torch.Tensor:
        return (
            t if t.shape[-2:] == size else nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
        )

    def base() -> Any:
        with torch.inference_mode(), autocast():
            return class_labels(resize(first.forward_base(x).logits))

    def error(w: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode(), autocast():
                out = w.forward_base(x)
                error_map = torch.sigmoid(resize(w.error_head(out.features[w.high_key], out.logits)))
                return class_labels(resize(out.logits)), error_map

        return run

    def full(w: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode(), autocast():
                out = w(x)
                return out.labels, out.error_prob, out.base_error_prob

        return run

    fns: dict[str, Callable[[], Any]] = {"base": base}
    for width, w in wrappers.items():
        fns[f"error@{width}"] = error(w)
        fns[f"all@{width}"] = full(w)
    for width, w in at_features.items():
        fns[f"features@{width}"] = full(w)
    return fns


def _flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _memory(fn: Callable[[], Any], device: torch.device) -> int:
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return int(peak)
    with TensorMemory() as tracker:
        out = fn()
    del out
    return int(tracker.peak)


def bench_model(
    key: str, args: argparse.Namespace, batch: int, size: list[int], say: Callable[[str], None]
) -> dict[str, Any]:
    from errwrap import ErrorCorrectionWrapper

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = MODELS[key][1]().eval().to(device)
    height, width = size
    wrappers: dict[int, nn.Module] = {}
    for w in args.widths:
        wrap = ErrorCorrectionWrapper(base, error_channels=w, detail_channels=w, sample_size=64).to(device).eval()
        wrappers[w] = wrap
    at_features: dict[int, nn.Module] = {}
    if args.fuse_at_features:  # the headline width's heads, fused at the features' resolution
        w = args.widths[0]
        wrap = (
            ErrorCorrectionWrapper(base, error_channels=w, detail_channels=w, sample_size=64, fuse_at_features=True)
            .to(device)
            .eval()
        )
        wrap.load_state_dict(wrappers[w].state_dict())
        at_features[w] = wrap
    x = torch.randn(batch, 3, height, width, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        for wrap in [*wrappers.values(), *at_features.values()]:
            wrap.to(memory_format=torch.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    fns = _variants(wrappers, x, autocast, at_features)
    flops = {name: _flops(fn) for name, fn in fns.items()} if device.type != "meta" else {}
    memory = {name: _memory(fn, device) for name, fn in fns.items()}
    if args.compile:
        fns = {name: torch.compile(fn) for name, fn in fns.items()}
    start = time.perf_counter()
    times = interleaved_times(fns, args.repeats, args.warmup, device)
    seconds = time.perf_counter() - start

    base_params = _count_params(base)
    first = wrappers[args.widths[0]]
    rows = []
    for name in fns:
        kind, _, w = name.partition("@")
        wrap = wrappers[int(w)] if w else first
        added = (
            0
            if kind == "base"
            else _count_params(wrap.error_head)
            if kind == "error"
            else sum(p.numel() for p in wrap.head_parameters())
        )
        ratios = [t / b for t, b in zip(times[name], times["base"], strict=False)]
        rows.append({
            "model": key,
            "size": f"{height}x{width}",
            "variant": name,
            "width": int(w) if w else None,
            "batch": batch,
            "latency_ms": {k: (1000 * v if k != "n" else v) for k, v in quartiles(times[name]).items()},
            "ratio": quartiles(ratios),
            "params": base_params + added,
            "added_params": added,
            "added_params_pct_of_base": 100 * added / base_params,
            "added_params_pct_of_reference": 100 * added / args.reference_params,
            "gflops": flops.get(name, 0) / 1e9,
            "added_gflops_pct": 100 * (flops.get(name, 0) - flops.get("base", 0)) / max(1, flops.get("base", 1)),
            "peak_memory_mb": memory[name] / 2**20,
            "added_memory_pct": 100 * (memory[name] - memory["base"]) / max(1, memory["base"]),
        })  # fmt: skip
    say(f"  {key} {height}x{width} batch {batch}: {len(fns)} variants x {args.repeats} rounds in {seconds:.0f} s")
    return {
        "model": key,
        "description": MODELS[key][0],
        "size": f"{height}x{width}",
        "batch": batch,
        "base_params": base_params,
        "rows": rows,
        "times_s": times,
    }


def _meets(rows: list[dict[str, Any]], width: int, key: str) -> dict[str, Any]:
    by = {r["variant"]: r for r in rows}
    err, full = by[f"error@{width}"], by[f"all@{width}"]
    memory_ratio = full["peak_memory_mb"] / max(by["base"]["peak_memory_mb"], 1e-9)
    heavy = key in TARGET_ALL
    return {
        "error_ratio": err["ratio"]["median"],
        "all_ratio": full["ratio"]["median"],
        "memory_ratio": memory_ratio,
        "added_params_pct_of_reference": full["added_params_pct_of_reference"],
        "error_met": err["ratio"]["median"] <= TARGET_ERROR if heavy else None,
        "all_met": full["ratio"]["median"] <= _target_all(key),
        "memory_met": memory_ratio <= TARGET_MEMORY if heavy else None,
        "params_met": full["added_params_pct_of_reference"] <= 100 * TARGET_PARAMS,
    }


def _mark(value: float, met: bool | None) -> str:
    return f"{value:.3f} {'-' if met is None else 'yes' if met else 'NO'}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="models: " + ", ".join(MODELS),
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=list(MODELS),
        help=f"bases to measure (default: {' '.join(CPU_MODELS)})",
    )
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        action="append",
        default=None,
        metavar=("H", "W"),
        help="input size, repeatable (default 256 512 on CPU, 512 1024 on CUDA)",
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes")
    parser.add_argument(
        "--widths",
        nargs="+",
        type=int,
        default=[64, 32, 16],
        help="error_channels = detail_channels values; the first is the headline",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs and weights")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--fuse-at-features", action="store_true",
        help="also time the headline width fused at the features' resolution (variant features@W)",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run: a tiny model at 64x128, 3 rounds")
    parser.add_argument("--plot", metavar="PNG", help="write a bar plot of the latency ratios")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    args = parser.parse_args(argv)
    setup_logging(random_heads=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if args.tiny:
        args.models = args.models or ["tiny_deeplabv3plus_resnet18"]
        args.size = args.size or [[64, 128]]
        args.repeats = args.repeats or 3
        args.warmup = args.warmup if args.warmup is not None else 1
        args.widths = [64, 16]
    args.models = args.models or CPU_MODELS
    args.size = args.size or [[512, 1024] if cuda else [256, 512]]
    args.repeats = args.repeats or (30 if cuda else 9)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.reference_params = _reference_params()

    say = print
    say(f"errwrap overhead benchmark: {args.device} {args.dtype}{' compiled' if args.compile else ''}"
        f"{' channels_last' if args.channels_last else ''}, "
        f"input {', '.join(f'{h}x{w}' for h, w in args.size)}, widths {args.widths}, {args.repeats} rounds after "
        f"{args.warmup} warm-up")  # fmt: skip
    results = [
        bench_model(key, args, batch, size, say) for key in args.models for size in args.size for batch in args.batch
    ]
    env = environment(args.device)  # after the runs, so the versions of every imported family are listed

    table = []
    for res in results:
        for r in res["rows"]:
            lat = r["latency_ms"]
            table.append({
                "model": r["model"], "size": r["size"], "batch": r["batch"], "variant": r["variant"],
                "ms (median)": f"{lat['median']:.1f}", "IQR ms": f"{lat['iqr']:.1f}",
                "x base": f"{r['ratio']['median']:.3f}", "params M": f"{r['params'] / 1e6:.2f}",
                "+params % ref": f"{r['added_params_pct_of_reference']:.2f}", "GFLOPs": f"{r['gflops']:.1f}",
                "+FLOPs %": f"{r['added_gflops_pct']:.1f}", "peak MB": f"{r['peak_memory_mb']:.1f}",
                "+mem %": f"{r['added_memory_pct']:.1f}",
            })  # fmt: skip
    print()
    print(format_table(table))
    memory_note = (
        "CUDA max_memory_allocated during the call"
        if cuda
        else "peak bytes of live tensors created during the call (TensorMemory; no weights, no allocator overhead)"
    )
    print(
        f"\nmemory: {memory_note}; +params % ref: added parameters in % of {REFERENCE} "
        f"({args.reference_params / 1e6:.2f} M)"
    )

    targets = []
    per_model: dict[str, Any] = {}
    for res in results:
        key = f"{res['model']}/{res['size']}/b{res['batch']}"
        headline = _meets(res["rows"], args.widths[0], res["model"])
        reaching = [w for w in sorted(args.widths, reverse=True) if _meets(res["rows"], w, res["model"])["all_met"]]
        per_model[key] = {
            "width": args.widths[0],
            "target_all": _target_all(res["model"]),
            **headline,
            "widest_meeting_all": reaching[0] if reaching else None,
        }
        targets.append({
            "model": key, "width": args.widths[0],
            f"error head x base (<= {TARGET_ERROR})": _mark(headline["error_ratio"], headline["error_met"]),
            "all x base (target)":
                f"{_mark(headline['all_ratio'], headline['all_met'])} (<= {_target_all(res['model'])})",
            f"peak memory x base (<= {TARGET_MEMORY})": _mark(headline["memory_ratio"], headline["memory_met"]),
            f"+params % ref (<= {100 * TARGET_PARAMS:.0f})":
                _mark(headline["added_params_pct_of_reference"], headline["params_met"]),
            "widest width meeting 'all'": reaching[0] if reaching else "none measured",
        })  # fmt: skip
    print("\ntargets (median ratios of the headline width; '-': no target for this base):")
    print(format_table(targets))
    if args.plot:
        groups = [f"{r['model']}/{r['size']}/b{r['batch']}" for r in results]
        series = {
            f"{kind}@{w}": [
                next(x["ratio"]["median"] for x in r["rows"] if x["variant"] == f"{kind}@{w}") for r in results
            ]
            for w in args.widths[:2]
            for kind in ("error", "all")
        }
        bar_plot(args.plot, f"latency / base latency ({args.device}, median of {args.repeats} rounds)", groups, series,
                 reference=TARGET_ALL_LIGHT, reference_label=f"target all heads, light bases {TARGET_ALL_LIGHT}",
                 value_format="{:.2f}", width=1100)  # fmt: skip
        print(f"wrote {args.plot}")

    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    summary = {"benchmark": "overhead", "device": args.device, "size": args.size, "models": per_model,
               "all_targets_met_at_default_width": all(
                   m[k] is not False for m in per_model.values()
                   for k in ("error_met", "all_met", "memory_met", "params_met"))}  # fmt: skip
    finish({**env, "config": config, "memory": memory_note, "results": results}, summary, args.json)
    return summary


if __name__ == "__main__":
    main()
