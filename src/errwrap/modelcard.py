"""The ``README.md`` model card written next to a saved errwrap model."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["CITATION", "render_model_card"]

CITATION = """@article{gong2022erroneous,
  title   = {Erroneous pixel prediction for semantic image segmentation},
  author  = {Gong, Lixue and Zhang, Yiqun and Zhang, Yunke and Yang, Yin and Xu, Weiwei},
  journal = {Computational Visual Media},
  volume  = {8},
  number  = {1},
  pages   = {165--175},
  year    = {2022},
  doi     = {10.1007/s41095-021-0235-7}
}"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    """Tables from an evaluation report's ``to_dict()`` (``base``/``fused`` segmentation,
    ``error_detection`` per score, ``calibration``)."""
    lines = ["## Evaluation", ""]
    if "base" in metrics or "fused" in metrics:
        lines += ["| output | mIoU | pixel accuracy | ECE |", "|---|---|---|---|"]
        calibration = metrics.get("calibration") or {}
        for name in ("base", "fused"):
            seg = metrics.get(name) or {}
            ece = (calibration.get(name) or {}).get("ece")
            lines.append(f"| {name} | {_fmt(seg.get('miou'))} | {_fmt(seg.get('pixel_accuracy'))} | {_fmt(ece)} |")
        lines.append("")
    detection = metrics.get("error_detection") or {}
    if detection:
        lines += ["| error score | AUROC | AUPR-Error | AUPR-Success | FPR@95%TPR |", "|---|---|---|---|---|"]
        for name, m in detection.items():
            lines.append(
                f"| {name} | {_fmt(m.get('auroc'))} | {_fmt(m.get('aupr_error'))} | {_fmt(m.get('aupr_success'))} | "
                f"{_fmt(m.get('fpr95'))} |"
            )
        lines.append("")
    if metrics.get("num_images") is not None:
        lines += [f"On {metrics['num_images']} images ({metrics.get('num_pixels')} labelled pixels).", ""]
    return lines


def _normalisation(config: dict[str, Any]) -> str:
    pre = config.get("preprocessing")
    if pre:
        return f"normalised with mean {pre['mean']} and std {pre['std']}"
    return "not normalised: RGB in [0, 1] (config.json has no preprocessing; the errwrap CLI applies none either)"


def _cli_usage(config: dict[str, Any]) -> list[str]:
    if config.get("base") is None or config.get("heads_only"):
        return ["The `errwrap` command line cannot rebuild this base network; use Python as above.", ""]
    return [
        "From the command line:",
        "",
        "```bash",
        "errwrap predict --model REPO_ID photos/ --out predictions",
        "errwrap evaluate --model REPO_ID --data folder:IMAGES_DIR,MASKS_DIR --json report.json",
        "```",
        "",
    ]


def render_model_card(
    config: dict[str, Any],
    *,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    license: str | None = None,
) -> str:
    """Markdown model card with Hub metadata (library ``errwrap``, tags), the base, the classes,
    how the model was trained, its metrics and the paper's citation."""
    heads = config["heads"]
    base = config.get("base")
    tags = ["errwrap", "semantic-segmentation", "error-prediction", "failure-detection", "pytorch"]
    front = ["---", "library_name: errwrap", "pipeline_tag: image-segmentation", "tags:"]
    front += [f"- {t}" for t in tags]
    if license:
        front.append(f"license: {license}")
    front.append("---")
    if base is None:
        base_text = "a custom network (not described in `config.json`): pass it as `model=` when loading"
    else:
        base_text = f"family `{base['family']}`, configuration in `config.json` under `base`"
    kind = (
        "the three heads only (the base's weights are not in this repository)"
        if config.get("heads_only")
        else "the base network and the three heads"
    )
    names = config.get("class_names")
    classes = ", ".join(f"`{n}`" for n in names) if names else "not named"
    lines = front + [
        "",
        "# errwrap model",
        "",
        "A semantic-segmentation network wrapped by [errwrap](https://pypi.org/project/errwrap/): an error head "
        "predicts, per pixel, the probability that the base network's label is wrong; a detail head re-labels "
        "those pixels from high-resolution features; a fusion head mixes both.",
        "",
        f"- **Base**: {base_text}.",
        f"- **Weights**: {kind}, in `model.safetensors`.",
        f"- **Classes** ({heads['num_classes']}): {classes}.",
        f"- **Heads**: error head {heads['error_blocks']}x{heads['error_channels']} channels, detail head "
        f"{heads['detail_blocks']}x{heads['detail_channels']} channels"
        f"{', features reduced by 1x1 convolutions first' if heads.get('project_features') else ''}, "
        f"`{heads['fusion']}` fusion.",
        "",
        "## Usage",
        "",
        "```python",
        "from errwrap import ErrorCorrectionWrapper",
        "",
        (
            "wrap = ErrorCorrectionWrapper.from_pretrained(REPO_ID, model=my_base)"
            if base is None or config.get("heads_only")
            else "wrap = ErrorCorrectionWrapper.from_pretrained(REPO_ID)"
        ),
        f"out = wrap(images)          # images: B x {heads['in_channels']} x H x W float, {_normalisation(config)}",
        "out.labels, out.error_prob  # corrected labels, P(returned label is wrong)",
        "```",
        "",
        *_cli_usage(config),
        "## Training",
        "",
    ]
    if training:
        lines += [f"- {k}: {v}" for k, v in training.items()]
    else:
        lines.append("Not recorded.")
    lines.append("")
    if metrics:
        lines += _metrics_section(metrics)
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)
