"""Shared helpers of errwrap's benchmarks: interleaved timing, tensor-memory tracking, machine
and version info, tables, JSON output, the one-line summary and Pillow bar plots.

Every benchmark script ends its standard output with one line ``SUMMARY {json}`` that a
machine can read (the smoke test does).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "TensorMemory",
    "bar_plot",
    "demo_config",
    "scenes_val_loader",
    "setup_logging",
    "environment",
    "finish",
    "format_table",
    "interleaved_times",
    "mean_std",
    "quartiles",
    "synchronize",
]

SUMMARY_PREFIX = "SUMMARY "


def synchronize(device: torch.device | str) -> None:
    """Wait for the device (CUDA) to finish queued work; no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def quartiles(values: Sequence[float]) -> dict[str, float]:
    """Median, first and third quartile and IQR of ``values``."""
    values = sorted(float(v) for v in values)
    if len(values) == 1:
        q1 = med = q3 = values[0]
    else:
        q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(values)}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value); ``nan`` entries are left out."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in interleaved rounds.

    ``warmup`` rounds are run and thrown away; then each of ``repeats`` rounds calls every
    function once, in an order rotated by one each round, so slow drifts of the machine (other
    processes, thermal state) hit every function alike.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


class TensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors created inside the context that are alive at the same time.

    Every tensor returned by an aten operator is counted once per storage, from its creation
    until its storage is freed (a weak reference's callback). Tensors that existed before the
    context (weights, the input) are not counted, so the peak is the working memory of the
    activations and temporaries of what ran inside. It ignores allocator overhead and memory
    outside tensors (e.g. oneDNN scratch buffers), so it is a lower bound of the process's
    extra memory. Works on any device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list[weakref.ref] = []

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage in self._seen:
                    continue
                nbytes = storage.nbytes()
                self._seen[storage] = nbytes
                self.live += nbytes
                self._refs.append(weakref.ref(storage, lambda _ref, n=nbytes: self._free(n)))
        self.peak = max(self.peak, self.live)
        return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: str = "cpu") -> dict[str, Any]:
    """Date, command, machine and library versions, for the JSON output and the docs."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("errwrap", "timm", "segmentation_models_pytorch", "torchvision", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    machine = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    with contextlib.suppress(OSError):
        machine["load_average_1m"] = round(os.getloadavg()[0], 2)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": machine,
        "versions": versions,
    }


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table (readable as plain text too) of ``rows``; floats get 4 significant digits
    unless already strings."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + " |" for row in cells]
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def finish(result: dict[str, Any], summary: dict[str, Any], json_path: str | None) -> None:
    """Write ``result`` (with ``summary`` inside) to ``json_path`` when given, and print the
    ``SUMMARY`` line last."""
    result = dict(result, summary=summary)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
        print(f"wrote {path}")
    print(SUMMARY_PREFIX + json.dumps(_json_safe(summary), allow_nan=False), flush=True)


def bar_plot(
    path: str | Path,
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    errors: Mapping[str, Sequence[float]] | None = None,
    reference: float | None = None,
    reference_label: str = "",
    value_format: str = "{:.2f}",
    width: int = 900,
    height: int = 420,
) -> Path:
    """Grouped vertical bar chart drawn with Pillow (no matplotlib).

    Args:
        path: PNG file to write.
        title: text at the top.
        groups: x-axis group labels.
        series: legend name -> one value per group.
        errors: legend name -> half-length of an error bar per group (optional).
        reference: draw a dashed horizontal line at this value (e.g. a target).
        reference_label: its label.
        value_format: format of the value printed above each bar.
    """
    from PIL import Image, ImageDraw, ImageFont

    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, 20, 40, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    names = list(series)
    values = [v for name in names for v in series[name] if v is not None and not math.isnan(v)]
    errs = errors or {}
    tops = [
        v + (errs.get(name, [0] * len(groups))[i] or 0)
        for name in names
        for i, v in enumerate(series[name])
        if v is not None and not math.isnan(v)
    ]
    vmax = max([*tops, *(values or [1.0]), reference or 0.0]) * 1.15 or 1.0
    draw.text((left, 10), title, fill="black", font=font)
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    for k in range(5):
        v = vmax * k / 4
        y = top + plot_h - plot_h * v / vmax
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((5, y - 6), f"{v:.3g}", fill="black", font=font)
    group_w = plot_w / max(1, len(groups))
    bar_w = group_w * 0.8 / max(1, len(names))
    for g, label in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s, name in enumerate(names):
            v = series[name][g]
            if v is None or math.isnan(v):
                continue
            xa, xb = x0 + s * bar_w, x0 + (s + 1) * bar_w - 2
            ya = top + plot_h - plot_h * v / vmax
            draw.rectangle([xa, ya, xb, top + plot_h], fill=colors[s % len(colors)])
            e = errs.get(name, [0] * len(groups))[g] or 0
            if e:
                xm = (xa + xb) / 2
                y1, y2 = top + plot_h - plot_h * (v + e) / vmax, top + plot_h - plot_h * max(0.0, v - e) / vmax
                draw.line([(xm, y1), (xm, y2)], fill="black")
                draw.line([(xm - 3, y1), (xm + 3, y1)], fill="black")
            draw.text((xa, ya - 12), value_format.format(v), fill="black", font=font)
        draw.text((left + g * group_w + 4, top + plot_h + 6), label[: int(group_w / 6)], fill="black", font=font)
    if reference is not None:
        y = top + plot_h - plot_h * reference / vmax
        for x in range(left, left + plot_w, 12):
            draw.line([(x, y), (x + 6, y)], fill=(200, 0, 0))
        draw.text((left + plot_w - 6 * len(reference_label) - 4, y - 12), reference_label, fill=(200, 0, 0), font=font)
    lx = left
    for s, name in enumerate(names):
        draw.rectangle([lx, height - 22, lx + 10, height - 12], fill=colors[s % len(colors)])
        draw.text((lx + 14, height - 24), name, fill="black", font=font)
        lx += 24 + 6 * len(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ---------------------------------------------------------------------- trained demo models
# The schedule the documented quality run used (scaled by --minutes / 5), pinned here so that a
# rerun reproduces docs/benchmarks.md even when the demo's own defaults change.
DEMO_DEFAULTS: dict[str, Any] = {
    "image_size": 96,
    "train_images": 1000,
    "val_images": 120,
    "batch_size": 8,
    "encoder": "resnet18",
    "base_steps": 400,
    "head_steps": 300,
    "base_lr": 2e-3,
    "heads_lr": 5e-3,
}
DEMO_TINY: dict[str, Any] = {
    "image_size": 32,
    "train_images": 16,
    "val_images": 8,
    "batch_size": 4,
    "encoder": "resnet18",
    "base_steps": 4,
    "head_steps": 4,
}


def demo_config(minutes: float, seed: int, tiny: bool, mc_dropout: bool, **overrides: Any) -> Any:
    """A ``DemoConfig`` with the data, model and schedule fields set here (the step counts are
    scaled by ``minutes / 5``); fields this version of ``DemoConfig`` lacks are skipped. The
    JSON outputs record every field actually used."""
    import dataclasses

    from errwrap.demo import DemoConfig

    known = {f.name for f in dataclasses.fields(DemoConfig)}
    fields = dict(DEMO_TINY if tiny else DEMO_DEFAULTS)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields.update(minutes=minutes, seed=seed, panels=0, mc_dropout=mc_dropout)
    return DemoConfig(**{k: v for k, v in fields.items() if k in known})


def setup_logging(random_heads: bool = False) -> None:
    """Warnings to stderr; with ``random_heads`` (scripts that time untrained heads) without the
    wrapper's expected fresh-heads warning."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    if random_heads:
        logging.getLogger("errwrap.wrapper").setLevel(logging.ERROR)


def scenes_val_loader(num_images: int, size: int, seed: int, batch_size: int, split: str = "val") -> Any:
    """The held-out ``Scenes`` split the demo evaluates on (same seed and size give the same images);
    ``split="test"`` gives a disjoint set of the same kind (used to fit a temperature)."""
    from torch.utils.data import DataLoader

    from errwrap.data import IMAGENET_MEAN, IMAGENET_STD, Normalize, Scenes

    val = Scenes(
        num_images, size=size, seed=seed, split=split, transform=Normalize(IMAGENET_MEAN, IMAGENET_STD), cache=True
    )
    return DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=0)
