"""Adapters map a base network onto errwrap's native protocol (logits plus named features)."""

from .base import PROTOCOL_HELP, BaseAdapter, BaseOutput, NativeAdapter, normalize_features, parse_base_output
from .registry import find_adapter, register_adapter, registered_adapters, unregister_adapter

__all__ = [
    "PROTOCOL_HELP",
    "BaseAdapter",
    "BaseOutput",
    "NativeAdapter",
    "normalize_features",
    "parse_base_output",
    "find_adapter",
    "register_adapter",
    "registered_adapters",
    "unregister_adapter",
]
