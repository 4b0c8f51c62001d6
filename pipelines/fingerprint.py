"""Fingerprints of inputs and of the code, for cache keys and commit metadata."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import xxhash

_CHUNK = 1 << 22


def file_fingerprint(path: str | Path) -> str:
    """XXH3-128 of a file's bytes, or of every file under a directory (sorted by name)."""
    path = Path(path)
    digest = xxhash.xxh3_128()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return f"xxh3:{digest.hexdigest()}"


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts: the cache key of a task."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@cache
def code_version() -> str:
    """The installed aligncurate version."""
    try:
        return version("aligncurate")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"
