"""S3 (and S3-compatible: MinIO, moto) store roots: options from the standard ``AWS_*``
variables, atomic commits, and errors a user can act on.

Options use deltalake's (object_store's) keys, so one mapping configures the Delta log
(deltalake), the data files (``pyarrow.fs.S3FileSystem``, see :func:`storage.uris.filesystem`)
and readers such as ``datasets.load_dataset`` (s3fs, see :func:`fsspec_options`).

**Atomic commits.** A Delta commit is the creation of the log entry
``_delta_log/<version>.json``; two writers racing for the same version must not both
succeed. deltalake 1.6 dropped its DynamoDB locking provider (``AWS_S3_LOCKING_PROVIDER``)
and relies on S3 conditional writes instead: with ``conditional_put=etag`` the log entry is
written with ``If-None-Match: *``, which AWS S3 (since 2024), MinIO, Cloudflare R2 and moto
honour. The loser gets ``412 Precondition Failed`` and deltalake rebases its transaction
onto the new version (or reports a conflict). We always set it (an ``AWS_CONDITIONAL_PUT``
in the environment wins) and never set ``AWS_S3_ALLOW_UNSAFE_RENAME``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from storage.names import StoreError
from storage.uris import redact

ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ALLOW_HTTP",
    "AWS_CONDITIONAL_PUT",
)
"""The ``AWS_*`` variables a store reads (deltalake's names)."""

COMMIT_OPTIONS = {"conditional_put": "etag"}
"""Atomic log-entry creation through ``If-None-Match`` (see the module docstring)."""

CLIENT_OPTIONS = {"connect_timeout": "10s", "timeout": "120s", "max_retries": "3"}
"""Fail in seconds, not minutes, on an unreachable endpoint (object_store's defaults retry
for up to three minutes)."""


def is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def s3_options(
    root: str,
    explicit: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, str] | None:
    """The storage options of a store root: for ``s3://``, the ``AWS_*`` variables of
    ``env`` (default: the process environment), the commit and client options, then
    ``explicit`` on top. ``None`` for local roots without explicit options."""
    if not root.startswith("s3://"):
        return dict(explicit) if explicit else None
    env = os.environ if env is None else env
    options: dict[str, str] = {**COMMIT_OPTIONS, **CLIENT_OPTIONS}
    for key in ENV_KEYS:
        if env.get(key):
            options[key] = env[key]
    if "AWS_ENDPOINT_URL_S3" in options:  # the S3-specific endpoint wins, as in the AWS SDKs
        options["AWS_ENDPOINT_URL"] = options.pop("AWS_ENDPOINT_URL_S3")
    if "AWS_CONDITIONAL_PUT" in options:
        options["conditional_put"] = options.pop("AWS_CONDITIONAL_PUT")
    if "AWS_REGION" not in options and "AWS_DEFAULT_REGION" in options:
        options["AWS_REGION"] = options["AWS_DEFAULT_REGION"]
    options.pop("AWS_DEFAULT_REGION", None)
    options.update(explicit or {})
    return options


def option(options: Mapping[str, str] | None, name: str) -> str | None:
    """An option by its name without ``aws_``, in any case (``endpoint_url``)."""
    for key, value in (options or {}).items():
        if key.lower().removeprefix("aws_") == name:
            return value
    return None


def fsspec_options(options: Mapping[str, str] | None) -> dict[str, Any]:
    """s3fs ``storage_options`` for the same store, e.g. for
    ``datasets.load_dataset("parquet", data_files=store.files(ref), storage_options=...)``."""
    result: dict[str, Any] = {}
    pairs = {"access_key_id": "key", "secret_access_key": "secret", "session_token": "token"}
    for name, target in pairs.items():
        if value := option(options, name):
            result[target] = value
    if endpoint := option(options, "endpoint_url") or option(options, "endpoint"):
        result["endpoint_url"] = endpoint
    if region := option(options, "region"):
        result["client_kwargs"] = {"region_name": region}
    return result


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe(root: str, options: Mapping[str, str] | None, exc: BaseException) -> StoreError:
    """A :class:`StoreError` for a failed S3 request, saying what to check, with the
    credentials redacted (:func:`storage.uris.redact`): an endpoint's password, the secret
    key. Callers chain ``exc`` (``raise describe(...) from exc``), so its message is
    redacted in place too: a traceback in the Prefect run log or under ``--verbose``
    shows it."""
    secrets = [option(options, "secret_access_key"), option(options, "session_token")]
    text = redact(" ".join(_ANSI.sub("", str(exc)).split()), secrets)
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (redact(exc.args[0], secrets), *exc.args[1:])
    endpoint = redact(option(options, "endpoint_url") or "AWS's default endpoint")
    lowered = text.lower()
    refused = ("signature", "accesskey", "access_key", "403 forbidden", "denied", "credential")
    if any(s in lowered for s in refused):
        hint = (
            "the credentials were refused: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
            "(and AWS_SESSION_TOKEN)"
        )
    elif "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        hint = "the bucket does not exist"
    elif any(s in lowered for s in ("connect", "error sending", "timed out", "dns", "network")):
        hint = f"cannot reach the S3 endpoint {endpoint}: check AWS_ENDPOINT_URL and the network"
    else:
        hint = f"S3 request to {endpoint} failed"
    return StoreError(f"store {redact(root)}: {hint} ({text[:400]})")
