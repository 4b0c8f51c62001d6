"""Store roots and shard locations: a local path, a ``file://`` URI or an ``s3://`` URI.

All file access in :mod:`storage` goes through URIs and pyarrow filesystems, with
``storage_options`` passed through, so an ``s3://`` root is configuration, not a code change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pyarrow.fs as pafs

from storage.names import StoreError

_S3_OPTIONS = {
    "access_key_id": "access_key",
    "secret_access_key": "secret_key",
    "session_token": "session_token",
    "token": "session_token",
    "region": "region",
    "default_region": "region",
    "endpoint": "endpoint_override",
    "endpoint_url": "endpoint_override",
}


def normalize_root(root: str) -> str:
    """A store root as the store uses it: ``file://`` dropped, a local path made absolute
    (``~`` expanded), a remote URI without its trailing ``/``."""
    if root.startswith("file://"):
        root = root.removeprefix("file://")
    if "://" in root:
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root))


def local_path(uri: str) -> str | None:
    """The local path of a plain path or ``file://`` URI; ``None`` for a remote URI."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    return None


def filesystem(root: str, storage_options: Mapping[str, str] | None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and base path for ``root``.

    ``storage_options`` use deltalake's (object_store's) keys, e.g. ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_ALLOW_HTTP``; they are mapped onto ``S3FileSystem``.
    """
    if "://" not in root:
        return pafs.LocalFileSystem(), root
    if not storage_options:
        return pafs.FileSystem.from_uri(root)
    if not root.startswith("s3://"):
        raise StoreError(f"storage_options are only supported for s3:// roots, not {root}")
    kwargs: dict[str, Any] = {}
    for key, value in storage_options.items():
        name = key.lower().removeprefix("aws_")
        if name == "allow_http":
            kwargs.setdefault("scheme", "http" if value.lower() == "true" else "https")
        elif name in _S3_OPTIONS:
            target = _S3_OPTIONS[name]
            if target == "endpoint_override" and "://" in value:
                scheme, value = value.split("://", 1)
                kwargs["scheme"] = scheme
            kwargs[target] = value
    return pafs.S3FileSystem(**kwargs), root.removeprefix("s3://")
