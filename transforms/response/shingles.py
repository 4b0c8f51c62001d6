"""Word n-gram shingles of rows as 64-bit hashes, compiled over Arrow's UTF-8 bytes.

The text of a row is its prompt (every turn's content) and its response, lower-cased, with
every run of characters other than letters, digits and marks (any script) turned into one
space; shingles are its word ``n``-grams
(``n = 5`` by default), each hashed to 64 bits. A text with fewer than ``n`` words is one
shingle of all its words (an empty text: the hash of the empty word).

Words are hashed straight from Arrow's string buffers by a Numba kernel: a polynomial hash
of the bytes (mod 2^64) folded with the word's length, and each n-gram is the fold
(FNV-style, with a final splitmix64 step) of its words' hashes; nothing is made per word or
shingle in Python. The kernel takes the
runs of word bytes (``[A-Za-z0-9_]``, lower-cased, and any non-ASCII byte) as words, so a
row that is all ASCII needs no normalisation beforehand (:func:`raw_texts`): Arrow's
Unicode lower case and regex run only on the few rows with a non-ASCII byte, and the
shingles are those of :func:`row_texts` (a test checks both on real rows). The result is
one flat ``uint64`` array plus row offsets, which
:func:`transforms.response.near_dedup.minhash_matrix` turns into signatures; the stage
itself fuses the two (its kernel calls ``row_words`` and ``shingle`` of
:mod:`transforms.response.minhash_kernels` row by row, so no array of every shingle's hash
is made).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.response.lengths import prompt_plain
from transforms.text import byte_chunks, combined, rows_with

_NON_WORD = r"[^\p{L}\p{N}\p{M}_\s]+"


def _joined(table: pa.Table) -> pa.Array:
    """Prompt (every turn's content) and response of each row as one string, as given."""
    return pc.binary_join_element_wise(
        prompt_plain(table.column("prompt")),
        pc.fill_null(combined(table.column("response")), ""),
        "\n",
    )


def normalised(text: pa.Array) -> pa.Array:
    """Lower-cased, and every run of characters other than letters, digits, marks, ``_``
    and ASCII white space turned into one space."""
    # Runs of characters that are neither letters, digits, marks, "_" nor ASCII white space
    # become one space (Unicode classes: RE2's \w is ASCII-only and would erase "é" or
    # Cyrillic), so words are the runs of word characters split at ASCII white space.
    return pc.replace_substring_regex(pc.utf8_lower(text), _NON_WORD, " ")


def row_texts(table: pa.Table) -> pa.Array:
    """Prompt and response of each row as one normalised string."""
    return normalised(_joined(table))


def raw_texts(table: pa.Table) -> tuple[pa.Array, np.ndarray]:
    """``(texts, rows)``: each row's prompt and response as one string, not normalised,
    and the rows holding a non-ASCII byte (a few percent). :func:`shingle_hashes` of an
    ASCII row's raw text are those of its :func:`row_texts` (the kernel's byte classes
    normalise it the same way: the words of a normalised ASCII text are the runs of
    ``[a-z0-9_]``, lower-cased), so only ``rows`` need :func:`normalised` (Arrow's Unicode
    lower case and regex, most of :func:`row_texts`' cost) before hashing."""
    text = combined(_joined(table))
    non_ascii: list[np.ndarray] = []
    for first, data, bounds in byte_chunks(text):
        non_ascii.append(first + rows_with(np.flatnonzero(data >= 0x80), bounds))
    return text, np.concatenate(non_ascii) if non_ascii else np.zeros(0, np.int64)


def shingle_hashes(texts: pa.Array, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, offsets)``: the shingle hashes of row ``i`` are
    ``hashes[offsets[i]:offsets[i + 1]]`` (``uint64`` both). ``texts`` as :func:`row_texts`
    (or, for its ASCII rows, :func:`raw_texts`) makes them: a normalised text holds only
    word characters and ASCII white space, so its words are what splitting at white space
    gives."""
    from transforms.response.minhash_kernels import shingle_rows

    parts, counts = [], []
    for _, data, bounds in byte_chunks(texts):
        hashes, per_row = shingle_rows(data, bounds, n)
        parts.append(hashes)
        counts.append(per_row)
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(1, np.uint64)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.uint64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts), offsets
