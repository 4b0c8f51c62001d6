"""File types → streams of record pieces, read with bounded memory.

A reader never materialises a file. It yields *pieces*, each a run of consecutive records:
:class:`Records` (Python values, from JSON, JSON lines and CSV) or :class:`Columns` (an Arrow
table, from Parquet, a ``datasets`` directory, or JSON lines parsed by Arrow).

Supported inputs:

- JSON: a top-level array (cut into its elements, each parsed alone), or JSON lines in a
  ``.json`` file;
- JSON lines: ``.jsonl`` / ``.ndjson``;
- CSV with a header row (every value a string);
- any of the above compressed: ``.gz`` or ``.zst``;
- Parquet (``.parquet``, ``.pq``);
- a directory written by ``datasets``' ``save_to_disk``. For a ``DatasetDict`` directory the
  ``train`` split is read, or the only split if there is one; point at a split's folder to
  read another.

Every JSON record is bounded in depth and size (:class:`Bounds`) before a recursive parser
sees it (Arrow's is not one: see :mod:`~transforms.ingest.jsonio`), and so is every CSV field
(in size). A streamed file's main read hashes its bytes
(:class:`ReadDigest`), so that the build can check them against its fingerprint.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from transforms.ingest import jsonio
from transforms.ingest.digest import ReadDigest
from transforms.ingest.errors import IngestError, RowReject, unreadable
from transforms.ingest.fields import invalid_utf8_rows
from transforms.ingest.structure import Bounds

JSON_ARRAY, JSON_LINES, CSV, PARQUET, HF_DISK = "json", "jsonl", "csv", "parquet", "hf_disk"
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
"""File suffix → Arrow codec (decompression runs in Arrow's C++ streams)."""
HF_METADATA_BYTES = 16 << 20
"""The largest ``state.json`` or ``dataset_dict.json`` read (``datasets`` writes a few KiB)."""
EXTENSIONS = {
    ".json": JSON_ARRAY,
    ".jsonl": JSON_LINES,
    ".ndjson": JSON_LINES,
    ".csv": CSV,
    ".parquet": PARQUET,
    ".pq": PARQUET,
}


@dataclass(frozen=True)
class Records:
    """Consecutive records as Python values; the first has index ``first_index``."""

    first_index: int
    values: list[Any]


@dataclass(frozen=True)
class Columns:
    """Consecutive records as an Arrow table; the first has index ``first_index``."""

    first_index: int
    table: pa.Table


Piece = Records | Columns


@dataclass(frozen=True)
class SourceFile:
    """A corpus file (or ``datasets`` directory) and how to read it."""

    path: Path
    kind: str
    compression: str | None = None

    @property
    def name(self) -> str:
        """The path as given, for messages."""
        return str(self.path)

    def error(
        self, message: str, *, location: str | None = None, field: str | None = None
    ) -> IngestError:
        """A file-level error about this file."""
        return IngestError(self.name, message, location=location, field=field)

    @property
    def streamed(self) -> bool:
        """Whether the file is read from start to end as one stream (JSON, JSON lines, CSV)."""
        return self.kind in (JSON_ARRAY, JSON_LINES, CSV)

    def open_bytes(self, digest: ReadDigest | None = None) -> BinaryIO:
        """The file's bytes, decompressed (read inside :meth:`reading`); the raw bytes read
        go into ``digest`` if one is given."""
        if digest is None:
            return pa.input_stream(str(self.path), compression=self.compression)
        hashed = digest.open(self.path)
        if self.compression is None:  # see ReadDigest.open: Arrow's wrapper copies each read
            return hashed
        return pa.input_stream(hashed, compression=self.compression)

    def open_text(self, digest: ReadDigest | None = None) -> io.TextIOWrapper:
        """The file as text for the CSV reader (BOM dropped, invalid UTF-8 kept as surrogates)."""
        return io.TextIOWrapper(
            self.open_bytes(digest), encoding="utf-8-sig", errors="surrogateescape", newline=""
        )

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Turn I/O and decompression errors (``OSError``) into :class:`IngestError`."""
        try:
            yield
        except OSError as exc:
            raise unreadable(self.name, exc) from exc


# --- opening ---------------------------------------------------------------------------------


def open_source(path: str | Path) -> SourceFile:
    """Identify the file type of ``path`` (from its name, and for ``.json`` its first byte)."""
    path = Path(path)
    if path.is_dir():
        return SourceFile(path, HF_DISK)
    if not path.exists():
        raise IngestError(str(path), "no such file or directory")
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    extension = (suffixes[:-1] if compression else suffixes)[-1:] or [""]
    kind = EXTENSIONS.get(extension[0])
    if kind is None or (kind == PARQUET and compression):
        raise IngestError(
            str(path),
            "unsupported file type; expected .json, .jsonl, .ndjson or .csv (optionally .gz "
            "or .zst), .parquet, or a directory written by datasets' save_to_disk",
        )
    file = SourceFile(path, kind, compression)
    if kind == JSON_ARRAY and _first_byte(file) == b"{":
        return SourceFile(path, JSON_LINES, compression)
    return file


def default_source(path: str | Path) -> str:
    """The file name without its known extensions: ``gsm8k.jsonl.zst`` → ``gsm8k``."""
    path = Path(path)
    name = path.name
    while (suffix := Path(name).suffix.lower()) and (
        suffix in EXTENSIONS or suffix in COMPRESSIONS
    ):
        name = name[: -len(suffix)]
    return name or path.name


def _first_byte(file: SourceFile) -> bytes:
    with file.reading(), file.open_bytes() as stream:
        head = stream.read(64 << 10).removeprefix(jsonio.BOM).lstrip()
        while not head and (block := stream.read(64 << 10)):
            head = block.lstrip()
    return head[:1]


# --- the first record (format detection) ----------------------------------------------------


def peek_columns(file: SourceFile, bounds: Bounds) -> tuple[list[str], str] | None:
    """The column names of the file's first record within ``bounds`` and where it is, or
    ``None`` if the file holds no such record.

    Raises:
        IngestError: the first record cannot be read or parsed, or is not an object.
    """
    if file.kind == PARQUET:
        return list(_parquet_file(file).schema_arrow.names), "schema"
    if file.kind == HF_DISK:
        return list(_hf_schema(file).names), "schema"
    with file.reading():
        found = _csv_header(file) if file.kind == CSV else _first_json_record(file, bounds)
    if found is None:
        return None
    value, location = found
    if not isinstance(value, dict):
        raise file.error(
            f"expected a record (a JSON object), got {type(value).__name__}", location=location
        )
    return list(value), location


def _csv_header(file: SourceFile) -> tuple[dict[str, None], str] | None:
    with file.open_text() as text:
        header = _csv_row(file, csv.reader(text, strict=True))
    return (dict.fromkeys(header), "line 1") if header else None


def _first_json_record(file: SourceFile, bounds: Bounds) -> tuple[Any, str] | None:
    with file.open_bytes() as stream:
        if file.kind == JSON_LINES:
            records = jsonio.iter_lines(stream, file.open_bytes, file.name, bounds)
        else:
            values = jsonio.iter_array(stream, file.name, bounds)
            records = ((value, f"record {index}") for index, value in enumerate(values))
        return next(((v, at) for v, at in records if not isinstance(v, RowReject)), None)


# --- pieces ----------------------------------------------------------------------------------


def iter_pieces(
    file: SourceFile,
    *,
    batch_rows: int,
    arrow_schema: pa.Schema | None,
    bounds: Bounds,
    digest: ReadDigest | None = None,
) -> Iterator[Piece]:
    """Stream ``file`` as pieces of consecutive records. Python pieces hold at most
    ``batch_rows`` records; Arrow ones (JSON-lines chunks, ``datasets`` record batches) can
    hold more, and the caller re-batches.

    ``arrow_schema``: the fields the format reads; given, JSON lines are parsed by Arrow.
    ``bounds``: a JSON record past them becomes a :class:`RowReject`; a larger CSV field is
    an :class:`IngestError`. ``digest``: hashes the raw bytes of a streamed file.
    """
    with file.reading():
        if file.kind == JSON_LINES:
            yield from _jsonl_pieces(file, arrow_schema, bounds, digest)
        elif file.kind == JSON_ARRAY:
            with file.open_bytes(digest) as stream:
                values = jsonio.iter_array(stream, file.name, bounds)
                yield from _record_pieces(values, batch_rows)
        elif file.kind == CSV:
            yield from _record_pieces(_csv_records(file, bounds, digest), batch_rows)
        else:
            yield from _arrow_pieces(file, batch_rows)


def _arrow_pieces(file: SourceFile, batch_rows: int) -> Iterator[Columns]:
    batches = _parquet_batches(file, batch_rows) if file.kind == PARQUET else _hf_batches(file)
    index = 0
    for batch in batches:
        yield Columns(index, pa.Table.from_batches([batch]))
        index += batch.num_rows


def _record_pieces(values: Iterator[Any], batch_rows: int) -> Iterator[Records]:
    buffer: list[Any] = []
    index = 0
    for value in values:
        buffer.append(value)
        if len(buffer) == batch_rows:
            yield Records(index, buffer)
            index, buffer = index + len(buffer), []
    if buffer:
        yield Records(index, buffer)


def _jsonl_pieces(
    file: SourceFile, arrow_schema: pa.Schema | None, bounds: Bounds, digest: ReadDigest | None
) -> Iterator[Piece]:
    index = 0
    done = 0  # bytes of the stream in the chunks read
    # Arrow reads chunks unchecked while their keys are the schema's, whose types bound their
    # depth; from the first chunk it cannot read so (another key, a value that does not fit
    # its type, a line longer than its block) on, the file's chunks are checked first.
    strict = arrow_schema is not None and jsonio.schema_depth(arrow_schema) <= bounds.max_depth
    try:
        with file.open_bytes(digest) as stream:
            for chunk in jsonio.iter_chunks(stream, jsonio.CHUNK_BYTES, bounds.max_record_bytes):
                arrow = arrow_schema
                if arrow is None or chunk.oversized or jsonio.null_first(chunk.data):
                    arrow = None  # Arrow must not see a bare null first record
                table = None
                if strict and arrow is not None and len(chunk.data) <= bounds.max_record_bytes:
                    table = jsonio.read_chunk_strict(chunk, arrow, file.name)
                    strict = table is not None
                piece: Piece = (
                    _checked_piece(chunk, index, file, arrow, bounds)
                    if table is None
                    else Columns(index, table)
                )
                yield piece
                index += piece.table.num_rows if isinstance(piece, Columns) else len(piece.values)
                done = chunk.offset + len(chunk.data)
    except OSError as exc:  # a truncated or corrupt compressed stream: name the line it broke
        raise unreadable(file.name, exc, jsonio.lines_before(file.open_bytes, done) + 1) from exc


def _checked_piece(
    chunk: jsonio.Chunk,
    index: int,
    file: SourceFile,
    arrow_schema: pa.Schema | None,
    bounds: Bounds,
) -> Piece:
    """A chunk's records with its lines past the bounds found first: parsed by Arrow when
    none is and Arrow can (``arrow_schema``: ``None`` where Arrow must not see the chunk),
    else in Python (those lines as their :class:`RowReject`)."""
    hostile = jsonio.hostile_lines(chunk, bounds)
    if arrow_schema is not None and not hostile:  # None for an oversized chunk too
        table = jsonio.read_chunk_arrow(chunk, arrow_schema, file.name)
        if table is not None:
            return Columns(index, table)
    return Records(index, jsonio.parse_chunk(chunk, file.open_bytes, file.name, hostile))


def as_records(piece: Piece) -> Records:
    """A piece as Python records. Rows of an Arrow table holding invalid UTF-8 (which Arrow
    cannot turn into Python strings) become ``RowReject("invalid_utf8:<column>")`` values."""
    if isinstance(piece, Records):
        return piece
    table = piece.table
    reasons: list[str | None] = [None] * table.num_rows
    for name in table.column_names:
        bad = invalid_utf8_rows(table.column(name))
        if bad is not None:
            for row in bad.nonzero()[0]:
                reasons[row] = reasons[row] or f"invalid_utf8:{name}"
    if not any(reasons):
        return Records(piece.first_index, table.to_pylist())
    good = iter(table.filter(pa.array([r is None for r in reasons])).to_pylist())
    values = [RowReject(reason) if reason else next(good) for reason in reasons]
    return Records(piece.first_index, values)


# --- CSV -------------------------------------------------------------------------------------


def _csv_records(
    file: SourceFile, bounds: Bounds, digest: ReadDigest | None
) -> Iterator[dict[str, str]]:
    # The csv module's default limit (128 KiB a field) is too small for long responses; the
    # limit is the module's, and every reader uses the same bound unless a spec changes it.
    csv.field_size_limit(bounds.max_record_bytes)
    with file.open_text(digest) as text:
        reader = csv.reader(text, strict=True)
        header = _csv_row(file, reader)
        if header is None:
            return
        while True:
            start = reader.line_num + 1
            row = _csv_row(file, reader)
            if row is None:
                return
            if not row:
                continue
            if len(row) != len(header):
                raise file.error(
                    f"invalid CSV: expected {len(header)} fields, got {len(row)}",
                    location=f"line {start}",
                )
            yield dict(zip(header, row, strict=True))


def _csv_row(file: SourceFile, reader: Any) -> list[str] | None:
    try:
        return next(reader, None)
    except OSError as exc:  # a truncated or corrupt compressed stream
        raise unreadable(file.name, exc, reader.line_num + 1) from exc
    except csv.Error as exc:
        message = f"invalid CSV: {exc}"
        if "field larger than field limit" in str(exc):
            limit = csv.field_size_limit()
            message = f"a field is longer than {limit:,} characters (ingest.max_record_bytes)"
        raise file.error(message, location=f"line {reader.line_num}") from exc


# --- Parquet and datasets directories --------------------------------------------------------


def _parquet_file(file: SourceFile) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file.path)
    except (pa.ArrowException, OSError) as exc:
        raise file.error(f"cannot read Parquet: {exc}") from exc


def _parquet_batches(file: SourceFile, batch_rows: int) -> Iterator[pa.RecordBatch]:
    parquet = _parquet_file(file)
    try:
        yield from parquet.iter_batches(batch_size=batch_rows)
    except (pa.ArrowException, OSError) as exc:
        raise file.error(f"cannot read Parquet: {exc}") from exc


def hf_arrow_files(file: SourceFile) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory (see the module docstring for splits).

    Raises:
        IngestError: a ``dataset_dict.json`` or ``state.json`` that is not JSON, not of the
            shape ``datasets`` writes, or names a split folder or data file that is missing
            or outside the directory; the error names that file and the field.
    """
    folder = file.path
    splits_file = folder / "dataset_dict.json"
    if os.path.isfile(splits_file):
        split = _pick_split(file, splits_file, _read_json(splits_file).get("splits"))
        folder = folder / split
        if not os.path.isdir(folder):
            raise IngestError(
                str(splits_file), f"split {split!r} is listed but has no folder", field="splits"
            )
    state_file = folder / "state.json"
    files = (
        _state_files(state_file) if os.path.isfile(state_file) else sorted(folder.glob("*.arrow"))
    )
    if not files:
        raise file.error("not a datasets save_to_disk directory (no state.json, no .arrow files)")
    return files


def _pick_split(file: SourceFile, splits_file: Path, splits: Any) -> str:
    if not isinstance(splits, list) or not splits:
        got = "nothing" if splits is None else _json_type(splits)
        raise IngestError(
            str(splits_file), f"expected a list of split names, got {got}", field="splits"
        )
    for index, split in enumerate(splits):
        if not _plain_name(split):
            raise IngestError(
                str(splits_file),
                f"expected a split name (a folder in this directory), got {_shown(split)}",
                field=f"splits[{index}]",
            )
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise file.error(
        f"a DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
        "give the folder of the split to read"
    )


def _state_files(state_file: Path) -> list[Path]:
    """The data files that ``state.json`` lists, each checked to be a file in its folder."""
    entries = _read_json(state_file).get("_data_files")
    if not isinstance(entries, list) or not entries:
        got = "nothing" if entries is None else _json_type(entries)
        raise IngestError(
            str(state_file),
            f'expected a list of {{"filename": ...}} objects, got {got}',
            field="_data_files",
        )
    files = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise IngestError(
                str(state_file),
                f"expected an object with a filename, got {_json_type(entry)}",
                field=f"_data_files[{index}]",
            )
        field = f"_data_files[{index}].filename"
        name = entry.get("filename")
        if not _plain_name(name):
            got = "nothing" if name is None else _shown(name)
            raise IngestError(
                str(state_file), f"expected a file name in this folder, got {got}", field=field
            )
        path = state_file.parent / name
        if not os.path.isfile(path):
            raise IngestError(
                str(state_file), f"data file {_shown(name)} is listed but missing", field=field
            )
        files.append(path)
    return files


def _plain_name(name: Any) -> bool:
    """Whether ``name`` names an entry of a folder: one printable path component, not
    ``.`` or ``..``."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and name.isprintable()
        and "/" not in name
        and "\\" not in name
    )


def _shown(value: Any) -> str:
    """A JSON value in a message: a string quoted and cut short, else its JSON type."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return _json_type(value)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if value in ([], {}, ""):
        return f"an empty {names[type(value)].removeprefix('a ').removeprefix('an ')}"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def _read_json(path: Path) -> dict[str, Any]:
    """A ``datasets`` metadata file: a JSON object, or an :class:`IngestError` naming it."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(HF_METADATA_BYTES + 1)
    except OSError as exc:
        raise IngestError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) > HF_METADATA_BYTES:
        raise IngestError(str(path), f"larger than {HF_METADATA_BYTES >> 20} MiB")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise IngestError(str(path), f"cannot read: {exc}") from exc
    if not isinstance(value, dict):
        raise IngestError(str(path), f"expected a JSON object, got {_json_type(value)}")
    return value


def _open_arrow(file: SourceFile, path: Path) -> pa.RecordBatchStreamReader:
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except (pa.ArrowException, OSError) as exc:
        raise file.error(f"cannot read {path.name}: {exc}") from exc


def _hf_schema(file: SourceFile) -> pa.Schema:
    return _open_arrow(file, hf_arrow_files(file)[0]).schema


def _hf_batches(file: SourceFile) -> Iterator[pa.RecordBatch]:
    for path in hf_arrow_files(file):
        reader = _open_arrow(file, path)
        try:
            yield from reader
        except (pa.ArrowException, OSError) as exc:
            raise file.error(f"cannot read {path.name}: {exc}") from exc
