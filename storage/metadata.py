"""Build metadata in a Delta commit's ``commitInfo``: how it is written and read back.

Delta custom metadata is a flat map of strings. A build's metadata is stored one key per
entry under the prefix ``aligncurate.meta.``: strings as they are, everything else as JSON
(the JSON-encoded keys are listed under ``aligncurate.json_keys``, so a string that looks
like JSON stays a string). Two more entries are the store's own: ``aligncurate.rows`` (rows
per split, JSON) and ``aligncurate.commit_id`` (a UUID that finds the commit's version).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from storage.names import StoreError

META_PREFIX = "aligncurate.meta."
JSON_KEYS = "aligncurate.json_keys"
ROWS_KEY = "aligncurate.rows"
COMMIT_ID = "aligncurate.commit_id"


def encode_metadata(
    metadata: Mapping[str, Any], rows: Mapping[str, int], commit_id: str
) -> dict[str, str]:
    """A commit's custom metadata: the build's ``metadata``, its ``rows`` per split and
    its ``commit_id``.

    Raises:
        StoreError: a key that is not a non-empty string, or a value that is not
            JSON-serialisable (NaN and infinities included).
    """
    out: dict[str, str] = {}
    json_keys: list[str] = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise StoreError(f"metadata keys must be non-empty strings, got {key!r}")
        if isinstance(value, str):
            out[META_PREFIX + key] = value
            continue
        try:
            out[META_PREFIX + key] = json.dumps(value, allow_nan=False)  # keeps stage order
        except (TypeError, ValueError) as exc:
            raise StoreError(f"metadata {key!r} is not JSON-serialisable: {exc}") from exc
        json_keys.append(key)
    out[JSON_KEYS] = json.dumps(json_keys)
    out[ROWS_KEY] = json.dumps(dict(rows))
    out[COMMIT_ID] = commit_id
    return out


def decode_metadata(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The build metadata of a history entry (``DeltaTable.history()``), as committed."""
    json_keys = set(json.loads(entry.get(JSON_KEYS, "[]")))
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key.startswith(META_PREFIX):
            name = key[len(META_PREFIX) :]
            out[name] = json.loads(value) if name in json_keys else value
    return out


def decode_rows(entry: Mapping[str, Any]) -> dict[str, int]:
    """Rows per split of a history entry (empty for a commit the store did not write)."""
    return json.loads(entry.get(ROWS_KEY, "{}"))


def commit_id_of(entry: Mapping[str, Any]) -> str | None:
    """The commit id of a history entry, if the store wrote it."""
    return entry.get(COMMIT_ID)
