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
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .smp import SMP_ARCHITECTURES, is_smp_model, smp_spec
from .torchvision import TORCHVISION_BUILDERS, is_torchvision_segmentation_model, torchvision_spec
from .transformers import TRANSFORMERS_CLASSES, is_transformers_segmentation_model, transformers_spec

__all__ = ["build_base", "family_spec", "BASE_FAMILIES"]

_DEEPLAB_KEYS = frozenset(
    {
        "encoder_name", "num_classes", "in_channels", "output_stride", "atrous_rates", "aspp_channels",
        "decoder_channels", "low_level_channels", "dropout", "pretrained", "norm_layer", "act_layer",
    }
)  # fmt: skip


def _config(spec: Mapping[str, Any]) -> dict[str, Any]:
    config = spec.get("config")
    if not isinstance(config, Mapping):
        raise ValueError(f"base spec of family {spec.get('family')!r}: expected a 'config' mapping, got {type(config).__name__}")
    return copy.deepcopy(dict(config))


def _build_errwrap_deeplab(spec: Mapping[str, Any]) -> nn.Module:
    from ..models import DeepLabV3Plus

    config = _config(spec)
    unknown = sorted(set(config) - _DEEPLAB_KEYS)
    if unknown:
        raise ValueError(f"base spec errwrap.DeepLabV3Plus: unknown config keys {unknown}; expected a subset of {sorted(_DEEPLAB_KEYS)}")
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


def _build_transformers(spec: Mapping[str, Any]) -> nn.Module:
    import transformers

    cls = spec.get("class")
    if cls not in TRANSFORMERS_CLASSES:
        raise ValueError(f"base spec transformers: unknown class {cls!r}; expected one of {list(TRANSFORMERS_CLASSES)}")
    config_cls = getattr(transformers, TRANSFORMERS_CLASSES[cls])
    values = _config(spec)
    if "use_pretrained_backbone" in values:
        values["use_pretrained_backbone"] = False  # never download
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
    return BASE_FAMILIES[family](spec)


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
