"""Fingerprints of inputs and of the code, for cache keys and commit metadata."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import xxhash

from transforms.ingest.digest import file_fingerprint

__all__ = ["code_version", "file_fingerprint", "fresh", "key_of"]


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts: the cache key of a task."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_CODE_PACKAGES = ("transforms", "pipelines", "storage", "engines")


@cache
def code_version() -> str:
    """The aligncurate version plus a hash of its source files (``0.1.0+1a2b3c4d5e6f``).

    Task cache keys include it, so editing any stage or the flow invalidates cached task
    results even without a version bump.
    """
    try:
        release = version("aligncurate")
    except PackageNotFoundError:  # running from a source tree that is not installed
        release = "0"
    root = Path(__file__).resolve().parents[1]
    digest = xxhash.xxh3_64()
    for package in _CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return f"{release}+{digest.hexdigest()[:12]}"


def fresh(task: Any, folder: str | Path) -> Any:
    """The Prefect task, told to recompute when the folder its cached result points to is
    gone (deleted by hand): a cached result naming files that no longer exist is useless."""
    return task if Path(folder).is_dir() else task.with_options(refresh_cache=True)
