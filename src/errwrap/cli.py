"""The ``errwrap`` command line: ``demo``, ``predict``, ``evaluate`` and ``finetune``.

Every failure the user can fix (a missing file, an unknown model, a wrong data layout) is one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "parse_data_spec", "parse_label_map", "parse_corrupt"]

DATA_KINDS = ("scenes", "aerial", "cells", "cityscapes", "ade20k", "folder")
GENERATED_KINDS = DATA_KINDS[:3]  # errwrap.data.GENERATED; the CLI imports errwrap.data lazily


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
            raise CLIError(f"--label-map {text!r}: expected RAW:CLASS pairs separated by commas, such as 255:1, got {item!r}")
        mapping[int(raw)] = int(target)
    return mapping


def parse_corrupt(text: str | None):
    """``"fog:3"`` -> ``errwrap.data.Corrupt("fog", severity=3)`` (``KIND`` alone: severity 3);
    ``None`` stays ``None``."""
    if text is None:
        return None
    from .data import CORRUPTIONS, Corrupt

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
    from . import data

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
    that network, which only Python can pass: say so in CLI terms, before any work."""
    config_path = Path(location) / "config.json"
    if not config_path.is_file():
        return  # a Hub id, or a missing file: from_pretrained reports it
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # from_pretrained names the problem
    if not isinstance(config, dict):
        return
    if config.get("heads_only"):
        what = "holds only the heads (saved with heads_only=True)"
    elif "base" in config and config["base"] is None:
        what = "has a base network of your own, which errwrap cannot rebuild from config.json"
    else:
        return
    raise CLIError(
        f"--model {location}: {what}; the CLI can only load models whose base it rebuilds (errwrap, SMP, torchvision, "
        "transformers). Use Python: ErrorCorrectionWrapper.from_pretrained(DIR, model=your_network), then "
        "errwrap.finetune / errwrap.evaluate (docs/training.md)"
    )


def _load_model(location: str, device: str | None):
    from .wrapper import ErrorCorrectionWrapper

    _refuse_what_the_cli_cannot_rebuild(location)
    try:
        return ErrorCorrectionWrapper.from_pretrained(location, device=device).eval()
    except FileNotFoundError as exc:
        raise CLIError(f"--model {location}: {exc}") from None


def _normalizer(wrap):
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize

    pre = getattr(wrap, "preprocessing", None) or {}
    mean, std = pre.get("mean", IMAGENET_MEAN), pre.get("std", IMAGENET_STD)
    return Normalize(mean, std), mean, std


def _read_image(path: Path):
    from PIL import UnidentifiedImageError

    from .data.datasets import load_image

    if not path.is_file():
        raise CLIError(f"{path}: no such image file")
    try:
        return load_image(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CLIError(f"{path}: not an image errwrap can read ({exc})") from None


def _image_paths(arguments: Sequence[str]) -> list[Path]:
    """Image files named on the command line; a directory stands for the images directly in it."""
    from .data.datasets import IMAGE_EXTENSIONS

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


# ---------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(minutes=args.minutes, seed=args.seed)
    progress = logging.StreamHandler(sys.stdout)  # the fine-tuning loop's progress lines
    progress.setFormatter(logging.Formatter("  %(message)s"))
    train_log = logging.getLogger("errwrap.training")
    train_log.addHandler(progress)
    train_log.setLevel(logging.INFO)
    train_log.propagate = False
    if args.quick:
        cfg = DemoConfig(minutes=0.1, seed=args.seed, image_size=64, train_images=64, val_images=16, panels=2, mc_dropout=False)
    _say(f"errwrap demo: {cfg.scaled(cfg.base_steps)} base steps, {cfg.scaled(cfg.head_steps)} head steps, output {args.out}")
    result = run_demo(args.out, cfg, say=_say)
    report = result.report
    _say("")
    _say(report.table())
    _say("")
    head = report.error_detection["error_head"]
    msp = report.error_detection["msp"]
    _say(f"before/after: mIoU {100 * report.base.miou:.2f} -> {100 * report.fused.miou:.2f} ({100 * report.miou_gain:+.2f} points); "
         f"AUPR-Error error head {100 * head.aupr_error:.2f} vs MSP {100 * msp.aupr_error:.2f}")
    _say(f"wrote {len(result.files)} files to {result.out_dir} in {result.seconds:.0f} s "
         f"(base {result.base_steps} steps, heads {result.head_steps} steps)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from ._validate import check_outputs_finite
    from .viz import make_panel, palette_for, save_heatmap_png, save_label_png

    out = _output_dir(args.out)
    paths = _image_paths(args.images)
    images = [_read_image(p) for p in paths]  # fail on a bad file before loading the model
    corrupt = parse_corrupt(args.corrupt)
    if corrupt is not None:
        images = [corrupt(image) for image in images]
    wrap = _load_model(args.model, args.device)
    normalize, mean, std = _normalizer(wrap)
    palette = palette_for(wrap.num_classes, args.palette)
    out.mkdir(parents=True, exist_ok=True)
    device = next(wrap.parameters()).device
    for path, stem, image in zip(paths, _output_names(paths), images):
        x, _ = normalize(image, torch.zeros(image.shape[-2:], dtype=torch.long))
        with torch.no_grad():
            o = wrap(x[None].to(device))
        check_outputs_finite(o, str(path))
        labels, error, base = o.labels[0].cpu(), o.error_prob[0].cpu(), o.base_labels[0].cpu()
        save_label_png(labels, out / f"{stem}_labels.png", palette)
        save_heatmap_png(error, out / f"{stem}_error.png")
        make_panel(x, base, error, labels, palette=palette, mean=mean, std=std).save(out / f"{stem}_panel.png")
        changed = float((labels != base).float().mean())
        _say(f"{path}: mean error probability {float(error.mean()):.3f}, {100 * changed:.2f}% of pixels re-labelled -> {out}/{stem}_*.png")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .evaluation import evaluate

    json_path = _output_file(args.json, "--json")
    label_map = parse_label_map(args.label_map)
    corrupt = parse_corrupt(args.corrupt)
    wrap = _load_model(args.model, args.device)
    normalize, _, _ = _normalizer(wrap)
    if corrupt is not None:
        from .data import Compose

        normalize = Compose([corrupt.joint, normalize])
    dataset = parse_data_spec(args.data, args.split, transform=normalize, size=args.size, num_classes=wrap.num_classes, label_map=label_map)
    _check_classes(dataset, wrap, args.data)
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data}: no images found for split {args.split!r}")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    baselines = tuple(b for b in args.baselines.split(",") if b)
    start = time.perf_counter()
    report = evaluate(wrap, loader, baselines=baselines, mc_dropout_T=args.mc_T, max_batches=args.max_batches)
    _say(report.table())
    _say(f"evaluated {report.num_images} images in {time.perf_counter() - start:.1f} s")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        report.to_json(json_path)
        _say(f"wrote {json_path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import tempfile

    from . import data as D
    from ._io import check_writable, tensor_bytes
    from .training import finetune

    _output_dir(args.out)  # refuse a file before training, not after
    if args.checkpoint_dir is not None:
        _output_dir(args.checkpoint_dir, "--checkpoint-dir")
    label_map = parse_label_map(args.label_map)
    wrap = _load_model(args.model, args.device)
    check_writable(args.out, 2 * tensor_bytes(wrap.state_dict().values()), "--out")  # before training, not after
    normalize, _, _ = _normalizer(wrap)
    transforms = [D.RandomHorizontalFlip()]
    if args.crop:
        transforms = [D.RandomScale(0.5, 2.0), D.RandomCrop(args.crop), D.RandomHorizontalFlip()]
    dataset = parse_data_spec(args.data, "train", transform=D.Compose([*transforms, normalize]), size=args.size,
                              num_classes=wrap.num_classes, label_map=label_map)
    _check_classes(dataset, wrap, args.data)
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data}: no training images found")
    loader = D.make_loader(dataset, batch_size=args.batch_size, shuffle=True, seed=args.seed, num_workers=args.workers, drop_last=True)
    result = finetune(wrap, loader, steps=args.steps, lr=args.lr, precision=args.precision, seed=args.seed,
                      checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                      resume=args.resume)
    last = result.history[-1] if result.history else {}
    _say(f"fine-tuned {args.steps} steps; last losses: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float)))
    training = {"data": args.data, "steps": args.steps, "lr": args.lr}
    if args.label_map:
        training["label_map"] = args.label_map
    try:
        wrap.save_pretrained(args.out, training=training)
    except OSError as exc:
        fallback = wrap.save_pretrained(tempfile.mkdtemp(prefix="errwrap-finetune-"), training=training)
        raise CLIError(f"--out {args.out}: could not save the fine-tuned model ({exc}); it was saved to {fallback} instead") from None
    _say(f"saved to {args.out}")
    return 0


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``errwrap: error: ...`` (exit 2), pointing at ``--help``."""

    def error(self, message: str) -> Any:  # type: ignore[override]
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
DATA_HELP = ("scenes[:N], aerial[:N] or cells[:N] (generated), cityscapes:ROOT (19 classes), ade20k:ROOT (150 classes with label 0 ignored; "
             "0 is kept as 'other' for a 151-class model) or folder:IMAGES_DIR,MASKS_DIR (masks of class indices, "
             "paired by file stem; see --label-map)")
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
    errwrap.ErrorCorrectionWrapper(net).save_pretrained("my-model")

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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="errwrap", description="Predict where a segmentation network is wrong, and correct it.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"errwrap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model_note = ("--model is a directory written by ErrorCorrectionWrapper(net).save_pretrained(DIR) in Python "
                  "(see 'errwrap --help'); a base network of your own needs Python instead of the CLI.")

    p = sub.add_parser("demo", help="train, wrap, fine-tune and evaluate on the built-in scenes (CPU, ~5 min)",
                       description="On the built-in Scenes: train a small DeepLabV3+ base, wrap it, fine-tune the heads with the "
                                   "base frozen, evaluate on a held-out split, print a before/after table, and write metrics.json, "
                                   "a saved model and picture panels to --out.")
    p.add_argument("--out", default="errwrap-demo", help="output directory (default: errwrap-demo)")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="scales the training steps; 5 (the default) takes about 5 minutes on an idle 2-core CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the training (default: 0)")
    p.add_argument("--quick", action="store_true", help="a tiny run of a few seconds (smoke test; numbers are meaningless)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("predict", help="corrected labels, error map and panel for images",
                       description="For each image write OUT/STEM_labels.png (palette PNG of corrected class ids), "
                                   "OUT/STEM_error.png (error-probability heat map) and OUT/STEM_panel.png. "
                                   "Images are normalised with the model's saved preprocessing (default: ImageNet "
                                   "mean and std). " + model_note)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...; RGB, RGBA, grayscale, 16-bit) or directories of them")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--palette", choices=["cityscapes", "ade20k", "generated"], default=None,
                   help="colours of the label PNGs (default: by the number of classes)")
    p.add_argument("--corrupt", default=None, metavar="KIND:SEVERITY", help=CORRUPT_HELP)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics report: segmentation, error detection, calibration, timing",
                       description="Evaluate a model on a data set: base vs corrected mIoU, error head vs baselines (AUROC, "
                                   "AUPR-Error, AUPR-Success, FPR95), ECE and time per image. " + model_note)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, metavar="KIND:PATH", help=DATA_HELP)
    p.add_argument("--label-map", default=None, metavar="RAW:CLASS,...", help=LABEL_MAP_HELP)
    p.add_argument("--split", default="val", help="data split for cityscapes, ade20k and generated data (default: val)")
    p.add_argument("--size", type=_positive_int, default=None, help="image size for generated data (default: 128)")
    p.add_argument("--baselines", default="msp,entropy", help="comma-separated: msp, entropy, mc_dropout, max_logit, energy, error_prob (default: msp,entropy)")
    p.add_argument("--mc-T", type=_positive_int, default=10, help="passes of MC dropout (default: 10)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="images per batch (default: 4); 1 for images of different sizes")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--max-batches", type=_positive_int, default=None, help="stop after this many batches (default: all)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--corrupt", default=None, metavar="KIND:SEVERITY", help=CORRUPT_HELP)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("finetune", help="fine-tune the heads (base frozen) and save the model",
                       description="Fine-tune a saved model's heads with the base frozen on the training split of --data "
                                   "and save the model (base and heads) to --out. " + model_note)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, metavar="KIND:PATH", help=DATA_HELP)
    p.add_argument("--label-map", default=None, metavar="RAW:CLASS,...", help=LABEL_MAP_HELP)
    p.add_argument("--steps", type=_positive_int, required=True, help="optimizer steps")
    p.add_argument("--out", required=True, help="directory to save the fine-tuned model to")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW, poly schedule (default: 0.001)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="images per batch (default: 8); images of different sizes need --crop or --batch-size 1")
    p.add_argument("--crop", type=_positive_int, default=None, help="random scale (0.5-2) and crop to this size")
    p.add_argument("--size", type=_positive_int, default=None, help="image size for generated data (default: 128)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32 (default), bf16 autocast (CPU or GPU) or fp16 autocast (GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the heads' training (default: 0)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, help="a checkpoint every this many steps (and at the end)")
    p.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' (the newest in --checkpoint-dir)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``errwrap`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("errwrap: interrupted", file=sys.stderr)
        return 130
    except (CLIError, FileNotFoundError, NotADirectoryError, ValueError, TypeError, RuntimeError, OSError, json.JSONDecodeError) as exc:
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
