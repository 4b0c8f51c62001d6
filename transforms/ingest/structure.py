"""JSON structure without parsing: which bytes are inside strings, and the nesting depth.

Parsers recurse, or in ijson's case keep a prefix string per level, so a hostile file
nested 200,000 deep costs a ``RecursionError`` or gigabytes before any check can run.
:func:`scan` finds the structure of JSON text with a few numpy passes per block, carrying
its state from block to block, so the readers can bound a record's depth and size before
``json.loads`` sees it. Depths are counted from the start of the scanned text: a record
``{"a": [1]}`` reaches depth 2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

SCAN_BYTES = 1 << 20
"""Bytes scanned at a time (numpy temporaries are about 20 bytes per byte scanned)."""

QUOTE, BACKSLASH, COLON, COMMA = 0x22, 0x5C, 0x3A, 0x2C
OPEN_ARRAY, CLOSE_ARRAY, OPEN_OBJECT, CLOSE_OBJECT = 0x5B, 0x5D, 0x7B, 0x7D
_NOT_OPENER_OR_NEWLINE = bytes(b for b in range(256) if b not in b"[{\n")


@dataclass
class ScanState:
    """What carries from one block of JSON text to the next."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    """The block ended inside an odd run of backslashes: its next byte is escaped."""


@dataclass(frozen=True)
class Structure:
    """One scanned block: its bytes, which of them are structural (outside strings, quotes
    excluded), and the nesting depth after each byte."""

    code: np.ndarray
    structural: np.ndarray
    depth: np.ndarray

    def at(self, byte: int) -> np.ndarray:
        """Where ``byte`` occurs outside strings."""
        return self.structural & (self.code == byte)

    def closes(self) -> np.ndarray:
        """Where an array or object closes."""
        return self.structural & ((self.code == CLOSE_ARRAY) | (self.code == CLOSE_OBJECT))


def scan(data: bytes | memoryview, state: ScanState) -> Structure:
    """The structure of ``data``, continuing from ``state``, which is updated to its end.

    A quote is escaped when an odd run of backslashes precedes it; bytes after an odd number
    of unescaped quotes are inside a string. Text that is not JSON gives meaningless depths,
    but never an error: the parser that reads it says what is wrong.
    """
    code = np.frombuffer(data, np.uint8)
    n = len(code)
    if n == 0:
        return Structure(code, np.zeros(0, bool), np.zeros(0, np.int64))
    index = np.arange(n, dtype=np.int32)
    backslash = code == BACKSLASH
    last_other = np.maximum.accumulate(np.where(backslash, np.int32(-1), index))
    run = index - last_other + np.where(last_other < 0, np.int32(state.escaped), np.int32(0))
    escaped = np.empty(n, bool)
    escaped[0] = state.escaped
    escaped[1:] = (run[:-1] & 1).astype(bool)
    quote = (code == QUOTE) & ~escaped
    quotes = np.cumsum(quote, dtype=np.int32)
    inside = ((quotes - quote + np.int32(state.in_string)) & 1).astype(bool)
    structural = ~inside & ~quote
    opens = structural & ((code == OPEN_ARRAY) | (code == OPEN_OBJECT))
    closes = structural & ((code == CLOSE_ARRAY) | (code == CLOSE_OBJECT))
    depth = np.cumsum(opens.astype(np.int64) - closes, dtype=np.int64) + state.depth
    state.depth = int(depth[-1])
    state.in_string = bool((int(quotes[-1]) + state.in_string) & 1)
    state.escaped = bool(run[-1] & 1)
    return Structure(code, structural, depth)


def deep_lines(data: bytes | memoryview, max_depth: int) -> list[int]:
    """The indices (in ``data.split(b"\\n")``) of the lines that may nest deeper than
    ``max_depth``: those holding more than ``max_depth`` opening brackets (a cheap bound,
    made exact by :func:`too_deep`)."""
    openers = bytes(data).translate(None, _NOT_OPENER_OR_NEWLINE)
    if len(openers) - openers.count(b"\n") <= max_depth:
        return []
    pattern = re.compile(rb"[^\n]{%d,}" % (max_depth + 1))
    return [openers.count(b"\n", 0, m.start()) for m in pattern.finditer(openers)]


def too_deep(text: bytes | memoryview, max_depth: int) -> str | None:
    """``None`` if the JSON value ``text`` nests at most ``max_depth`` deep, else the field
    where it goes deeper: the record's top-level key, or ``record`` when the value is not an
    object (or the key cannot be found)."""
    state = ScanState()
    colon = -1
    for start in range(0, len(text), SCAN_BYTES):
        structure = scan(text[start : start + SCAN_BYTES], state)
        past = np.flatnonzero(structure.depth > max_depth)
        end = past[0] if len(past) else len(structure.code)
        colons = np.flatnonzero(structure.at(COLON)[:end] & (structure.depth[:end] == 1))
        if len(colons):
            colon = start + int(colons[-1])
        if len(past):
            return key_before(bytes(text[:colon]), colon) if colon >= 0 else "record"
    return None


def key_before(text: bytes, colon: int) -> str:
    """The object key whose closing quote is the last one before ``colon``."""
    end = text.rfind(b'"', 0, colon)
    start = end
    while (start := text.rfind(b'"', 0, start)) >= 0:
        first = start
        while first > 0 and text[first - 1] == BACKSLASH:
            first -= 1
        if (start - first) % 2 == 0:
            try:
                return str(json.loads(text[start : end + 1].decode("utf-8", "surrogateescape")))
            except ValueError:
                break
    return "record"


@dataclass(frozen=True)
class Bounds:
    """How deep and how large one record may be (``IngestParams.max_depth`` and
    ``max_record_bytes``); a record past them is rejected as ``too_deep:<field>`` or
    ``too_large:record``."""

    max_depth: int = 100
    max_record_bytes: int = 64 << 20
