"""Per-pixel error scores behind one interface: the error head and the baselines it must beat.

Every score is a callable ``score(wrapper, images, base_logits=None, output=None)`` returning a
:class:`ScoreOutput`: an error score in ``[0, 1]`` of shape ``(B, H, W)`` at the input's
resolution (high = "the base's label here is probably wrong") and the base logits whose argmax
is the prediction the score judges. Every score here but two (see below) judges the
*deterministic base prediction*, so they rank the same errors and their metrics are comparable.

``base_logits`` (the base logits at input resolution) and ``output`` (an
:class:`~errwrap.ErrorCorrectionOutput`) let a caller that already ran the networks reuse
them; the score then only pays for what it adds. Scores run without gradients.

===================  =============================================  ===========================
score                definition                                     cost beyond the base pass
===================  =============================================  ===========================
``error_head``       ``out.base_error_prob`` of the wrapper         the heads (one wrapper pass)
``msp``              ``1 - max_c softmax(z0)_c``                    a softmax
``entropy``          ``H(softmax(z0)) / log C``                     a softmax
``mc_dropout``       predictive entropy (or variance) over T        T more base passes
                     dropout-perturbed base passes
``max_logit``        ``squash(-max_c z0_c)``                        a max
``energy``           ``squash(-logsumexp_c z0_c)``                  a logsumexp
``temperature_msp``  ``1 - max_c softmax(z0 / T)_c``, T fitted      a softmax
``ensemble``         ``1 - max_c mean_m softmax(z_m)_c`` over N     N more base passes
                     bases (or their mutual information)
``errwrap``          ``out.base_error_prob``, or ``out.error_prob`` the heads (one wrapper pass)
                     for the returned labels
===================  =============================================  ===========================

``squash(s) = (1 + s / (10 + |s|)) / 2`` maps an unbounded score increasingly onto ``(0, 1)``
with polynomial (not exponential) tails, so that typical logits (a few to a few tens) spread over
hundreds of the ``1e-4``-wide histogram bins of :class:`~errwrap.metrics.ErrorDetectionMetrics`
and scores hundreds of logits apart still land in different bins; ranking metrics (AUROC, AUPR,
FPR95, AURC) do not change under an increasing map.

Two scores judge another prediction than the base's argmax, and their report rows count their
own errors: :class:`EnsembleScore` (the argmax of the ensemble's mean softmax) and
``ErrwrapScore("returned")`` (the wrapper's corrected labels ``out.labels``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import eval_mode
from ._validate import check_positive_int
from .adapters import NativeAdapter, find_adapter
from .calibration import fit_temperature, sample_labelled_pixels
from .functional import class_labels, normalized_entropy, normalized_entropy_of_logits
from .layers import resize

__all__ = [
    "ScoreOutput",
    "ErrorScore",
    "ErrorHeadScore",
    "MSPScore",
    "EntropyScore",
    "MCDropoutScore",
    "MaxLogitScore",
    "EnergyScore",
    "TemperatureMSPScore",
    "EnsembleScore",
    "ErrwrapScore",
    "msp_score",
    "entropy_score",
    "max_logit_score",
    "energy_score",
    "squash",
    "SCORES",
    "build_score",
    "find_classifier",
]

logger = logging.getLogger(__name__)

_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)


class ScoreOutput(NamedTuple):
    """A per-pixel error score and the base logits it refers to.

    Attributes:
        score: error score ``(B, H, W)`` in ``[0, 1]``, high where an error is predicted.
        base_logits: base logits ``(B, C, H, W)`` at input resolution; their argmax is the
            prediction whose errors the score ranks.
    """

    score: Tensor
    base_logits: Tensor

    @property
    def prediction(self) -> Tensor:
        """The judged prediction ``(B, H, W)`` int64."""
        return class_labels(self.base_logits)


def msp_score(logits: Tensor) -> Tensor:
    """``1 - max softmax``: in ``[0, 1 - 1/C]``.

    Shapes:
        logits ``(B, C, H, W)`` -> ``(B, H, W)``.
    """
    return 1.0 - torch.softmax(logits.float(), dim=1).amax(dim=1)


def _entropy_of_probs(probs: Tensor) -> Tensor:
    return normalized_entropy(probs).clamp_(0.0, 1.0)


def entropy_score(logits: Tensor) -> Tensor:
    """Entropy of the softmax divided by ``log C``: in ``[0, 1]`` (1 = uniform).

    Shapes:
        logits ``(B, C, H, W)`` with ``C >= 2`` -> ``(B, H, W)``.
    """
    return normalized_entropy_of_logits(logits.float()).clamp_(0.0, 1.0)


def squash(values: Tensor, scale: float = 10.0) -> Tensor:
    """The increasing map ``s -> (1 + s / (scale + |s|)) / 2`` of the real line onto ``(0, 1)``
    (``0 -> 0.5``, ``±scale -> 0.75 / 0.25``); finite for every finite input, computed in float32
    at least.

    Shapes:
        any -> the same.
    """
    v = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    return (0.5 + 0.5 * v / (scale + v.abs())).clamp_(0.0, 1.0)


def max_logit_score(logits: Tensor) -> Tensor:
    """Max-logit baseline (Hendrycks et al. 2022): ``squash(-max_c z_c)``, in ``(0, 1)``.

    Higher where the largest logit is smaller; ``0.5`` at a max logit of 0.

    Shapes:
        logits ``(B, C, H, W)`` -> ``(B, H, W)``.
    """
    return squash(-logits.float().amax(dim=1))


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Energy baseline (Liu et al. 2020): the free energy ``E = -T logsumexp_c(z_c / T)``
    (higher = more likely wrong), mapped by :func:`squash` into ``(0, 1)``.

    Shapes:
        logits ``(B, C, H, W)`` -> ``(B, H, W)``.
    """
    energy = -temperature * torch.logsumexp(logits.float() / temperature, dim=1)
    return squash(energy)


def _base_logits(wrapper: nn.Module, images: Tensor) -> Tensor:
    return resize(wrapper.forward_base(images).logits, images.shape[-2:])  # type: ignore[operator]


class ErrorScore:
    """Interface of an error score; subclasses implement :meth:`compute`.

    Attributes:
        name: the key under which reports list the score.
        judges: whose labels' errors the score ranks (``"base"`` for every score but
            :class:`EnsembleScore` and ``ErrwrapScore("returned")``).
    """

    name: ClassVar[str] = "score"
    #: whose labels the score judges: ``"base"`` (the base's argmax), ``"returned"`` (the
    #: wrapper's ``out.labels``) or ``"ensemble"``.
    judges: ClassVar[str] = "base"

    def compute(self, wrapper: nn.Module, images: Tensor, base_logits: Tensor | None, output: Any) -> ScoreOutput:
        raise NotImplementedError

    def __call__(
        self, wrapper: nn.Module, images: Tensor, base_logits: Tensor | None = None, output: Any = None
    ) -> ScoreOutput:
        """Score ``images`` ``(B, C_in, H, W)``; reuse ``base_logits``/``output`` when given."""
        with torch.no_grad():
            return self.compute(wrapper, images, base_logits, output)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ErrorHeadScore(ErrorScore):
    """The wrapper's probability that the base's label is wrong, ``out.base_error_prob`` (one wrapper pass)."""

    name = "error_head"

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        out = output if output is not None else wrapper(images)
        return ScoreOutput(out.base_error_prob, out.base_logits)


class MSPScore(ErrorScore):
    """Maximum softmax probability baseline: ``1 - max_c softmax(z0)_c`` (Hendrycks & Gimpel)."""

    name = "msp"

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        logits = base_logits if base_logits is not None else _base_logits(wrapper, images)
        return ScoreOutput(msp_score(logits), logits)


class EntropyScore(ErrorScore):
    """Softmax entropy baseline, normalised by ``log C`` into ``[0, 1]``."""

    name = "entropy"

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        logits = base_logits if base_logits is not None else _base_logits(wrapper, images)
        return ScoreOutput(entropy_score(logits), logits)


class MaxLogitScore(ErrorScore):
    """Max-logit baseline: :func:`max_logit_score`, ``squash(-max_c z0_c)`` in ``(0, 1)``."""

    name = "max_logit"

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        logits = base_logits if base_logits is not None else _base_logits(wrapper, images)
        return ScoreOutput(max_logit_score(logits), logits)


class EnergyScore(ErrorScore):
    """Energy baseline: :func:`energy_score`, ``squash(-T logsumexp(z0 / T))`` in ``(0, 1)``.

    Args:
        temperature: ``T`` of the free energy (1 in Liu et al. 2020).
    """

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive_float(temperature, "temperature")

    def __repr__(self) -> str:
        return f"EnergyScore(temperature={self.temperature:g})"

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        logits = base_logits if base_logits is not None else _base_logits(wrapper, images)
        return ScoreOutput(energy_score(logits, self.temperature), logits)


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return float(value)


class TemperatureMSPScore(ErrorScore):
    """Temperature-scaled MSP (Guo et al. 2017): ``1 - max_c softmax(z0 / T)_c``, in ``[0, 1 - 1/C]``.

    The temperature does not change the argmax (the judged prediction) but does change the
    ranking across pixels. Fit it on held-out labelled data with :meth:`fit`.

    Args:
        temperature: ``T > 0``; 1 gives :class:`MSPScore`.

    Attributes:
        fit_result: the :class:`~errwrap.calibration.TemperatureFit` when made by :meth:`fit`.
    """

    name = "temperature_msp"

    def __init__(self, temperature: float) -> None:
        self.temperature = _positive_float(temperature, "temperature")
        self.fit_result: Any = None

    def __repr__(self) -> str:
        return f"TemperatureMSPScore(temperature={self.temperature:.4g})"

    @classmethod
    def fit(cls, wrapper: nn.Module, loader: Any, **kwargs: Any) -> TemperatureMSPScore:
        """The score with ``T`` fitted on ``loader`` by minimising the NLL of
        ``softmax(z0 / T)`` (the base's logits) on a seeded sample of labelled pixels.

        Args:
            wrapper: an :class:`~errwrap.ErrorCorrectionWrapper` (its base is what is scored).
            loader: held-out labelled batches, any form :func:`errwrap.evaluate` reads.
            **kwargs: ``ignore_index``, ``max_pixels``, ``max_batches``, ``seed``, ``device`` of
                :func:`errwrap.calibration.sample_labelled_pixels`.
        """
        logits, labels = sample_labelled_pixels(wrapper, loader, _base_logits, **kwargs)
        if labels.numel() == 0:
            raise ValueError(
                "TemperatureMSPScore.fit: the loader gave no labelled pixels (all equal to ignore_index, or empty)"
            )
        result = fit_temperature(logits, labels)
        logger.info(
            "base temperature %.4f on %d pixels: NLL %.4f -> %.4f",
            result.temperature,
            result.pixels,
            result.nll_before,
            result.nll_after,
        )
        score = cls(result.temperature)
        score.fit_result = result
        return score

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        logits = base_logits if base_logits is not None else _base_logits(wrapper, images)
        return ScoreOutput(msp_score(logits.float() / self.temperature), logits)


def _member_logits(member: nn.Module, images: Tensor) -> Tensor:
    """Logits ``(B, C, h, w)`` of an ensemble member: a wrapper (its base), or a network that
    returns logits, ``(logits, ...)``, a mapping with ``"logits"``/``"out"``, or is read by a
    registered adapter."""
    if hasattr(member, "forward_base"):
        return member.forward_base(images).logits  # type: ignore[operator]
    adapter = find_adapter(member)
    if not isinstance(adapter, NativeAdapter):
        return adapter(member, images).logits
    out = member(images)
    if isinstance(out, Mapping):
        out = out.get("logits", out.get("out"))
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor) or out.ndim != 4 or not out.is_floating_point():
        raise TypeError(
            f"ensemble member {type(member).__name__}: expected logits BxCxhxw (alone, first in a tuple, or under "
            f"'logits'/'out'), got {type(out).__name__}"
        )
    return out


class EnsembleScore(ErrorScore):
    """Deep ensemble (Lakshminarayanan et al. 2017) of ``N`` independently trained base networks.

    Every member runs once (in eval mode, its modes restored afterwards); their softmax maps
    ``p_m`` are resized to the input and averaged, ``p = mean_m p_m``. The prediction it judges is
    the **ensemble's** label ``argmax p`` (not the wrapper's base label), so its report row counts
    the ensemble's errors; ``base_logits`` in its output are ``log p``.

    * ``"msp"`` (default): ``1 - max_c p_c``, in ``[0, 1 - 1/C]``;
    * ``"entropy"``: ``H(p) / log C``, in ``[0, 1]``;
    * ``"mutual_information"``: ``(H(p) - mean_m H(p_m)) / log C``, in ``[0, 1]`` (the members'
      disagreement; 0 for identical members).

    Members are not part of the wrapper: pass networks whose logits have the wrapper's classes
    (the wrapper's own base is a member only if listed). A one-channel (binary) member is read
    as two classes ``[0, z]``. Cost: ``N`` base passes per image.

    Args:
        bases: the members: base networks, or wrappers (their base is used).
        statistic: ``"msp"``, ``"entropy"`` or ``"mutual_information"``.
    """

    name = "ensemble"
    judges = "ensemble"
    STATISTICS: ClassVar[tuple[str, ...]] = ("msp", "entropy", "mutual_information")

    def __init__(self, bases: Sequence[nn.Module], statistic: str = "msp") -> None:
        bases = list(bases) if isinstance(bases, (list, tuple, nn.ModuleList)) else bases
        if not isinstance(bases, list) or not bases or not all(isinstance(b, nn.Module) for b in bases):
            raise TypeError(f"bases: expected a non-empty list of networks (nn.Module), got {type(bases).__name__}")
        if statistic not in self.STATISTICS:
            raise ValueError(f"statistic: expected one of {self.STATISTICS}, got {statistic!r}")
        self.bases = bases
        self.statistic = statistic

    def __repr__(self) -> str:
        return f"EnsembleScore(N={len(self.bases)}, statistic={self.statistic!r})"

    def member_probs(self, images: Tensor) -> list[Tensor]:
        """Each member's softmax at the input's resolution, float32.

        Shapes:
            images ``(B, C_in, H, W)`` -> ``N`` tensors ``(B, C, H, W)``.
        """
        probs: list[Tensor] = []
        for i, member in enumerate(self.bases):
            param = next(iter(member.parameters()), None)
            if param is not None and param.device != images.device:
                raise ValueError(
                    f"ensemble member {i} is on {param.device}, the images on {images.device}: move the members "
                    "(member.to(device))"
                )
            with eval_mode(member):
                logits = _member_logits(member, images.to(param.dtype) if param is not None else images)
            if logits.shape[1] == 1:
                logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
            if probs and logits.shape[1] != probs[0].shape[1]:
                raise ValueError(
                    f"ensemble member {i}: expected {probs[0].shape[1]} classes like member 0, got logits of shape "
                    f"{tuple(logits.shape)}"
                )
            probs.append(torch.softmax(resize(logits, images.shape[-2:]).float(), dim=1))
        return probs

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        probs = self.member_probs(images)
        mean = torch.stack(probs).mean(dim=0)
        num_classes = getattr(wrapper, "num_classes", mean.shape[1])
        if mean.shape[1] != num_classes:
            raise ValueError(f"ensemble members: expected {num_classes} classes like the wrapper, got {mean.shape[1]}")
        if self.statistic == "msp":
            score = 1.0 - mean.amax(dim=1)
        elif self.statistic == "entropy":
            score = _entropy_of_probs(mean)
        else:
            member_entropy = torch.stack([_entropy_of_probs(p) for p in probs]).mean(dim=0)
            score = (_entropy_of_probs(mean) - member_entropy).clamp_(0.0, 1.0)
        return ScoreOutput(score.clamp_(0.0, 1.0), torch.log(mean.clamp_min(1e-30)))


class ErrwrapScore(ErrorScore):
    """The wrapper's own error maps as a score (one wrapper pass).

    * ``kind="base"``: ``out.base_error_prob``, the probability that the **base's** label is
      wrong; it judges ``out.base_labels`` (reported as ``"base_error_prob"``; the same values
      as :class:`ErrorHeadScore`).
    * ``kind="returned"``: ``out.error_prob``, the probability that the **returned** label
      ``out.labels`` is wrong; it judges ``out.labels`` (reported as ``"error_prob"``; its
      output's ``base_logits`` are the fused log-probabilities ``out.logits``).

    Both are in ``[0, 1]``.

    Args:
        kind: ``"base"`` or ``"returned"``.
    """

    KINDS: ClassVar[dict[str, str]] = {"base": "base_error_prob", "returned": "error_prob"}

    def __init__(self, kind: str = "base") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind: expected one of {sorted(self.KINDS)}, got {kind!r}")
        self.kind = kind
        # per instance here: the class-level defaults of ErrorScore describe one kind
        self.name = self.KINDS[kind]  # type: ignore[misc]
        self.judges = "base" if kind == "base" else "returned"  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ErrwrapScore(kind={self.kind!r})"

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        out = output if output is not None else wrapper(images)
        if self.kind == "base":
            return ScoreOutput(out.base_error_prob, out.base_logits)
        return ScoreOutput(out.error_prob, out.logits)


def find_classifier(base: nn.Module, num_classes: int) -> str:
    """Name of the last ``Conv2d`` in ``base`` with ``num_classes`` output channels (module
    registration order), where :class:`MCDropoutScore` inserts dropout when the base has none."""
    found = [name for name, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    if not found:
        raise ValueError(
            f"MC dropout: the base has no dropout layer and no Conv2d with num_classes={num_classes} output channels "
            "to insert one before; pass classifier='module.name' (the layer that produces the logits)"
        )
    return found[-1]


class MCDropoutScore(ErrorScore):
    """Monte Carlo dropout: ``T`` stochastic passes of the base with dropout on.

    During the ``T`` passes (only) the base is put in eval mode and its dropout modules in train
    mode, so norm layers keep their running statistics; every module's mode is restored
    afterwards. If the base has no dropout module, ``Dropout2d(p)`` is applied to the input of
    its classifier (``classifier``, or :func:`find_classifier`) by a temporary forward pre-hook,
    removed after the passes, and an INFO message says so. The passes draw their randomness from
    ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so results depend on ``seed``
    only and the caller's random state is untouched.

    The score is computed from the ``T`` softmax maps ``p_t`` (at input resolution):

    * ``"entropy"``: predictive entropy of the mean, ``H(mean_t p_t) / log C`` in ``[0, 1]``;
    * ``"msp"``: ``1 - max_c (mean_t p_t)_c`` in ``[0, 1 - 1/C]``;
    * ``"variance"``: total variance ``sum_c Var_t(p_t,c)`` (population variance over passes),
      in ``[0, 1 - 1/C]``; it is 0 for ``T = 1``.

    The prediction it judges is the deterministic base's argmax (``base_logits`` when given,
    else one extra pass with the base in eval mode), so it ranks the same errors as every
    other score.
    Cost: ``T`` base passes per image (``T + 1`` without ``base_logits``). With ``T = 1`` and no
    active dropout (``p = 0``) the ``"entropy"`` and ``"msp"`` statistics equal
    :class:`EntropyScore` and :class:`MSPScore`.

    Args:
        T: number of stochastic passes.
        seed: seed of the dropout masks.
        statistic: ``"entropy"``, ``"msp"`` or ``"variance"``.
        p: drop probability of the inserted ``Dropout2d`` (used only when the base has no
            dropout module).
        classifier: name of the module (in ``wrapper.base``) before which to insert dropout;
            default: :func:`find_classifier`.
    """

    name = "mc_dropout"
    STATISTICS: ClassVar[tuple[str, ...]] = ("entropy", "msp", "variance")

    def __init__(
        self, T: int = 10, seed: int = 0, statistic: str = "entropy", p: float = 0.1, classifier: str | None = None
    ) -> None:
        check_positive_int(T, "T")
        if statistic not in self.STATISTICS:
            raise ValueError(f"statistic: expected one of {self.STATISTICS}, got {statistic!r}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
        self.T = T
        self.seed = seed
        self.statistic = statistic
        self.p = p
        self.classifier = classifier
        self._announced = False

    def __repr__(self) -> str:
        return f"MCDropoutScore(T={self.T}, seed={self.seed}, statistic={self.statistic!r}, p={self.p})"

    def _install_dropout(self, base: nn.Module, num_classes: int) -> tuple[list[nn.Module], Any]:
        # dropout layers with p = 0 (common in timm and transformers configs) would give T identical passes
        dropouts: list[nn.Module] = [
            m for m in base.modules() if isinstance(m, _DROPOUT_TYPES) and float(getattr(m, "p", 0.0)) > 0
        ]
        if dropouts:
            return dropouts, None
        name = self.classifier or find_classifier(base, num_classes)
        module = base.get_submodule(name)
        p = self.p
        if not self._announced:
            logger.info(
                "MC dropout: the base has no dropout layer; applying Dropout2d(p=%g) to the input of %r during the %d "
                "passes",
                p,
                name,
                self.T,
            )
            self._announced = True

        def pre_hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            dropped = F.dropout2d(x, p, training=True) if x.ndim in (3, 4) else F.dropout(x, p, training=True)
            return (dropped, *args[1:])

        return [], module.register_forward_pre_hook(pre_hook)

    def sample_probs(
        self, wrapper: nn.Module, images: Tensor, deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Mean and total variance over the ``T`` passes of the base softmax, and (when
        ``deterministic``) the logits of one pass with dropout off, all at input resolution.

        Shapes:
            images ``(B, C_in, H, W)`` -> mean ``(B, C, H, W)``, variance ``(B, H, W)``,
            logits ``(B, C, H, W)`` or ``None``.
        """
        base: nn.Module = wrapper.base  # type: ignore[assignment]
        devices = [images.device] if images.device.type == "cuda" else []
        hook = None
        with eval_mode(base):
            try:
                with torch.no_grad():
                    logits = _base_logits(wrapper, images) if deterministic else None
                    # a binary base's classifier has one output channel (the wrapper reads it as two classes)
                    dropouts, hook = self._install_dropout(
                        base, 1 if getattr(wrapper, "binary", False) else wrapper.num_classes  # type: ignore[arg-type]
                    )
                    for m in dropouts:
                        m.train()
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(self.seed)
                        mean = sq = None
                        for _ in range(self.T):
                            probs = torch.softmax(_base_logits(wrapper, images).float(), dim=1)
                            mean = probs.clone() if mean is None else mean.add_(probs)
                            sq = probs.square() if sq is None else sq.add_(probs.square())
            finally:
                if hook is not None:
                    hook.remove()
        assert mean is not None and sq is not None  # T >= 1 passes (checked in __init__)
        mean = mean / self.T
        variance = (sq / self.T - mean.square()).clamp_min(0).sum(dim=1)
        return mean, variance, logits

    def compute(self, wrapper, images, base_logits=None, output=None) -> ScoreOutput:
        mean, variance, logits = self.sample_probs(wrapper, images, deterministic=base_logits is None)
        if base_logits is None:
            base_logits = logits
        if self.statistic == "entropy":
            score = _entropy_of_probs(mean)
        elif self.statistic == "msp":
            score = 1.0 - mean.amax(dim=1)
        else:
            score = variance.clamp(0.0, 1.0)
        return ScoreOutput(score, base_logits)


SCORES: dict[str, Callable[..., ErrorScore]] = {
    ErrorHeadScore.name: ErrorHeadScore,
    MSPScore.name: MSPScore,
    EntropyScore.name: EntropyScore,
    MCDropoutScore.name: MCDropoutScore,
    MaxLogitScore.name: MaxLogitScore,
    EnergyScore.name: EnergyScore,
    TemperatureMSPScore.name: TemperatureMSPScore,
    EnsembleScore.name: EnsembleScore,
    "errwrap": ErrwrapScore,
    "base_error_prob": lambda: ErrwrapScore("base"),
    "error_prob": lambda: ErrwrapScore("returned"),
}


def build_score(name: str | ErrorScore, **kwargs: Any) -> ErrorScore:
    """A score from its name in :data:`SCORES` (``kwargs`` go to its constructor), or the score
    itself when one is passed."""
    if isinstance(name, ErrorScore):
        return name
    if not isinstance(name, str):
        raise TypeError(f"score: expected a name or an ErrorScore, got {type(name).__name__}")
    if name not in SCORES:
        raise ValueError(f"score: unknown name {name!r}; expected one of {sorted(SCORES)}")
    try:
        return SCORES[name](**kwargs)
    except TypeError as exc:  # a required setting is missing: say which score needs it
        needs = {
            "ensemble": "bases=[net, ...]",
            "temperature_msp": "temperature=T (or TemperatureMSPScore.fit(wrapper, loader))",
        }
        raise TypeError(
            f"score {name!r}: {exc}; pass {needs.get(name, 'its settings')} or an ErrorScore object"
        ) from None
