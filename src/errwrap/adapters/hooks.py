"""Tap any network: forward hooks on named modules give the features, the output gives the logits.

Example:
    >>> wrap = ErrorCorrectionWrapper(model, low_level="backbone.layer1", high_level="decoder")  # doctest: +SKIP

The hooks hold no reference to the adapter, and the adapter removes them when it is garbage
collected (with the wrapper that owns it) or when :meth:`HooksAdapter.detach` is called, so the
model works unwrapped afterwards.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._validate import describe, is_tracing
from .base import PROTOCOL_HELP, Adapter, BaseOutput
from .features import FeaturePair
from .registry import family_spec

__all__ = ["FeatureTap", "HooksAdapter", "logits_from_output", "module_or_error"]

LOGIT_KEYS = ("out", "logits")


def module_or_error(model: nn.Module, name: str, role: str = "module") -> nn.Module:
    """``model``'s submodule called ``name``; a ``ValueError`` listing close names otherwise."""
    modules = dict(model.named_modules())
    if isinstance(name, str) and name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(str(name), names, n=6, cutoff=0.5)
    hint = f"close names: {close}" if close else f"its top-level modules are {[n for n in names if '.' not in n][:12]}"
    raise ValueError(
        f"{role}={name!r}: expected the name of a module of {type(model).__name__}, got no such module; {hint}"
    )


def _first_tensor(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return value


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class FeatureTap:
    """Forward hooks that store the outputs of named modules until :meth:`pop` reads them.

    A module whose output is a tuple or list contributes its first tensor. The stored tensors are
    dropped by :meth:`pop`, so nothing outlives one forward pass. Hooks are removed by
    :meth:`remove` or when the tap is garbage collected.

    Args:
        model: the network to tap.
        names: module names (as in ``model.named_modules()``), in the order of the features.
        role: how errors name the argument (e.g. ``"low_level"``).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], role: str = "module") -> None:
        self.names = list(dict.fromkeys(names))
        store: dict[str, Any] = {}
        self._store = store
        self._handles: list[RemovableHandle] = []
        modules = [module_or_error(model, n, role) for n in self.names]
        for name, module in zip(self.names, modules, strict=True):
            self._handles.append(module.register_forward_hook(self._make_hook(store, name)))
        self._finalizer = weakref.finalize(self, _remove, self._handles)

    @staticmethod
    def _make_hook(store: dict[str, Any], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[name] = _first_tensor(output)

        return hook

    def pop(self) -> dict[str, Tensor]:
        """The tapped outputs of the last forward pass, by module name; clears the store."""
        missing = [n for n in self.names if n not in self._store]
        if missing and not is_tracing():
            self._store.clear()
            raise RuntimeError(
                f"hooked modules {missing} did not run in the base's forward; expected modules that the forward calls"
            )
        out = {n: self._store.pop(n) for n in self.names}
        if not is_tracing():
            for name, value in out.items():
                if not isinstance(value, Tensor) or value.ndim != 4:
                    raise TypeError(
                        f"module {name!r}: expected its output to be a 4-d tensor BxCxhxw, got {describe(value)}"
                    )
        return out

    def clear(self) -> None:
        self._store.clear()

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        self._finalizer()
        self._store.clear()

    @property
    def active(self) -> bool:
        return self._finalizer.alive


def logits_from_output(out: Any) -> Tensor:
    """Read logits from a model's output: a tensor, a mapping (or ``ModelOutput``) with
    ``"out"`` or ``"logits"``, or a tuple/list whose first element is a tensor."""
    if isinstance(out, Tensor):
        logits = out
    elif isinstance(out, Mapping) and any(k in out for k in LOGIT_KEYS):
        logits = next(out[k] for k in LOGIT_KEYS if k in out)
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    else:
        raise TypeError(
            f"base output: got {describe(out)}; expected a logits tensor, a mapping with 'out' or 'logits', or a "
            f"tuple whose first element is the logits, or pass logits_fn=. {PROTOCOL_HELP}"
        )
    if not is_tracing() and (not isinstance(logits, Tensor) or logits.ndim != 4):
        raise TypeError(f"base logits: expected a 4-d tensor BxCxhxw, got {describe(logits)}. {PROTOCOL_HELP}")
    return logits


class HooksAdapter(Adapter):
    """Any network: features from forward hooks on named modules, logits from its output.

    Features are named by the module names, low-level first; with one name, that module's
    output serves as both features.

    Args:
        model: the network to tap.
        low_level: name of the module whose output feeds the detail head.
        high_level: name of the module whose output feeds the error head.
        logits_fn: turns the model's output into logits; default :func:`logits_from_output`.

    Example:
        >>> import torchvision                                              # doctest: +SKIP
        >>> net = torchvision.models.segmentation.fcn_resnet50(num_classes=5)  # doctest: +SKIP
        >>> adapter = HooksAdapter(net, "backbone.layer1", "classifier.3")  # doctest: +SKIP
    """

    name = "hooks"

    def __init__(
        self,
        model: nn.Module,
        low_level: str | None = None,
        high_level: str | None = None,
        logits_fn: Callable[[Any], Tensor] | None = None,
    ) -> None:
        names = [n for n in (low_level, high_level) if n is not None]
        if not names:
            raise ValueError("HooksAdapter: expected at least one module name in low_level= or high_level=, got none")
        for role, ref in (("low_level", low_level), ("high_level", high_level)):
            if ref is not None and not isinstance(ref, str):
                raise TypeError(f"{role}: expected a module name, got {type(ref).__name__}")
            if ref is not None:
                module_or_error(model, ref, role)
        self.low_level, self.high_level = low_level, high_level
        self.logits_fn = logits_fn or logits_from_output
        self.tap = FeatureTap(model, names, role="low_level" if low_level is not None else "high_level")
        self.default_features: FeaturePair = (low_level or high_level, high_level or low_level)

    def forward(self, model: nn.Module, x: Tensor) -> BaseOutput:
        self.tap.clear()
        out = model(x)
        features = self.tap.pop()
        return BaseOutput(self.logits_fn(out), features)

    def detach(self) -> None:
        self.tap.remove()

    def spec(self, model: nn.Module) -> dict[str, Any] | None:
        """The model's family spec (SMP, torchvision, transformers, ``errwrap_spec()``), so a
        tapped model of a known family is rebuilt by ``from_pretrained`` without ``model=``."""
        return family_spec(model)

    def feature_module(self, name: str) -> str | None:
        """Every feature is the output of the module it is named after."""
        return name if name in self.tap.names else None

    def __repr__(self) -> str:
        return f"HooksAdapter(low_level={self.low_level!r}, high_level={self.high_level!r})"
