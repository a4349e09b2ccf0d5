"""Which way to run a wrapper for deployment is fastest: eager, ``channels_last``, ``torch.compile``.

One base network, wrapped with the defaults, in interleaved rounds (after warm-up rounds):

* ``base``: the base alone through its adapter, its logits resized to the input and their
  ``argmax`` (the labels a user of the base alone gets), eager, ``torch.inference_mode()``;
* ``base channels_last``: the same with the base and the images in ``channels_last``;
* ``no_grad``: ``wrap(x)`` in eval mode under ``torch.no_grad()``, reading ``out.labels``,
  ``out.error_prob`` and ``out.base_error_prob``;
* ``inference_mode``: the same under ``torch.inference_mode()``;
* ``channels_last``: the same with the wrapper and the images in ``channels_last``;
* ``compile``: ``torch.compile(wrap)`` (default mode) under ``torch.inference_mode()``;
* ``compile+channels_last``: both; and ``base compile+channels_last``, the base alone so.

Each variant's latency is the median of the rounds; ``x base`` is the median of the per-round
ratios to ``base``, and ``x eager`` to ``inference_mode``. Compilation happens in the warm-up
rounds and is reported apart. Every variant's outputs are checked against ``no_grad``'s
(corrected and base labels equal on at least 99.9% of pixels, ``error_prob`` within 1e-3, and
``base_error_prob`` within 1e-3 where the base's label is the same: where the base's top two
classes nearly tie, another summation order may flip its label).

Example:
    python benchmarks/inference_path.py                                   # SMP DeepLabV3+ r50, 256x512
    python benchmarks/inference_path.py --model smp_unet_resnet34 --size 512 1024
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, finish, format_table, interleaved_times, quartiles, setup_logging  # noqa: E402
from overhead import MODELS  # noqa: E402


def _read(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return out.labels, out.error_prob, out.base_labels, out.base_error_prob


def _variants(
    wrap: nn.Module, x: torch.Tensor, compile_: bool
) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    size = x.shape[-2:]
    x_last = x.contiguous(memory_format=torch.channels_last)
    wrap_last = _channels_last_copy(wrap)

    def base_of(model: Any, images: torch.Tensor) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                logits = model.forward_base(images).logits
                if logits.shape[-2:] != size:
                    logits = nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                return logits.argmax(1)

        return call

    def run(model: Callable[[torch.Tensor], Any], images: torch.Tensor, mode: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with mode():
                return _read(model(images))

        return call

    fns: dict[str, Callable[[], Any]] = {
        "base": base_of(wrap, x),
        "base channels_last": base_of(wrap_last, x_last),
        "no_grad": run(wrap, x, torch.no_grad),
        "inference_mode": run(wrap, x, torch.inference_mode),
        "channels_last": run(wrap_last, x_last, torch.inference_mode),
    }
    compile_seconds: dict[str, float] = {}
    if compile_:
        compiled_base = torch.compile(wrap_last.forward_base)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled_base(x_last)  # compiles
        compile_seconds["base compile+channels_last"] = time.perf_counter() - start
        fns["base compile+channels_last"] = base_of(types.SimpleNamespace(forward_base=compiled_base), x_last)
        for name, model, images in (("compile", wrap, x), ("compile+channels_last", wrap_last, x_last)):
            compiled = torch.compile(model)
            start = time.perf_counter()
            with torch.inference_mode():
                compiled(images)  # compiles
            compile_seconds[name] = time.perf_counter() - start
            fns[name] = run(compiled, images, torch.inference_mode)
    return fns, compile_seconds


def _channels_last_copy(wrap: nn.Module) -> nn.Module:
    """A copy of the wrapper with its weights in ``channels_last`` (the original stays NCHW)."""
    return copy.deepcopy(wrap).to(memory_format=torch.channels_last)


def _agreement(fns: dict[str, Callable[[], Any]]) -> dict[str, dict[str, float]]:
    reference = fns["no_grad"]()
    result = {}
    for name, fn in fns.items():
        if name.startswith("base"):
            continue
        labels, error_prob, base_labels, base_error_prob = fn()
        same_base = base_labels == reference[2]  # a near-tie of the base's top two classes may flip
        result[name] = {
            "labels_equal": float((labels == reference[0]).float().mean()),
            "base_labels_equal": float(same_base.float().mean()),
            "error_prob_max_diff": float((error_prob - reference[1]).abs().max()),
            "base_error_prob_max_diff": float((base_error_prob - reference[3])[same_base].abs().max()),
        }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model", default="smp_deeplabv3plus_resnet50", choices=list(MODELS), help="base network (random weights)"
    )
    parser.add_argument("--size", nargs=2, type=int, default=[256, 512], metavar=("H", "W"), help="input size")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (after compilation)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--tiny", action="store_true", help="seconds-long smoke run: a tiny model at 64x128, 2 rounds, no compile"
    )
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    args = parser.parse_args(argv)
    setup_logging(random_heads=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.model, args.size, args.repeats, args.warmup, args.no_compile = (
            "tiny_deeplabv3plus_resnet18",
            [64, 128],
            2,
            1,
            True,
        )

    from errwrap import ErrorCorrectionWrapper

    torch.manual_seed(0)
    base = MODELS[args.model][1]().eval()
    wrap = ErrorCorrectionWrapper(base).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random heads: timing only
        wrap.train().eval()
    x = torch.randn(args.batch, 3, *args.size)
    shape = f"{args.batch}x3x{args.size[0]}x{args.size[1]}"
    print(
        f"errwrap inference paths: {args.model}, input {shape}, {torch.get_num_threads()} threads, "
        f"{args.repeats} rounds after {args.warmup} warm-up"
    )
    fns, compile_seconds = _variants(wrap, x, not args.no_compile)
    agreement = _agreement(fns)
    times = interleaved_times(fns, args.repeats, args.warmup)
    eager = "inference_mode"
    rows, results = [], {}
    for name, ts in times.items():
        q = quartiles(ts)
        vs_base = quartiles([t / b for t, b in zip(ts, times["base"], strict=True)])["median"]
        vs_eager = quartiles([t / e for t, e in zip(ts, times[eager], strict=True)])["median"]
        results[name] = {
            "latency_ms": {k: (1000 * v if k != "n" else v) for k, v in q.items()},
            "x_base": vs_base,
            "x_eager": vs_eager,
            "compile_s": compile_seconds.get(name),
            **agreement.get(name, {}),
        }
        rows.append({
            "variant": name, "ms (median)": f"{1000 * q['median']:.1f}", "IQR ms": f"{1000 * q['iqr']:.1f}",
            "x base": f"{vs_base:.3f}", "x inference_mode": f"{vs_eager:.3f}",
            "compile s": f"{compile_seconds[name]:.0f}" if name in compile_seconds else "",
            "labels equal": f"{agreement[name]['labels_equal']:.4f}" if name in agreement else "",
        })  # fmt: skip
    print()
    print(format_table(rows))
    wrapped = {k: v for k, v in results.items() if not k.startswith("base")}
    fastest = min(wrapped, key=lambda k: wrapped[k]["latency_ms"]["median"])
    agree = all(
        v["labels_equal"] >= 0.999 and v["error_prob_max_diff"] <= 1e-3 and v["base_error_prob_max_diff"] <= 1e-3
        for v in wrapped.values()
    )
    print(
        f"\nfastest wrapper path: {fastest} ({wrapped[fastest]['x_base']:.3f} x base); outputs agree with no_grad: "
        f"{agree}"
    )
    summary = {"benchmark": "inference_path", "model": args.model, "size": args.size, "fastest": fastest,
               "x_base": {k: v["x_base"] for k, v in results.items()}, "outputs_agree": agree}  # fmt: skip
    config = {k: v for k, v in vars(args).items() if k != "json"}
    finish({**environment("cpu"), "config": config, "results": results, "times_s": times}, summary, args.json)
    return summary


if __name__ == "__main__":
    main()
