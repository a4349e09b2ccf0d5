"""Which adapter runs a base, and which of its features feed the heads: the one place that decides.

The wrapper asks three questions, in order:

1. :func:`select_adapter`: the adapter given; ``"hooks"`` (or, for a native-protocol model,
   ``low_level`` / ``high_level`` naming modules of the base) taps modules with
   :class:`~errwrap.adapters.hooks.HooksAdapter`; otherwise the registered family adapter for
   the base (:func:`~errwrap.adapters.registry.find_adapter`), else the native adapter.
2. :func:`probe`: run the base once on a probe input. When the adapter finds logits but no feature
   maps (:class:`~errwrap.adapters.base.NoFeaturesError`) and the user named no features, two
   modules are chosen by :func:`~errwrap.adapters.auto.choose_feature_modules` and tapped with
   hooks instead. The answer carries the adapter that ran, its output, and the features as
   :class:`~errwrap.adapters.features.FeatureInfo` data.
3. :func:`choose_features`: the user's ``low_level`` / ``high_level`` (an index or a name) where
   given, else the pure default rule
   :func:`~errwrap.adapters.features.choose_default_features` applied to the adapter's
   preference for those features.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body, self.head = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 4, 1)
    ...     def forward(self, x):
    ...         return self.head(self.body(x))
    >>> net = Net()
    >>> adapter = select_adapter(net, None, None, None)
    >>> result = probe(adapter, net, torch.randn(1, 3, 32, 32), discover=True)
    >>> type(result.adapter).__name__, [(f.name, f.channels, f.stride) for f in result.features]
    ('HooksAdapter', [('body', 8, 2)])
    >>> choose_features(result.adapter, result.features, None, None)
    ('body', 'body')
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .auto import choose_feature_modules
from .base import Adapter, BaseOutput, NativeAdapter, NoFeaturesError
from .features import FeatureInfo, choose_default_features, feature_info
from .hooks import HooksAdapter
from .registry import find_adapter

__all__ = ["FeatureRef", "Probe", "select_adapter", "probe", "choose_features", "resolve_feature"]

logger = logging.getLogger(__name__)

#: How a user names a feature: its index in the base's features, its name, or ``None`` (default).
FeatureRef = int | str | None


class Probe(NamedTuple):
    """What one probe pass found: the adapter that ran (possibly a hooks adapter that replaced the
    one given), its output, and its features as data, in the output's order."""

    adapter: Adapter
    output: BaseOutput
    features: list[FeatureInfo]


def _hooks_adapter(base: nn.Module, low_level: FeatureRef, high_level: FeatureRef) -> HooksAdapter:
    for role, ref in (("low_level", low_level), ("high_level", high_level)):
        if ref is not None and not isinstance(ref, str):
            raise ValueError(
                f"{role}={ref!r}: errwrap taps modules of the base with hooks here, so expected a module name or None, "
                f"got {type(ref).__name__}"
            )
    return HooksAdapter(base, low_level, high_level)  # type: ignore[arg-type]


def select_adapter(
    base: nn.Module,
    adapter: Adapter | str | None,
    low_level: FeatureRef,
    high_level: FeatureRef,
) -> Adapter:
    """The adapter for ``base``: ``adapter`` itself when it is one; ``"hooks"`` taps the modules
    named by ``low_level`` and ``high_level``; otherwise the registered family adapter for ``base``
    (or the one registered as ``adapter``), or, for a native-protocol model, hooks when
    ``low_level``/``high_level`` name modules of ``base``.

    Raises:
        TypeError: ``adapter`` is neither an :class:`~errwrap.adapters.base.Adapter`, a name nor ``None``.
        ValueError: unknown adapter name, unknown module name, or a non-name feature with hooks.
    """
    if isinstance(adapter, Adapter):
        return adapter
    if adapter is not None and not isinstance(adapter, str):
        raise TypeError(f"adapter: expected a BaseAdapter, an adapter name or None, got {type(adapter).__name__}")
    if adapter == HooksAdapter.name:
        return _hooks_adapter(base, low_level, high_level)
    chosen = find_adapter(base, adapter)
    if isinstance(chosen, NativeAdapter):
        modules = {name for name, _ in base.named_modules() if name}
        if any(isinstance(ref, str) and ref in modules for ref in (low_level, high_level)):
            return _hooks_adapter(base, low_level, high_level)
    return chosen


def _run(adapter: Adapter, base: nn.Module, x: Tensor, discover: bool) -> tuple[Adapter, BaseOutput]:
    """``adapter(base, x)``; with ``discover``, a base with logits but no features gets the hooks
    adapter on two modules chosen from this pass (the first adapter is detached)."""
    try:
        return adapter, adapter(base, x)
    except NoFeaturesError:
        if not discover:
            raise
    low, high = choose_feature_modules(base, x)
    adapter.detach()
    hooks = HooksAdapter(base, low, high)
    try:
        return hooks, hooks(base, x)
    except BaseException:
        hooks.detach()
        raise


def probe(adapter: Adapter, base: nn.Module, x: Tensor, discover: bool = False) -> Probe:
    """Run ``base`` once on ``x`` through ``adapter``, in eval mode and without gradients (every
    submodule's train/eval mode is restored afterwards).

    Args:
        adapter: the adapter from :func:`select_adapter`.
        base: the base network.
        x: the probe input ``(B, C, H, W)``.
        discover: the user named no features, so a base that returns logits without features
            may be tapped with hooks on modules errwrap chooses.

    Raises:
        TypeError, ValueError: the base's output or the user's arguments, as the adapter reports them.
        RuntimeError: anything else the base raised, with the probe's shape.
    """
    modes = {m: m.training for m in base.modules()}
    base.eval()
    try:
        with torch.no_grad():
            adapter, out = _run(adapter, base, x, discover)
    except (TypeError, ValueError):
        raise
    except Exception as exc:
        raise RuntimeError(
            f"running the base on a probe input of shape {tuple(x.shape)} failed ({type(exc).__name__}: {exc}); "
            "pass sample_size= (e.g. 224) or in_channels= to match what the base accepts"
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    size = (int(x.shape[-2]), int(x.shape[-1]))
    return Probe(adapter, out, feature_info(out.features, size, adapter.feature_module))


def resolve_feature(ref: FeatureRef, names: Sequence[str], role: str, default: str) -> str:
    """The feature name that ``ref`` (an index into ``names``, a name, or ``None`` for
    ``default``) means; ``role`` names the argument in errors."""
    keys = list(names)
    if ref is None:
        return default
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        raise TypeError(f"{role}: expected a feature index, a feature name or None, got {type(ref).__name__}")
    if isinstance(ref, int):
        if not -len(keys) <= ref < len(keys):
            raise ValueError(
                f"{role}={ref}: the base returns {len(keys)} feature maps {keys}; "
                f"expected an index in [{-len(keys)}, {len(keys)})"
            )
        return keys[ref]
    if ref not in keys:
        raise ValueError(
            f"{role}={ref!r}: not a feature of the base output; its features are {keys}. "
            "To tap an inner module instead, pass module names (with adapter='hooks' for a model family errwrap knows)"
        )
    return ref


def choose_features(
    adapter: Adapter,
    features: Sequence[FeatureInfo],
    low_level: FeatureRef = None,
    high_level: FeatureRef = None,
) -> tuple[str, str]:
    """The ``(low_level, high_level)`` feature names the heads read: the user's where given, else
    :func:`~errwrap.adapters.features.choose_default_features` of ``features`` and
    ``adapter.preferred_features(features)``."""
    default_low, default_high = choose_default_features(features, adapter.preferred_features(features))
    names = [f.name for f in features]
    low = resolve_feature(low_level, names, "low_level", default_low)
    return low, resolve_feature(high_level, names, "high_level", default_high)
