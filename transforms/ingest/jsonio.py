"""Streaming JSON: JSON lines in newline-aligned chunks, and top-level JSON arrays.

JSON lines are cut into chunks of whole lines (a few MiB each). A chunk goes through
``pyarrow.json.read_json`` (multi-threaded, explicit schema) when the format has an Arrow
path, and through ``json.loads`` line by line otherwise or when Arrow rejects the chunk
(a wrong-typed field, a non-object line, a malformed line): that finds the exact line.

A JSON array is streamed with ``ijson``. ijson cannot say where it failed, nor read past
invalid UTF-8, so on any ijson error the file is read again with a locating scanner built
on the standard library's ``JSONDecoder.raw_decode``: it names the line of a syntax error
and turns invalid bytes into lone surrogates that the field checks then reject by field.

Text is decoded with ``surrogateescape`` everywhere, so invalid UTF-8 never aborts a file.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import ijson
import pyarrow as pa
import pyarrow.json as pj

from transforms.ingest.errors import IngestError

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
"""JSON-lines chunk size: bounds memory, and is large enough for Arrow's threads."""
BLOCK_BYTES = 2 << 20
"""Arrow's JSON block size; a line longer than this makes its chunk take the Python path."""
READ_BYTES = 1 << 20
"""Read size of the locating scanner."""
MAX_RECORD_BYTES = 256 << 20
"""The scanner reports a syntax error once this much text after a record's start does not
complete it (an unterminated string would otherwise read the whole file)."""

BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r\n"
_WHITESPACE = re.compile(r"[ \t\r\n]*")

OpenBytes = Callable[[], BinaryIO]


# --- JSON lines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Whole lines of a JSON-lines stream, starting ``offset`` bytes into it.

    Line numbers are not counted on the way (that would scan every byte once more); an
    error message counts them with :func:`lines_before`.
    """

    data: bytes | memoryview
    offset: int

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """``(index of the line in the chunk, line)`` for every non-blank line, as Arrow's
        reader counts records."""
        for index, line in enumerate(bytes(self.data).split(b"\n")):
            if line.strip(_BLANK):
                yield index, line


def iter_chunks(stream: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Cut a byte stream into chunks of whole lines without copying the bulk of each read:
    a line that straddles two reads becomes a chunk of its own. A UTF-8 BOM is dropped."""
    pending: list[bytes] = []
    offset = 0
    first = True
    while block := stream.read(chunk_bytes):
        start = len(BOM) if first and block.startswith(BOM) else 0
        first, offset = False, offset + start
        if pending:
            head = block.find(b"\n", start)
            if head < 0:
                pending.append(block[start:])
                continue
            line = b"".join([*pending, block[start : head + 1]])
            pending, start = [], head + 1
            yield Chunk(line, offset)
            offset += len(line)
        cut = block.rfind(b"\n", start)
        if cut >= start:
            yield Chunk(memoryview(block)[start : cut + 1], offset)
            offset += cut + 1 - start
            start = cut + 1
        if start < len(block):
            pending.append(block[start:])
    if pending:
        yield Chunk(b"".join(pending), offset)


def lines_before(open_bytes: OpenBytes, offset: int) -> int:
    """The number of line breaks in the first ``offset`` bytes of the stream."""
    count = 0
    with open_bytes() as stream:
        while offset > 0 and (block := stream.read(min(offset, CHUNK_BYTES))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


def parse_chunk(chunk: Chunk, open_bytes: OpenBytes, path: str) -> list[Any]:
    """Every record of a chunk, parsed in Python."""
    return [_parse_line(chunk, index, line, open_bytes, path) for index, line in chunk.lines()]


def _parse_line(chunk: Chunk, index: int, line: bytes, open_bytes: OpenBytes, path: str) -> Any:
    """One line's JSON value; a malformed line is an :class:`IngestError` naming its number."""
    try:
        return json.loads(line.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        number = lines_before(open_bytes, chunk.offset) + index + 1
        raise IngestError(
            path, f"invalid JSON: {exc.msg} (column {exc.colno})", location=f"line {number}"
        ) from exc


def read_chunk_arrow(chunk: Chunk, schema: pa.Schema, path: str) -> pa.Table | None:
    """A chunk parsed by Arrow with an explicit schema (other keys ignored), or ``None`` when
    Arrow cannot parse it and the chunk must take the Python path."""
    try:
        return pj.read_json(
            pa.BufferReader(chunk.data),
            read_options=pj.ReadOptions(use_threads=True, block_size=BLOCK_BYTES),
            parse_options=pj.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            ),
        )
    except pa.ArrowInvalid as exc:
        log.info("%s: Arrow's JSON reader failed on a chunk (%s); parsing it per line", path, exc)
        return None


def first_line_record(open_bytes: OpenBytes, path: str) -> tuple[Any, str] | None:
    """The first record of a JSON-lines file and its location, or ``None`` if it has none."""
    with open_bytes() as stream:
        for chunk in iter_chunks(stream, 64 << 10):
            for index, line in chunk.lines():
                value = _parse_line(chunk, index, line, open_bytes, path)
                return value, f"line {lines_before(open_bytes, chunk.offset) + index + 1}"
    return None


# --- JSON arrays ---------------------------------------------------------------------------


def iter_array(open_bytes: OpenBytes, path: str) -> Iterator[Any]:
    """The elements of a top-level JSON array, streamed.

    ijson reads the file; if it fails, the locating scanner reads it again from the start,
    skips the elements already yielded, and either raises an :class:`IngestError` naming the
    line or carries on (invalid UTF-8 is then a row-level problem).
    """
    done = 0
    try:
        with open_bytes() as stream:
            for value in ijson.items(stream, "item", use_float=True):
                yield value
                done += 1
        return
    except ijson.JSONError as exc:
        log.info("%s: ijson failed after %d records (%s); rescanning", path, done, exc)
    with open_bytes() as stream:
        for index, value in enumerate(_scan_array(stream, path)):
            if index >= done:
                yield value


class _Window:
    """A sliding window of decoded text over a byte stream, with line accounting."""

    def __init__(self, stream: BinaryIO, path: str) -> None:
        self.stream = stream
        self.path = path
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.text = ""
        self.pos = 0
        self.lines_before = 0
        self.eof = False
        self.first = True

    def fill(self, size: int = READ_BYTES) -> None:
        """Drop consumed text and append at least ``size`` more bytes' worth (if any)."""
        self.lines_before += self.text.count("\n", 0, self.pos)
        self.text, self.pos = self.text[self.pos :], 0
        block = self.stream.read(size)
        if self.first:
            block, self.first = block.removeprefix(BOM), False
        self.eof = not block
        self.text += self.decoder.decode(block, final=self.eof)

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end), without consuming it."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or self.eof:
                return self.text[self.pos : self.pos + 1]
            self.fill()

    def value(self) -> Any:
        """Decode the JSON value at the cursor, reading more text until it is complete."""
        decoder = json.JSONDecoder()
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof or len(self.text) - self.pos > MAX_RECORD_BYTES:
                    raise self.error(exc.pos, f"invalid JSON: {exc.msg}") from exc
                self.fill(max(READ_BYTES, len(self.text) - self.pos))
                continue
            if end < len(self.text) or self.eof:  # a number may go on in the next block
                self.pos = end
                return value
            self.fill(max(READ_BYTES, len(self.text) - self.pos))

    def error(self, pos: int, message: str) -> IngestError:
        line = self.lines_before + self.text.count("\n", 0, pos) + 1
        return IngestError(self.path, message, location=f"line {line}")


def _scan_array(stream: BinaryIO, path: str) -> Iterator[Any]:
    window = _Window(stream, path)
    start = window.peek()
    if not start:
        return
    if start != "[":
        raise window.error(window.pos, "invalid JSON: expected a top-level array")
    window.pos += 1
    if window.peek() == "]":
        window.pos += 1
    else:
        yield from _scan_elements(window)
    if window.peek():
        raise window.error(window.pos, "invalid JSON: extra data after the top-level array")


def _scan_elements(window: _Window) -> Iterator[Any]:
    while True:
        window.peek()
        yield window.value()
        separator = window.peek()
        window.pos += 1
        if separator == "]":
            return
        if separator != ",":
            raise window.error(window.pos - 1, "invalid JSON: expected ',' or ']' after an element")
