"""``read_source``: one corpus file → a stream of canonical batches.

The file is opened, typed and its format settled (detected, or the override's columns
checked) before the first batch is asked for, so a missing or unknown file fails at the
call. Each yielded :class:`~transforms.stage.StageResult` holds at most
``params.batch_rows`` rows, kept plus rejected. Given the fingerprint the caller took, the
read ends by checking that the bytes read are the bytes fingerprinted.

:func:`source_batches` is the same stream one step earlier: each batch read and parsed but
not yet built into canonical rows (prompts, field checks, ids), so that a caller can build
batches on other threads while the file is still being read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from transforms.ingest import alpaca
from transforms.ingest.digest import ReadDigest, file_fingerprint
from transforms.ingest.errors import IngestError, RowReject
from transforms.ingest.formats import (
    FORMATS,
    ROW_ADAPTERS,
    VECTORISED,
    RowAdapter,
    check_columns,
    detect,
    task_of,
)
from transforms.ingest.params import IngestParams
from transforms.ingest.readers import (
    Columns,
    Piece,
    SourceFile,
    as_records,
    default_source,
    iter_pieces,
    open_source,
)
from transforms.ingest.results import Outcome, build_rows
from transforms.stage import StageResult

T = TypeVar("T")

Batch = Callable[[], StageResult]
"""A batch read but not yet built into canonical rows: calling it builds them."""

NO_RECORDS_FORMAT = "alpaca"
"""How a file without a record to detect the format from is read: an empty file gives no
rows, and records past the bounds are rejected with their reasons whatever the format."""


def read_source(
    path: str | Path,
    *,
    format: str | None = None,
    source: str | None = None,
    params: IngestParams | None = None,
    fingerprint: str | None = None,
) -> Iterator[StageResult]:
    """:func:`source_batches`, each batch built in turn."""
    batches = source_batches(
        path, format=format, source=source, params=params, fingerprint=fingerprint
    )
    return (build() for build in batches)


def source_batches(
    path: str | Path,
    *,
    format: str | None = None,
    source: str | None = None,
    params: IngestParams | None = None,
    fingerprint: str | None = None,
) -> Iterator[Batch]:
    """Stream a corpus file (or a ``datasets`` ``save_to_disk`` directory) as canonical batches.

    Args:
        path: the file; see :mod:`transforms.ingest.readers` for the supported types.
        format: one of :data:`FORMATS`; detected from the first record when ``None``.
        source: the ``source`` column; by default the file name without its extensions.
        params: batch size, ShareGPT tags and the bounds of a record.
        fingerprint: the file's fingerprint (:func:`file_fingerprint`) taken by the caller;
            given, the read fails once it is done if the bytes it read hash otherwise.

    Yields:
        One :data:`Batch` per batch, in order: called (on any thread, once), it returns a
        result whose ``kept`` follows ``transforms.schema.SCHEMA`` and whose ``rejected``
        holds the rows with row-level problems, with ``reject_stage="ingest"`` and a
        ``reject_reason``; ``stats["rows_read"] == kept + rejected``.

    Raises:
        IngestError: a file-level problem, at the call (missing file, unknown format,
            required column absent) or while iterating (a malformed line or row, or a file
            that changed while it was read).
    """
    params = params or IngestParams()
    file = open_source(path)
    if format is None:
        format = detect(file, params) or NO_RECORDS_FORMAT
    elif format not in FORMATS:
        raise IngestError(
            file.name, f"unknown format {format!r}; known formats: {', '.join(FORMATS)}"
        )
    else:
        check_columns(file, format, params)
    return _results(file, format, source or default_source(file.path), params, fingerprint)


def _results(
    file: SourceFile, format_: str, source: str, params: IngestParams, fingerprint: str | None
) -> Iterator[Batch]:
    task = task_of(format_)
    schema = alpaca.JSON_SCHEMA if format_ == "alpaca" else None
    digest = ReadDigest() if fingerprint is not None else None  # nothing to check it against
    pieces = iter_pieces(
        file,
        batch_rows=params.batch_rows,
        arrow_schema=schema,
        bounds=params.bounds,
        digest=digest,
    )
    if format_ in VECTORISED:
        # map, not a for loop: a loop variable would keep the last piece and the last raw
        # batch alive while this generator waits for its consumer
        raws = map(functools.partial(_raw, format_=format_), pieces)
        build = functools.partial(_Deferred, alpaca.build, source=source, task=task)
        yield from map(build, rebatch(raws, params.batch_rows))
    else:
        outcomes = _outcomes(pieces, ROW_ADAPTERS[format_], params)
        build = functools.partial(_Deferred, build_rows, source=source, task=task)
        yield from map(build, chunked(outcomes, params.batch_rows))
    if fingerprint is not None and digest is not None:
        check_unchanged(file, fingerprint, digest)


def check_unchanged(file: SourceFile, fingerprint: str, digest: ReadDigest) -> None:
    """Fail if what was read is not the file that was fingerprinted: for a streamed file,
    the bytes read (``digest``); for Parquet or a ``datasets`` folder, the file now.

    Raises:
        IngestError: the file changed while it was read.
    """
    read = digest.fingerprint() if file.streamed else file_fingerprint(file.path)
    if read != fingerprint:
        size = f", {digest.size:,} bytes read" if file.streamed else ""
        raise file.error(
            f"changed while it was read (fingerprint {fingerprint} before, {read} of what was "
            f"read{size}); nothing was cached: build again once the file no longer changes"
        )


class _Deferred:
    """``fn(rows, **kwargs)`` when called, once: the call lets go of ``rows``, so a batch's
    raw rows are freed once built (not when the caller drops the batch)."""

    def __init__(self, fn: Callable[..., StageResult], rows: Any, **kwargs: Any) -> None:
        self._fn, self._rows, self._kwargs = fn, rows, kwargs

    def __call__(self) -> StageResult:
        rows, self._rows = self._rows, None
        assert rows is not None, "a batch is built once"
        return self._fn(rows, **self._kwargs)


def _raw(piece: Piece, format_: str) -> pa.Table:
    if format_ == "self_instruct":
        return alpaca.from_records(as_records(piece), self_instruct=True)
    if isinstance(piece, Columns):
        return alpaca.from_columns(piece)
    return alpaca.from_python(piece)


def _outcomes(
    pieces: Iterable[Piece], adapter: RowAdapter, params: IngestParams
) -> Iterator[tuple[int, Outcome]]:
    for piece in pieces:
        records = as_records(piece)
        for offset, value in enumerate(records.values):
            yield records.first_index + offset, _adapt(adapter, value, params)


def _adapt(adapter: RowAdapter, value: Any, params: IngestParams) -> Outcome:
    try:
        return adapter(value, params)
    except RowReject as reject:
        return reject


def rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Re-cut a stream of tables into tables of exactly ``rows`` rows (the last may be short)."""
    buffer: list[pa.Table] = []
    size = 0
    for table in tables:
        if not table.num_rows:
            continue
        buffer.append(table)
        size += table.num_rows
        del table  # held by the buffer while it is needed, not after
        while size >= rows:
            whole = pa.concat_tables(buffer)
            out = [whole.slice(0, rows)]
            buffer, size = [whole.slice(rows)], size - rows
            del whole  # the rows handed out are the consumer's to free
            yield out.pop()
    if size:
        yield pa.concat_tables(buffer)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` consecutive items (the last may be short)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
