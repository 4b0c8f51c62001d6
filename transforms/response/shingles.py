"""Word n-gram shingles of rows as 64-bit hashes, compiled over Arrow's UTF-8 bytes.

The text of a row is its prompt (every turn's content) and its response, lower-cased, with
every run of characters other than letters, digits and marks (any script) turned into one
space; shingles are its word ``n``-grams
(``n = 5`` by default), each hashed to 64 bits. A text with fewer than ``n`` words is one
shingle of all its words (an empty text: the hash of the empty word).

Words are hashed straight from Arrow's string buffers by a Numba kernel: a polynomial hash
of the bytes (mod 2^64) folded with the word's length, and each n-gram is the :func:`fold`
of its words' hashes; nothing is made per word or shingle in Python. The kernel takes the
runs of word bytes (``[A-Za-z0-9_]``, lower-cased, and any non-ASCII byte) as words, so a
row that is all ASCII needs no normalisation beforehand: :func:`hashing_texts` runs Arrow's
Unicode lower case and regex only on the few rows with a non-ASCII byte, and the shingles
are those of :func:`row_texts` (a test checks both on real rows). The result is one flat
``uint64`` array plus row offsets, which
:func:`transforms.response.near_dedup.minhash_matrix` turns into signatures.
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.response.lengths import prompt_plain
from transforms.text import byte_chunks, combined, rows_with

MIX = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(0x100000001B3)
_SPLIT1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLIT2 = np.uint64(0x94D049BB133111EB)
# Per byte: what the word hash adds for it (its value, lower-cased, plus one) when it is a
# word byte ([A-Za-z0-9_] or non-ASCII), else 0: a separator.
_WORD_BYTE = np.zeros(256, np.uint64)
for _c in (*range(48, 58), *range(97, 123), 95, *range(128, 256)):
    _WORD_BYTE[_c] = _c + 1
_WORD_BYTE[65:91] = _WORD_BYTE[97:123]


_NON_WORD = r"[^\p{L}\p{N}\p{M}_\s]+"


def _joined(table: pa.Table) -> pa.Array:
    """Prompt (every turn's content) and response of each row as one string, as given."""
    return pc.binary_join_element_wise(
        prompt_plain(table.column("prompt")),
        pc.fill_null(combined(table.column("response")), ""),
        "\n",
    )


def _normalised(text: pa.Array) -> pa.Array:
    # Runs of characters that are neither letters, digits, marks, "_" nor ASCII white space
    # become one space (Unicode classes: RE2's \w is ASCII-only and would erase "é" or
    # Cyrillic), so words are the runs of word characters split at ASCII white space.
    return pc.replace_substring_regex(pc.utf8_lower(text), _NON_WORD, " ")


def row_texts(table: pa.Table) -> pa.Array:
    """Prompt and response of each row as one normalised string."""
    return _normalised(_joined(table))


def hashing_texts(table: pa.Table) -> pa.Array:
    """What :func:`shingle_hashes` needs to give the shingles of :func:`row_texts`, made
    faster: only the rows holding a non-ASCII byte (a few percent) are normalised by Arrow
    (Unicode lower case and classes; its regex is most of :func:`row_texts`' cost). An
    ASCII row is left as it is, since the kernel's byte classes normalise it the same way:
    the words of a normalised ASCII text are the runs of ``[a-z0-9_]``, lower-cased."""
    text = combined(_joined(table))
    non_ascii: list[np.ndarray] = []
    for first, data, bounds in byte_chunks(text):
        non_ascii.append(first + rows_with(np.flatnonzero(data >= 0x80), bounds))
    rows = np.concatenate(non_ascii) if non_ascii else np.zeros(0, np.int64)
    if not len(rows):
        return text
    mask = np.zeros(len(text), bool)
    mask[rows] = True
    return pc.replace_with_mask(text, pa.array(mask), _normalised(text.take(pa.array(rows))))


def fold(parts: list[np.ndarray]) -> np.ndarray:
    """Order-sensitive 64-bit combination of equal-length hash arrays (FNV-style, with a
    final splitmix64 step); :func:`fold_step` and :func:`fold_finish` are the same, compiled."""
    h = np.full(len(parts[0]), MIX, dtype=np.uint64)
    for part in parts:
        h = (h ^ part) * _PRIME
    h ^= h >> np.uint64(30)
    h *= _SPLIT1
    h ^= h >> np.uint64(27)
    h *= _SPLIT2
    return h ^ (h >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def fold_step(h: np.uint64, part: np.uint64) -> np.uint64:
    return (h ^ part) * _PRIME


@numba.njit(cache=True, inline="always")
def fold_finish(h: np.uint64) -> np.uint64:
    h ^= h >> np.uint64(30)
    h *= _SPLIT1
    h ^= h >> np.uint64(27)
    h *= _SPLIT2
    return h ^ (h >> np.uint64(31))


@numba.njit(cache=True)
def _shingle_kernel(data: np.ndarray, bounds: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, per row count)`` of the rows ``data[bounds[i]:bounds[i + 1]]``. Words
    are the runs of word bytes: ``[A-Za-z0-9_]`` (hashed lower-cased) and every non-ASCII
    byte; any other byte separates words."""
    rows = len(bounds) - 1
    total = 0  # first the words (at least one per row: the empty word), for exact sizes
    for r in range(rows):
        inside, k = False, 0
        for p in range(bounds[r], bounds[r + 1]):
            word = _WORD_BYTE[data[p]] != 0
            k += word and not inside
            inside = word
        total += max(k, 1)
    words = np.empty(total, np.uint64)
    word_counts = np.zeros(rows, np.int64)
    w = 0
    for r in range(rows):
        start, inside, h, power = w, False, np.uint64(0), _PRIME
        length = 0
        for p in range(bounds[r], bounds[r + 1] + 1):
            c = _WORD_BYTE[data[p]] if p < bounds[r + 1] else np.uint64(0)
            if c:
                h += c * power
                power *= _PRIME
                length += 1
                inside = True
            elif inside:
                words[w] = fold_finish(fold_step(fold_step(MIX, h), np.uint64(length)))
                w += 1
                inside, h, power, length = False, np.uint64(0), _PRIME, 0
        if w == start:  # no word: the empty word
            words[w] = fold_finish(fold_step(fold_step(MIX, np.uint64(0)), np.uint64(0)))
            w += 1
        word_counts[r] = w - start
    counts = np.maximum(word_counts - n + 1, 1)
    out = np.empty(counts.sum(), np.uint64)
    o, w = 0, 0
    for r in range(rows):
        k = word_counts[r]
        width = min(n, k)
        for s in range(counts[r]):
            h = MIX
            for j in range(width):
                h = fold_step(h, words[w + s + j])
            out[o] = fold_finish(h)
            o += 1
        w += k
    return out, counts


def shingle_hashes(texts: pa.Array, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, offsets)``: the shingle hashes of row ``i`` are
    ``hashes[offsets[i]:offsets[i + 1]]`` (``uint64`` both). ``texts`` as :func:`row_texts`
    (or, the same shingles, :func:`hashing_texts`) makes them: a normalised text holds only
    word characters and ASCII white space, so its words are what splitting at white space
    gives."""
    parts, counts = [], []
    for _, data, bounds in byte_chunks(texts):
        hashes, per_row = _shingle_kernel(data, bounds, n)
        parts.append(hashes)
        counts.append(per_row)
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(1, np.uint64)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.uint64)
    return np.concatenate(parts), offsets
