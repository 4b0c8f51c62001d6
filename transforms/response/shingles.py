"""Word n-gram shingles of rows as 64-bit hashes, vectorised over Arrow.

The text of a row is its prompt (every turn's content) and its response, lower-cased, with
every run of characters other than letters, digits and marks (any script) turned into one
space; shingles are its word ``n``-grams
(``n = 5`` by default), each hashed to 64 bits. A text with fewer than ``n`` words is one
shingle of all its words (an empty text: the hash of the empty word).

Words are hashed straight from Arrow's string buffers with numpy (a polynomial hash of the
bytes), and the n-grams are folded from the word hashes, so no Python object is made per
word or shingle.
The result is one flat ``uint64`` array plus row offsets, which
:func:`transforms.response.near_dedup.minhash_matrix` turns into signatures.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.response.lengths import prompt_plain
from transforms.text import combined

_MIX = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(0x100000001B3)


def row_texts(table: pa.Table) -> pa.Array:
    """Prompt and response of each row as one normalised string."""
    text = pc.binary_join_element_wise(
        prompt_plain(table.column("prompt")),
        pc.fill_null(combined(table.column("response")), ""),
        "\n",
    )
    # Runs of characters that are neither letters, digits, marks, "_" nor ASCII white space
    # become one space (Unicode classes: RE2's \w is ASCII-only and would erase "é" or
    # Cyrillic), so words are the runs of word characters split at ASCII white space.
    return pc.replace_substring_regex(pc.utf8_lower(text), r"[^\p{L}\p{N}\p{M}_\s]+", " ")


def _word_hashes(flat: pa.Array) -> np.ndarray:
    """A 64-bit hash of each word: each distinct word (Arrow's dictionary encoding) is
    hashed once by :func:`_string_hashes`."""
    if not len(flat):
        return np.zeros(0, dtype=np.uint64)
    encoded = pc.dictionary_encode(combined(flat))
    return _string_hashes(encoded.dictionary)[encoded.indices.to_numpy(zero_copy_only=False)]


def _string_hashes(strings: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string, from the Arrow buffers: a polynomial hash of its bytes
    (mod 2^64, summed per string with ``np.add.reduceat``) folded with its length."""
    words = strings.cast(pa.large_string())
    n = len(words)
    if not n:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(words.buffers()[1], dtype=np.int64)[words.offset : words.offset + n + 1]
    data = np.frombuffer(words.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    out = np.zeros(n, dtype=np.uint64)
    full = lengths > 0
    if full.any():
        pos = np.arange(len(data)) - np.repeat(starts, lengths)
        powers = np.cumprod(np.full(int(lengths.max()), _PRIME, dtype=np.uint64))
        terms = (data.astype(np.uint64) + np.uint64(1)) * powers[pos]
        out[full] = np.add.reduceat(terms, starts[full])
    return fold([out, lengths.astype(np.uint64)])


def fold(parts: list[np.ndarray]) -> np.ndarray:
    """Order-sensitive 64-bit combination of equal-length hash arrays (FNV-style, with a
    final splitmix64 step)."""
    h = np.full(len(parts[0]), _MIX, dtype=np.uint64)
    for part in parts:
        h = (h ^ part) * _PRIME
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def shingle_hashes(texts: pa.Array, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, offsets)``: the shingle hashes of row ``i`` are
    ``hashes[offsets[i]:offsets[i + 1]]`` (``uint64`` both). ``texts`` as
    :func:`row_texts` makes them: words are split at ASCII white space only."""
    texts = pc.ascii_trim_whitespace(pc.fill_null(combined(texts), ""))
    words = pc.ascii_split_whitespace(texts)
    counts = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    wh = _word_hashes(pc.list_flatten(words))
    # Full n-grams: every position whose n words lie in the same row.
    full = np.maximum(counts - n + 1, 0)
    row_of = np.repeat(np.arange(len(counts)), full)
    pos = np.arange(int(full.sum())) - np.repeat(np.cumsum(full) - full, full) + starts[row_of]
    if len(pos):  # the n-gram at every word position (slices, no gathers), then the rows'
        last = len(wh) - n + 1
        grams = fold([wh[k : last + k] for k in range(n)])[pos]
    else:
        grams = np.zeros(0, np.uint64)
    # Short rows (1..n-1 words): one shingle of all their words; empty rows: the shingle 0.
    per_row = np.where(full > 0, full, 1)
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.uint64)
    out = np.zeros(int(per_row.sum()), dtype=np.uint64)
    full_rows = full > 0
    out[np.repeat(full_rows, per_row)] = grams
    for i in np.flatnonzero((counts > 0) & ~full_rows):
        parts = [wh[starts[i] + k : starts[i] + k + 1] for k in range(counts[i])]
        out[int(offsets[i])] = fold(parts)[0]
    return out, offsets
