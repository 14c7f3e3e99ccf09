"""Crash-safe checkpoint files.

``save_checkpoint`` never leaves a half-written file under the checkpoint's
name: it writes a temporary file in the same folder, fsyncs it and renames it
into place; the file it replaces stays readable as ``<path>.prev`` (a hard link
where the file system allows, so ``path`` itself never disappears).
``load_checkpoint`` reads with ``weights_only=True`` (no code runs from a file)
and falls back to ``<path>.prev``, with a warning, when the newest file is
missing, truncated or corrupt.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Any

import torch

from .errors import MLOError


class CheckpointError(MLOError, RuntimeError):
    """Neither the checkpoint nor its ``.prev`` backup could be loaded."""


def previous_path(path: str | os.PathLike) -> str:
    """Where ``save_checkpoint`` keeps the checkpoint it replaced."""
    return f"{os.fspath(path)}.prev"


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` atomically; keep the replaced file as ``<path>.prev``.

    ``obj`` should hold only tensors, numbers, strings, lists and dicts so that
    ``load_checkpoint`` can read it with ``weights_only=True``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(path):
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> Any:
    """Load with ``weights_only=True``; fall back to ``<path>.prev`` if ``path`` is missing or damaged.

    Warns when it falls back; raises ``CheckpointError`` naming both files when neither loads.
    """
    obj, used, reason = load_with_fallback(path, map_location)
    if reason is not None:
        warnings.warn(f"checkpoint {os.fspath(path)} is unreadable ({reason}); loaded the previous one, {used}",
                      stacklevel=2)
    return obj


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` or its backup ``<path>.prev`` exists (there is something to resume from)."""
    return os.path.exists(path) or os.path.exists(previous_path(path))


def load_with_fallback(path: str | os.PathLike, map_location="cpu") -> tuple[Any, str, str | None]:
    """``(object, file read, why the newest file was not used or None)``; no warning.

    Raises ``CheckpointError`` naming both files when neither loads.
    """
    path = os.fspath(path)
    prev = previous_path(path)
    try:
        return torch.load(path, weights_only=True, map_location=map_location), path, None
    except Exception as exc:  # a damaged file surfaces as many different exception types
        first = exc
    if not os.path.exists(prev):
        raise CheckpointError(f"no readable checkpoint: cannot load {path} ({_describe(first)}); "
                              f"no backup {prev} exists") from first
    try:
        obj = torch.load(prev, weights_only=True, map_location=map_location)
    except Exception as exc:
        raise CheckpointError(f"no readable checkpoint: cannot load {path} ({_describe(first)}) "
                              f"nor its backup {prev} ({_describe(exc)})") from exc
    return obj, prev, _describe(first)


def temporary_files(path: str | os.PathLike) -> list[str]:
    """The temporary files a writer of ``path`` killed mid-write may have left behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix, staged = f".{os.path.basename(path)}.", os.path.basename(previous_path(path)) + ".tmp"
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if (n.startswith(prefix) and n.endswith(".tmp")) or n == staged)


def _remove_stale_temporaries(path: str) -> None:
    """One writer per checkpoint path: any temporary of ``path`` now present is a dead writer's."""
    for name in temporary_files(path):
        os.unlink(name)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _keep_previous(path: str) -> None:
    """Make ``<path>.prev`` a copy of ``path`` while ``path`` itself stays in place."""
    prev = previous_path(path)
    staged = f"{prev}.tmp"
    if os.path.exists(staged):
        os.unlink(staged)
    try:
        os.link(path, staged)  # cheap: a second name for the same data
    except OSError:
        shutil.copyfile(path, staged)
    os.replace(staged, prev)


def _fsync_dir(folder: str) -> None:
    """Persist the renames themselves (POSIX); skipped where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
