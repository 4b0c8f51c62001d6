"""Field checks shared by every format, on Python values and on Arrow columns.

They produce the row-level reasons ``missing_field:<field>``, ``wrong_type:<field>``,
``invalid_utf8:<field>`` and ``invalid_json:<field>``. A null value counts as missing: the
Arrow readers cannot tell ``{"output": null}`` from a record without ``output``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.ingest.errors import RowReject

NULL_REASON = pa.scalar(None, pa.string())
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)


def valid_utf8(value: str) -> bool:
    """Whether ``value`` can be stored as UTF-8.

    Readers decode bytes with ``surrogateescape``, so invalid input bytes show up here as
    lone surrogates, and so do JSON escapes of lone surrogates such as ``"\\ud800"``.
    """
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, field: str, *, required: bool = True) -> tuple[str | None, str | None]:
    """``(value, None)`` for a storable string, else ``(None, reason)``.

    A missing optional value is ``(None, None)``.
    """
    if value is None:
        return None, f"missing_field:{field}" if required else None
    if not isinstance(value, str):
        return None, f"wrong_type:{field}"
    if not valid_utf8(value):
        return None, f"invalid_utf8:{field}"
    return value, None


def text(value: Any, field: str) -> str:
    """A required string, or :class:`RowReject`."""
    checked, reason = check_text(value, field)
    if reason:
        raise RowReject(reason)
    return checked  # type: ignore[return-value]


def optional_text(value: Any, field: str) -> str | None:
    """An optional string (``None`` when absent), or :class:`RowReject`."""
    checked, reason = check_text(value, field, required=False)
    if reason:
        raise RowReject(reason)
    return checked


def record(value: Any) -> dict[str, Any]:
    """The record as a dict, or :class:`RowReject` (``wrong_type:record``) for a JSON value
    that is not an object (a line holding ``[1, 2]``, say)."""
    if isinstance(value, RowReject):
        raise value
    if not isinstance(value, dict):
        raise RowReject("wrong_type:record")
    return value


def dump_json(value: Any, field: str) -> str:
    """``value`` serialised as JSON text (non-ASCII kept as is), or :class:`RowReject`."""
    try:
        dumped = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise RowReject(f"wrong_type:{field}") from exc
    return text(dumped, field)


def json_text(value: Any, field: str) -> str | None:
    """An optional JSON column such as ``tools``: a JSON string is checked and kept, a list
    or object is serialised; empty or absent gives ``None``."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        checked = text(value, field)
        try:
            json.loads(checked)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise RowReject(f"invalid_json:{field}") from exc
        return checked
    if isinstance(value, list | dict):
        return dump_json(value, field)
    raise RowReject(f"wrong_type:{field}")


# --- Arrow columns -------------------------------------------------------------------------


def is_text_type(type_: pa.DataType) -> bool:
    """String-like Arrow types that cast to ``string`` without loss."""
    if pa.types.is_dictionary(type_):
        return is_text_type(type_.value_type)
    return any(test(type_) for test in _TEXT_TYPES)


def invalid_utf8_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """A boolean mask of the rows holding invalid UTF-8 anywhere (nested values included),
    or ``None`` when every row is valid.

    Arrow readers do not check UTF-8, so this runs on every batch; the check is one
    vectorised validation, and only a failing column is searched row by row.
    """
    if _valid(column):
        return None
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.fromiter((_slice_invalid(array, i) for i in range(len(array))), bool, len(array))


def _valid(column: pa.Array | pa.ChunkedArray) -> bool:
    """Whether every value is valid (UTF-8 included), checked chunk by chunk: combining
    the chunks first copied all of a batch's text."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    try:
        for chunk in chunks:
            chunk.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _slice_invalid(array: pa.Array, row: int) -> bool:
    try:
        array.slice(row, 1).validate(full=True)
    except pa.ArrowInvalid:
        return True
    return False


def reason_where(mask: np.ndarray | pa.Array, reason: str) -> pa.Array:
    """``reason`` where ``mask`` is true, null elsewhere."""
    return pc.if_else(pa.array(mask, pa.bool_()), pa.scalar(reason), NULL_REASON)


def arrow_text(
    column: pa.Array | pa.ChunkedArray | None, n: int, field: str, *, required: bool
) -> tuple[pa.Array | pa.ChunkedArray, pa.Array]:
    """Vectorised :func:`check_text` for one column: ``(strings, reasons)``.

    The strings are null where the value was missing or unusable; ``reasons`` is null where
    the value was fine. A column of a non-string type rejects its non-null rows
    (``wrong_type``): Arrow types are per column, so this is exact.
    """
    if column is None or pa.types.is_null(column.type):
        values, reasons = pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
    elif not is_text_type(column.type):
        values, reasons = (
            pa.nulls(n, pa.string()),
            reason_where(pc.is_valid(column), f"wrong_type:{field}"),
        )
    else:
        values, reasons = _valid_strings(column, field)
    if required:
        missing = pc.is_null(values)
        if isinstance(missing, pa.ChunkedArray):
            missing = missing.combine_chunks()
        reasons = pc.coalesce(reasons, reason_where(missing, f"missing_field:{field}"))
    return values, reasons


def _valid_strings(
    column: pa.Array | pa.ChunkedArray, field: str
) -> tuple[pa.Array | pa.ChunkedArray, pa.Array]:
    """The strings (chunked as they came when all are valid: no copy) and the reasons."""
    if isinstance(column, pa.ChunkedArray) and not pa.types.is_dictionary(column.type):
        if _valid(column):
            return column.cast(pa.string()), pa.nulls(len(column), pa.string())
        column = column.combine_chunks()
    elif isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    bad = invalid_utf8_rows(column)
    if bad is None:
        return column.cast(pa.string()), pa.nulls(len(column), pa.string())
    cleaned = pc.if_else(pa.array(bad), pa.scalar(None, column.type), column)
    return cleaned.cast(pa.string()), reason_where(bad, f"invalid_utf8:{field}")
