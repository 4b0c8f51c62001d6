"""Stable content-hash row ids.

``id`` is the BLAKE2b-128 hex digest of (source, prompt, response): the same content from
the same source gets the same id in every build. The exact-dedup key drops the source, so
the same (prompt, response) pair from two corpora is a duplicate.
"""

from __future__ import annotations

from hashlib import blake2b

import pyarrow as pa
import pyarrow.compute as pc

_SEP = "\x1f"  # unit separator: cannot appear in normalised text (control chars are stripped)
_TURN = "\x1e"


def prompt_text(prompt: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Serialise each conversation as ``role<US>content<RS>role<US>content...`` (one string)."""
    prompt = prompt.combine_chunks() if isinstance(prompt, pa.ChunkedArray) else prompt
    flat = pc.list_flatten(prompt)
    turns = pc.binary_join_element_wise(
        pc.fill_null(flat.field("role"), ""), pc.fill_null(flat.field("content"), ""), _SEP
    )
    offsets = prompt.offsets
    if prompt.offset or len(offsets) and offsets[0].as_py() != 0:
        offsets = pc.subtract(offsets, offsets[0])
    grouped = pa.ListArray.from_arrays(offsets, turns)
    return pc.binary_join(grouped, _TURN)


def _digest(values: pa.Array) -> pa.Array:
    return pa.array(
        [blake2b(v.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest() for v in
         values.to_pylist()],
        pa.string(),
    )


def content_key(prompt: pa.Array | pa.ChunkedArray, response: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Hash of (prompt, response): the exact-dedup key."""
    response = response.combine_chunks() if isinstance(response, pa.ChunkedArray) else response
    text = pc.binary_join_element_wise(prompt_text(prompt), pc.fill_null(response, ""), _SEP)
    return _digest(text)


def row_ids(
    source: pa.Array | pa.ChunkedArray,
    prompt: pa.Array | pa.ChunkedArray,
    response: pa.Array | pa.ChunkedArray,
) -> pa.Array:
    """Hash of (source, prompt, response): the stable row id."""
    source = source.combine_chunks() if isinstance(source, pa.ChunkedArray) else source
    response = response.combine_chunks() if isinstance(response, pa.ChunkedArray) else response
    text = pc.binary_join_element_wise(
        pc.fill_null(source, ""), prompt_text(prompt), pc.fill_null(response, ""), _SEP
    )
    return _digest(text)
