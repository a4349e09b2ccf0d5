"""Adapters map a base network onto errwrap's native protocol (logits plus named features)."""

from .base import PROTOCOL_HELP, BaseAdapter, BaseOutput, NativeAdapter, NoFeaturesError, normalize_features, parse_base_output
from .registry import find_adapter, register_adapter, registered_adapters, unregister_adapter
from .hooks import FeatureTap, HooksAdapter, logits_from_output
from .auto import choose_feature_modules
from .smp import SMPAdapter
from .torchvision import TorchvisionSegmentationAdapter
from .transformers import TransformersAdapter
from .specs import build_base
from . import builtin  # noqa: F401  registers the SMP, torchvision and transformers adapters

__all__ = [
    "PROTOCOL_HELP",
    "BaseAdapter",
    "BaseOutput",
    "NativeAdapter",
    "NoFeaturesError",
    "normalize_features",
    "parse_base_output",
    "find_adapter",
    "register_adapter",
    "registered_adapters",
    "unregister_adapter",
    "FeatureTap",
    "HooksAdapter",
    "logits_from_output",
    "choose_feature_modules",
    "SMPAdapter",
    "TorchvisionSegmentationAdapter",
    "TransformersAdapter",
    "build_base",
]
