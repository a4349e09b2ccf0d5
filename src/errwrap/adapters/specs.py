"""Rebuild a base network from its JSON spec, for the families errwrap knows.

A spec is ``{"family": ..., "config": {...}}`` (transformers specs add ``"class"``), as written by
an adapter's ``spec(model)``. The family is looked up in the family registry
(:func:`errwrap.adapters.registry.register_family`); each family's builder lives in its own
module and looks every architecture and class name up in a fixed table, with the checks below;
nothing in a spec is imported or looked up by an arbitrary name, so a downloaded spec cannot
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

from .registry import FAMILY_BUILDERS, family_spec, get_family

__all__ = [
    "build_base",
    "family_spec",
    "check_model_name",
    "check_timm_name",
    "spec_config",
    "BASE_FAMILIES",
    "MAX_BASE_ELEMENTS",
]

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

def check_model_name(value: Any, key: str, family: str) -> str:
    """``value`` if it is a plain model name (``^[A-Za-z0-9_.-]+$``, no ``..``), else a
    ``ValueError`` naming the family and the key: no scheme (``hf-hub:``, ``local-dir:``,
    ``timm/``) and no path, so a saved spec cannot make a library download or read elsewhere."""
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(
            f"base spec {family}: {key} {value!r} is not a plain model name; expected letters, digits, '_', '.' and "
            "'-' "
            "only (no scheme such as 'hf-hub:' or 'local-dir:', no path): errwrap rebuilds a base from a known name, "
            "never from a download or another directory"
        )
    return value


def check_timm_name(value: Any, key: str, family: str) -> str:
    """``value`` if it is a plain model name that timm knows, else a ``ValueError`` (see :func:`check_model_name`)."""
    import timm

    name = check_model_name(value, key, family)
    if not timm.is_model(name):
        raise ValueError(
            f"base spec {family}: {key} {name!r} is not a model this timm {timm.__version__} knows (timm.list_models())"
        )
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


def spec_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``spec["config"]``, after refusing any string in it that names a Hub
    download, a local directory or a URL."""
    config = spec.get("config")
    family = str(spec.get("family"))
    if not isinstance(config, Mapping):
        raise ValueError(f"base spec of family {family!r}: expected a 'config' mapping, got {type(config).__name__}")
    config = copy.deepcopy(dict(config))
    _refuse_outside_strings(config, family)
    return config


#: family name -> builder (read-only, from the family registry): the only families :func:`build_base` accepts.
BASE_FAMILIES = FAMILY_BUILDERS


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
    family = get_family(spec.get("family"))
    if family is None:
        raise ValueError(f"base spec: unknown family {spec.get('family')!r}; expected one of {list(BASE_FAMILIES)}")
    _refuse_huge(family.build, spec)
    return family.build(spec)


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
            f"base spec {spec.get('family')}: this config builds a base of {elements / 1e9:.2f} G parameters, more "
            "than the "
            f"{MAX_BASE_ELEMENTS / 1e9:.2f} G errwrap rebuilds from a file; for a base this large build it yourself "
            "and pass it "
            "as from_pretrained(..., model=...)"
        )
