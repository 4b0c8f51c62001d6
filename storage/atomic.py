"""Atomic writes: a file or folder appears whole under its name, or not at all.

Every local writer of the project goes through here: :func:`atomic_path` (a temporary file
beside the target, renamed onto it when the block succeeds) for any file format whose
writer wants a path (Parquet, ``.npy``/``.npz``, JSON lines), :func:`write_text_atomic` and
:func:`write_json_atomic` on top of it, and :func:`atomic_dir` for folders (model
checkpoints). Temporary names are unique per call (``mkstemp``/``mkdtemp``), so two builds
writing the same file at once never share one, and a failed block leaves nothing behind.
Object stores (``s3://``) are written through their own filesystem's move instead (see
``storage.dataset.DatasetStore._write_tags``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` (hidden, same suffix) for the block to write;
    renamed onto ``path`` when the block succeeds, removed when it fails.

    The file exists (empty) when the block starts; writers overwrite it. It ends with the
    permissions a plain ``open`` would give (``mkstemp``'s 0600 would hide it from the
    store's other users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``path`` for the block to fill; when the block
    succeeds, what was at ``path`` is removed and the folder renamed into place; when it
    fails, the folder is removed. (A reader may find no folder for the instant between the
    removal and the rename, never a half-written one.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON (non-JSON values as strings), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
