"""Store roots and shard locations: a local path, a ``file://`` URI or an ``s3://`` URI.

All file access in :mod:`storage` goes through URIs and pyarrow filesystems, with
``storage_options`` passed through, so an ``s3://`` root is configuration, not a code change.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
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
_S3_SECONDS = {"connect_timeout": "connect_timeout", "timeout": "request_timeout"}

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*:/+)(?P<user>[^\s/?#@:]*):[^\s/?#@]*@")
"""A URL's ``user:password@``; ``scheme:/`` too, as a path made of a URL reads
(``Path("http://u:p@h/x")`` is ``http:/u:p@h/x``)."""
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""Variables whose values are never shown: :func:`redact` hides them wherever they appear."""
REDACTED = "***"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with its credentials hidden: the password of every URL
    (``http://admin:secret@host`` → ``http://admin:***@host``, and in a URL that became a
    path, ``http:/admin:secret@host``), the values of the
    :data:`SECRET_ENV` variables and ``secrets`` (e.g. a secret key passed as a storage
    option). Use it on every message or log line that may hold an endpoint, a store root
    or an exception from a client."""
    text = _USERINFO.sub(rf"\g<scheme>\g<user>:{REDACTED}@", text)
    for secret in (*(os.environ.get(key) for key in SECRET_ENV), *secrets):
        if secret and len(secret) >= 4:  # a one-letter "secret" would blank out every such letter
            text = text.replace(secret, REDACTED)
    return text


def _seconds(value: str) -> float:
    """object_store durations (``10s``, ``500ms``, ``2m``) in seconds."""
    value = value.strip().lower()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * scale
    return float(value)


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
    ``AWS_ACCESS_KEY_ID``, ``AWS_ALLOW_HTTP``, ``timeout``; they are mapped onto
    ``S3FileSystem`` (keys it has no use for, such as ``conditional_put``, are skipped).
    """
    if "://" not in root:
        return pafs.LocalFileSystem(), root
    if not storage_options:
        return pafs.FileSystem.from_uri(root)
    if not root.startswith("s3://"):
        raise StoreError(f"storage_options are only supported for s3:// roots, not {redact(root)}")
    kwargs: dict[str, Any] = {}
    for key, value in storage_options.items():
        name = key.lower().removeprefix("aws_")
        if name in _S3_SECONDS:
            kwargs[_S3_SECONDS[name]] = _seconds(value)
        elif name == "max_retries":
            kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=int(value) + 1)
        elif name == "allow_http":
            kwargs.setdefault("scheme", "http" if value.lower() == "true" else "https")
        elif name in _S3_OPTIONS:
            target = _S3_OPTIONS[name]
            if target == "endpoint_override" and "://" in value:
                scheme, value = value.split("://", 1)
                kwargs["scheme"] = scheme
            kwargs[target] = value
    return pafs.S3FileSystem(**kwargs), root.removeprefix("s3://")


WORK_ENV = "ALIGNCURATE_WORK"


def work_dir(root: str, name: str) -> Path:
    """The local folder for the shards and Prefect task results of dataset ``name``'s
    builds: ``<root>/_work/<name>`` for a local store; for a remote one (shards are
    scratch files, read and written many times), ``$ALIGNCURATE_WORK`` or
    ``~/.cache/aligncurate/work``, then a hash of the store root, then ``<name>``."""
    folder = local_path(root)
    if folder is not None:
        return Path(folder) / "_work" / name
    base = os.environ.get(WORK_ENV) or Path.home() / ".cache" / "aligncurate" / "work"
    digest = hashlib.sha256(root.encode()).hexdigest()[:16]
    return Path(base).expanduser() / digest / name
