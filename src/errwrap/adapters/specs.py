"""Rebuild a base network from its JSON spec, for the families errwrap knows.

A spec is ``{"family": ..., "config": {...}}`` (transformers specs add ``"class"``), as written by
an adapter's ``spec(model)``. Every family, architecture and class name is looked up in a fixed
table; nothing in a spec is imported or looked up by an arbitrary name, so a downloaded spec cannot
make errwrap run code it does not ship. Rebuilt models have random weights and never download
any: pretrained flags are switched off, the weights come from the checkpoint.

Example:
    >>> spec = {"family": "errwrap.DeepLabV3Plus", "config": {"encoder_name": "resnet18", "num_classes": 3}}
    >>> type(build_base(spec)).__name__
    'DeepLabV3Plus'
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .smp import SMP_ARCHITECTURES, is_smp_model, smp_spec
from .torchvision import TORCHVISION_BUILDERS, is_torchvision_segmentation_model, torchvision_spec
from .transformers import TRANSFORMERS_CLASSES, is_transformers_segmentation_model, transformers_spec

__all__ = ["build_base", "family_spec", "check_model_name", "BASE_FAMILIES"]

logger = logging.getLogger(__name__)

#: Most parameters and buffers of a base rebuilt from a spec (4 GB in float32): a file cannot
#: make errwrap allocate more; a larger base is built by the user and passed as ``model=``.
MAX_BASE_ELEMENTS = 2**30

#: What a model name (a timm or SMP encoder, a timm backbone) may be: a plain name, optionally
#: with a timm pretrained tag (``resnet18.a1_in1k``); no scheme, no path.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: Prefixes that make timm, SMP or transformers fetch or read from outside the model directory;
#: refused in any string of a spec.
_OUTSIDE = re.compile(r"(hf[-_]hub|local[-_]dir)\s*:|^\s*(https?|file|s3|gs|ftp)://|^\s*timm/", re.IGNORECASE)

_DEEPLAB_KEYS = frozenset(
    {
        "encoder_name", "num_classes", "in_channels", "output_stride", "atrous_rates", "aspp_channels",
        "decoder_channels", "low_level_channels", "dropout", "pretrained", "norm_layer", "act_layer",
    }
)  # fmt: skip


def check_model_name(value: Any, key: str, family: str) -> str:
    """``value`` if it is a plain model name (``^[A-Za-z0-9_.-]+$``, no ``..``), else a
    ``ValueError`` naming the family and the key: no scheme (``hf-hub:``, ``local-dir:``,
    ``timm/``) and no path, so a saved spec cannot make a library download or read elsewhere."""
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(
            f"base spec {family}: {key} {value!r} is not a plain model name; expected letters, digits, '_', '.' and '-' "
            "only (no scheme such as 'hf-hub:' or 'local-dir:', no path): errwrap rebuilds a base from a known name, "
            "never from a download or another directory"
        )
    return value


def _check_timm_name(value: Any, key: str, family: str) -> str:
    import timm

    name = check_model_name(value, key, family)
    if not timm.is_model(name):
        raise ValueError(f"base spec {family}: {key} {name!r} is not a model this timm {timm.__version__} knows (timm.list_models())")
    return name


def _refuse_outside_strings(obj: Any, family: str, where: str = "config") -> None:
    """Refuse any string of a spec that names a Hub download, a local directory or a URL."""
    if isinstance(obj, str):
        if _OUTSIDE.search(obj):
            raise ValueError(
                f"base spec {family}: {where} = {obj!r} points outside the model directory (a Hub download, another "
                "directory or a URL); errwrap rebuilds bases from plain names only"
            )
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if k != "_name_or_path":  # transformers' note of where a config came from; never read to build
                _refuse_outside_strings(v, family, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _refuse_outside_strings(v, family, f"{where}.{i}")


def _config(spec: Mapping[str, Any]) -> dict[str, Any]:
    config = spec.get("config")
    family = str(spec.get("family"))
    if not isinstance(config, Mapping):
        raise ValueError(f"base spec of family {family!r}: expected a 'config' mapping, got {type(config).__name__}")
    config = copy.deepcopy(dict(config))
    _refuse_outside_strings(config, family)
    return config


def _build_errwrap_deeplab(spec: Mapping[str, Any]) -> nn.Module:
    from ..models import DeepLabV3Plus

    config = _config(spec)
    unknown = sorted(set(config) - _DEEPLAB_KEYS)
    if unknown:
        raise ValueError(f"base spec errwrap.DeepLabV3Plus: unknown config keys {unknown}; expected a subset of {sorted(_DEEPLAB_KEYS)}")
    _check_timm_name(config.get("encoder_name", "resnet50"), "encoder_name", "errwrap.DeepLabV3Plus")
    config["pretrained"] = False
    return DeepLabV3Plus(**config)


def _build_smp(spec: Mapping[str, Any]) -> nn.Module:
    import segmentation_models_pytorch as smp

    config = _config(spec)
    arch = str(config.pop("arch", "")).lower()
    if arch not in SMP_ARCHITECTURES:
        raise ValueError(f"base spec smp: unknown arch {arch!r}; expected one of {list(SMP_ARCHITECTURES)}")
    activation = config.get("activation")
    if activation is not None and not isinstance(activation, str):
        raise ValueError(f"base spec smp: activation must be a name or null, got {type(config['activation']).__name__}")
    encoder = check_model_name(config.get("encoder_name", "resnet34"), "encoder_name", "smp")
    if encoder.startswith("tu-"):
        _check_timm_name(encoder[3:], "encoder_name", "smp")
    elif encoder not in smp.encoders.get_encoder_names():
        raise ValueError(f"base spec smp: encoder_name {encoder!r} is not an encoder this SMP {smp.__version__} knows (smp.encoders.get_encoder_names(), or 'tu-' and a timm name)")
    config["encoder_weights"] = None
    return smp.create_model(arch, **config)


def _build_torchvision(spec: Mapping[str, Any]) -> nn.Module:
    from torchvision.models import segmentation

    config = _config(spec)
    name = config.pop("name", None)
    allowed = [n for names in TORCHVISION_BUILDERS.values() for n in names]
    if name not in allowed:
        raise ValueError(f"base spec torchvision: unknown name {name!r}; expected one of {allowed}")
    unknown = sorted(set(config) - {"num_classes", "aux_loss"})
    if unknown:
        raise ValueError(f"base spec torchvision: unknown config keys {unknown}; expected 'num_classes' and 'aux_loss'")
    return getattr(segmentation, name)(weights=None, weights_backbone=None, **config)


def _check_backbones(values: dict[str, Any], cls: str) -> None:
    """A transformers config names its backbone either by a nested ``backbone_config`` (data,
    fine) or by ``backbone``: a timm name (checked) or a Hub name, which transformers would fetch
    with ``AutoConfig.from_pretrained`` (refused). At every level ``use_pretrained_backbone`` is
    switched off, so no weights are downloaded."""
    family = f"transformers {cls}"
    timm_backbone = bool(values.get("use_timm_backbone", False)) or values.get("model_type") == "timm_backbone"
    backbone = values.get("backbone")
    if backbone is not None:
        if not timm_backbone:
            raise ValueError(
                f"base spec {family}: backbone {backbone!r} names a transformers backbone by Hub name, which would be "
                "fetched from the Hub; expected backbone null and a 'backbone_config' object (or a timm backbone)"
            )
        _check_timm_name(backbone, "backbone", family)
    if "use_pretrained_backbone" in values:
        values["use_pretrained_backbone"] = False  # never download
    nested = values.get("backbone_config")
    if isinstance(nested, dict):
        _check_backbones(nested, cls)


def _build_transformers(spec: Mapping[str, Any]) -> nn.Module:
    import transformers

    cls = spec.get("class")
    if cls not in TRANSFORMERS_CLASSES:
        raise ValueError(f"base spec transformers: unknown class {cls!r}; expected one of {list(TRANSFORMERS_CLASSES)}")
    config_cls = getattr(transformers, TRANSFORMERS_CLASSES[cls])
    values = _config(spec)
    _check_backbones(values, cls)
    config = config_cls.from_dict(values)
    return getattr(transformers, cls)(config)


#: family name -> builder; the only families :func:`build_base` accepts.
BASE_FAMILIES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "errwrap.DeepLabV3Plus": _build_errwrap_deeplab,
    "smp": _build_smp,
    "torchvision": _build_torchvision,
    "transformers": _build_transformers,
}


def build_base(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a base network (random weights, in train mode as a fresh module is) from a spec.

    Args:
        spec: ``{"family": ..., "config": {...}}`` as returned by an adapter's ``spec``.

    Raises:
        ValueError: unknown family, architecture, class or config key.
        TypeError: ``spec`` is not a mapping.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"base spec: expected a mapping with 'family' and 'config', got {type(spec).__name__}")
    family = spec.get("family")
    if family not in BASE_FAMILIES:
        raise ValueError(f"base spec: unknown family {family!r}; expected one of {list(BASE_FAMILIES)}")
    _refuse_huge(BASE_FAMILIES[family], spec)
    return BASE_FAMILIES[family](spec)


def _refuse_huge(builder: Callable[[Mapping[str, Any]], nn.Module], spec: Mapping[str, Any]) -> None:
    """Build the base on the meta device first (no memory) and refuse a spec whose base would
    have more than :data:`MAX_BASE_ELEMENTS` parameters and buffers."""
    try:
        with torch.device("meta"):
            probe = builder(spec)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 (only a size estimate: the real build reports its own errors)
        logger.debug("base spec %s: no meta-device size estimate (%s: %s)", spec.get("family"), type(exc).__name__, exc)
        return
    elements = sum(t.numel() for t in probe.parameters()) + sum(t.numel() for t in probe.buffers())
    if elements > MAX_BASE_ELEMENTS:
        raise ValueError(
            f"base spec {spec.get('family')}: this config builds a base of {elements / 1e9:.2f} G parameters, more than the "
            f"{MAX_BASE_ELEMENTS / 1e9:.2f} G errwrap rebuilds from a file; for a base this large build it yourself and pass it "
            "as from_pretrained(..., model=...)"
        )


def family_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec of ``model`` whatever adapter runs it (e.g. an SMP model tapped with hooks):
    the family's spec for SMP, torchvision and transformers models, ``model.errwrap_spec()``
    for a model that has one, else ``None``."""
    if is_smp_model(model):
        return smp_spec(model)
    if is_torchvision_segmentation_model(model):
        return torchvision_spec(model)
    if is_transformers_segmentation_model(model):
        return transformers_spec(model)
    to_spec = getattr(model, "errwrap_spec", None)
    return to_spec() if callable(to_spec) else None
