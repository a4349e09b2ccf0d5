"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for :class:`ErrorCorrectionWrapper`.

A saved model is a directory (or a Hub repository) with three files:

- ``config.json``: plain JSON, the heads' configuration and a *base spec* for the model families
  errwrap can rebuild (``None`` for a custom base, which must then be passed as ``model=``);
- ``model.safetensors``: the weights (the whole wrapper, or only the heads with ``heads_only``);
- ``README.md``: a model card.

Files are data, never code: no pickle is read, the base is rebuilt only through a fixed table of
known families, and a config with unknown keys, unknown families or code hooks is refused.
Downloads go through ``huggingface_hub.hf_hub_download`` (so its cache, offline mode and tokens
apply); uploads through ``HfApi.create_repo`` and ``HfApi.upload_folder``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_directory, load_safetensors, load_state_strict, save_safetensors, write_text_atomic
from .adapters.specs import build_base
from .modelcard import render_model_card

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "FORMAT_VERSION", "HubMixin", "parse_config"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1

_TOP_KEYS = {"errwrap_version", "format_version", "heads", "heads_only", "base", "class_names", "adapter_options", "preprocessing"}
_INT_KEYS = ("num_classes", "in_channels", "low_channels", "high_channels", "error_channels", "error_blocks", "detail_channels", "detail_blocks", "sample_size")
_STR_KEYS = ("low_level", "high_level", "fusion", "norm_layer", "act_layer", "adapter")
_HEAD_KEYS = set(_INT_KEYS) | set(_STR_KEYS) | {"error_prior", "temperature"}
#: Head settings added after format 1 was first written, with the value a config without them
#: means; they are written only when they differ, so older errwrap still reads the usual config.
_OPTIONAL_HEAD_DEFAULTS: dict[str, Any] = {"sample_size": 64, "temperature": 1.0}
#: Head settings passed to the constructor when a model is rebuilt (the others are checked after).
_CONSTRUCTOR_KEYS = ("num_classes", "in_channels", "low_level", "high_level", "error_channels", "error_blocks", "detail_channels", "detail_blocks", "fusion", "norm_layer", "act_layer", "error_prior")
#: Largest value of each integer head setting a config may hold: a config cannot ask for a
#: huge allocation (the heads' weights grow with channels squared and with blocks).
_INT_LIMITS: dict[str, int] = {
    "num_classes": 65536, "in_channels": 1024, "low_channels": 16384, "high_channels": 16384, "error_channels": 4096,
    "error_blocks": 64, "detail_channels": 4096, "detail_blocks": 64, "sample_size": 2048,
}  # fmt: skip
#: Largest ``config.json`` errwrap reads, and how deeply its JSON may nest.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_CONFIG_DEPTH = 32
#: Most parameters the three heads of a config may have (1 GB in float32; errwrap's defaults
#: give about 0.1 M).
MAX_HEAD_PARAMETERS = 2**28
#: The temperatures a config may hold and :func:`errwrap.calibrate_temperature` may set.
TEMPERATURE_RANGE = (1e-3, 1e3)
#: Keys that would ask a loader to run code; refused anywhere in a config.
_CODE_KEYS = {"auto_map", "trust_remote_code", "_target_", "__class__", "__reduce__", "import", "module", "callable"}


def _scan_for_code_keys(obj: Any, source: str, where: str = "", depth: int = 0) -> None:
    if depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"{source}: {where[:80]}... is nested more than {MAX_CONFIG_DEPTH} levels deep; an errwrap config is not")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if str(k) in _CODE_KEYS:
                raise ValueError(f"{source}: key {where + str(k)!r} asks for code to be loaded; errwrap configs are data only")
            _scan_for_code_keys(v, source, f"{where}{k}.", depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _scan_for_code_keys(v, source, f"{where}{i}.", depth + 1)


def _head_parameters(heads: dict[str, Any]) -> int:
    """About how many parameters the error and detail heads of ``heads`` have (3x3 blocks)."""
    c, low, high = heads["num_classes"], heads.get("low_channels", 0), heads.get("high_channels", 0)
    ec, eb, dc, db = heads["error_channels"], heads["error_blocks"], heads["detail_channels"], heads["detail_blocks"]
    error = 9 * ec * (high + c + 3) + 9 * (eb - 1) * ec * ec
    detail = dc * high + 9 * dc * (low + dc + 1) + 9 * (db - 1) * dc * dc + dc * c
    return error + detail


def parse_config(raw: Any, source: str = CONFIG_NAME) -> dict[str, Any]:
    """Validate a loaded ``config.json``; raise ``ValueError`` naming the file and the key."""
    from . import __version__

    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{source}: missing or invalid 'format_version' (expected an integer); is this an errwrap config?")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source}: written by errwrap {raw.get('errwrap_version', '?')} in format {version}; this errwrap "
            f"{__version__} reads format <= {FORMAT_VERSION}. Upgrade errwrap."
        )
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} (written by errwrap {raw.get('errwrap_version', '?')}?); this errwrap {__version__} knows {sorted(_TOP_KEYS)}")
    _scan_for_code_keys(raw, source)
    heads = raw.get("heads")
    if not isinstance(heads, dict):
        raise ValueError(f"{source}: 'heads' must be a JSON object")
    unknown = sorted(set(heads) - _HEAD_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown keys heads.{unknown}; expected {sorted(_HEAD_KEYS)}")
    missing = sorted(set(_CONSTRUCTOR_KEYS) - set(heads))
    if missing:
        raise ValueError(f"{source}: missing keys heads.{missing}")
    for key in _INT_KEYS:
        if key in heads and (not isinstance(heads[key], int) or isinstance(heads[key], bool) or heads[key] < 1):
            raise ValueError(f"{source}: heads.{key} must be a positive integer, got {heads[key]!r}")
        if key in heads and heads[key] > _INT_LIMITS[key]:
            raise ValueError(f"{source}: heads.{key}={heads[key]} is larger than errwrap allows ({_INT_LIMITS[key]}); is this file damaged or hostile?")
    for key in _STR_KEYS:
        if key in heads and not isinstance(heads[key], str):
            raise ValueError(f"{source}: heads.{key} must be a string, got {heads[key]!r}")
    size = _head_parameters(heads)
    if size > MAX_HEAD_PARAMETERS:
        raise ValueError(f"{source}: these head settings make heads of about {size / 1e6:.0f} M parameters, more than errwrap allows ({MAX_HEAD_PARAMETERS / 1e6:.0f} M); is this file damaged or hostile?")
    if not isinstance(heads["error_prior"], (int, float)) or not 0 < heads["error_prior"] < 1:
        raise ValueError(f"{source}: heads.error_prior must be a probability in (0, 1), got {heads['error_prior']!r}")
    temperature = heads.get("temperature", 1.0)
    low, high = TEMPERATURE_RANGE
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not low <= temperature <= high:
        raise ValueError(f"{source}: heads.temperature must be a positive number in [{low:g}, {high:g}], got {temperature!r}")
    if not isinstance(raw.get("heads_only", False), bool):
        raise ValueError(f"{source}: 'heads_only' must be true or false")
    base = raw.get("base")
    if base is not None and (not isinstance(base, dict) or not isinstance(base.get("family"), str)):
        raise ValueError(f"{source}: 'base' must be null or an object with a 'family' string, got {base!r}")
    names = raw.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{source}: 'class_names' must be a list of strings")
    if names is not None and len(names) != heads["num_classes"]:
        raise ValueError(f"{source}: {len(names)} class_names for num_classes={heads['num_classes']}")
    pre = raw.get("preprocessing")
    if pre is not None:
        ok = isinstance(pre, dict) and set(pre) <= {"mean", "std"} and all(
            isinstance(pre.get(k), list) and len(pre[k]) == heads["in_channels"] and all(isinstance(v, (int, float)) for v in pre[k])
            for k in ("mean", "std")
        )
        if not ok:
            raise ValueError(f"{source}: 'preprocessing' must be {{'mean': [...], 'std': [...]}} with {heads['in_channels']} numbers each")
        if not all(math.isfinite(v) for v in pre["mean"]) or not all(math.isfinite(v) and v > 0 for v in pre["std"]):
            raise ValueError(f"{source}: 'preprocessing' must have finite means and finite stds > 0, got mean {pre['mean']}, std {pre['std']}")
    options = raw.get("adapter_options")
    if options not in (None, {}):
        keys = sorted(options) if isinstance(options, dict) else options
        raise ValueError(
            f"{source}: adapter_options {keys!r} are not allowed in a saved config; no adapter takes options from a file "
            "(expected {} or none). Pass such settings in Python, e.g. from_pretrained(...).unfreeze_base()"
        )
    return raw


def _resolve_file(location: str | os.PathLike, filename: str, **download: Any) -> Path:
    """A local file of a model directory, or a file of a Hub repository through its cache."""
    local = Path(location)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; an errwrap model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        return path
    if local.exists() or str(location).endswith((".json", ".safetensors")):
        raise FileNotFoundError(f"{location}: expected a model directory or a Hub repository id 'org/name'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, OfflineModeIsEnabled

    try:
        return Path(hf_hub_download(repo_id=str(location), filename=filename, library_name="errwrap", **download))
    except HFValidationError as exc:
        raise FileNotFoundError(f"{location}: not a local directory, and not a valid Hub repository id ({exc})") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{location}: has no {filename} (not in the local Hub cache, or not in the repository)") from None
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
        raise FileNotFoundError(f"{location}: could not get {filename} from the Hub ({type(exc).__name__}: {exc})") from None


def _other_entries(directory: Path) -> list[str]:
    """What ``directory`` holds besides a saved model's files (and temporary files of earlier
    saves); such a directory, or the working directory, is not replaced as a whole."""
    if not directory.is_dir():
        return []
    try:
        if Path.cwd().resolve().is_relative_to(directory.resolve()):
            return ["(the working directory)"]
    except OSError:
        pass
    own = {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME}
    return sorted(p.name for p in directory.iterdir() if p.name not in own and not (p.name.startswith(".") and p.name.endswith(".tmp")))


class HubMixin:
    """Adds ``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` to the wrapper."""

    head_config: dict[str, Any]
    #: Names of the classes, saved in ``config.json``.
    class_names: list[str] | None = None
    #: How images are normalised for the base, ``{"mean": [...], "std": [...]}`` (for the CLI).
    preprocessing: dict[str, list[float]] | None = None

    # ------------------------------------------------------------------ config
    def hub_config(self, *, heads_only: bool = False, class_names: list[str] | None = None) -> dict[str, Any]:
        """The ``config.json`` content: plain JSON data only."""
        from . import __version__

        names = class_names if class_names is not None else self.class_names
        spec = self.adapter.spec(self.base)  # type: ignore[attr-defined]
        config: dict[str, Any] = {
            "errwrap_version": __version__,
            "format_version": FORMAT_VERSION,
            "heads": {
                k: v
                for k, v in {**self.head_config, "temperature": float(getattr(self, "temperature", 1.0))}.items()
                if _OPTIONAL_HEAD_DEFAULTS.get(k, object()) != v
            },
            "heads_only": heads_only,
            "base": spec,
            "class_names": list(names) if names is not None else None,
            "adapter_options": self.adapter.options() if hasattr(self.adapter, "options") else {},  # type: ignore[attr-defined]
            "preprocessing": self.preprocessing,
        }
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the model's configuration is not plain JSON ({exc}); name layers by string (e.g. norm_layer='batchnorm')") from None
        return parse_config(config, "the configuration")

    def _weights(self, heads_only: bool) -> dict[str, torch.Tensor]:
        state = self.state_dict()  # type: ignore[attr-defined]
        return {k: v for k, v in state.items() if not (heads_only and k.startswith("base."))}

    # ------------------------------------------------------------------ save
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        heads_only: bool = False,
        class_names: list[str] | None = None,
        metrics: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        license: str | None = None,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` to ``save_directory``.

        The files are written into a sibling temporary directory that then replaces
        ``save_directory`` as a whole, so an interrupted save (even ``kill -9``) leaves the
        previous model or the new one, never a mix; temporary directories of processes that died
        are removed by the next save. A directory that holds other files too (or the working
        directory, or one whose parent cannot be written) keeps them: there each file is replaced
        on its own, atomically. Files get the user's umask (``0644`` by default).

        Args:
            save_directory: created if missing.
            heads_only: save only the three heads (the base's weights stay wherever you keep them).
            class_names: names of the classes (defaults to ``self.class_names``).
            metrics: an evaluation report as a dict (``report.to_dict()``) for the model card.
            training: how the model was trained, ``{"what": "value"}``, for the model card.
            license: an SPDX license id for the model card's metadata.

        Returns:
            The directory.
        """
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"save_directory: expected a directory (existing or new), got the file {directory}")
        config = self.hub_config(heads_only=heads_only, class_names=class_names)
        card = render_model_card(config, metrics=metrics, training=training, license=license)
        weights = self._weights(heads_only)

        def write(into: Path) -> None:
            save_safetensors(weights, into / WEIGHTS_NAME, metadata={"format": "pt", "library": "errwrap", "heads_only": str(heads_only).lower()})
            write_text_atomic(into / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
            write_text_atomic(into / CARD_NAME, card)

        others = _other_entries(directory)
        if directory.is_dir() and not os.access(directory.absolute().parent, os.W_OK | os.X_OK):
            others = others or ["(a parent directory that cannot be written)"]
        if others:
            logger.info("%s holds other files (%s); its model files are replaced one by one, not as one directory", directory, others[:5])
            directory.mkdir(parents=True, exist_ok=True)
            write(directory)
        else:
            with atomic_directory(directory) as tmp:
                write(tmp)
        logger.info("saved errwrap model (%s) to %s", "heads only" if heads_only else "base and heads", directory)
        return directory

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        model: nn.Module | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Load a wrapper from a local directory or a Hub repository id, in eval mode (call
        ``.train()`` to fine-tune it further).

        Args:
            pretrained_model_name_or_path: a directory written by :meth:`save_pretrained`, or
                ``"org/name"`` on the Hub (through the Hub cache; ``HF_HUB_OFFLINE=1`` works).
            model: the base network. Required when the checkpoint's base is a custom network or
                when it holds only the heads; otherwise the base is rebuilt from the config.
                A full checkpoint loads its base weights into ``model``.
            revision, cache_dir, force_download, local_files_only, token: passed to
                ``huggingface_hub.hf_hub_download``.
            device: where to put the model (default: CPU, or ``model``'s device).
            dtype: floating-point dtype of the weights (default: as constructed, usually float32).

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the config is invalid, names an unknown family, or the weights are
                corrupt, miss keys, have unexpected keys or the wrong shapes (all named).
        """
        download = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download, "local_files_only": local_files_only, "token": token}
        config_path = _resolve_file(pretrained_model_name_or_path, CONFIG_NAME, **download)
        size = config_path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{config_path}: {size} bytes, larger than the {MAX_CONFIG_BYTES} errwrap reads for a config; refusing it")
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise ValueError(f"{config_path}: JSON nested too deeply; refusing it") from None
        config = parse_config(raw, str(config_path))
        heads, heads_only = config["heads"], bool(config.get("heads_only", False))
        if model is None:
            if heads_only:
                raise ValueError(f"{pretrained_model_name_or_path}: this checkpoint holds only the heads; pass your trained base network as model=")
            if config["base"] is None:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: the base is a custom network that errwrap cannot rebuild from "
                    f"{CONFIG_NAME}; pass it as from_pretrained(..., model=your_network)"
                )
            model = build_base(config["base"])
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        kwargs = {k: heads[k] for k in _CONSTRUCTOR_KEYS}
        kwargs["sample_size"] = heads.get("sample_size", _OPTIONAL_HEAD_DEFAULTS["sample_size"])
        adapter = heads.get("adapter")
        wrapper = cls(model, adapter=None if adapter in (None, "native") else adapter, **kwargs)
        for key in ("low_channels", "high_channels"):
            if key in heads and wrapper.head_config[key] != heads[key]:
                raise ValueError(f"{config_path}: heads.{key}={heads[key]}, but the base gives {wrapper.head_config[key]} channels; is this the right base network?")
        weights_path = _resolve_file(pretrained_model_name_or_path, WEIGHTS_NAME, **download)
        tensors, _ = load_safetensors(weights_path)
        wrapper._load_checked(tensors, heads_only, str(weights_path))
        wrapper.temperature = float(heads.get("temperature", _OPTIONAL_HEAD_DEFAULTS["temperature"]))
        wrapper.class_names = config.get("class_names")
        wrapper.preprocessing = config.get("preprocessing")
        if device is not None or dtype is not None:
            wrapper.to(device=device, dtype=dtype)
        return wrapper.eval()  # as transformers and huggingface_hub do: call .train() to fine-tune

    def _load_checked(self, tensors: dict[str, torch.Tensor], heads_only: bool, source: str) -> None:
        """Strict, all-or-nothing load: every problem is found before any weight is copied."""
        keys = {k for k in self.state_dict() if not (heads_only and k.startswith("base."))}  # type: ignore[attr-defined]
        load_state_strict(self, tensors, source, required=keys, allowed=keys)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ push
    def push_to_hub(
        self,
        repo_id: str,
        *,
        heads_only: bool = False,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload errwrap model",
        create_pr: bool = False,
        class_names: list[str] | None = None,
        metrics: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        license: str | None = None,
    ) -> Any:
        """Save to a temporary directory and upload it to ``repo_id`` (created if missing).

        Returns:
            What ``HfApi.upload_folder`` returns (the commit info).
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, heads_only=heads_only, class_names=class_names, metrics=metrics, training=training, license=license)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )
