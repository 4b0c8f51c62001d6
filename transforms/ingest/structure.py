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
from dataclasses import dataclass

import numpy as np

SCAN_BYTES = 1 << 20
"""Bytes scanned at a time."""

QUOTE, BACKSLASH, COLON, COMMA = 0x22, 0x5C, 0x3A, 0x2C
OPEN_ARRAY, CLOSE_ARRAY, OPEN_OBJECT, CLOSE_OBJECT = 0x5B, 0x5D, 0x7B, 0x7D
_TOKEN = np.zeros(256, bool)
_TOKEN[[OPEN_ARRAY, CLOSE_ARRAY, OPEN_OBJECT, CLOSE_OBJECT, COMMA, COLON]] = True
_STEP = np.zeros(256, np.int64)
_STEP[[OPEN_ARRAY, OPEN_OBJECT]] = 1
_STEP[[CLOSE_ARRAY, CLOSE_OBJECT]] = -1
_NOT_OPENER_OR_NEWLINE = bytes(b for b in range(256) if b not in b"[{\n")
_SLICE = 1 << 20


@dataclass(frozen=True)
class Bounds:
    """How deep and how large one record may be (``IngestParams.max_depth`` and
    ``max_record_bytes``); a record past them is rejected as ``too_deep:<field>`` or
    ``too_large:record``."""

    max_depth: int = 100
    max_record_bytes: int = 64 << 20


@dataclass
class ScanState:
    """What carries from one block of JSON text to the next."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    """The block ended inside an odd run of backslashes: its next byte is escaped."""


@dataclass(frozen=True)
class Structure:
    """The structural bytes of one scanned block (brackets, commas and colons outside
    strings): where they are, which they are, and the nesting depth after each."""

    positions: np.ndarray
    codes: np.ndarray
    depth: np.ndarray

    def closes(self) -> np.ndarray:
        """Which of them close an array or object."""
        return _STEP[self.codes] < 0


def scan(data: bytes | memoryview, state: ScanState) -> Structure:
    """The structure of ``data``, continuing from ``state``, which is updated to its end.

    A quote is escaped when an odd run of backslashes precedes it; a byte after an odd
    number of unescaped quotes is inside a string. The work is a few passes over the bytes
    and then over the quotes and structural bytes only. Text that is not JSON gives
    meaningless depths, but never an error: the parser that reads it says what is wrong.
    """
    code = np.frombuffer(data, np.uint8)
    carry = int(state.escaped)
    quotes = np.flatnonzero(code == QUOTE)
    quotes = quotes[~_escaped(code, quotes, carry)]
    tokens = np.flatnonzero(_TOKEN[code])
    outside = ((np.searchsorted(quotes, tokens) + state.in_string) & 1) == 0
    tokens = tokens[outside]
    codes = code[tokens]
    depth = np.cumsum(_STEP[codes]) + state.depth
    if len(depth):
        state.depth = int(depth[-1])
    state.in_string = bool((len(quotes) + state.in_string) & 1)
    trailing = 0
    while trailing < len(code) and code[-1 - trailing] == BACKSLASH:
        trailing += 1
    state.escaped = bool((trailing + (carry if trailing == len(code) else 0)) & 1)
    return Structure(tokens, codes, depth)


def _escaped(code: np.ndarray, quotes: np.ndarray, carry: int) -> np.ndarray:
    """Which ``quotes`` follow an odd run of backslashes (``carry``: the previous block
    ended in an odd run), counted back one backslash at a time for all quotes at once."""
    run = np.where(quotes == 0, carry, 0)
    back = quotes - 1
    active = back >= 0
    active[active] = code[back[active]] == BACKSLASH
    while active.any():
        run += active
        back -= 1
        run[active & (back < 0)] += carry  # the run reaches back into the previous block
        active &= back >= 0
        active[active] = code[back[active]] == BACKSLASH
    return (run & 1).astype(bool)


def deep_lines(data: bytes | memoryview, max_depth: int) -> list[int]:
    """The indices (in ``data.split(b"\\n")``) of the lines that may nest deeper than
    ``max_depth``: those holding more than ``max_depth`` opening brackets (a cheap bound,
    made exact by :func:`too_deep`)."""
    # 1 MiB at a time: a copy of a whole chunk (several MiB) page-faults fresh memory each time
    # (15 ms a chunk, against 10 ms in slices that the heap reuses)
    view = memoryview(data)
    openers = b"".join(
        bytes(view[i : i + _SLICE]).translate(None, _NOT_OPENER_OR_NEWLINE)
        for i in range(0, len(view), _SLICE)
    )
    if len(openers) - openers.count(b"\n") <= max_depth:
        return []
    # Each line's openers, counted between the newlines of the (short) translated text:
    # half the time of a pattern search for runs longer than max_depth, the same lines.
    newlines = np.flatnonzero(np.frombuffer(openers, np.uint8) == ord("\n"))
    ends = np.append(newlines, len(openers))
    counts = np.diff(ends, prepend=-1) - 1
    return np.flatnonzero(counts > max_depth).tolist()


def too_deep(text: bytes | memoryview, max_depth: int) -> str | None:
    """``None`` if the JSON value ``text`` nests at most ``max_depth`` deep, else the field
    where it goes deeper: the record's top-level key, or ``record`` when the value is not an
    object (or the key cannot be found)."""
    state = ScanState()
    colon = -1
    for start in range(0, len(text), SCAN_BYTES):
        structure = scan(text[start : start + SCAN_BYTES], state)
        past = np.flatnonzero(structure.depth > max_depth)
        end = past[0] if len(past) else len(structure.codes)
        keys = (structure.codes[:end] == COLON) & (structure.depth[:end] == 1)
        if keys.any():
            colon = start + int(structure.positions[:end][keys][-1])
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
