"""Streaming JSON: JSON lines in newline-aligned chunks, and top-level JSON arrays.

JSON lines are cut into chunks of whole lines (a few MiB each). A chunk goes through
``pyarrow.json.read_json`` (multi-threaded, explicit schema) when the format has an Arrow
path, and through ``json.loads`` line by line otherwise or when Arrow rejects the chunk
(a wrong-typed field, a non-object line, a malformed line): that finds the exact line.

A JSON array is cut into its elements by :mod:`~transforms.ingest.structure`'s scan (which
knows each element's line), and each element is parsed by ``json.loads``. A syntax error
names its line.

Records are bounded (:class:`~transforms.ingest.structure.Bounds`) before a recursive
parser sees them: a line or element nested too deep becomes ``RowReject("too_deep:<field>")``,
one too large ``RowReject("too_large:record")``, and the bytes of a too-large one are skipped,
never held. Text is decoded with ``surrogateescape`` everywhere, so invalid UTF-8 never aborts
a file.

Arrow's parser is iterative, so a chunk may meet it unchecked when no record in it can be too
deep: :func:`read_chunk_strict` lets Arrow read a chunk only if every key of every record is
one of the format's fields, whose types bound the nesting (:func:`schema_depth`). A record
with another key, or with a field nested deeper than its type, fails the chunk, which then
takes the checked path. On the instruction corpora this skips the nesting scan, a third of
the reading thread's own work.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.json as pj

from transforms.ingest.errors import IngestError, RowReject, unreadable
from transforms.ingest.structure import (
    CLOSE_ARRAY,
    COMMA,
    OPEN_ARRAY,
    SCAN_BYTES,
    Bounds,
    ScanState,
    Structure,
    deep_lines,
    scan,
    too_deep,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
"""JSON-lines chunk size: bounds memory, and is large enough for Arrow's threads (four
blocks). 16 MiB took as long on the 1M-row benchmark and raised the build's peak by about
35 MiB (docs/performance.md)."""
BLOCK_BYTES = 2 << 20
"""Arrow's JSON block size; a line longer than this makes its chunk take the Python path."""
TOO_LARGE = "too_large:record"
TOO_LARGE_NUMBER = "too_large:number"
"""An integer literal longer than Python converts (``sys.get_int_max_str_digits()``)."""

BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r\n"
_NON_BLANK = re.compile(rb"[^ \t\r\n]")

OpenBytes = Callable[[], BinaryIO]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:  # more digits than sys.get_int_max_str_digits()
        raise RowReject(TOO_LARGE_NUMBER) from exc


def loads(text: str) -> Any:
    """``json.loads``; a record holding an integer too long to convert is its
    :class:`RowReject` (``too_large:number``), returned, not raised."""
    try:
        return json.loads(text, parse_int=_int)
    except RowReject as reject:
        return reject


def decode(text: bytes | memoryview) -> str:
    """UTF-8 text, invalid bytes kept as lone surrogates (which the field checks reject)."""
    return bytes(text).decode("utf-8", "surrogateescape")


# --- JSON lines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Whole lines of a JSON-lines stream, starting ``offset`` bytes into it; or, when
    ``oversized``, one line longer than the bound, whose bytes were skipped.

    Line numbers are not counted on the way (that would scan every byte once more); an
    error message counts them with :func:`lines_before`.
    """

    data: bytes | memoryview
    offset: int
    oversized: bool = False

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """``(index of the line in the chunk, line)`` for every non-blank line, as Arrow's
        reader counts records."""
        for index, line in enumerate(bytes(self.data).split(b"\n")):
            if line.strip(_BLANK):
                yield index, line


def iter_chunks(
    stream: BinaryIO, chunk_bytes: int = CHUNK_BYTES, max_line: int = Bounds.max_record_bytes
) -> Iterator[Chunk]:
    """Cut a byte stream into chunks of whole lines without copying the bulk of each read:
    a line that straddles two reads becomes a chunk of its own, or an ``oversized`` one (its
    bytes dropped as they come) once it is longer than ``max_line``. A UTF-8 BOM is dropped."""
    pending: list[bytes] = []
    size = 0  # bytes of the straddling line so far
    skipping = False
    offset = 0
    first = True
    while block := stream.read(chunk_bytes):
        start = len(BOM) if first and block.startswith(BOM) else 0
        first, offset = False, offset + start
        if size:
            head = block.find(b"\n", start)
            end = len(block) if head < 0 else head + 1
            size += end - start
            skipping = skipping or size > max_line
            pending = [] if skipping else [*pending, block[start:end]]
            if head < 0:
                continue
            yield Chunk(b"".join(pending), offset, skipping)
            offset, start = offset + size, end
            pending, size, skipping = [], 0, False
        cut = block.rfind(b"\n", start)
        if cut >= start:
            yield Chunk(memoryview(block)[start : cut + 1], offset)
            offset += cut + 1 - start
            start = cut + 1
        if start < len(block):
            size = len(block) - start
            skipping = size > max_line
            pending = [] if skipping else [block[start:]]
    if size:
        yield Chunk(b"".join(pending), offset, skipping)


def lines_before(open_bytes: OpenBytes, offset: int) -> int:
    """The number of line breaks in the first ``offset`` bytes of the stream."""
    count = 0
    with open_bytes() as stream:
        while offset > 0 and (block := stream.read(min(offset, CHUNK_BYTES))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


def hostile_lines(chunk: Chunk, bounds: Bounds) -> dict[int, str]:
    """The lines of a chunk past the bounds (by their index in the chunk) and the reason."""
    found: dict[int, str] = {}
    if len(chunk.data) > bounds.max_record_bytes:
        code = np.frombuffer(chunk.data, np.uint8)
        ends = np.append(np.flatnonzero(code == ord("\n")), len(code))
        lengths = np.diff(ends, prepend=-1) - 1
        found = dict.fromkeys(np.flatnonzero(lengths > bounds.max_record_bytes).tolist(), TOO_LARGE)
    if not (candidates := deep_lines(chunk.data, bounds.max_depth)):
        return found
    lines = bytes(chunk.data).split(b"\n")
    for index in candidates:
        if index not in found and (field := too_deep(lines[index], bounds.max_depth)):
            found[index] = f"too_deep:{field}"
    return found


def parse_chunk(
    chunk: Chunk, open_bytes: OpenBytes, path: str, rejects: dict[int, str] | None = None
) -> list[Any]:
    """Every record of a chunk, parsed in Python; the lines in ``rejects`` become their
    :class:`RowReject` unparsed."""
    if chunk.oversized:
        return [RowReject(TOO_LARGE)]
    rejects = rejects or {}
    return [
        RowReject(rejects[index])
        if index in rejects
        else _parse_line(chunk, index, line, open_bytes, path)
        for index, line in chunk.lines()
    ]


def _parse_line(chunk: Chunk, index: int, line: bytes, open_bytes: OpenBytes, path: str) -> Any:
    """One line's JSON value; a malformed line is an :class:`IngestError` naming its number."""
    try:
        return loads(decode(line))
    except json.JSONDecodeError as exc:
        number = lines_before(open_bytes, chunk.offset) + index + 1
        raise IngestError(
            path, f"invalid JSON: {exc.msg} (column {exc.colno})", location=f"line {number}"
        ) from exc


def null_first(data: bytes | memoryview) -> bool:
    """Whether the first record of ``data`` is a bare JSON ``null``, which Arrow's reader
    must not see: pyarrow 26 crashes the process (a segmentation fault) on it. Such a chunk
    is read per line in Python, where the line is ``wrong_type:record``. (A ``null`` after
    the first record, at a block boundary of Arrow's reader or not, becomes a row of nulls,
    rejected as ``missing_field:<field>``: tested around every 2 MiB boundary of 8 MiB for
    four line lengths. Finding those in every chunk cost 0.15-0.2 s per million rows.)"""
    first = _NON_BLANK.search(data)
    return first is not None and bytes(data[first.start() : first.start() + 4]) == b"null"


def read_chunk_arrow(chunk: Chunk, schema: pa.Schema, path: str) -> pa.Table | None:
    """A chunk parsed by Arrow with an explicit schema (other keys ignored), or ``None`` when
    Arrow cannot parse it and the chunk must take the Python path."""
    try:
        return _read_json(chunk, schema, "ignore")
    except pa.ArrowInvalid as exc:
        log.info("%s: Arrow's JSON reader failed on a chunk (%s); parsing it per line", path, exc)
        return None


def read_chunk_strict(chunk: Chunk, schema: pa.Schema, path: str) -> pa.Table | None:
    """A chunk parsed by Arrow when every key of its records is a field of ``schema`` and
    every value fits its field's type, else ``None``. Such a chunk needs no nesting check
    when :func:`schema_depth` is within the bound: no record in it nests deeper."""
    try:
        return _read_json(chunk, schema, "error")
    except pa.ArrowInvalid as exc:
        log.debug("%s: a chunk has keys or values outside %s (%s)", path, schema.names, exc)
        return None


def _read_json(chunk: Chunk, schema: pa.Schema, unexpected: str) -> pa.Table:
    return pj.read_json(
        pa.BufferReader(chunk.data),
        read_options=pj.ReadOptions(use_threads=True, block_size=BLOCK_BYTES),
        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior=unexpected),
    )


def schema_depth(schema: pa.Schema) -> int:
    """The deepest a JSON record can nest when its keys are ``schema``'s fields and its values
    fit their types, counted as :func:`~transforms.ingest.structure.scan` counts (the record's
    own object is depth 1; each list or struct inside it adds one)."""
    return 1 + max((_type_depth(field.type) for field in schema), default=0)


def _type_depth(type_: pa.DataType) -> int:
    """A nested type this does not know counts as unbounded: its schema is always checked."""
    if pa.types.is_struct(type_):
        return 1 + max((_type_depth(field.type) for field in type_), default=0)
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return 1 + _type_depth(type_.value_type)
    return sys.maxsize if pa.types.is_nested(type_) else 0


def iter_lines(
    stream: BinaryIO, open_bytes: OpenBytes, path: str, bounds: Bounds
) -> Iterator[tuple[Any, str]]:
    """Every record of a JSON-lines stream, parsed in Python, with its line; a record past
    the bounds as its :class:`RowReject`."""
    line = 1
    for chunk in iter_chunks(stream, 64 << 10, bounds.max_record_bytes):
        values = parse_chunk(chunk, open_bytes, path, hostile_lines(chunk, bounds))
        indices = [0] if chunk.oversized else [index for index, _ in chunk.lines()]
        for index, value in zip(indices, values, strict=True):
            yield value, f"line {line + index}"
        line += 1 if chunk.oversized else bytes(chunk.data).count(b"\n")


# --- JSON arrays ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """One element of a top-level JSON array: its text and first line, or why it is not
    parsed (past the bounds)."""

    line: int
    text: bytes = b""
    reason: str | None = None

    def value(self, path: str) -> Any:
        """The parsed element, or its :class:`RowReject`; a syntax error is an
        :class:`IngestError` naming the line."""
        if self.reason:
            return RowReject(self.reason)
        text = decode(self.text)
        try:
            return loads(text)
        except json.JSONDecodeError as exc:
            line = self.line + text.count("\n", 0, exc.pos)
            raise IngestError(path, f"invalid JSON: {exc.msg}", location=f"line {line}") from exc


def iter_array(stream: BinaryIO, path: str, bounds: Bounds) -> Iterator[Any]:
    """The elements of a top-level JSON array, streamed: parsed values, or a
    :class:`RowReject` for an element past the bounds."""
    for element in ArraySplitter(path, bounds).elements(stream):
        yield element.value(path)


class ArraySplitter:
    """Cuts a top-level JSON array into its elements' texts, scanning each read block once.

    An element is held until it ends, and at most ``bounds.max_record_bytes`` of it: past
    that, or past ``bounds.max_depth``, its bytes are dropped as they come and the element
    is reported with its reason.
    """

    def __init__(self, path: str, bounds: Bounds) -> None:
        self.path = path
        self.bounds = bounds
        self.state = ScanState()
        self.phase = "before"  # before the opening '[', inside the array, or after it
        self.parts: list[bytes] = []
        self.size = 0
        self.reason: str | None = None
        self.commas = 0
        self.lines_before = 0  # line breaks before the current block
        self.start_line = 1  # of the current element

    def elements(self, stream: BinaryIO) -> Iterator[Element]:
        """The elements of the array read from ``stream``."""
        first = True
        while block := self._read(stream):
            if first:
                block, first = block.removeprefix(BOM), False
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
            yield from self._block(block, newlines)
            self.lines_before += len(newlines)
        if self.phase == "inside":
            raise self._error(self.start_line, "unexpected end of file inside the top-level array")

    def _read(self, stream: BinaryIO) -> bytes:
        try:
            return stream.read(SCAN_BYTES)
        except OSError as exc:  # a truncated or corrupt compressed stream
            raise unreadable(self.path, exc, self.lines_before + 1) from exc

    def _block(self, block: bytes, newlines: np.ndarray) -> Iterator[Element]:
        structure = scan(block, self.state)
        pos = 0
        if self.phase == "before":
            match = _NON_BLANK.search(block)
            if match is None:
                return
            pos = match.start() + 1
            self.start_line = self.lines_before + int(np.searchsorted(newlines, pos)) + 1
            if block[match.start()] != OPEN_ARRAY:
                raise self._error(self.start_line, "expected a top-level array")
            self.phase = "inside"
        if self.phase == "inside":
            pos = yield from self._elements(block, structure, pos, newlines)
        if self.phase == "after" and (match := _NON_BLANK.search(block, pos)):
            line = self.lines_before + int(np.searchsorted(newlines, match.start())) + 1
            raise self._error(line, "extra data after the top-level array")

    def _elements(
        self, block: bytes, structure: Structure, pos: int, newlines: np.ndarray
    ) -> Iterator[Element]:
        """The elements that end in ``block`` (from ``pos``); holds the rest. Returns the
        position after the array's end, if it is in the block."""
        at = structure.positions >= pos
        ends = at & (
            ((structure.codes == COMMA) & (structure.depth == 1))
            | (structure.closes() & (structure.depth <= 0))
        )
        cuts = structure.positions[ends]
        starts = np.concatenate(([pos], cuts + 1))
        deep = structure.positions[structure.depth > self.bounds.max_depth + 1]
        is_deep = np.searchsorted(deep, starts[:-1]) < np.searchsorted(deep, cuts)
        lines = self.lines_before + np.searchsorted(newlines, starts) + 1
        for start, cut, too_deep_, line in zip(
            starts[:-1].tolist(), cuts.tolist(), is_deep.tolist(), lines[1:].tolist(), strict=True
        ):
            self._hold(block[start:cut], too_deep_)
            element = Element(self.start_line, b"".join(self.parts), self.reason)
            self.parts, self.size, self.reason, self.start_line = [], 0, None, line
            if block[cut] == COMMA:
                self.commas += 1
                yield element
                continue
            if block[cut] != CLOSE_ARRAY:
                raise self._error(line, "expected ',' or ']' after an element")
            self.phase = "after"
            if element.text.strip(_BLANK) or element.reason or self.commas:
                yield element  # else the array is empty
            return cut + 1
        tail = int(starts[-1])
        self._hold(block[tail:], bool(np.searchsorted(deep, tail) < len(deep)))
        return len(block)

    def _hold(self, part: bytes, deep: bool) -> None:
        """Add ``part`` to the current element, unless that is past the bounds."""
        if self.reason or not part:
            return
        self.size += len(part)
        if self.size > self.bounds.max_record_bytes:
            self.parts, self.reason = [], TOO_LARGE
        elif deep:
            field = too_deep(b"".join([*self.parts, part]), self.bounds.max_depth)
            self.parts, self.reason = [], f"too_deep:{field or 'record'}"
        else:
            self.parts.append(part)

    def _error(self, line: int, message: str) -> IngestError:
        return IngestError(self.path, f"invalid JSON: {message}", location=f"line {line}")
