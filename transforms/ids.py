"""Stable content-hash row ids.

``id`` is the XXH3-128 hex digest of (source, prompt, response): the same content from the
same source gets the same id in every build. The exact-dedup key drops the source, so the
same (prompt, response) pair from two corpora is a duplicate. XXH3 is not a cryptographic
hash; at 128 bits accidental collisions are negligible, and it hashes straight from the
Arrow buffers about 8x faster than BLAKE2b over Python strings (see docs/performance.md).
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

Column = pa.Array | pa.ChunkedArray

_SEP = "\x1f"  # unit separator: cannot appear in normalised text (control chars are stripped)
_TURN = "\x1e"


def contiguous(column: Column) -> pa.Array:
    """One array from a possibly chunked column, without copying a column of one chunk
    (``ChunkedArray.combine_chunks`` copies it all even then: a full copy of a shard's text
    per call). The array may be a slice (a non-zero offset)."""
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def prompt_text(prompt: Column) -> pa.Array:
    """Serialise each conversation as ``role<US>content<RS>role<US>content...`` (one string)."""
    prompt = contiguous(prompt)
    flat = pc.list_flatten(prompt)
    turns = pc.binary_join_element_wise(
        pc.fill_null(flat.field("role"), ""), pc.fill_null(flat.field("content"), ""), _SEP
    )
    offsets = prompt.offsets
    if len(offsets) and offsets[0].as_py() != 0:
        offsets = pc.subtract(offsets, offsets[0])
    return pc.binary_join(pa.ListArray.from_arrays(offsets, turns), _TURN)


def _digests(values: pa.Array) -> bytes:
    """The XXH3-128 digests of the strings (null hashes as empty), 16 bytes each in order,
    read from Arrow buffers. The digest's bytes are the canonical (big-endian) ones, whose
    hex is ``hexdigest``."""
    values = pc.fill_null(values, "")
    width = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(values.buffers()[1], dtype=width)
    offsets = offsets[values.offset : values.offset + len(values) + 1].tolist()
    data = values.buffers()[2]
    view = memoryview(data) if data is not None else memoryview(b"")
    digest = xxhash.xxh3_128_digest
    return b"".join([digest(view[a:b]) for a, b in itertools.pairwise(offsets)])


def _digest(values: pa.Array) -> pa.Array:
    """XXH3-128 hex digest of each string (null hashes as empty): the digests' bytes in hex
    at once, not a Python string per row."""
    raw = _digests(values)
    n = len(raw) // 16
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    text = raw.hex().encode("ascii")
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(text)])


def _content_text(prompt: Column, response: Column) -> pa.Array:
    response = pc.fill_null(contiguous(response), "")
    return pc.binary_join_element_wise(prompt_text(prompt), response, _SEP)


def content_key(prompt: Column, response: Column) -> pa.Array:
    """Hash of (prompt, response): the exact-dedup key."""
    return _digest(_content_text(prompt, response))


def content_key_words(prompt: Column, response: Column) -> np.ndarray:
    """:func:`content_key` as ``(n, 2)`` ``uint64`` words, the digests' raw 16 bytes each
    (what :func:`transforms.keyset.hex_words` makes of its hex), without the hex."""
    raw = _digests(_content_text(prompt, response))
    return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)


def row_ids(source: Column, prompt: Column, response: Column) -> pa.Array:
    """Hash of (source, prompt, response): the stable row id."""
    text = pc.binary_join_element_wise(
        pc.fill_null(contiguous(source), ""),
        prompt_text(prompt),
        pc.fill_null(contiguous(response), ""),
        _SEP,
    )
    return _digest(text)


def position_ids(source: Column, source_index: Column) -> pa.Array:
    """Ids for rows rejected before their content could be read: a hash of where they came
    from, (source, source_index), so every row of a version has an id."""
    where = pc.binary_join_element_wise(
        pc.fill_null(contiguous(source), ""), contiguous(source_index).cast(pa.string()), _SEP
    )
    return _digest(where)
