"""Adapters map a base network onto errwrap's native protocol (logits plus named features).

Module map: :mod:`.base` (the protocol and the :class:`Adapter` interface), :mod:`.features`
(features as :class:`FeatureInfo` data and the default-feature rule), :mod:`.select` (which
adapter runs a base and which features feed the heads), :mod:`.registry` (adapter and family
registries), :mod:`.hooks` and :mod:`.auto` (tapping any network), :mod:`.specs` (rebuilding a
base from its JSON spec), one module per family (:mod:`.smp`, :mod:`.torchvision`,
:mod:`.transformers`, :mod:`.deeplab`) and :mod:`.builtin`, which registers those families.
"""

from . import builtin  # noqa: F401  registers the built-in families and the SMP, torchvision and transformers adapters
from .auto import choose_feature_modules
from .base import (
    PROTOCOL_HELP,
    Adapter,
    BaseAdapter,
    BaseOutput,
    NativeAdapter,
    NoFeaturesError,
    normalize_features,
    parse_base_output,
)
from .features import FeatureInfo, choose_default_features, feature_info
from .hooks import FeatureTap, HooksAdapter, logits_from_output
from .registry import (
    Family,
    family_spec,
    find_adapter,
    register_adapter,
    register_family,
    registered_adapters,
    registered_families,
    unregister_adapter,
    unregister_family,
)
from .select import Probe, choose_features, probe, select_adapter
from .smp import SMPAdapter
from .specs import build_base
from .torchvision import TorchvisionSegmentationAdapter
from .transformers import TransformersAdapter

__all__ = [
    "PROTOCOL_HELP",
    "Adapter",
    "BaseAdapter",
    "BaseOutput",
    "NativeAdapter",
    "NoFeaturesError",
    "normalize_features",
    "parse_base_output",
    "FeatureInfo",
    "feature_info",
    "choose_default_features",
    "find_adapter",
    "register_adapter",
    "registered_adapters",
    "unregister_adapter",
    "Family",
    "family_spec",
    "register_family",
    "registered_families",
    "unregister_family",
    "FeatureTap",
    "HooksAdapter",
    "logits_from_output",
    "choose_feature_modules",
    "SMPAdapter",
    "TorchvisionSegmentationAdapter",
    "TransformersAdapter",
    "build_base",
    "Probe",
    "select_adapter",
    "probe",
    "choose_features",
]
