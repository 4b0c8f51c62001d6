"""Stable content-hash row ids.

``id`` is the BLAKE2b-128 hex digest of (source, prompt, response): the same content from
the same source gets the same id in every build. The exact-dedup key drops the source, so
the same (prompt, response) pair from two corpora is a duplicate.
"""

from __future__ import annotations

from hashlib import blake2b

import pyarrow as pa
import pyarrow.compute as pc

from transforms.text import combined

Column = pa.Array | pa.ChunkedArray

_SEP = "\x1f"  # unit separator: cannot appear in normalised text (control chars are stripped)
_TURN = "\x1e"


def prompt_text(prompt: Column) -> pa.Array:
    """Serialise each conversation as ``role<US>content<RS>role<US>content...`` (one string)."""
    prompt = combined(prompt)
    flat = pc.list_flatten(prompt)
    turns = pc.binary_join_element_wise(
        pc.fill_null(flat.field("role"), ""), pc.fill_null(flat.field("content"), ""), _SEP
    )
    offsets = prompt.offsets
    if len(offsets) and offsets[0].as_py() != 0:
        offsets = pc.subtract(offsets, offsets[0])
    return pc.binary_join(pa.ListArray.from_arrays(offsets, turns), _TURN)


def _digest(values: pa.Array) -> pa.Array:
    return pa.array(
        [blake2b(v.encode(), digest_size=16).hexdigest() for v in values.to_pylist()],
        pa.string(),
    )


def content_key(prompt: Column, response: Column) -> pa.Array:
    """Hash of (prompt, response): the exact-dedup key."""
    response = pc.fill_null(combined(response), "")
    return _digest(pc.binary_join_element_wise(prompt_text(prompt), response, _SEP))


def row_ids(source: Column, prompt: Column, response: Column) -> pa.Array:
    """Hash of (source, prompt, response): the stable row id."""
    text = pc.binary_join_element_wise(
        pc.fill_null(combined(source), ""),
        prompt_text(prompt),
        pc.fill_null(combined(response), ""),
        _SEP,
    )
    return _digest(text)
