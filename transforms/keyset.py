"""A compact, exact set of 128-bit keys, each with a 128-bit value, as sorted numpy runs.

Keys and values are held as pairs of ``uint64`` words (the raw 16 bytes of an XXH3-128
digest, see :func:`hex_words`), 32 bytes per key in all, instead of a dict of hex strings
(about 200 bytes per key). The set is log-structured, as an LSM tree's levels (O'Neil et
al., 1996, "The log-structured merge-tree"): each :meth:`KeySet.add` appends one run sorted
by key, and a run is merged into the one before it while it is at least as large (a
binary counter), so a lookup searches O(log n) runs and merging costs O(n log n) in all;
the merge of two sorted runs is a near-linear timsort. Keys compare as (first word, second
word), so the set stays exact at 128 bits; keys that share a first word (some pair of n
keys does with probability about n^2 / 2^65) fall back to a full lexicographic order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.ids import contiguous

Words = np.ndarray
"""``(n, 2)`` ``uint64``: the 16 raw bytes of a 128-bit digest (memory order)."""

_DROPPED = np.zeros(0, np.uint64)  # stands in for a merged run's column once it is copied


def hex_words(values: pa.Array | pa.ChunkedArray) -> tuple[Words, np.ndarray]:
    """The 128-bit values of 32-character lowercase hex strings (XXH3-128 hex digests),
    and a mask of the rows that are such strings; other rows (nulls included) get zeros."""
    values = pc.cast(contiguous(values), pa.large_string())
    n = len(values)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset :][: n + 1]
    data = values.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    sized = np.diff(offsets) == 32
    if values.null_count:
        sized &= values.is_valid().to_numpy(zero_copy_only=False)
    if n and sized.all() and offsets[-1] - offsets[0] == 32 * n:
        chars = raw[offsets[0] : offsets[-1]].reshape(n, 32)
    else:  # mixed lengths: gather the 32-character rows only
        starts = np.where(sized, offsets[:-1], 0)
        chars = np.zeros((n, 32), np.uint8)
        chars[sized] = raw[starts[sized, None] + np.arange(32)]
    # 0-9 and a-f only (uint8 arithmetic wraps, so one comparison tests each range)
    hexdigit = ((chars - np.uint8(48)) < 10) | ((chars - np.uint8(97)) < 6)
    plain = sized & hexdigit.all(axis=1)
    if not plain.all():
        chars = np.where(plain[:, None], chars, np.uint8(48))  # "0" for the others
    decoded = bytes.fromhex(chars.tobytes().decode("ascii"))
    return np.frombuffer(decoded, dtype=np.uint64).reshape(n, 2), plain


def words_hex(words: Words) -> pa.Array:
    """The inverse of :func:`hex_words`: 32-character lowercase hex strings."""
    text = np.ascontiguousarray(words, dtype=np.uint64).tobytes().hex().encode("ascii")
    offsets = np.arange(0, 32 * len(words) + 1, 32, dtype=np.int32)
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(text)]
    return pa.Array.from_buffers(pa.string(), len(words), buffers)


def _equal_pairs(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Of sorted keys, whether each is equal to the one before (length ``n - 1``)."""
    return (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])


def group_keys(keys: Words) -> tuple[Words, np.ndarray, np.ndarray]:
    """The distinct keys in (first word, second word) order, the first row holding each,
    and each row's number in that order: a faster ``np.unique(return_index=True,
    return_inverse=True)`` for 128-bit keys."""
    hi, lo = keys[:, 0], keys[:, 1]
    order = np.argsort(hi)
    shi, slo = hi[order], lo[order]
    same_hi = shi[1:] == shi[:-1]
    if (same_hi & (slo[1:] != slo[:-1])).any():  # two keys share a first word
        order = np.lexsort((lo, hi))
        shi, slo = hi[order], lo[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = ~_equal_pairs(shi, slo)
    starts = np.flatnonzero(new)
    first = np.minimum.reduceat(order, starts) if len(order) else order
    group = np.empty(len(order), dtype=np.int64)
    group[order] = np.cumsum(new) - 1
    distinct = np.stack([shi[starts], slo[starts]], axis=1)
    return distinct, first, group


class KeySet:
    """128-bit keys, each with a 128-bit value, in sorted runs; the keys of different runs
    are disjoint. Picklable (plain numpy arrays)."""

    def __init__(self) -> None:
        # Each run: four uint64 columns [key hi, key lo, value hi, value lo], sorted by key.
        self.runs: list[list[np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(run[0]) for run in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for run in self.runs for column in run)

    def find(self, keys: Words) -> tuple[np.ndarray, Words]:
        """Which of ``keys`` (distinct; sorted keeps the lookups cache-friendly) are in the
        set, and their values (zeros where absent)."""
        found = np.zeros(len(keys), dtype=bool)
        values = np.zeros((len(keys), 2), dtype=np.uint64)
        todo = np.arange(len(keys))
        for hi, lo, *run_values in reversed(self.runs):  # newest (smallest) first
            if not len(todo):
                break
            where = _positions(hi, lo, keys[todo, 0], keys[todo, 1])
            hit = where >= 0
            found[todo[hit]] = True
            for k, column in enumerate(run_values):
                values[todo[hit], k] = column[where[hit]]
            todo = todo[~hit]
        return found, values

    def add(self, keys: Words, values: Words) -> None:
        """Add ``keys``, distinct, sorted as :func:`group_keys` returns them and absent from
        the set, with their values."""
        if not len(keys):
            return
        self.runs.append(
            [np.array(words[:, k], np.uint64) for words in (keys, values) for k in (0, 1)]
        )
        while len(self.runs) > 1 and len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            newer, older = self.runs.pop(), self.runs.pop()
            self.runs.append(_merge(older, newer))


def _positions(
    hi: np.ndarray, lo: np.ndarray, key_hi: np.ndarray, key_lo: np.ndarray
) -> np.ndarray:
    """Where each key sits in a sorted run, -1 where absent."""
    pos = np.searchsorted(hi, key_hi)
    at = np.minimum(pos, len(hi) - 1)
    same_hi = (pos < len(hi)) & (hi[at] == key_hi)
    hit = same_hi & (lo[at] == key_lo)
    where = np.where(hit, pos, -1)
    for i in np.flatnonzero(same_hi & ~hit):  # rare: a first word shared by several keys
        end = int(np.searchsorted(hi, key_hi[i], side="right"))
        j = int(pos[i]) + int(np.searchsorted(lo[pos[i] : end], key_lo[i]))
        if j < end and lo[j] == key_lo[i]:
            where[i] = j
    return where


def _merge(older: list[np.ndarray], newer: list[np.ndarray]) -> list[np.ndarray]:
    """One sorted run from two (disjoint keys). Built one column at a time, each input
    column dropped as soon as it is copied, so a merge of n keys holds at most 16 bytes per
    key more than the runs themselves (the order, and one 8-byte column twice)."""
    hi = np.concatenate([older[0], newer[0]])
    older[0] = newer[0] = _DROPPED
    order = np.argsort(hi, kind="stable")  # timsort: two sorted runs merge in near-linear time
    merged = hi[order]
    if (merged[1:] == merged[:-1]).any():  # two keys share a first word: order by both words
        order = np.lexsort((np.concatenate([older[1], newer[1]]), hi))
        merged = hi[order]
    del hi
    out = [merged]
    for k in (1, 2, 3):
        column = np.concatenate([older[k], newer[k]])
        older[k] = newer[k] = _DROPPED
        out.append(column[order])
        del column
    return out
