"""The heads' configuration, :class:`HeadConfig`: one frozen dataclass, saved as ``config.json``'s ``heads``.

Each field carries its own check in its metadata (a positive integer with an upper limit, a
string, a probability, a temperature), so reading a config back is one loop over
:func:`dataclasses.fields`. Fields with a default are optional in a file and are written only
when they differ from it: settings added after format 1 was first written (``sample_size``,
``temperature``) then stay out of the usual config, which older errwrap still reads.

Example:
    >>> config = HeadConfig(num_classes=5, in_channels=3, low_level="0", high_level="2",
    ...                     error_channels=8, error_blocks=2, detail_channels=8, detail_blocks=2,
    ...                     fusion="mixture", norm_layer="batchnorm", act_layer="relu", error_prior=0.1)
    >>> HeadConfig.from_json(config.to_json(), "config.json") == config
    True
    >>> "sample_size" in config.to_json()
    False
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .layers import LayerSpec

__all__ = ["HeadConfig", "MAX_HEAD_PARAMETERS", "TEMPERATURE_RANGE", "head_parameter_count"]

#: Most parameters the three heads of a config may have (1 GB in float32; errwrap's defaults
#: give 0.1-0.3 M on a resnet50 DeepLabV3+).
MAX_HEAD_PARAMETERS = 2**28
#: The temperatures a config may hold and :func:`errwrap.calibrate_temperature` may set.
TEMPERATURE_RANGE = (1e-3, 1e3)

#: A field's check: the value read from a file -> ``None`` when valid, else what is wrong with it
#: (the message goes after ``"heads.<name>"``).
_Check = Callable[[Any], "str | None"]


def _positive_int(limit: int) -> _Check:
    """A positive integer (not a bool) of at most ``limit``: a config cannot ask for a huge
    allocation (the heads' weights grow with channels squared and with blocks)."""

    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f" must be a positive integer, got {value!r}"
        if value > limit:
            return f"={value} is larger than errwrap allows ({limit}); is this file damaged or hostile?"
        return None

    return check


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else f" must be a string, got {value!r}"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f" must be true or false, got {value!r}"


def _probability(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        return f" must be a probability in (0, 1), got {value!r}"
    return None


def _temperature(value: Any) -> str | None:
    low, high = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        return f" must be a positive number in [{low:g}, {high:g}], got {value!r}"
    return None


def _field(
    check: _Check, *, constructor: bool = True, convert: Callable[[Any], Any] | None = None, **kwargs: Any
) -> Any:
    """A dataclass field with its check. ``constructor``: passed to
    :class:`~errwrap.ErrorCorrectionWrapper` when a model is rebuilt (the others are read from
    the base, or set after construction); ``convert``: applied to a checked value read from a file."""
    return field(metadata={"check": check, "constructor": constructor, "convert": convert}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """What the error, detail and fusion heads of a wrapper are, as plain data.

    Fields without a default are required in a saved config; fields with one may be left out,
    and are written only when they differ from it.

    Attributes:
        num_classes: number of classes ``C``.
        in_channels: channels of the images the base takes.
        low_level, high_level: keys of the base's features feeding the detail and error heads.
        low_channels, high_channels: channels of those features (``None``: not recorded; read
            from the base and, when recorded, checked against it on load).
        error_channels, error_blocks: width and depth of the error head.
        detail_channels, detail_blocks: width and depth of the detail head.
        fusion: ``"mixture"`` or ``"learned"``.
        norm_layer, act_layer: layer names from :mod:`errwrap.layers` (a callable is allowed in
            a live model but cannot be saved).
        error_prior: initial error probability of the error head.
        adapter: name of the adapter (``None`` or ``"native"``: chosen from the base's type).
        sample_size: side of the probe input used at construction.
        temperature: temperature of the fused probabilities (1: none).
        project_features: each head reduces its backbone feature to its width with a 1x1
            conv-norm-act before its 3x3 blocks. New wrappers set it (``ErrorCorrectionWrapper``'s
            default); a saved config without it is the earlier architecture, which reads the
            features directly.
        fuse_at_features: the fusion runs at the resolution of the base's finer map (its logits
            before its own upsampling, or the detail head's low-level feature, never above the
            output's) and its change to the base's distribution is upsampled onto the base's
            logits (an option for speed; off by default and in every config without the key).
    """

    num_classes: int = _field(_positive_int(65536))
    in_channels: int = _field(_positive_int(1024))
    low_level: str = _field(_string)
    high_level: str = _field(_string)
    low_channels: int | None = _field(_positive_int(16384), constructor=False, default=None)
    high_channels: int | None = _field(_positive_int(16384), constructor=False, default=None)
    error_channels: int = _field(_positive_int(4096))
    error_blocks: int = _field(_positive_int(64))
    detail_channels: int = _field(_positive_int(4096))
    detail_blocks: int = _field(_positive_int(64))
    fusion: str = _field(_string)
    norm_layer: LayerSpec = _field(_string)
    act_layer: LayerSpec = _field(_string)
    error_prior: float = _field(_probability)
    adapter: str | None = _field(_string, constructor=False, default=None)
    sample_size: int = _field(_positive_int(2048), default=64)
    temperature: float = _field(_temperature, constructor=False, convert=float, default=1.0)
    project_features: bool = _field(_boolean, default=False)
    fuse_at_features: bool = _field(_boolean, default=False)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """The ``heads`` object of ``config.json``: every field in declaration order, fields that
        have a default left out when at it. Values are as held (a callable layer stays one; the
        caller's ``json.dumps`` refuses it)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                out[f.name] = value
        return out

    def constructor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~errwrap.ErrorCorrectionWrapper` that rebuild these heads
        (``adapter`` is left to the caller: ``None`` and ``"native"`` mean "choose")."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["constructor"]}

    @classmethod
    def from_json(cls, data: Any, source: str = "config.json") -> HeadConfig:
        """Check a config's ``heads`` object field by field and build the config.

        Args:
            data: the loaded JSON object.
            source: the file, for messages.

        Raises:
            ValueError: ``data`` is not an object, has unknown keys, lacks a required one, or a
                value is of the wrong type or out of range (each named ``heads.<key>``), or the
                heads would be too large.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: 'heads' must be a JSON object")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys heads.{unknown}; expected {sorted(known)}")
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{source}: missing keys heads.{missing}")
        values: dict[str, Any] = {}
        for f in fields:
            if f.name in data:
                problem = f.metadata["check"](data[f.name])
                if problem is not None:
                    raise ValueError(f"{source}: heads.{f.name}{problem}")
                convert = f.metadata["convert"]
                values[f.name] = data[f.name] if convert is None else convert(data[f.name])
        config = cls(**values)
        size = head_parameter_count(config)
        if size > MAX_HEAD_PARAMETERS:
            raise ValueError(
                f"{source}: these head settings make heads of about {size / 1e6:.0f} M parameters, more than errwrap "
                f"allows ({MAX_HEAD_PARAMETERS / 1e6:.0f} M); is this file damaged or hostile?"
            )
        return config

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (defaults included), as :func:`dataclasses.asdict`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def head_parameter_count(config: HeadConfig) -> int:
    """About how many parameters the error and detail heads of ``config`` have (3x3 blocks;
    unrecorded feature channels count as 0)."""
    c, low, high = config.num_classes, config.low_channels or 0, config.high_channels or 0
    ec, eb, dc, db = config.error_channels, config.error_blocks, config.detail_channels, config.detail_blocks
    if config.project_features:
        error = ec * high + 9 * ec * (ec + c + 3)
        detail = dc * high + dc * low + 9 * dc * (dc + dc + 1)
    else:
        error = 9 * ec * (high + c + 3)
        detail = dc * high + 9 * dc * (low + dc + 1)
    return error + 9 * (eb - 1) * ec * ec + detail + 9 * (db - 1) * dc * dc + dc * c

