"""The base-network protocol errwrap speaks, and the adapter interface that maps other
networks onto it.

The native protocol: ``base(x)`` returns ``(logits, features)`` or a mapping with keys
``"logits"`` and ``"features"``; ``features`` is one tensor, a sequence of tensors, or a mapping of
name to tensor. Adapters turn any other network into that form.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .._protocol import BaseOutput
from .._validate import check_base_batch, describe, explain_device_mismatch, is_tracing
from .features import FeatureInfo, FeaturePair

__all__ = [
    "NoFeaturesError",
    "BaseOutput",
    "Adapter",
    "BaseAdapter",
    "NativeAdapter",
    "parse_base_output",
    "normalize_features",
    "PROTOCOL_HELP",
]

PROTOCOL_HELP = (
    "errwrap accepts a base network whose forward returns (logits, features) or a mapping with "
    "keys 'logits' and 'features', where features is a tensor, a sequence of tensors or a mapping "
    "of name to tensor (each Bx?xhxw); or a model family with a registered adapter (SMP, "
    "torchvision, transformers); or any network with forward hooks on two of its modules: "
    "ErrorCorrectionWrapper(model, low_level='backbone.layer1', high_level='decoder')"
)


class NoFeaturesError(TypeError):
    """The base returns logits errwrap can read but no feature maps it can use (the wrapper then
    looks for features itself, see :mod:`errwrap.adapters.auto`)."""


def normalize_features(features: Any) -> dict[str, Tensor]:
    """Turn a tensor, a sequence or a mapping of 4-d tensors into an ordered ``name -> tensor``
    dict; sequence items are named ``"0"``, ``"1"``, ...; a single tensor is ``"0"``."""
    if isinstance(features, Tensor):
        named = {"0": features}
    elif isinstance(features, Mapping):
        named = {str(k): v for k, v in features.items()}
    elif isinstance(features, Sequence) and not isinstance(features, str):
        named = {str(i): f for i, f in enumerate(features)}
    else:
        raise TypeError(
            f"base features: expected a tensor, a sequence or a mapping of tensors, got {describe(features)}. "
            f"{PROTOCOL_HELP}"
        )
    if not is_tracing():
        if not named:
            raise ValueError(f"base features: expected at least one feature map, got none. {PROTOCOL_HELP}")
        for name, f in named.items():
            if not isinstance(f, Tensor) or f.ndim != 4:
                raise TypeError(f"base feature {name!r}: expected a 4-d tensor BxCxhxw, got {describe(f)}")
    return named


def parse_base_output(out: Any) -> BaseOutput:
    """Parse the native protocol; raise a ``TypeError`` that explains it otherwise."""
    if isinstance(out, BaseOutput):
        return out
    if isinstance(out, Tensor) or (
        isinstance(out, Mapping) and "features" not in out and any(k in out for k in ("out", "logits"))
    ):
        raise NoFeaturesError(f"base output: got {describe(out)}, logits without features. {PROTOCOL_HELP}")
    if isinstance(out, Mapping):
        if "logits" in out and "features" in out:
            logits, features = out["logits"], out["features"]
        else:
            raise TypeError(
                f"base output: got a mapping with keys {list(out.keys())[:8]}, expected keys "
                f"'logits' and 'features'. {PROTOCOL_HELP}"
            )
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        # (logits, aux_logits), (logits, None) and longer tuples are logits without features; so
        # is a second element shaped like the logits (an auxiliary head's output, not a feature).
        second = out[1] if len(out) == 2 else None
        if second is None or (
            isinstance(second, Tensor) and second.ndim == 4 and out[0].ndim == 4 and second.shape[1] == out[0].shape[1]
        ):
            raise NoFeaturesError(
                f"base output: got {describe(out)}, logits (and auxiliary logits) without features. {PROTOCOL_HELP}"
            )
        logits, features = out
    else:
        raise TypeError(f"base output: got {describe(out)}, which errwrap cannot read. {PROTOCOL_HELP}")
    if not is_tracing() and (not isinstance(logits, Tensor) or logits.ndim != 4):
        raise TypeError(f"base logits: expected a 4-d tensor BxCxhxw, got {describe(logits)}. {PROTOCOL_HELP}")
    return BaseOutput(logits, normalize_features(features))


class Adapter(ABC):
    """The adapter interface: runs a base network and returns a :class:`BaseOutput`.

    Subclasses implement :meth:`forward`. The rest has defaults: :meth:`forward_with_coarse_logits`
    (``forward`` plus the logits before the base's own last upsampling, when the adapter can
    read them; what a wrapper built with ``fuse_at_features=True`` fuses at), :attr:`name` (recorded in the
    wrapper's config), :attr:`default_features` (the adapter's static preference for the
    ``(low_level, high_level)`` features), :meth:`preferred_features` (that preference given the
    features the probe saw; by default :attr:`default_features`), :meth:`feature_module`,
    :meth:`detach` (removes anything the adapter installed on the model, such as hooks) and
    :meth:`spec` (a JSON description of the base that the Hub code can rebuild, or ``None``).
    Adapters hold no parameters: the wrapper owns the base. :data:`BaseAdapter` is the same class.
    """

    name: str = "base"
    #: preferred ``(low_level, high_level)`` feature names; ``None`` leaves the choice to
    #: :func:`~errwrap.adapters.features.choose_default_features` (finest map, last map).
    default_features: FeaturePair = (None, None)

    def __init__(self, model: nn.Module | None = None) -> None:  # noqa: B027 - optional override, does nothing
        """Registered adapters are built as ``factory(model)``; the base class ignores ``model``."""

    @abstractmethod
    def forward(self, model: nn.Module, x: Tensor) -> BaseOutput:
        """Run ``model`` on ``x`` and return its logits ``(B, C, h0, w0)`` and named feature maps."""

    def forward_with_coarse_logits(self, model: nn.Module, x: Tensor) -> tuple[BaseOutput, Tensor | None]:
        """:meth:`forward`, and the logits before the base's own last upsampling to the input (a
        DeepLabV3+'s at stride 4) when the adapter can read them; ``None`` (the default) when not."""
        return self.forward(model, x), None

    def __call__(self, model: nn.Module, x: Tensor) -> BaseOutput:
        return self._checked(lambda: (self.forward(model, x), None), model, x)[0]

    def call_with_coarse_logits(self, model: nn.Module, x: Tensor) -> tuple[BaseOutput, Tensor | None]:
        """:meth:`forward_with_coarse_logits` with the checks of calling the adapter."""
        return self._checked(lambda: self.forward_with_coarse_logits(model, x), model, x)

    @staticmethod
    def _checked(
        run: Callable[[], tuple[BaseOutput, Tensor | None]], model: nn.Module, x: Tensor
    ) -> tuple[BaseOutput, Tensor | None]:
        if is_tracing():
            return run()
        try:
            out = run()
        except RuntimeError as exc:  # torch's device errors are deep: say which devices differ
            explain_device_mismatch(exc, model, x)
            raise
        check_base_batch(out[0], x)
        return out

    def preferred_features(self, features: Sequence[FeatureInfo]) -> FeaturePair:
        """The preferred ``(low_level, high_level)`` names given the probe's ``features``; must
        depend on ``features`` and the adapter's construction only. Default: :attr:`default_features`."""
        return self.default_features

    def feature_module(self, name: str) -> str | None:
        """Name of the module of the base whose output the feature ``name`` is, if known."""
        return None

    def detach(self) -> None:  # noqa: B027 - optional override: nothing to undo by default
        """Undo whatever the adapter did to the model (e.g. remove hooks)."""

    def spec(self, model: nn.Module) -> dict[str, Any] | None:
        """A JSON description of ``model`` from which errwrap can rebuild it, or ``None``."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: The name adapters were written against before :class:`Adapter`; subclass either.
BaseAdapter = Adapter


class NativeAdapter(Adapter):
    """For networks that already speak the native protocol."""

    name = "native"

    def forward(self, model: nn.Module, x: Tensor) -> BaseOutput:
        return parse_base_output(model(x))

    def forward_with_coarse_logits(self, model: nn.Module, x: Tensor) -> tuple[BaseOutput, Tensor | None]:
        """A native base that defines ``forward_with_coarse_logits(x) -> (output, coarse_logits)``
        (errwrap's DeepLabV3+ does) gives its logits before their last upsampling. The method is
        called directly, so hooks registered on the base module itself do not run (its
        submodules' do)."""
        method = getattr(model, "forward_with_coarse_logits", None)
        if not callable(method):
            return self.forward(model, x), None
        out, coarse = method(x)
        return parse_base_output(out), coarse

    def spec(self, model: nn.Module) -> dict[str, Any] | None:
        to_spec = getattr(model, "errwrap_spec", None)
        return to_spec() if callable(to_spec) else None
