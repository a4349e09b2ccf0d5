"""The demo behind ``errwrap demo``: train a small DeepLabV3+ on the built-in ``Scenes``, wrap it,
fine-tune the heads with the base frozen, evaluate on a held-out split, and write a report, a
saved model and picture panels.

Everything runs on the CPU. The step counts are fixed (so a run is repeatable, and its numbers
depend on the seed, not on how busy the machine is); they were chosen so that the default run
takes about 5 minutes on an otherwise idle 2-core CPU, and ``minutes`` scales them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import Scenes
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, RandomHorizontalFlip
from .evaluation import EvaluationReport, evaluate
from .models import DeepLabV3Plus
from .training import finetune
from .viz import add_panel_key, make_panel, palette_for
from .wrapper import ErrorCorrectionWrapper

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults fit about 5 minutes on 2 CPU cores."""

    minutes: float = 5.0  # scales the step counts below, which are for 5 minutes
    seed: int = 0
    image_size: int = 64
    train_images: int = 1000
    val_images: int = 120
    batch_size: int = 8
    encoder: str = "resnet18"
    base_steps: int = 300
    head_steps: int = 1000
    base_lr: float = 2e-3
    heads_lr: float = 5e-3
    panels: int = 4
    mc_dropout: bool = True

    def scaled(self, steps: int) -> int:
        """``steps`` scaled by ``minutes / 5`` (at least 10)."""
        return max(10, round(steps * self.minutes / 5.0))


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    report: EvaluationReport
    base_steps: int
    head_steps: int
    seconds: float
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def _loader(ds, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=g, num_workers=0)


def _train_base(
    model: DeepLabV3Plus, loader: DataLoader, total: int, cfg: DemoConfig, say: Callable[[str], None]
) -> None:
    """Plain cross-entropy training of the base for ``total`` steps (warm-up, then poly decay)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=1e-4)
    model.train()
    start, i = time.perf_counter(), 0
    while i < total:
        for images, labels in loader:
            for group in opt.param_groups:
                group["lr"] = cfg.base_lr * min(1.0, (i + 1) / 20) * (1 - i / total) ** 0.9
            logits, _ = model(images)
            loss = F.cross_entropy(logits, labels, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            i += 1
            if i % max(1, total // 10) == 0 or i == total:
                say(f"  base step {i}/{total}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s")
            if i == total:
                break
    model.eval()


def run_demo(
    out_dir: str | Path = "errwrap-demo", config: DemoConfig | None = None, say: Callable[[str], None] | None = None
) -> DemoResult:
    """Run the demo and write its outputs to ``out_dir``.

    Files written: ``metrics.json`` (the evaluation report and the demo's settings),
    ``model/`` (``save_pretrained``), ``panels/panel_XX.png``.
    """
    cfg = config or DemoConfig()
    say = say or logger.info
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = Scenes(
        cfg.train_images,
        size=cfg.image_size,
        seed=cfg.seed,
        split="train",
        transform=Compose([RandomHorizontalFlip(), norm]),
        cache=True,
    )
    val = Scenes(cfg.val_images, size=cfg.image_size, seed=cfg.seed, split="val", transform=norm, cache=True)
    for ds in (train, val):  # draw every scene once, before anything is timed
        for i in range(len(ds)):
            ds[i]
    say(
        f"data: built-in Scenes, {len(train)} training and {len(val)} held-out images of "
        f"{cfg.image_size}x{cfg.image_size}, {train.num_classes} classes"
    )

    say(f"[1/4] training a small DeepLabV3+ ({cfg.encoder}, output stride 16) from scratch")
    base = DeepLabV3Plus(
        cfg.encoder,
        num_classes=train.num_classes,
        output_stride=16,
        aspp_channels=64,
        decoder_channels=64,
        low_level_channels=24,
    )
    base_steps = cfg.scaled(cfg.base_steps)
    _train_base(base, _loader(train, cfg.batch_size, True, cfg.seed), base_steps, cfg, say)

    say("[2/4] wrapping it and fine-tuning the error, detail and fusion heads (base frozen)")
    wrap = ErrorCorrectionWrapper(base, sample_size=cfg.image_size)
    wrap.preprocessing = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    train_loader = _loader(train, cfg.batch_size, True, cfg.seed + 1)
    head_steps = cfg.scaled(cfg.head_steps)
    result = finetune(
        wrap,
        train_loader,
        steps=head_steps,
        lr=cfg.heads_lr,
        warmup_steps=min(50, head_steps // 10),
        seed=cfg.seed,
        progress=False,
        log_every=max(1, head_steps // 10),
    )
    last = result.history[-1]
    say(
        f"  heads done: loss {last['loss']:.3f} (error {last['error']:.3f}, detail {last['detail']:.3f}, fused "
        f"{last['fused']:.3f})"
    )
    wrap.eval()

    baselines = ("msp", "entropy", "mc_dropout") if cfg.mc_dropout else ("msp", "entropy")
    say(f"[3/4] evaluating on {len(val)} held-out images: base vs corrected, error head vs {', '.join(baselines)}")
    val_loader = _loader(val, cfg.batch_size, False, 0)
    batches = len(val_loader)

    def progress(i: int) -> None:
        if (i + 1) % max(1, batches // 4) == 0 or i + 1 == batches:
            say(f"  evaluated {min((i + 1) * cfg.batch_size, len(val))}/{len(val)} images")

    report = evaluate(wrap, val_loader, baselines=baselines, mc_dropout_T=10, progress=progress)

    say(f"[4/4] writing results to {out}")
    files = []
    seconds = time.perf_counter() - t0
    settings: dict[str, Any] = {k: v for k, v in vars(cfg).items()}
    settings.update(base_steps=base_steps, head_steps=head_steps, seconds=round(seconds, 1))
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps({"report": report.to_dict(), "demo": settings}, indent=2) + "\n")
    files.append(metrics_path)
    training = {
        "data": f"errwrap.data.Scenes, {cfg.train_images} images of {cfg.image_size} px, seed {cfg.seed}",
        "base": f"DeepLabV3Plus({cfg.encoder}) trained {base_steps} steps from scratch",
        "heads": f"{head_steps} steps, base frozen",
    }
    files.append(
        wrap.save_pretrained(out / "model", class_names=train.class_names, metrics=report.to_dict(), training=training)
    )
    palette = palette_for(train.num_classes)
    with torch.no_grad():
        for i in range(min(cfg.panels, len(val))):
            image, label = val[i]
            o = wrap(image[None])
            panel = make_panel(
                image,
                o.base_labels[0],
                o.error_prob[0],
                o.labels[0],
                ground_truth=label,
                palette=palette,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
            )
            present = sorted(
                set(o.base_labels[0].unique().tolist())
                | set(o.labels[0].unique().tolist())
                | set(label[label != 255].unique().tolist())
            )
            panel = add_panel_key(panel, palette, present, class_names=train.class_names, ground_truth=True)
            path = out / "panels" / f"panel_{i:02d}.png"
            path.parent.mkdir(exist_ok=True)
            panel.resize((panel.width * 2, panel.height * 2), resample=0).save(path)
            files.append(path)
    return DemoResult(report, base_steps, head_steps, time.perf_counter() - t0, out, files)
