"""``ErrorCorrectionWrapper``: a segmentation network plus the error, detail and fusion heads."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._io import load_state_strict
from ._utils import user_stacklevel
from ._validate import check_images, check_logits, check_norm_batch, input_dtype, is_tracing
from .adapters import Adapter, BaseOutput
from .adapters.select import FeatureRef, Probe, choose_features, probe, select_adapter
from .config import HeadConfig
from .functional import class_labels
from .heads import DetailHead, ErrorHead, build_fusion, confidence_cues
from .hub import HubMixin
from .layers import resize

__all__ = ["ErrorCorrectionOutput", "ErrorCorrectionWrapper", "binary_to_two_class"]

logger = logging.getLogger(__name__)

class ErrorCorrectionOutput(NamedTuple):
    """What :class:`ErrorCorrectionWrapper` returns, always, every map at the input's ``(H, W)``.

    Attributes:
        logits: fused log-probabilities ``(B, C, H, W)`` (after the wrapper's temperature);
            ``argmax`` is the corrected label.
        base_logits: the base network's logits, resized ``(B, C, H, W)``.
        error_logits: the error head's raw logit that the base's label is wrong ``(B, 1, H, W)``
            (stage (i) of the paper; what the fusion is driven by).
        detail_logits: the detail head's logits ``(B, C, H, W)``.

    The two error maps a user reads are derived from the fused distribution ``p`` (see
    docs/method.md for why): :attr:`error_prob` ``= 1 - max_c p_c``, the probability that the
    returned label :attr:`labels` is wrong, and :attr:`base_error_prob` ``= 1 - p_{y0}``, the
    probability that the base's label ``y0`` is wrong.
    """

    logits: Tensor
    base_logits: Tensor
    error_logits: Tensor
    detail_logits: Tensor

    @property
    def error_prob(self) -> Tensor:
        """Probability that the returned label :attr:`labels` is wrong, ``(B, H, W)`` in ``[0, 1]``."""
        return (1.0 - self.logits.float().amax(dim=1).exp()).clamp_(0.0, 1.0)

    @property
    def base_error_prob(self) -> Tensor:
        """Probability that the base network's label :attr:`base_labels` is wrong, ``(B, H, W)`` in ``[0, 1]``."""
        log_p = self.logits.float().gather(1, self.base_labels.unsqueeze(1))[:, 0]
        return (1.0 - log_p.exp()).clamp_(0.0, 1.0)

    @property
    def head_error_prob(self) -> Tensor:
        """The error head alone: ``sigmoid(error_logits)``, ``(B, H, W)`` in ``[0, 1]``."""
        return torch.sigmoid(self.error_logits[:, 0].float())

    @property
    def labels(self) -> Tensor:
        """Corrected labels ``(B, H, W)`` int64."""
        return class_labels(self.logits)

    @property
    def base_labels(self) -> Tensor:
        """The base network's labels ``(B, H, W)`` int64."""
        return class_labels(self.base_logits)

    @property
    def probs(self) -> Tensor:
        """Fused class probabilities ``(B, C, H, W)``, summing to 1 over ``C``."""
        return self.logits.float().exp()


def binary_to_two_class(logits: Tensor) -> Tensor:
    """One-channel (sigmoid) logits ``z`` as two-class logits ``[0, z]``: their softmax is
    ``[1 - sigmoid(z), sigmoid(z)]``, so class 1 is the foreground.

    Shapes:
        ``(B, 1, h, w)`` -> ``(B, 2, h, w)``.
    """
    return torch.cat([torch.zeros_like(logits), logits], dim=1)


def _heads_loaded(module: Any, incompatible_keys: Any) -> None:
    module._fresh_heads = False


def _first_conv_in_channels(base: nn.Module) -> int:
    conv = next((m for m in base.modules() if isinstance(m, nn.Conv2d)), None)
    channels = int(conv.in_channels) if conv is not None else 3
    if channels != 3:
        logger.info("in_channels=%d, read from the first Conv2d of %s", channels, type(base).__name__)
    return channels


class ErrorCorrectionWrapper(nn.Module, HubMixin):
    """Wraps a segmentation network with an error head, a detail head and a fusion head.

    Construction runs the base once, in eval mode and without gradients, on a
    ``1 x in_channels x sample_size x sample_size`` input (random, from a private generator, on
    the base's device and dtype) to read ``num_classes`` and the channels and resolutions of its
    features; the base's train/eval modes are restored afterwards.

    Args:
        base: the segmentation network (native protocol or a family with an adapter).
        num_classes: number of classes; inferred from the base's logits when ``None``, checked
            against them otherwise. A base with one output channel (binary segmentation with a
            sigmoid, e.g. SMP's ``classes=1``) becomes two classes, background and foreground:
            its logit ``z`` is read as the two-class logits ``[0, z]``, whose softmax is
            ``[1 - sigmoid(z), sigmoid(z)]``.
        low_level: which feature feeds the detail head (index, feature name, or the name of a
            module of ``base`` to tap with a forward hook); default: the adapter's choice
            (``adapter.preferred_features``), else the feature of finest resolution (see
            :func:`errwrap.adapters.features.choose_default_features`).
        high_level: which feature feeds the error head (same forms); default: the adapter's
            choice, else the last one.
        in_channels: channels of the images the base takes; ``None`` reads them from the first
            ``Conv2d`` of the base (3 when it has none).
        adapter: a :class:`~errwrap.adapters.BaseAdapter`, a registered adapter name, ``"hooks"``, or
            ``None`` to choose one from the model's type.
        error_channels, error_blocks: width and depth of the error head.
        detail_channels, detail_blocks: width and depth of the detail head.
        fusion: ``"mixture"`` (the paper's) or ``"learned"``.
        norm_layer, act_layer: names from ``errwrap.layers`` used by both heads.
        error_prior: initial error probability of the error head.
        project_features: each head reduces its backbone feature to its width with a 1x1
            conv-norm-act before its 3x3 blocks (about half the heads' cost on a DeepLabV3+ base;
            see docs/method.md). ``False`` builds the architecture of models saved before this setting existed.
        fuse_at_features: fuse at the resolution of the base's finer map (its logits before
            its own upsampling, or the low-level feature; at most the input's) and upsample the
            fusion's change to the base onto the base's logits: faster on bases with coarse
            logits (3-5% of a DeepLabV3+ resnet50's latency, 14% of an LR-ASPP's), but the
            error maps and corrections are worse (0.7 points of AUPR-Error on a stride-4 base,
            3 on a stride-8 one, in the quality benchmark; docs/method.md). ``False`` (the
            default) fuses at the input's resolution.
        freeze_base: start with the base frozen (see :meth:`freeze_base`).
        sample_size: side of the probe input used at construction.

    Shapes:
        input ``(B, in_channels, H, W)`` float -> :class:`ErrorCorrectionOutput`, every map
        ``(B, *, H, W)``.

    Example:
        >>> wrap = ErrorCorrectionWrapper(my_model)             # doctest: +SKIP
        >>> out = wrap(images)                                  # doctest: +SKIP
        >>> out.error_prob.shape, out.labels.shape              # doctest: +SKIP
    """

    def __init__(
        self,
        base: nn.Module,
        num_classes: int | None = None,
        *,
        low_level: FeatureRef = None,
        high_level: FeatureRef = None,
        in_channels: int | None = None,
        adapter: Adapter | str | None = None,
        error_channels: int = 64,
        error_blocks: int = 2,
        detail_channels: int = 64,
        detail_blocks: int = 2,
        fusion: str = "mixture",
        norm_layer: str = "batchnorm",
        act_layer: str = "relu",
        error_prior: float = 0.1,
        project_features: bool = True,
        fuse_at_features: bool = False,
        freeze_base: bool = True,
        sample_size: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base: expected a torch.nn.Module, got {type(base).__name__}")
        self.base = base
        self.binary = False
        self.adapter: Adapter = select_adapter(base, adapter, low_level, high_level)
        in_channels, found = self._probe(in_channels, sample_size, discover=low_level is None and high_level is None)
        logits, features = found.output.logits, found.output.features
        self.binary = int(logits.shape[1]) == 1
        if self.binary:
            logger.info(
                "%s returns one logit channel: read as binary segmentation, classes 0 (background) and 1 (foreground)",
                type(base).__name__,
            )
            logits = binary_to_two_class(logits)
        inferred = int(logits.shape[1])
        if num_classes is not None and num_classes != inferred:
            if self.binary:
                raise ValueError(
                    f"num_classes={num_classes}, but the base returns one logit channel (binary segmentation), which "
                    "errwrap reads as 2 channels: expected num_classes=2 or None"
                )
            raise ValueError(
                f"num_classes={num_classes}, but the base returns logits with {inferred} channels (shape "
                f"{tuple(logits.shape)})"
            )
        low_key, high_key = choose_features(self.adapter, found.features, low_level, high_level)
        low_channels = int(features[low_key].shape[1])
        high_channels = int(features[high_key].shape[1])
        #: The heads' configuration, saved as config.json's "heads": ``num_classes``, ``in_channels``,
        #: ``low_key``, ``high_key`` and ``temperature`` read it.
        self.config = HeadConfig(
            num_classes=inferred, in_channels=in_channels, low_level=low_key, high_level=high_key,
            low_channels=low_channels, high_channels=high_channels, error_channels=error_channels,
            error_blocks=error_blocks, detail_channels=detail_channels, detail_blocks=detail_blocks, fusion=fusion,
            norm_layer=norm_layer, act_layer=act_layer, error_prior=error_prior, adapter=self.adapter.name,
            sample_size=sample_size, project_features=project_features, fuse_at_features=fuse_at_features,
        )  # fmt: skip
        param = next(iter(base.parameters()), None)
        floating = param is not None and param.is_floating_point()
        dd: dict[str, Any] = {"device": param.device, "dtype": param.dtype} if param is not None and floating else {}
        self.error_head = ErrorHead(
            high_channels,
            inferred,
            error_channels,
            error_blocks,
            norm_layer=norm_layer,
            act_layer=act_layer,
            prior=error_prior,
            project=project_features,
            **dd,
        )
        self.detail_head = DetailHead(
            low_channels,
            high_channels,
            inferred,
            detail_channels,
            detail_blocks,
            norm_layer=norm_layer,
            act_layer=act_layer,
            project=project_features,
            **dd,
        )
        self.fusion = build_fusion(fusion, inferred, **dd)
        self.base_frozen = False
        self._trainable_base: list[str] = []
        # Fresh heads: the error head starts as the max-softmax baseline, but the detail head is
        # random, so neither the labels nor the error maps (read from the fused distribution) are
        # trained yet. Warned about once, at the
        # first eval-mode forward, unless the heads were trained (train()) or loaded first.
        self._fresh_heads = True
        self.register_load_state_dict_post_hook(_heads_loaded)
        if freeze_base:
            self.freeze_base()
        logger.debug(
            "wrapped %s: %d classes, low-level %r (%d ch, %s), high-level %r (%d ch, %s)",
            type(base).__name__, inferred, self.low_key, low_channels, tuple(features[self.low_key].shape[-2:]),
            self.high_key, high_channels, tuple(features[self.high_key].shape[-2:]),
        )

    # ------------------------------------------------------------------ configuration
    @property
    def num_classes(self) -> int:
        """Number of classes ``C`` (``config.num_classes``)."""
        return self.config.num_classes

    @property
    def in_channels(self) -> int:
        """Channels of the images the base takes (``config.in_channels``)."""
        return self.config.in_channels

    @property
    def low_key(self) -> str:
        """The base's feature that feeds the detail head (``config.low_level``)."""
        return self.config.low_level

    @property
    def high_key(self) -> str:
        """The base's feature that feeds the error head (``config.high_level``)."""
        return self.config.high_level

    @property
    def temperature(self) -> float:
        """Temperature of the fused probabilities (1: none); set by :func:`errwrap.calibrate_temperature`,
        saved with the model (``config.temperature``)."""
        return self.config.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.config = dataclasses.replace(self.config, temperature=float(value))

    @property
    def head_config(self) -> dict[str, Any]:
        """The heads' configuration as a dict (every field of :attr:`config` but the temperature)."""
        config = self.config.as_dict()
        del config["temperature"]
        return config

    # ------------------------------------------------------------------ hub hooks (see errwrap.hub.HubMixin)
    def _hub_config(self) -> HeadConfig:
        return self.config

    def _hub_base_spec(self) -> dict[str, Any] | None:
        return self.adapter.spec(self.base)

    def _hub_weights(self, heads_only: bool) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not (heads_only and k.startswith("base."))}

    def _hub_load_weights(self, tensors: dict[str, Tensor], heads_only: bool, source: str) -> None:
        keys = {k for k in self.state_dict() if not (heads_only and k.startswith("base."))}
        load_state_strict(self, tensors, source, required=keys, allowed=keys)

    @classmethod
    def _hub_from_config(cls, model: nn.Module, heads: HeadConfig) -> ErrorCorrectionWrapper:
        adapter = None if heads.adapter in (None, "native") else heads.adapter
        wrapper = cls(model, adapter=adapter, **heads.constructor_kwargs())
        wrapper.temperature = heads.temperature
        return wrapper

    def _hub_place(self, device: torch.device | str | None, dtype: torch.dtype | None) -> ErrorCorrectionWrapper:
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        return self.eval()

    # ------------------------------------------------------------------ construction helpers
    def _probe(self, in_channels: int | None, sample_size: int, discover: bool) -> tuple[int, Probe]:
        """Run the base once on a random ``1 x in_channels x sample_size x sample_size`` input
        (see :func:`errwrap.adapters.select.probe`) and keep the adapter that ran. ``in_channels=None``
        reads them from the first ``Conv2d``, and falls back to 3 when that input fails (e.g.
        channels added inside the network). Returns the input channels and the probe's findings."""
        if in_channels is not None:
            return in_channels, self._probe_once(in_channels, sample_size, discover)
        in_channels = _first_conv_in_channels(self.base)
        try:
            return in_channels, self._probe_once(in_channels, sample_size, discover)
        except RuntimeError:
            if in_channels == 3:
                raise
        return 3, self._probe_once(3, sample_size, discover)

    def _probe_once(self, in_channels: int, sample_size: int, discover: bool) -> Probe:
        param = next(iter(self.base.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, in_channels, sample_size, sample_size, generator=generator).to(device=device, dtype=dtype)
        found = probe(self.adapter, self.base, x, discover)
        self.adapter = found.adapter
        check_logits(found.output.logits, name="base logits")
        return found

    # ------------------------------------------------------------------ capabilities
    @property
    def _is_torch_scriptable(self) -> bool:
        """TorchScript is not supported (the output NamedTuple has properties; use export)."""
        return False

    @property
    def _is_torch_compilable(self) -> bool:
        """``torch.compile(wrapper, fullgraph=True)`` works: every built-in adapter runs without
        graph breaks (checked per family in tests/test_export.py)."""
        return True

    @property
    def _is_torch_exportable(self) -> bool:
        """``torch.export`` and ONNX export of :class:`~errwrap.export.InferenceModule` work for
        every built-in adapter (checked per family in tests/test_export.py)."""
        return True

    # ------------------------------------------------------------------ freezing
    def freeze_base(self) -> ErrorCorrectionWrapper:
        """Stop gradients into the base and keep it (norm statistics, dropout) in eval mode,
        even after ``wrapper.train()``. The base then runs under ``torch.no_grad()``."""
        if not self.base_frozen:
            self._trainable_base = [n for n, p in self.base.named_parameters() if p.requires_grad]
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base_frozen = True
        self.base.eval()
        return self

    def unfreeze_base(self) -> ErrorCorrectionWrapper:
        """Let the base train again: restores ``requires_grad`` of the parameters that had it
        before :meth:`freeze_base`, and the base follows the wrapper's train/eval mode."""
        if self.base_frozen:
            trainable = set(self._trainable_base)
            for n, p in self.base.named_parameters():
                p.requires_grad_(n in trainable)
        self.base_frozen = False
        self.base.train(self.training)
        return self

    def train(self, mode: bool = True) -> ErrorCorrectionWrapper:
        super().train(mode)
        if mode:
            self._fresh_heads = False
        if self.base_frozen:
            self.base.eval()
        return self

    # ------------------------------------------------------------------ parameters
    def head_modules(self) -> dict[str, nn.Module]:
        """The three heads by name (their state-dict prefixes)."""
        return {"error_head": self.error_head, "detail_head": self.detail_head, "fusion": self.fusion}

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the three heads (what frozen-base fine-tuning trains)."""
        for module in self.head_modules().values():
            yield from module.parameters()

    # ------------------------------------------------------------------ forward
    def forward_base(self, x: Tensor) -> BaseOutput:
        """Run the base through its adapter (without gradients when the base is frozen)."""
        return self._forward_base(x, coarse=False)[0]

    def _forward_base(self, x: Tensor, coarse: bool) -> tuple[BaseOutput, Tensor | None]:
        """:meth:`forward_base`, and with ``coarse`` the adapter's logits before the base's own
        last upsampling (``None`` when it cannot read them)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.base_frozen):
            if coarse:
                out, coarse_logits = self.adapter.call_with_coarse_logits(self.base, x)
            else:
                out, coarse_logits = self.adapter(self.base, x), None
        if self.binary:
            out = BaseOutput(binary_to_two_class(out.logits), out.features)
            coarse_logits = None if coarse_logits is None else binary_to_two_class(coarse_logits)
        if not is_tracing():
            check_logits(out.logits, self.num_classes, name="base logits")
            if coarse_logits is not None:
                check_logits(coarse_logits, self.num_classes, name="base coarse logits")
        return out, coarse_logits

    def forward_heads(
        self,
        base_out: BaseOutput,
        size: tuple[int, int] | torch.Size,
        coarse_logits: Tensor | None = None,
    ) -> ErrorCorrectionOutput:
        """Run the three heads on a base output and resize every map to ``size``.

        ``coarse_logits``: the base's logits before its own last upsampling, where a wrapper built
        with ``fuse_at_features=True`` fuses (ignored otherwise)."""
        base_logits = base_out.logits
        low = base_out.features[self.low_key]
        high = base_out.features[self.high_key]
        check_norm_batch(self.error_head, high, "error head")
        size = (size[0], size[1])
        coarse = base_logits
        if self.config.fuse_at_features and coarse_logits is not None:
            coarse = coarse_logits
        at = self._fusion_size(coarse, low, size)
        full = resize(base_logits, size)
        z0 = resize(coarse, at) if at != size else full
        # The base's distribution where the fusion runs, computed once for the error head (when the
        # base's logits are already at that size), the cues, the fusion and its upsampling.
        base_log_probs = torch.log_softmax(z0.detach().float(), dim=1)
        base_probs = base_log_probs.exp()
        error = self.error_head(high, coarse, base_probs if coarse.shape[-2:] == z0.shape[-2:] else None)
        cues = confidence_cues(base_probs, base_log_probs)
        # Kept only for a coarse fusion's upsampling (then small); freed before the full-resolution work.
        coarse_log_probs = base_log_probs if at != size else None
        del base_log_probs
        error_prob_low = resize(torch.sigmoid(error), low.shape[-2:]).detach()
        detail = resize(self.detail_head(low, high, error_prob_low), at)
        error = self.error_head.forward_refine(resize(error, at), z0, cues)
        fused = self.fusion(z0, detail, error, base_probs)
        if at != size:
            # What the fusion changed, log p_fused - log p_base, is upsampled and added to the base's own
            # logits at the output: where the error head says 0, the output is exactly the base's
            # distribution (and its labels), however coarse the fusion. A base that trains gets
            # the gradient of its logits once, through ``full``.
            reference = torch.log_softmax(z0.float(), dim=1) if z0.requires_grad else coarse_log_probs
            fused = full.float() + resize(fused - reference, size)
            if self.temperature != 1.0:
                fused = fused / self.temperature
            fused = torch.log_softmax(fused, dim=1)
            error, detail = resize(error, size), resize(detail, size)
        elif self.temperature != 1.0:  # temperature scaling keeps the argmax: labels do not change
            fused = torch.log_softmax(fused / self.temperature, dim=1)
        return ErrorCorrectionOutput(fused, full, error, detail)

    def _fusion_size(self, base_logits: Tensor, low: Tensor, size: tuple[int, int]) -> tuple[int, int]:
        """Where the fusion runs: ``size``, or with ``config.fuse_at_features`` the finer of the
        base's logits (before its last upsampling, when known) and the low-level feature, per
        side and at most ``size``."""
        if not self.config.fuse_at_features:
            return size
        (lh, lw), (fh, fw) = base_logits.shape[-2:], low.shape[-2:]
        return (min(size[0], max(lh, fh)), min(size[1], max(lw, fw)))

    def forward(self, x: Tensor) -> ErrorCorrectionOutput:
        check_images(x, self.in_channels)
        if not is_tracing():  # float64 images, or fp32 images into a bf16/fp16 model: cast, as finetune does
            dtype = input_dtype(self.base)
            if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
                x = x.to(dtype)
        if self._fresh_heads and not self.training and not is_tracing():
            self._fresh_heads = False
            warnings.warn(
                "the error, detail and fusion heads are freshly initialised: labels are not corrections and "
                "error_prob is not a trained error map until the heads are trained (errwrap.finetune) or loaded "
                "(ErrorCorrectionWrapper.from_pretrained, load_state_dict)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        base_out, coarse = self._forward_base(x, coarse=self.config.fuse_at_features)
        base_out = self._keep_used_features(base_out)  # the other features are freed here
        return self.forward_heads(base_out, x.shape[-2:], coarse)

    def _keep_used_features(self, out: BaseOutput) -> BaseOutput:
        """``out`` with only the features the heads read, so the others (a backbone's every
        stage, for some adapters) are freed before the heads run at the output's resolution."""
        keys = (self.low_key, self.high_key)
        return BaseOutput(out.logits, {k: v for k, v in out.features.items() if k in keys})

    def extra_repr(self) -> str:
        temperature = f", temperature={self.temperature:.4g}" if self.temperature != 1.0 else ""
        return (
            f"num_classes={self.num_classes}{temperature}, adapter={self.adapter.name!r}, "
            f"low_level={self.low_key!r}, high_level={self.high_key!r}, base_frozen={self.base_frozen}"
        )
