"""The ``errwrap`` command line: ``demo``, ``predict``, ``evaluate``, ``finetune``, ``estimate`` and ``report``.

Every failure the user can fix (a missing file, an unknown model, a wrong data layout) is one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from huggingface_hub import constants, try_to_load_from_cache
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Subset

from . import data
from ._io import check_writable, tensor_bytes
from ._validate import check_outputs_finite
from ._version import __version__
from .data import CORRUPTIONS, Compose, Corrupt
from .data.datasets import IMAGE_EXTENSIONS, load_image
from .data.datasets import _open as open_image
from .data.transforms import Normalize
from .demo import DemoConfig, run_demo
from .estimation import estimate
from .evaluation import evaluate
from .hub import CONFIG_NAME, read_config
from .report import write_report
from .training import finetune
from .viz import (
    add_panel_key,
    colorize,
    heatmap,
    make_panel,
    overlay,
    palette_for,
    panel_scale,
    save_heatmap_png,
    save_label_png,
    shrink_to_width,
)
from .wrapper import ErrorCorrectionWrapper

__all__ = ["main", "build_parser", "parse_data_spec", "parse_label_map", "parse_corrupt"]

DATA_KINDS = ("scenes", "aerial", "cells", "cityscapes", "ade20k", "folder")
GENERATED_KINDS = DATA_KINDS[:3]  # errwrap.data.GENERATED


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def _say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------- data and model
def parse_label_map(text: str | None) -> dict[int, int] | None:
    """``"255:1,128:0"`` -> ``{255: 1, 128: 0}`` (raw mask value -> class); ``None`` stays ``None``."""
    if text is None:
        return None
    mapping: dict[int, int] = {}
    for item in (i.strip() for i in text.split(",")):
        raw, colon, target = item.partition(":")
        if not colon or not raw.strip().isdigit() or not target.strip().isdigit():
            raise CLIError(
                f"--label-map {text!r}: expected RAW:CLASS pairs separated by commas, such as 255:1, got {item!r}"
            )
        mapping[int(raw)] = int(target)
    return mapping


def parse_corrupt(text: str | None):
    """``"fog:3"`` -> ``errwrap.data.Corrupt("fog", severity=3)`` (``KIND`` alone: severity 3);
    ``None`` stays ``None``."""
    if text is None:
        return None
    kind, colon, severity = text.partition(":")
    if kind not in CORRUPTIONS or (colon and severity not in ("1", "2", "3", "4", "5")):
        raise CLIError(f"--corrupt {text!r}: expected KIND or KIND:SEVERITY with KIND one of {', '.join(CORRUPTIONS)} "
                       "and SEVERITY 1 (mild) to 5 (strong)")
    return Corrupt(kind, int(severity) if colon else 3)


def parse_data_spec(
    spec: str,
    split: str,
    transform: Any = None,
    size: int | None = None,
    *,
    num_classes: int | None = None,
    label_map: dict[int, int] | None = None,
):
    """``KIND:PATH`` -> a dataset. Kinds: ``scenes[:N]``, ``aerial[:N]``, ``cells[:N]`` (generated,
    N images, see ``errwrap.data.GENERATED``), ``cityscapes:ROOT``,
    ``ade20k:ROOT``, ``folder:IMAGES_DIR,MASKS_DIR``.

    ``num_classes`` is the model's: a folder's masks are checked against it (naming the file
    with a bad value), and ADE20K keeps label 0 as the class "other" for a 151-class model
    (``reduce_zero_label=False``). ``label_map`` (raw mask value -> class) is for folders only.
    """
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if label_map is not None and kind != "folder":
        raise CLIError(f"--label-map: only for folder:IMAGES_DIR,MASKS_DIR data, got --data {spec!r}")
    if kind in data.GENERATED:
        if rest and (not rest.isdigit() or int(rest) < 1):
            raise CLIError(f"--data {spec!r}: expected {kind} or {kind}:N with N a positive number of images")
        n = int(rest) if rest else 200
        return data.generated(kind, n, size=size or 128, seed=0, split=split, transform=transform)
    if kind not in DATA_KINDS:
        expected = [k + "[:N]" for k in GENERATED_KINDS] + [k + ":PATH" for k in DATA_KINDS if k not in GENERATED_KINDS]
        raise CLIError(f"--data {spec!r}: unknown kind {kind!r}; expected one of {', '.join(expected)}")
    if not rest:
        raise CLIError(f"--data {spec!r}: expected {kind}:PATH")
    if kind == "cityscapes":
        return data.Cityscapes(rest, split=split, transform=transform)
    if kind == "ade20k":
        keep_zero = num_classes == len(data.ADE20K_CLASSES) + 1
        return data.ADE20K(rest, split=split, transform=transform, reduce_zero_label=not keep_zero)
    images, _, masks = rest.partition(",")
    if not masks:
        raise CLIError(f"--data {spec!r}: expected folder:IMAGES_DIR,MASKS_DIR")
    return data.SegmentationFolder(images, masks, num_classes=num_classes, transform=transform, label_map=label_map)


def _check_classes(dataset, wrap, spec: str) -> None:
    n = getattr(dataset, "num_classes", None)
    if n is not None and n != wrap.num_classes:
        raise CLIError(f"--data {spec}: the data has {n} classes, the model {wrap.num_classes}")


def _refuse_what_the_cli_cannot_rebuild(location: str) -> None:
    """A local model whose base is the user's own network (or that holds only the heads) needs
    that network, which only Python can pass: say so in CLI terms, before any work. A config that
    is not valid is refused here with the message ``from_pretrained`` would give."""
    config_path = Path(location) / CONFIG_NAME
    if not config_path.is_file():
        return  # a Hub id, or a missing file: from_pretrained reports it
    config = read_config(config_path)
    if config.heads_only:
        what = "holds only the heads (saved with heads_only=True)"
    elif config.base is None:
        what = "has a base network of your own, which errwrap cannot rebuild from config.json"
    else:
        return
    raise CLIError(
        f"--model {location}: {what}; the CLI can only load models whose base it rebuilds (errwrap, SMP, torchvision, "
        "transformers). Use Python: ErrorCorrectionWrapper.from_pretrained(DIR, model=your_network), then "
        "errwrap.finetune / errwrap.evaluate (docs/training.md)"
    )


def _check_device(device: str | None) -> None:
    """``--device``: a device torch knows and this machine has, or one line saying what is wrong."""
    if device is None:
        return
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a device name; expected cpu, cuda, cuda:N or mps") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}, "
            f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for CPU only'}); use --device cpu"
        )
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise CLIError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: the MPS backend is not available here; use --device cpu")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1, ON, YES, TRUE), from the environment now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(
        constants.HF_HUB_OFFLINE
    )


def _check_model_location(location: str) -> bool:
    """Local first: ``True`` for a local path. A name that is no local path fails in one line,
    before any Hub request, when it cannot be a Hub id, when its first part is a local directory
    (a typo in a path), or when the Hub is offline (``HF_HUB_OFFLINE``) and its cache lacks it."""
    path = Path(location).expanduser()
    if path.exists():
        return True
    missing = f"--model {location}: no local directory {location!r}"
    parent = path.parent
    if str(parent) not in ("", ".") and parent.is_dir():
        entries = sorted(p.name for p in parent.iterdir() if p.is_dir())[:8]
        listing = f"; {parent} holds: {', '.join(entries)}" if entries else f"; {parent} holds no directories"
        raise CLIError(missing + listing)
    if not _HUB_ID.match(location) or ".." in location or "--" in location:
        raise CLIError(f"{missing}, and it is not a Hub repository id (org/name)")
    if isinstance(try_to_load_from_cache(location, CONFIG_NAME), str):
        return False  # in the cache: from_pretrained takes it from there
    if _hub_offline():
        raise CLIError(f"{missing} and not found in the Hub cache (HF_HUB_OFFLINE is set: the Hub is not asked)")
    unreachable = _hub_unreachable()
    if unreachable:
        raise CLIError(f"{missing}, not in the Hub cache, and the Hub cannot be reached ({unreachable})")
    return False


def _hub_unreachable() -> str | None:
    """Why the Hub's host name does not resolve (no network), or ``None``: one cheap look-up
    instead of huggingface_hub's retries, which take about 30 s to give up."""
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
    return None


def _load_model(location: str, device: str | None):
    local = _check_model_location(location)
    _check_device(device)
    _refuse_what_the_cli_cannot_rebuild(location)
    try:
        return ErrorCorrectionWrapper.from_pretrained(location, device=device).eval()
    except FileNotFoundError as exc:
        where = "" if local else f"no local directory {location!r} and not found on the Hub/cache: "
        raise CLIError(f"--model {location}: {where}{exc}") from None


def _unchanged(image: Any, label: Any) -> tuple[Any, Any]:
    """The transform of a model saved without preprocessing: images go in as read, in ``[0, 1]``."""
    return image, label


def _normalizer(wrap, location: str = "the model"):
    """The model's own preprocessing, as saved in its ``config.json``: ``(transform, mean, std)``.

    ``"preprocessing": null`` means the model was used on raw ``[0, 1]`` images (what the Python
    API feeds when the user normalises nothing): the CLI then applies none, so Python and the CLI
    give the same answers, and says so once on stderr instead of guessing ImageNet statistics.
    """
    pre = getattr(wrap, "preprocessing", None)
    if not pre:
        print(
            f'errwrap: note: {location} was saved without preprocessing (config.json "preprocessing": null): images go '
            'in '
            "unnormalised, RGB in [0, 1], as in Python; if its base expects normalised images, set "
            'wrap.preprocessing = {"mean": [...], "std": [...]} and save it again',
            file=sys.stderr,
            flush=True,
        )
        return _unchanged, None, None
    return Normalize(pre["mean"], pre["std"]), pre["mean"], pre["std"]


def _preprocessing_record(wrap) -> str:
    """How the model's images were preprocessed, in words, for the model card's training notes."""
    pre = getattr(wrap, "preprocessing", None)
    return f"mean {pre['mean']}, std {pre['std']}" if pre else "none (RGB in [0, 1])"


def _read_image(path: Path):
    if not path.is_file():
        raise CLIError(f"{path}: no such image file")
    try:
        return load_image(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CLIError(f"{path}: not an image errwrap can read ({exc})") from None


def _image_paths(arguments: Sequence[str]) -> list[Path]:
    """Image files named on the command line; a directory stands for the images directly in it."""
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise CLIError(f"{path}: a directory without image files ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def _output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per image: its stem, with the extension (and then a number) added
    where stems collide (``a.png`` and ``a.jpg``, or the same name in two directories)."""
    stems = [p.stem for p in paths]
    names = [p.stem if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in paths]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name}_{seen[name]}")
    return unique


def _output_dir(value: str, option: str = "--out") -> Path:
    """``value`` as a directory to write into: refused up front when it is an existing file."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {value}: expected a directory (existing or new), got an existing file")
    return path


def _output_file(value: str | None, option: str) -> Path | None:
    path = Path(value) if value is not None else None
    if path is not None and path.is_dir():
        raise CLIError(f"{option} {value}: expected a file name, got an existing directory")
    return path


# ---------------------------------------------------------------------- progress
#: On a non-terminal, a progress line at least this often (seconds), besides every tenth of the work.
PROGRESS_SECONDS = 10.0


def _on_terminal() -> bool:
    return sys.stdout.isatty()


@contextlib.contextmanager
def _training_progress(prefix: str = "  ") -> Iterator[None]:
    """Print the fine-tuning loop's progress lines (``errwrap.training`` INFO) on stdout, one plain
    line each, and restore the logger afterwards."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    train_log = logging.getLogger("errwrap.training")
    level, propagate = train_log.level, train_log.propagate
    train_log.addHandler(handler)
    if not train_log.isEnabledFor(logging.INFO):
        train_log.setLevel(logging.INFO)
    train_log.propagate = False
    try:
        yield
    finally:
        train_log.removeHandler(handler)
        train_log.setLevel(level)
        train_log.propagate = propagate


def _batch_progress(total: int | None, what: str = "evaluate") -> Callable[[int], None]:
    """A callback ``f(batch_index)`` printing a plain line every tenth of ``total`` batches, at
    least every :data:`PROGRESS_SECONDS`, and at the last batch."""
    start = last = time.perf_counter()
    every = max(1, (total or 10) // 10)

    def report(index: int) -> None:
        nonlocal last
        done, now = index + 1, time.perf_counter()
        if done % every == 0 or done == total or now - last >= PROGRESS_SECONDS:
            last = now
            _say(f"  {what}: batch {done}/{total if total is not None else '?'}, {now - start:.0f} s")

    return report


# ---------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    cfg = DemoConfig(minutes=args.minutes, seed=args.seed)
    if args.quick:
        cfg = DemoConfig(
            minutes=0.1, seed=args.seed, image_size=64, train_images=64, val_images=16, panels=2, mc_dropout=False
        )
    _say(
        f"errwrap demo: {cfg.scaled(cfg.base_steps)} base steps, {cfg.scaled(cfg.head_steps)} head steps, output "
        f"{args.out}"
    )
    with _training_progress():
        result = run_demo(args.out, cfg, say=_say)
    report = result.report
    _say("")
    _say(report.table())
    _say("")
    head = report.error_detection["error_head"]
    msp = report.error_detection["msp"]
    _say(
        f"before/after: mIoU {100 * report.base.miou:.2f} -> {100 * report.fused.miou:.2f} "
        f"({100 * report.miou_gain:+.2f} points); "
        f"AUPR-Error error head {100 * head.aupr_error:.2f} vs MSP {100 * msp.aupr_error:.2f}"
    )
    _say(f"wrote {len(result.files)} files to {result.out_dir} in {result.seconds:.0f} s "
         f"(base {result.base_steps} steps, heads {result.head_steps} steps)")
    return 0


def _readable_images(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Split ``paths`` into files whose header Pillow reads and one-line reasons for the others;
    a path that does not exist is a typo on the command line: refused at once."""
    readable, skipped = [], []
    for path in paths:
        if not path.is_file():
            raise CLIError(f"{path}: no such image file")
        try:
            with open_image(path):  # refuses decompression bombs with a ValueError naming the file
                pass
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            skipped.append(f"{path}: not an image errwrap can read ({exc})")
            continue
        readable.append(path)
    if not readable:
        raise CLIError(
            skipped[0]
            if len(skipped) == 1
            else f"none of the {len(skipped)} files is an image errwrap can read; first: {skipped[0]}"
        )
    return readable, skipped


def _report_skipped(skipped: Sequence[str], total: int) -> int:
    """Name the files that were skipped on stderr; the exit code: 1 when any was, else 0."""
    if not skipped:
        return 0
    print(f"errwrap: skipped {len(skipped)} of {total} files (the others were written):", file=sys.stderr)
    for reason in skipped:
        print(f"  {reason}", file=sys.stderr)
    return 1


def _panel(x, base, error, labels, *, palette, mean, std, class_names, max_width: int | None):
    """The six-tile panel with its key (class legend, error colour bar, changed-pixels colours),
    built from inputs shrunk first when the panel would be wider than ``max_width``."""
    scale = panel_scale(x.shape[-1], max_width)
    if scale < 1.0:
        size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        error = F.interpolate(error[None, None], size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]
        base, labels = (
            F.interpolate(t[None, None].float(), size=size, mode="nearest")[0, 0].long() for t in (base, labels)
        )
    panel = make_panel(x, base, error, labels, palette=palette, mean=mean, std=std)
    present = sorted(set(base.unique().tolist()) | set(labels.unique().tolist()))
    return shrink_to_width(add_panel_key(panel, palette, present, class_names=class_names), max_width)


def cmd_predict(args: argparse.Namespace) -> int:
    out = _output_dir(args.out)
    json_path = _output_file(args.json, "--json")
    all_paths = _image_paths(args.images)
    paths, skipped = _readable_images(all_paths)  # before loading the model
    corrupt = parse_corrupt(args.corrupt)
    wrap = _load_model(args.model, args.device)
    normalize, mean, std = _normalizer(wrap, args.model)
    palette = palette_for(wrap.num_classes, args.palette)
    out.mkdir(parents=True, exist_ok=True)
    device = next(wrap.parameters()).device
    results: list[dict[str, Any]] = []
    for path, stem in zip(paths, _output_names(paths), strict=False):  # one image at a time: any mix of sizes
        try:
            image = _read_image(path)
        except CLIError as exc:  # a header that reads, a body that does not (a truncated file)
            skipped.append(str(exc))
            continue
        if corrupt is not None:
            image = corrupt(image)
        x, _ = normalize(image, torch.zeros(image.shape[-2:], dtype=torch.long))
        with torch.no_grad():
            o = wrap(x[None].to(device))
        check_outputs_finite(o, str(path))
        labels, error, base = o.labels[0].cpu(), o.error_prob[0].cpu().float(), o.base_labels[0].cpu()
        written = [
            save_label_png(labels, out / f"{stem}_labels.png", palette),
            save_heatmap_png(error, out / f"{stem}_error.png"),
        ]
        if not args.no_panel:
            panel = _panel(x, base, error, labels, palette=palette, mean=mean, std=std, class_names=wrap.class_names,
                           max_width=args.panel_max_width)
            panel.save(out / f"{stem}_panel.png")
            written.append(out / f"{stem}_panel.png")
        if args.overlay:
            for suffix, colours in (("overlay", colorize(labels, palette)), ("error_overlay", heatmap(error))):
                target = out / f"{stem}_{suffix}.png"
                Image.fromarray(overlay(x, colours, alpha=0.5, mean=mean, std=std)).save(target)
                written.append(target)
        mean_error, changed = float(error.mean()), float((labels != base).float().mean())
        results.append(
            {
                "file": str(path),
                "height": int(labels.shape[0]),
                "width": int(labels.shape[1]),
                "mean_error_prob": mean_error,
                "relabelled_fraction": changed,
                "predicted_accuracy": 1.0 - mean_error,
                "outputs": [str(w) for w in written],
            }
        )
        _say(
            f"{path}: mean error probability {mean_error:.3f}, {100 * changed:.2f}% of pixels re-labelled -> "
            f"{out}/{stem}_*.png"
        )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(
            json.dumps({"model": args.model, "images": results, "skipped": list(skipped)}, indent=2) + "\n"
        )
        _say(f"wrote {json_path}")
    return _report_skipped(skipped, len(all_paths))


def _image_sizes(dataset) -> list[tuple[int, int]] | None:
    """Each image's ``(width, height)`` from its file header, for datasets of files (folders,
    Cityscapes, ADE20K); ``None`` for others (the built-in scenes share one size)."""
    pairs = getattr(dataset, "pairs", None)
    if not pairs:
        return None
    sizes = []
    for image_path, _ in pairs:
        with Image.open(image_path) as im:
            sizes.append(im.size)
    return sizes


def _batches_by_size(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of at most ``batch_size`` images of one size, in the data's order
    within each size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _evaluation_loader(dataset, batch_size: int, workers: int):
    """A loader that never stacks images of different sizes: mixed sizes are batched by size."""
    sizes = _image_sizes(dataset) if batch_size > 1 else None
    if sizes is None or len(set(sizes)) == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    _say(
        f"images of {len(set(sizes))} different sizes: batched by size (up to {batch_size} images of one size per "
        "batch)"
    )
    return DataLoader(dataset, batch_sampler=_batches_by_size(sizes, batch_size), num_workers=workers)


def cmd_evaluate(args: argparse.Namespace) -> int:
    json_path = _output_file(args.json, "--json")
    label_map = parse_label_map(args.label_map)
    corrupt = parse_corrupt(args.corrupt)
    wrap = _load_model(args.model, args.device)
    normalize, _, _ = _normalizer(wrap, args.model)
    if corrupt is not None:
        normalize = Compose([corrupt.joint, normalize])
    dataset = parse_data_spec(
        args.data, args.split, transform=normalize, size=args.size, num_classes=wrap.num_classes, label_map=label_map
    )
    _check_classes(dataset, wrap, args.data)
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data}: no images found for split {args.split!r}")
    loader = _evaluation_loader(dataset, args.batch_size, args.workers)
    baselines = tuple(b for b in args.baselines.split(",") if b)
    start = time.perf_counter()
    total = min(len(loader), args.max_batches or len(loader))
    progress: bool | Callable[[int], None] = True if _on_terminal() else _batch_progress(total)  # a bar, or plain lines
    report = evaluate(
        wrap, loader, baselines=baselines, mc_dropout_T=args.mc_T, max_batches=args.max_batches, progress=progress
    )
    _say(report.table())
    _say(f"evaluated {report.num_images} images in {time.perf_counter() - start:.1f} s")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        report.to_json(json_path)
        _say(f"wrote {json_path}")
    return 0


def _training_batch_size(dataset, batch_size: int, *, crop: int | None) -> int:
    """``batch_size``, made smaller (and said so) where it cannot work: fewer images than a batch
    (full batches only are used), or images of different sizes without ``--crop``."""
    if len(dataset) < batch_size:
        _say(f"{len(dataset)} training images, fewer than --batch-size {batch_size}: batches of {len(dataset)}")
        batch_size = len(dataset)
    sizes = _image_sizes(dataset) if crop is None and batch_size > 1 else None
    if sizes is not None and len(set(sizes)) > 1:
        _say(
            f"images of {len(set(sizes))} different sizes and no --crop: one image per batch (--crop N trains on "
            "batches of NxN crops)"
        )
        batch_size = 1
    return batch_size


def cmd_finetune(args: argparse.Namespace) -> int:
    _output_dir(args.out)  # refuse a file before training, not after
    if args.checkpoint_dir is not None:
        _output_dir(args.checkpoint_dir, "--checkpoint-dir")
    label_map = parse_label_map(args.label_map)
    wrap = _load_model(args.model, args.device)
    check_writable(args.out, 2 * tensor_bytes(wrap.state_dict().values()), "--out")  # before training, not after
    normalize, _, _ = _normalizer(wrap, args.model)
    transforms: list[Any] = [data.RandomHorizontalFlip()]
    if args.crop:
        transforms = [data.RandomScale(0.5, 2.0), data.RandomCrop(args.crop), data.RandomHorizontalFlip()]
    dataset = parse_data_spec(args.data, "train", transform=data.Compose([*transforms, normalize]), size=args.size,
                              num_classes=wrap.num_classes, label_map=label_map)
    _check_classes(dataset, wrap, args.data)
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data}: no training images found")
    batch_size = _training_batch_size(dataset, args.batch_size, crop=args.crop)
    loader = data.make_loader(dataset, batch_size=batch_size, shuffle=True, seed=args.seed, num_workers=args.workers,
                              drop_last=True)
    log_every = args.log_every or max(1, min(50, args.steps // 10))
    progress = contextlib.nullcontext() if _on_terminal() else _training_progress()  # a terminal gets tqdm's bar
    with progress:
        result = finetune(wrap, loader, steps=args.steps, lr=args.lr, precision=args.precision, seed=args.seed,
                          checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                          resume=args.resume, log_every=log_every, progress=_on_terminal() or None,
                          augment=None if args.augment == "none" else args.augment, calibrate=args.calibrate)
    last = result.history[-1] if result.history else {}
    _say(
        f"fine-tuned {args.steps} steps; last losses: "
        + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float))
    )
    training = {"data": args.data, "steps": args.steps, "lr": args.lr, "augment": args.augment,
                "calibrated": args.calibrate, "preprocessing": _preprocessing_record(wrap)}
    if args.label_map:
        training["label_map"] = args.label_map
    try:
        wrap.save_pretrained(args.out, training=training)
    except OSError as exc:
        fallback = wrap.save_pretrained(tempfile.mkdtemp(prefix="errwrap-finetune-"), training=training)
        raise CLIError(
            f"--out {args.out}: could not save the fine-tuned model ({exc}); it was saved to {fallback} instead"
        ) from None
    _say(f"saved to {args.out}")
    return 0


class _ImageFiles:
    """Unlabelled images for ``errwrap estimate --data images:PATH``: normalised ``(3, H, W)`` tensors."""

    def __init__(self, paths: Sequence[Path], normalize: Any, corrupt: Any = None) -> None:
        self.paths, self.normalize, self.corrupt = list(paths), normalize, corrupt

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = _read_image(self.paths[index])
        if self.corrupt is not None:
            image = self.corrupt(image)
        return self.normalize(image, torch.zeros(image.shape[-2:], dtype=torch.long))[0]


def cmd_estimate(args: argparse.Namespace) -> int:
    json_path = _output_file(args.json, "--json")
    corrupt = parse_corrupt(args.corrupt)
    kind, _, rest = args.data.partition(":")
    paths = _image_paths(rest.split(",")) if kind.lower() == "images" and rest else None
    if kind.lower() == "images" and not paths:
        raise CLIError(f"--data {args.data!r}: expected images:PATH with PATH an image file or a directory of images")
    if paths is not None:
        for path in paths:  # fail on a bad file before loading the model
            _read_image(path)
    wrap = _load_model(args.model, args.device)
    normalize, _, _ = _normalizer(wrap)
    if paths is not None:
        dataset: Any = _ImageFiles(paths, normalize, corrupt)
        batch_size = args.batch_size or 1
    else:
        if corrupt is not None:
            normalize = Compose([corrupt.joint, normalize])
        dataset = parse_data_spec(args.data, args.split, transform=normalize, size=args.size,
                                  num_classes=wrap.num_classes, label_map=parse_label_map(args.label_map))  # fmt: skip
        _check_classes(dataset, wrap, args.data)
        batch_size = args.batch_size or 4
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data}: no images found for split {args.split!r}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=args.workers)
    report = estimate(wrap, loader, threshold=args.threshold, max_batches=args.max_batches)
    if paths is not None:
        for row in report.per_image:
            row["file"] = str(paths[row["index"]])
    _say(report.table(k=args.worst))
    if paths is not None and args.worst:
        _say("files, most likely wrong first: " + ", ".join(Path(row["file"]).name for row in report.worst(args.worst)))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        report.to_json(json_path)
        _say(f"wrote {json_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = _output_dir(args.out)
    corrupt = parse_corrupt(args.corrupt)
    kind, _, rest = args.data.partition(":")
    paths = _image_paths(rest.split(",")) if kind.lower() == "images" and rest else None
    if kind.lower() == "images" and not paths:
        raise CLIError(f"--data {args.data!r}: expected images:PATH with PATH an image file or a directory of images")
    if paths is not None:
        paths = paths[: args.max_images]
        for path in paths:  # fail on a bad file before loading the model
            _read_image(path)
    wrap = _load_model(args.model, args.device)
    normalize, mean, std = _normalizer(wrap, args.model)
    if paths is not None:
        dataset: Any = _ImageFiles(paths, normalize, corrupt)  # named by file in the page
    else:
        if corrupt is not None:
            normalize = Compose([corrupt.joint, normalize])
        dataset = parse_data_spec(args.data, args.split, transform=normalize, size=args.size,
                                  num_classes=wrap.num_classes, label_map=parse_label_map(args.label_map))  # fmt: skip
        _check_classes(dataset, wrap, args.data)
        if args.max_images is not None and args.max_images < len(dataset):
            dataset = Subset(dataset, range(args.max_images))
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data}: no images found for split {args.split!r}")
    start = time.perf_counter()
    page = write_report(wrap, dataset, out, labels=not args.no_labels, worst=args.worst,
                        mean=mean, std=std, threshold=args.threshold, max_side=args.max_side)  # fmt: skip
    _say(
        f"wrote {page} ({min(args.worst, len(dataset))} of {len(dataset)} images, worst first) in "
        f"{time.perf_counter() - start:.1f} s; "
        "open it in a browser, offline"
    )
    return 0


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``errwrap: error: ...`` (exit 2), pointing at ``--help``."""

    def error(self, message: str) -> Any:
        command = self.prog.removeprefix("errwrap").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"errwrap: error: {where}{message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


MODEL_HELP = ("a model directory written by save_pretrained, or a Hub repo id; its base must be one the CLI "
              "rebuilds from config.json (errwrap's DeepLabV3Plus, SMP, torchvision or transformers models)")
DATA_HELP = (
    "scenes[:N], aerial[:N] or cells[:N] (generated), cityscapes:ROOT (19 classes), ade20k:ROOT (150 classes with "
    "label 0 ignored; "
    "0 is kept as 'other' for a 151-class model) or folder:IMAGES_DIR,MASKS_DIR (masks of class indices, "
    "paired by file stem; see --label-map)"
)
CORRUPT_HELP = ("corrupt the images before the model sees them, to measure a shift: blur, fog, noise, dark or jpeg, "
                "severity 1 (mild) to 5 (strong), e.g. fog:3 (errwrap.data.Corrupt)")
LABEL_MAP_HELP = ("folder data only: raw mask value -> class, e.g. 255:1 for binary masks saved as 0/255 "
                  "(255 = foreground); several as 255:1,128:255")
EPILOG = """\
models:
  predict, evaluate and finetune read a model directory that you write from Python:

    import torchvision, errwrap
    net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(num_classes=5)
    # ... train net, or load your weights into it ...
    wrap = errwrap.ErrorCorrectionWrapper(net)
    # as net was trained; omit for raw [0, 1]
    wrap.preprocessing = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    wrap.save_pretrained("my-model")

  then: errwrap finetune --model my-model --data folder:images,masks --steps 1000 --out my-model-tuned
  The CLI rebuilds the base from config.json for errwrap's DeepLabV3Plus, SMP, torchvision and
  transformers models. A network of your own (config.json has "base": null) or a heads-only save
  needs Python: ErrorCorrectionWrapper.from_pretrained(DIR, model=your_network), errwrap.finetune,
  errwrap.evaluate (docs/training.md).

data (--data KIND:PATH):
  scenes[:N]                  errwrap's generated street-like scenes (N images, default 200)
  aerial[:N]                  generated top-down map-like tiles (6 classes)
  cells[:N]                   generated microscopy-like images (3 classes)
  cityscapes:ROOT             ROOT/leftImg8bit and ROOT/gtFine
  ade20k:ROOT                 ADEChallengeData2016 (or the directory that holds it)
  folder:IMAGES_DIR,MASKS_DIR images and masks (PNG of class indices) paired by file stem;
                              0/255 binary masks need --label-map 255:1
"""


_MODEL_NOTE = ("--model is a directory written by ErrorCorrectionWrapper(net).save_pretrained(DIR) in Python "
               "(see 'errwrap --help'); a base network of your own needs Python instead of the CLI.")


def build_parser() -> argparse.ArgumentParser:
    """The ``errwrap`` parser: global options and one sub-parser per command (``_add_<command>``)."""
    parser = _Parser(prog="errwrap", description="Predict where a segmentation network is wrong, and correct it.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"errwrap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_predict, _add_evaluate, _add_finetune, _add_estimate, _add_report):
        add(sub)
    return parser


def _add_demo(sub: Any) -> None:
    """The ``demo`` command's arguments."""
    p = sub.add_parser(
        "demo",
        help="train, wrap, fine-tune and evaluate on the built-in scenes (CPU, ~5 min)",
        description="On the built-in Scenes: train a small DeepLabV3+ base, wrap it, fine-tune the heads with the "
        "base frozen, evaluate on a held-out split, print a before/after table, and write metrics.json, "
        "a saved model and picture panels to --out.",
    )
    p.add_argument("--out", default="errwrap-demo", help="output directory (default: errwrap-demo)")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="scales the training steps; 5 (the default) takes about 5 minutes on an idle 2-core CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the training (default: 0)")
    p.add_argument(
        "--quick", action="store_true", help="a tiny run of a few seconds (smoke test; numbers are meaningless)"
    )
    p.set_defaults(func=cmd_demo)


def _add_predict(sub: Any) -> None:
    """The ``predict`` command's arguments."""
    p = sub.add_parser("predict", help="corrected labels, error map and panel for images",
                       description="For each image write OUT/STEM_labels.png (palette PNG of corrected class ids), "
                                   "OUT/STEM_error.png (error-probability heat map) and OUT/STEM_panel.png. "
                                   "Images are normalised with the model's saved preprocessing (none when it saved "
                                   "none: RGB in [0, 1], as in Python). " + _MODEL_NOTE)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "images", nargs="+", help="image files (PNG, JPEG, ...; RGB, RGBA, grayscale, 16-bit) or directories of them"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--palette", choices=["cityscapes", "ade20k", "generated"], default=None,
                   help="colours of the label PNGs (default: by the number of classes)")
    p.add_argument("--no-panel", action="store_true", help="do not write STEM_panel.png")
    p.add_argument("--panel-max-width", type=_positive_int, default=2048,
                   help="shrink panels wider than this many pixels (default: 2048)")
    p.add_argument(
        "--overlay",
        action="store_true",
        help="also write STEM_overlay.png (the image blended with the corrected labels) and STEM_error_overlay.png "
        "(blended with the error map)",
    )
    p.add_argument(
        "--json",
        default=None,
        help="write per-image results here: file, mean error probability, fraction of "
        "pixels re-labelled, predicted accuracy (1 - mean error probability)",
    )
    p.add_argument("--corrupt", default=None, metavar="KIND:SEVERITY", help=CORRUPT_HELP)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.set_defaults(func=cmd_predict)


def _add_evaluate(sub: Any) -> None:
    """The ``evaluate`` command's arguments."""
    p = sub.add_parser(
        "evaluate",
        help="metrics report: segmentation, error detection, calibration, timing",
        description="Evaluate a model on a data set: base vs corrected mIoU, error head vs baselines (AUROC, "
        "AUPR-Error, AUPR-Success, FPR95), ECE and time per image. " + _MODEL_NOTE,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, metavar="KIND:PATH", help=DATA_HELP)
    p.add_argument("--label-map", default=None, metavar="RAW:CLASS,...", help=LABEL_MAP_HELP)
    p.add_argument("--split", default="val", help="data split for cityscapes, ade20k and generated data (default: val)")
    p.add_argument("--size", type=_positive_int, default=None, help="image size for generated data (default: 128)")
    p.add_argument(
        "--baselines",
        default="msp,entropy",
        help="comma-separated: msp, entropy, mc_dropout, max_logit, energy, error_prob (default: msp,entropy)",
    )
    p.add_argument("--mc-T", type=_positive_int, default=10, help="passes of MC dropout (default: 10)")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=4,
        help="images per batch (default: 4); images of different sizes are batched by size",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument(
        "--max-batches", type=_positive_int, default=None, help="stop after this many batches (default: all)"
    )
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--corrupt", default=None, metavar="KIND:SEVERITY", help=CORRUPT_HELP)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.set_defaults(func=cmd_evaluate)


def _add_finetune(sub: Any) -> None:
    """The ``finetune`` command's arguments."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune the heads (base frozen) and save the model",
        description="Fine-tune a saved model's heads with the base frozen on the training split of --data "
        "and save the model (base and heads) to --out. " + _MODEL_NOTE,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, metavar="KIND:PATH", help=DATA_HELP)
    p.add_argument("--label-map", default=None, metavar="RAW:CLASS,...", help=LABEL_MAP_HELP)
    p.add_argument("--steps", type=_positive_int, required=True, help="optimizer steps")
    p.add_argument("--out", required=True, help="directory to save the fine-tuned model to")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW, poly schedule (default: 0.001)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="images per batch (default: 8); images of different sizes without --crop train one per batch")
    p.add_argument("--crop", type=_positive_int, default=None, help="random scale (0.5-2) and crop to this size")
    p.add_argument("--size", type=_positive_int, default=None, help="image size for generated data (default: 128)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32 (default), bf16 autocast (CPU or GPU) or fp16 autocast (GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the heads' training (default: 0)")
    p.add_argument("--augment", choices=["photometric", "none"], default="photometric",
                   help="photometric (default): random gain, gamma, contrast and saturation on half of the training "
                        "images, as errwrap.finetune does; none: the images as they are")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="keep the temperature at 1; by default it is fitted on the first 32 training batches after "
                        "the last step, as errwrap.finetune does")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here")
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help="a checkpoint every this many steps (and at the end)",
    )
    p.add_argument(
        "--resume", default=None, help="a checkpoint directory, or 'latest' (the newest in --checkpoint-dir)"
    )
    p.add_argument("--log-every", type=_positive_int, default=None,
                   help="when the output is not a terminal, a progress line every this many steps (default: a tenth of "
                        "--steps, at most 50)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.set_defaults(func=cmd_finetune)


def _add_estimate(sub: Any) -> None:
    """The ``estimate`` command's arguments."""
    p = sub.add_parser(
        "estimate",
        help="predicted accuracy and mIoU without labels; the images to check first",
        description="Estimate, without labels, the pixel accuracy and mIoU of the corrected labels per image and "
        "for the data set (from the error map and the fused probabilities; docs/estimate.md), "
        "beside the average-confidence baseline, and list the images most likely wrong first. "
        "Labels in --data are ignored. " + _MODEL_NOTE,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, metavar="KIND:PATH",
                   help="images:PATH (image files or directories, comma-separated; no labels needed) or " + DATA_HELP)
    p.add_argument("--label-map", default=None, metavar="RAW:CLASS,...", help=LABEL_MAP_HELP)
    p.add_argument("--split", default="val", help="data split for cityscapes, ade20k and scenes (default: val)")
    p.add_argument("--size", type=_positive_int, default=None, help="image size for scenes (default: 128)")
    p.add_argument("--corrupt", default=None, metavar="KIND:SEVERITY", help=CORRUPT_HELP)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="error probability above which a pixel counts as flagged (default: 0.5)",
    )
    p.add_argument(
        "--worst", type=int, default=10, help="how many of the most-likely-wrong images to list (default: 10)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=None, help="images per batch (default: 1 for images:PATH, else 4)"
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument(
        "--max-batches", type=_positive_int, default=None, help="stop after this many batches (default: all)"
    )
    p.add_argument("--json", default=None, help="also write the report (every image's row) as JSON here")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.set_defaults(func=cmd_estimate)


def _add_report(sub: Any) -> None:
    """The ``report`` command's arguments."""
    p = sub.add_parser(
        "report",
        help="a static HTML page: the estimate and the images most likely wrong first",
        description="Write OUT/index.html, a page that opens from disk offline (pictures in OUT/images/, numbers "
        "in OUT/report.json): the estimate of errwrap estimate, the --worst images with the lowest "
        "predicted accuracy first (image, labels, error map with a colour bar, class legend), and, "
        "when --data has labels, true against predicted accuracy and the risk-coverage plot. " + _MODEL_NOTE,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, metavar="KIND:PATH",
                   help="images:PATH (image files or directories, comma-separated; no labels needed) or " + DATA_HELP)
    p.add_argument("--out", required=True, help="output directory (index.html, report.json, images/)")
    p.add_argument("--label-map", default=None, metavar="RAW:CLASS,...", help=LABEL_MAP_HELP)
    p.add_argument("--split", default="val", help="data split for cityscapes, ade20k and generated data (default: val)")
    p.add_argument("--size", type=_positive_int, default=None, help="image size for generated data (default: 128)")
    p.add_argument("--corrupt", default=None, metavar="KIND:SEVERITY", help=CORRUPT_HELP)
    p.add_argument("--max-images", type=_positive_int, default=None, help="read only the first N images (default: all)")
    p.add_argument(
        "--worst", type=int, default=24, help="how many images to show, most likely wrong first (default: 24)"
    )
    p.add_argument(
        "--no-labels", action="store_true", help="ignore the labels of --data (the page a user without labels sees)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="error probability above which a pixel counts as flagged (default: 0.5)",
    )
    p.add_argument(
        "--max-side",
        type=_positive_int,
        default=512,
        help="shrink pictures to at most this many pixels a side (default: 512)",
    )
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.set_defaults(func=cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``errwrap`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    hub_log = logging.getLogger("huggingface_hub")
    if hub_log.handlers:  # it prints its own messages (Hub retries): not a second time through the root handler
        hub_log.propagate = False
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("errwrap: interrupted", file=sys.stderr)
        return 130
    except (
        CLIError,
        FileNotFoundError,
        NotADirectoryError,
        ValueError,
        TypeError,
        RuntimeError,
        OSError,
        json.JSONDecodeError,
    ) as exc:
        if args.debug:
            raise
        lines = str(exc).splitlines()
        message = lines[0] if lines else type(exc).__name__
        if message.startswith("Caught ") and "Original Traceback" in str(exc):  # raised in a DataLoader worker
            message = lines[-1].split(": ", 1)[-1]
        print(f"errwrap: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
