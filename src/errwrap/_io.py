"""Safe file I/O: atomic writes (temporary file or directory + rename), files with the user's
umask, and checked safetensors loading."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
import sys
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "nan_to_none",
    "none_to_nan",
    "read_json_text",
    "write_json_text",
    "atomic_path", "atomic_directory", "replace_directory", "write_text_atomic", "default_mode", "check_writable",
    "tensor_bytes", "tensors_digest", "save_safetensors", "load_safetensors", "load_state_strict",
    "MAX_HEADER_BYTES", "CHECKSUM_KEY",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: Largest safetensors JSON header errwrap reads (a header lists names, dtypes, shapes, offsets:
#: a few hundred bytes per tensor, so this allows well over 100k tensors).
MAX_HEADER_BYTES = 64 * 1024 * 1024


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    A crash or an exception before the end leaves the previous ``path`` (if any) intact and no
    temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, default_mode())  # mkstemp makes 0600; a saved file gets the user's umask
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file (``0o666``) or directory
    (``0o777``) under the user's umask: ``0o644`` / ``0o755`` with the usual umask 022."""
    return (0o777 if directory else 0o666) & ~_umask()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every system can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False``
    where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX); elsewhere always ``True``, so nothing of another
    process is removed (on Windows ``os.kill(pid, 0)`` would terminate it)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` left next to ``path`` by processes that
    died mid-save; put a set-aside ``.old`` back when ``path`` itself is missing."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    stale = []
    for entry in path.parent.iterdir():
        found = pattern.match(entry.name)
        if found and int(found.group(2)) != os.getpid() and not _pid_alive(int(found.group(2))):
            stale.append((found.group(1), entry))
    for kind, entry in sorted(stale, key=lambda e: e[0] != "old"):
        if kind == "old" and not path.exists():
            os.replace(entry, path)  # a save died between setting the old directory aside and renaming the new one in
            logger.warning("restored %s from %s, left by an interrupted save", path, entry.name)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.info("removed %s, left by an interrupted save", entry)


def replace_directory(new: Path, path: Path, aside: Path | None = None) -> None:
    """Put the complete directory ``new`` at ``path``, replacing what is there in one step where
    Linux can swap them (``new`` then holds the old directory, which is removed); elsewhere the
    old one is renamed to ``aside`` (default ``path`` + ``.old``), ``new`` renamed in, and the old
    one removed."""
    if not path.exists():
        os.rename(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)
    else:
        aside = aside or path.with_name(f"{path.name}.old")
        os.rename(path, aside)
        os.rename(new, path)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new sibling directory ``.NAME.tmp-PID-RAND`` to fill; on success it replaces
    ``path`` as a whole (swapped in one step where Linux can, else the old one is renamed aside,
    the new one in, and the old one removed), so a crash leaves the old or the new directory,
    never a mix. Temporary directories of processes that died are removed on the next call.
    The directory and the files written through :func:`atomic_path` get the user's umask."""
    path = Path(path).absolute()
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.is_dir() else default_mode(directory=True))
        yield tmp
        _fsync_dir(tmp)
        replace_directory(tmp, path, aside=path.with_name(f".{path.name}.old-{tag}"))
    finally:
        if tmp.exists():  # the new directory, after a failure
            shutil.rmtree(tmp, ignore_errors=True)


def tensor_bytes(tensors: Collection[torch.Tensor]) -> int:
    """Bytes of ``tensors`` as stored (what a safetensors file of them takes, less its header)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def check_writable(path: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Before long work that ends in a write: check that ``path`` (a directory, existing or not)
    can be written and that its file system has ``need_bytes`` free.

    Raises:
        OSError: naming ``what``, the path, and the reason (not writable, or how much is free).
    """
    path = Path(path)
    probe = path
    while not probe.is_dir():
        if probe.exists() or probe.parent == probe:
            raise NotADirectoryError(
                f"{what} {path}: expected a directory (existing or new), but {probe} is not a directory"
            )
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise OSError(
            f"{what} {path}: cannot write in {probe} ({exc.strerror or exc}); choose a writable directory"
        ) from None
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise OSError(
            f"{what} {path}: {free / 1e6:.1f} MB free on its disk, but saving needs about {need_bytes / 1e6:.1f} MB; "
            "free some space or choose another directory"
        )


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


CHECKSUM_KEY = "errwrap_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` as safetensors, atomically, with a SHA-256 of the tensors in the
    metadata (checked by :func:`load_safetensors`); shared or strided tensors are copied."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {**(metadata or {}), CHECKSUM_KEY: tensors_digest(plain)}
    with atomic_path(path) as tmp:
        try:
            save_file(plain, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # e.g. a full disk: an OSError like any other failed write
            raise OSError(f"{path}: could not write the weights ({exc})") from None


def _check_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes; expected an 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path}: safetensors header of {length} bytes is larger than the {MAX_HEADER_BYTES} errwrap reads; "
                "refusing it"
            )
        if length > size - 8:
            raise ValueError(
                f"{path}: truncated or malformed safetensors file (header says {length} bytes, file has {size - 8} "
                "after the length)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: malformed safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: malformed safetensors header (expected a JSON object)")
    return header


def load_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file after checking its header; return ``(tensors, metadata)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated, corrupt, or its header is oversized or malformed
            (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    header = _check_header(path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: malformed safetensors metadata (expected a JSON object)")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ValueError(f"{path}: corrupt safetensors file ({exc})") from None
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise ValueError(
            f"{path}: checksum mismatch, the weights were corrupted after they were written; refusing them"
        )
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _listed(keys: list[str]) -> str:
    return f"{keys[:10]}{' ...' if len(keys) > 10 else ''}"


def _kind(t: torch.Tensor) -> str:
    return (
        "float"
        if t.is_floating_point()
        else "complex"
        if t.is_complex()
        else "bool"
        if t.dtype == torch.bool
        else "int"
    )


def load_state_strict(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    source: str,
    *,
    required: Collection[str] | None = None,
    allowed: Collection[str] | None = None,
) -> list[str]:
    """Copy ``tensors`` into ``module`` all-or-nothing: every key, shape and kind of dtype (float,
    integer, bool) is checked first, and NaN/Inf values are refused; on any problem a
    ``ValueError`` names them all and no tensor is copied.

    Args:
        module: loaded in place.
        tensors: name -> tensor, as in ``module.state_dict()``.
        source: what to name in the error (the file).
        required: keys that must be in ``tensors`` (default: all of ``module``'s).
        allowed: keys ``tensors`` may hold (default: all of ``module``'s).

    Returns:
        The loaded keys, sorted.
    """
    current = module.state_dict()
    required = set(current) if required is None else set(required)
    allowed = set(current) if allowed is None else set(allowed) & set(current)
    missing, unexpected = sorted(required - set(tensors)), sorted(set(tensors) - allowed)
    wrong = [
        f"{k}: expected {tuple(current[k].shape)}, got {tuple(t.shape)}"
        for k, t in sorted(tensors.items())
        if k in allowed and current[k].shape != t.shape
    ]
    kinds = [
        f"{k}: expected {current[k].dtype}, got {t.dtype}"
        for k, t in sorted(tensors.items())
        if k in allowed and _kind(current[k]) != _kind(t)
    ]
    non_finite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    problems = []
    if kinds:
        problems.append(f"dtype mismatches [{'; '.join(kinds[:10])}{' ...' if len(kinds) > 10 else ''}]")
    if non_finite:
        problems.append(f"NaN/Inf values in {_listed(non_finite)}")
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches [{'; '.join(wrong[:10])}{' ...' if len(wrong) > 10 else ''}]")
    if problems:
        raise ValueError(f"{source}: weights do not fit this model: {', '.join(problems)}; nothing was loaded")
    module.load_state_dict({**current, **tensors}, strict=True)
    return sorted(tensors)


def nan_to_none(obj: Any) -> Any:
    """``obj`` with every float NaN (in nested mappings, lists and tuples) as ``None``: JSON has no NaN."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Mapping):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


def none_to_nan(obj: Any) -> Any:
    """The inverse of :func:`nan_to_none` for values read back from JSON."""
    if obj is None:
        return float("nan")
    if isinstance(obj, Mapping):
        return {k: none_to_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [none_to_nan(v) for v in obj]
    return obj


def write_json_text(obj: Any, path: str | os.PathLike | None = None, indent: int = 2) -> str:
    """``obj`` as strict JSON text (a NaN is an error: pass it through :func:`nan_to_none`);
    also written to ``path`` (with a final newline) when given."""
    text = json.dumps(obj, indent=indent, allow_nan=False)
    if path is not None:
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


def read_json_text(text_or_path: str | os.PathLike) -> Any:
    """JSON from text that starts with ``{``, otherwise from the file at that path."""
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        text = Path(text_or_path).read_text(encoding="utf-8")
    return json.loads(text)
