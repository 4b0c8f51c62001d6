"""Vectorised text helpers over Arrow string arrays and conversation lists."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.schema import MESSAGE

StringOp = Callable[[pa.Array], pa.Array]


def combined(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array from a possibly chunked one."""
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def map_contents(prompt: pa.Array | pa.ChunkedArray, op: StringOp) -> pa.ListArray:
    """Apply a string operation to the ``content`` of every turn of every conversation."""
    prompt = combined(prompt)
    flat = pc.list_flatten(prompt)
    turns = pa.StructArray.from_arrays(
        [flat.field("role"), op(flat.field("content"))], fields=list(MESSAGE)
    )
    offsets = prompt.offsets
    if len(offsets) and offsets[0].as_py() != 0:
        offsets = pc.subtract(offsets, offsets[0])
    return pa.ListArray.from_arrays(offsets, turns, type=pa.list_(MESSAGE), mask=prompt.is_null())


def prompt_chars(prompt: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Total characters over all turns of each conversation."""
    return _prompt_total(prompt, pc.utf8_length)


def prompt_bytes(prompt: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Total UTF-8 bytes over all turns of each conversation (read off the offsets: no
    pass over the text, as counting characters is)."""
    return _prompt_total(prompt, pc.binary_length)


def _prompt_total(prompt: pa.Array | pa.ChunkedArray, measure: StringOp) -> pa.Array:
    prompt = combined(prompt)
    flat = pc.list_flatten(prompt)
    lengths = pc.fill_null(measure(flat.field("content")), 0).to_numpy()
    parents = pc.list_parent_indices(prompt).to_numpy()
    sums = np.bincount(parents, weights=lengths, minlength=len(prompt))
    return pa.array(sums.astype(np.int64))


CHUNK_BYTES = 1 << 24
"""Text bytes looked at once by the byte-level scans: bounded scratch memory."""


def byte_chunks(texts: pa.Array | pa.ChunkedArray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The UTF-8 bytes of a string array in row ranges of about :data:`CHUNK_BYTES` (at least
    one row each), as ``(first row, bytes, bounds)``: ``bounds[i]:bounds[i + 1]`` are row
    ``first + i``'s bytes. Nulls read as empty strings. Nothing is copied but the offsets."""
    text = pc.fill_null(combined(texts), "").cast(pa.large_string())
    n = len(text)
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[text.offset : text.offset + n + 1]
    data = text.buffers()[2]
    lo = 0
    while lo < n:
        hi = max(lo + 1, int(np.searchsorted(offsets, offsets[lo] + CHUNK_BYTES, "right")) - 1)
        hi = min(hi, n)
        chunk = np.frombuffer(data, dtype=np.uint8)[offsets[lo] : offsets[hi]] if data else None
        yield (
            lo,
            np.zeros(0, np.uint8) if chunk is None else chunk,
            offsets[lo : hi + 1] - offsets[lo],
        )
        lo = hi


def rows_with(flagged: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Rows (relative to a chunk of :func:`byte_chunks`) holding any of the ``flagged``
    byte positions (sorted)."""
    return np.flatnonzero(np.diff(np.searchsorted(flagged, bounds)))


def rows_with_bytes(
    texts: pa.Array | pa.ChunkedArray, flag: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Indices of the strings any of whose UTF-8 bytes ``flag`` (bytes → bool mask) marks."""
    parts = [
        first + rows_with(np.flatnonzero(marked), bounds)
        for first, data, bounds in byte_chunks(texts)
        if (marked := flag(data)).any()  # counting is cheaper than listing none
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def contains(texts: pa.Array | pa.ChunkedArray, needle: str) -> np.ndarray:
    """Per string: does it contain ``needle``? Only the strings holding the needle's first
    UTF-8 byte (found by a byte scan) are searched. Nulls give False."""
    lead = needle.encode()[0]
    rows = rows_with_bytes(texts, lambda data: data == lead)
    found = np.zeros(len(texts), dtype=bool)
    if len(rows):
        hits = pc.match_substring(combined(texts).take(pa.array(rows)), needle)
        found[rows] = pc.fill_null(hits, False).to_numpy(zero_copy_only=False)
    return found
