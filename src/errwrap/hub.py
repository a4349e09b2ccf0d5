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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from torch import nn

from ._io import atomic_directory, load_safetensors, save_safetensors, write_text_atomic
from ._version import __version__
from .adapters.specs import build_base
from .config import MAX_HEAD_PARAMETERS, TEMPERATURE_RANGE, HeadConfig
from .modelcard import render_model_card

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "FORMAT_VERSION", "HubMixin", "SavedConfig",
    "parse_config", "read_config", "MAX_HEAD_PARAMETERS", "TEMPERATURE_RANGE",
]  # fmt: skip

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1

#: Top-level keys of ``config.json``. ``adapter_options`` is no longer written; older files hold
#: ``{}`` there, which is still read (and anything else refused).
_TOP_KEYS = {
    "errwrap_version",
    "format_version",
    "heads",
    "heads_only",
    "base",
    "class_names",
    "adapter_options",
    "preprocessing",
}
#: Largest ``config.json`` errwrap reads, and how deeply its JSON may nest.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_CONFIG_DEPTH = 32
#: Keys that would ask a loader to run code; refused anywhere in a config.
_CODE_KEYS = {"auto_map", "trust_remote_code", "_target_", "__class__", "__reduce__", "import", "module", "callable"}

_M = TypeVar("_M", bound="HubMixin")


def _scan_for_code_keys(obj: Any, source: str, where: str = "", depth: int = 0) -> None:
    if depth > MAX_CONFIG_DEPTH:
        raise ValueError(
            f"{source}: {where[:80]}... is nested more than {MAX_CONFIG_DEPTH} levels deep; an errwrap config is not"
        )
    if isinstance(obj, dict):
        for k, v in obj.items():
            if str(k) in _CODE_KEYS:
                raise ValueError(
                    f"{source}: key {where + str(k)!r} asks for code to be loaded; errwrap configs are data only"
                )
            _scan_for_code_keys(v, source, f"{where}{k}.", depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _scan_for_code_keys(v, source, f"{where}{i}.", depth + 1)


@dataclass(frozen=True)
class SavedConfig:
    """A checked ``config.json`` (what :func:`read_config` returns).

    Attributes:
        heads: the heads' configuration.
        heads_only: the weights hold only the three heads.
        base: the base spec errwrap rebuilds the base from, or ``None`` for a custom network.
        class_names: names of the classes, or ``None``.
        preprocessing: ``{"mean": [...], "std": [...]}`` for the base's images, or ``None``.
        errwrap_version: the errwrap that wrote the file, when recorded.
    """

    heads: HeadConfig
    heads_only: bool = False
    base: dict[str, Any] | None = None
    class_names: list[str] | None = None
    preprocessing: dict[str, list[float]] | None = None
    errwrap_version: str | None = None


def _check_format(raw: Any, source: str) -> None:
    """The file is an errwrap config of a format this errwrap reads, with known keys and no code."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if not isinstance(version, int):
        raise ValueError(
            f"{source}: missing or invalid 'format_version' (expected an integer); is this an errwrap config?"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source}: written by errwrap {raw.get('errwrap_version', '?')} in format {version}; this errwrap "
            f"{__version__} reads format <= {FORMAT_VERSION}. Upgrade errwrap."
        )
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(
            f"{source}: unknown keys {unknown} (written by errwrap {raw.get('errwrap_version', '?')}?); this errwrap "
            f"{__version__} knows {sorted(_TOP_KEYS)}"
        )
    _scan_for_code_keys(raw, source)


def _check_preprocessing(pre: Any, in_channels: int, source: str) -> None:
    ok = isinstance(pre, dict) and set(pre) <= {"mean", "std"} and all(
        isinstance(pre.get(k), list) and len(pre[k]) == in_channels and all(isinstance(v, (int, float)) for v in pre[k])
        for k in ("mean", "std")
    )
    if not ok:
        raise ValueError(
            f"{source}: 'preprocessing' must be {{'mean': [...], 'std': [...]}} with {in_channels} numbers each"
        )
    if not all(math.isfinite(v) for v in pre["mean"]) or not all(math.isfinite(v) and v > 0 for v in pre["std"]):
        raise ValueError(
            f"{source}: 'preprocessing' must have finite means and finite stds > 0, "
            f"got mean {pre['mean']}, std {pre['std']}"
        )


def _check_config(raw: Any, source: str) -> SavedConfig:
    """Every check of a loaded ``config.json``; the heads are checked field by field by
    :meth:`HeadConfig.from_json`."""
    _check_format(raw, source)
    heads = HeadConfig.from_json(raw.get("heads"), source)
    if not isinstance(raw.get("heads_only", False), bool):
        raise ValueError(f"{source}: 'heads_only' must be true or false")
    base = raw.get("base")
    if base is not None and (not isinstance(base, dict) or not isinstance(base.get("family"), str)):
        raise ValueError(f"{source}: 'base' must be null or an object with a 'family' string, got {base!r}")
    names = raw.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{source}: 'class_names' must be a list of strings")
    if names is not None and len(names) != heads.num_classes:
        raise ValueError(f"{source}: {len(names)} class_names for num_classes={heads.num_classes}")
    pre = raw.get("preprocessing")
    if pre is not None:
        _check_preprocessing(pre, heads.in_channels, source)
    options = raw.get("adapter_options")
    if options not in (None, {}):  # older files hold {}; no adapter takes options from a file
        keys = sorted(options) if isinstance(options, dict) else options
        raise ValueError(
            f"{source}: adapter_options {keys!r} are not allowed in a saved config; no adapter takes options from a "
            "file "
            "(expected {} or none). Pass such settings in Python, e.g. from_pretrained(...).unfreeze_base()"
        )
    version = raw.get("errwrap_version")
    return SavedConfig(
        heads, bool(raw.get("heads_only", False)), base, names, pre, version if isinstance(version, str) else None
    )


def parse_config(raw: Any, source: str = CONFIG_NAME) -> dict[str, Any]:
    """Validate a loaded ``config.json``; raise ``ValueError`` naming the file and the key.

    Returns:
        ``raw``, checked (see :func:`read_config` for the config as typed data).
    """
    _check_config(raw, source)
    return raw


def read_config(path: str | os.PathLike) -> SavedConfig:
    """Read and check a ``config.json`` file.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is too large, not JSON, or not a valid errwrap config (naming the file and the key).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{path}: {size} bytes, larger than the {MAX_CONFIG_BYTES} errwrap reads for a config; refusing it"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply; refusing it") from None
    return _check_config(raw, str(path))


def _resolve_file(location: str | os.PathLike, filename: str, **download: Any) -> Path:
    """A local file of a model directory, or a file of a Hub repository through its cache."""
    local = Path(location)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; an errwrap model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        return path
    if local.exists() or str(location).endswith((".json", ".safetensors")):
        raise FileNotFoundError(f"{location}: expected a model directory or a Hub repository id 'org/name'")
    try:
        return Path(hf_hub_download(repo_id=str(location), filename=filename, library_name="errwrap", **download))
    except HFValidationError as exc:
        raise FileNotFoundError(
            f"{location}: not a local directory, and not a valid Hub repository id ({exc})"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"{location}: has no {filename} (not in the local Hub cache, or not in the repository)"
        ) from None
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
        raise FileNotFoundError(
            f"{location}: could not get {filename} from the Hub ({type(exc).__name__}: {exc})"
        ) from None


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
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name not in own and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )


class HubMixin:
    """Adds ``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` to a model class.

    The mixin owns the files (their format, checks, atomic writes, downloads); the model class
    declares the template hooks below, which are all the mixin asks of it.
    """

    #: Names of the classes, saved in ``config.json``.
    class_names: list[str] | None = None
    #: How images are normalised for the base, ``{"mean": [...], "std": [...]}`` (for the CLI).
    preprocessing: dict[str, list[float]] | None = None

    # ------------------------------------------------------------------ hooks the model declares
    def _hub_config(self) -> HeadConfig:
        """The heads' configuration to save, with the current temperature."""
        raise NotImplementedError

    def _hub_base_spec(self) -> dict[str, Any] | None:
        """The JSON spec errwrap rebuilds the base from, or ``None`` for a custom network."""
        raise NotImplementedError

    def _hub_weights(self, heads_only: bool) -> dict[str, torch.Tensor]:
        """The tensors to save: the whole model's, or only the heads' with ``heads_only``."""
        raise NotImplementedError

    def _hub_load_weights(self, tensors: dict[str, torch.Tensor], heads_only: bool, source: str) -> None:
        """Load ``tensors`` strictly (every key of :meth:`_hub_weights`, no other), all or nothing."""
        raise NotImplementedError

    @classmethod
    def _hub_from_config(cls: type[_M], model: nn.Module, heads: HeadConfig) -> _M:
        """A new model around the base ``model`` with the heads ``heads`` describe (fresh
        weights, the saved temperature)."""
        raise NotImplementedError

    def _hub_place(self: _M, device: torch.device | str | None, dtype: torch.dtype | None) -> _M:
        """The loaded model moved to ``device``/``dtype`` (when given) and put in eval mode."""
        raise NotImplementedError

    # ------------------------------------------------------------------ config
    def hub_config(self, *, heads_only: bool = False, class_names: list[str] | None = None) -> dict[str, Any]:
        """The ``config.json`` content: plain JSON data only."""
        names = class_names if class_names is not None else self.class_names
        config: dict[str, Any] = {
            "errwrap_version": __version__,
            "format_version": FORMAT_VERSION,
            "heads": self._hub_config().to_json(),
            "heads_only": heads_only,
            "base": self._hub_base_spec(),
            "class_names": list(names) if names is not None else None,
            "preprocessing": self.preprocessing,
        }
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"the model's configuration is not plain JSON ({exc}); name layers by string (e.g. "
                "norm_layer='batchnorm')"
            ) from None
        return parse_config(config, "the configuration")

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
            raise NotADirectoryError(
                f"save_directory: expected a directory (existing or new), got the file {directory}"
            )
        config = self.hub_config(heads_only=heads_only, class_names=class_names)
        card = render_model_card(config, metrics=metrics, training=training, license=license)
        weights = self._hub_weights(heads_only)

        def write(into: Path) -> None:
            save_safetensors(
                weights,
                into / WEIGHTS_NAME,
                metadata={"format": "pt", "library": "errwrap", "heads_only": str(heads_only).lower()},
            )
            write_text_atomic(into / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
            write_text_atomic(into / CARD_NAME, card)

        others = _other_entries(directory)
        if directory.is_dir() and not os.access(directory.absolute().parent, os.W_OK | os.X_OK):
            others = others or ["(a parent directory that cannot be written)"]
        if others:
            logger.info(
                "%s holds other files (%s); its model files are replaced one by one, not as one directory",
                directory,
                others[:5],
            )
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
        cls: type[_M],
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
    ) -> _M:
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
        download = {
            "revision": revision,
            "cache_dir": cache_dir,
            "force_download": force_download,
            "local_files_only": local_files_only,
            "token": token,
        }
        config_path = _resolve_file(pretrained_model_name_or_path, CONFIG_NAME, **download)
        config = read_config(config_path)
        if model is None:
            if config.heads_only:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: this checkpoint holds only the heads; pass your trained base "
                    "network as model="
                )
            if config.base is None:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: the base is a custom network that errwrap cannot rebuild from "
                    f"{CONFIG_NAME}; pass it as from_pretrained(..., model=your_network)"
                )
            model = build_base(config.base)
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        wrapper = cls._hub_from_config(model, config.heads)
        built = wrapper._hub_config()
        for key in ("low_channels", "high_channels"):
            saved, found = getattr(config.heads, key), getattr(built, key)
            if saved is not None and found != saved:
                raise ValueError(
                    f"{config_path}: heads.{key}={saved}, but the base gives {found} channels; "
                    "is this the right base network?"
                )
        weights_path = _resolve_file(pretrained_model_name_or_path, WEIGHTS_NAME, **download)
        tensors, _ = load_safetensors(weights_path)
        wrapper._hub_load_weights(tensors, config.heads_only, str(weights_path))
        wrapper.class_names = config.class_names
        wrapper.preprocessing = config.preprocessing
        return wrapper._hub_place(device, dtype)  # eval mode, as in transformers: call .train() to fine-tune

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
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(
                tmp, heads_only=heads_only, class_names=class_names, metrics=metrics, training=training, license=license
            )
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )
