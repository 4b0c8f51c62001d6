"""The compiled kernels of near dedup (Numba, ``cache=True``): word hashing, shingles and
MinHash in one pass per row, band keys, and the ordered pass's lookups.

They live apart from :mod:`transforms.response.shingles` and
:mod:`transforms.response.near_dedup` so that importing those (every build does, through the
stage registry) does not import Numba (about 0.15 s and 70 MiB): a kernel module is loaded the
first time a near-dedup stage hashes or compares rows. What each kernel computes is described
where it is called.
"""

from __future__ import annotations

import numba
import numpy as np

# Numba compiles these globals into the kernels (``cache=True`` notices a change only in
# this file), so they live here.
MIX = np.uint64(0x9E3779B97F4A7C15)
PRIME = np.uint64(0x100000001B3)
SPLIT1 = np.uint64(0xBF58476D1CE4E5B9)
SPLIT2 = np.uint64(0x94D049BB133111EB)
# Per byte: what the word hash adds for it (its value, lower-cased, plus one) when it is a
# word byte ([A-Za-z0-9_] or non-ASCII), else 0: a separator.
WORD_BYTE = np.zeros(256, np.uint64)
for _c in (*range(48, 58), *range(97, 123), 95, *range(128, 256)):
    WORD_BYTE[_c] = _c + 1
WORD_BYTE[65:91] = WORD_BYTE[97:123]


@numba.njit(cache=True, inline="always")
def fold_step(h: np.uint64, part: np.uint64) -> np.uint64:
    return (h ^ part) * PRIME


@numba.njit(cache=True, inline="always")
def fold_finish(h: np.uint64) -> np.uint64:
    h ^= h >> np.uint64(30)
    h *= SPLIT1
    h ^= h >> np.uint64(27)
    h *= SPLIT2
    return h ^ (h >> np.uint64(31))


@numba.njit(cache=True)
def row_words(data: np.ndarray, start: int, end: int, words: np.ndarray) -> int:
    """Hash the words of ``data[start:end]`` into ``words`` (which holds at least
    ``(end - start + 1) // 2 + 1``) and return how many (at least 1: a text without words
    is the empty word). Words are the runs of word bytes: ``[A-Za-z0-9_]`` (hashed
    lower-cased) and every non-ASCII byte; any other byte separates words."""
    w, h, power, length = 0, np.uint64(0), PRIME, 0
    for p in range(start, end + 1):
        c = WORD_BYTE[data[p]] if p < end else np.uint64(0)
        if c:
            h += c * power
            power *= PRIME
            length += 1
        elif length:
            words[w] = fold_finish(fold_step(fold_step(MIX, h), np.uint64(length)))
            w += 1
            h, power, length = np.uint64(0), PRIME, 0
    if w == 0:
        words[0] = fold_finish(fold_step(fold_step(MIX, np.uint64(0)), np.uint64(0)))
        w = 1
    return w


@numba.njit(cache=True, inline="always")
def shingle(words: np.ndarray, first: int, width: int) -> np.uint64:
    """The hash of the shingle of ``words[first:first + width]``."""
    h = MIX
    for j in range(first, first + width):
        h = fold_step(h, words[j])
    return fold_finish(h)


@numba.njit(cache=True)
def shingle_rows(data: np.ndarray, bounds: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, per row count)`` of the rows ``data[bounds[i]:bounds[i + 1]]``."""
    rows = len(bounds) - 1
    words = np.empty(len(data) // 2 + 2 * rows + 1, np.uint64)  # a bound: all rows' words
    word_counts = np.zeros(rows, np.int64)
    w = 0
    for r in range(rows):
        word_counts[r] = row_words(data, bounds[r], bounds[r + 1], words[w:])
        w += word_counts[r]
    counts = np.maximum(word_counts - n + 1, 1)
    out = np.empty(counts.sum(), np.uint64)
    o, w = 0, 0
    for r in range(rows):
        width = min(n, word_counts[r])
        for s in range(counts[r]):
            out[o] = shingle(words, w + s, width)
            o += 1
        w += word_counts[r]
    return out, counts


@numba.njit(cache=True, inline="always")
def fmix32(x: np.uint32) -> np.uint32:
    """MurmurHash3's 32-bit finalizer (a bijection), as datasketch pre-mixes input hashes
    (in 64-bit arithmetic, masked: Numba widens 32-bit integers)."""
    low = np.uint64(0xFFFFFFFF)
    x = np.uint64(x)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x85EBCA6B)) & low
    x ^= x >> np.uint64(13)
    x = (x * np.uint64(0xC2B2AE35)) & low
    return np.uint32(x ^ (x >> np.uint64(16)))


@numba.njit(cache=True, inline="always")
def take_shingle(sig: np.ndarray, shingle_hash: np.uint64, a: np.ndarray, b: np.ndarray):
    """Lower ``sig[k]`` to ``a[k] * x + b[k] mod 2^32``, ``x = fmix32(low 32 bits of the
    shingle's hash)``, for every permutation ``k`` (the loop the compiler vectorises)."""
    x = fmix32(np.uint32(shingle_hash & np.uint64(0xFFFFFFFF)))
    for k in range(len(a)):
        v = np.uint32(a[k] * x + b[k])
        if v < sig[k]:
            sig[k] = v


@numba.njit(cache=True)
def minhash_rows(hashes: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray):
    """Row ``r``'s signature: per permutation the minimum over its shingle hashes."""
    out = np.empty((len(offsets) - 1, len(a)), np.uint32)
    sig = np.empty(len(a), np.uint32)
    for r in range(len(offsets) - 1):
        sig[:] = np.uint32(0xFFFFFFFF)
        for s in range(offsets[r], offsets[r + 1]):
            take_shingle(sig, hashes[s], a, b)
        out[r] = sig
    return out


@numba.njit(cache=True)
def signature_rows(data, bounds, n, a, b) -> np.ndarray:
    """Shingles and MinHash in one pass, row by row (no array of every shingle's hash):
    the signatures :func:`minhash_matrix` gives for ``shingle_hashes``' hashes."""
    rows, num_perm = len(bounds) - 1, len(a)
    longest = 0
    for r in range(rows):
        longest = max(longest, bounds[r + 1] - bounds[r])
    words = np.empty((longest + 1) // 2 + 1, np.uint64)
    out = np.empty((rows, num_perm), np.uint32)
    sig = np.empty(num_perm, np.uint32)
    for r in range(rows):
        k = row_words(data, bounds[r], bounds[r + 1], words)
        sig[:] = np.uint32(0xFFFFFFFF)
        for s in range(max(k - n + 1, 1)):
            take_shingle(sig, shingle(words, s, min(n, k)), a, b)
        out[r] = sig
    return out


@numba.njit(cache=True)
def band_key_rows(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    out = np.empty((sig.shape[0], bands), np.uint64)
    for i in range(sig.shape[0]):
        for j in range(bands):
            h = fold_step(MIX, np.uint64(j + 1))
            for t in range(j * rows, (j + 1) * rows):
                h = fold_step(h, np.uint64(sig[i, t]))
            out[i, j] = fold_finish(h)
    return out


@numba.njit(cache=True, inline="always")
def similar(x: np.ndarray, y: np.ndarray, need: int) -> bool:
    """At least ``need`` equal minhashes."""
    equal = 0
    for k in range(len(x)):
        equal += x[k] == y[k]
    return equal >= need


@numba.njit(cache=True)
def radix_table(keys: np.ndarray, shift: int) -> np.ndarray:
    """``table[t]``: the first position of sorted ``keys`` whose top bits are ``>= t``."""
    table = np.zeros((1 << (64 - shift)) + 1, np.int32)
    for key in keys:
        table[(key >> np.uint64(shift)) + 1] += 1
    return np.cumsum(table).astype(np.int32)


@numba.njit(cache=True)
def best_in_run(keys, small, sigs, need, run_keys, run_kept, table, shift, best) -> None:
    """Lower ``best[i]`` to the earliest kept row of this run that shares a band with row
    ``i`` and is similar to it (verified only when earlier than the best so far)."""
    for i in range(keys.shape[0]):
        for j in range(keys.shape[1]):
            key = keys[i, j]
            top = key >> np.uint64(shift)
            for p in range(table[top], table[top + 1]):
                if run_keys[p] == key:
                    kept = run_kept[p]
                    if kept < best[i] and similar(small[i], sigs[kept], need):
                        best[i] = kept


@numba.njit(cache=True)
def owners_in_shard(keys, small, need, dropped) -> np.ndarray:
    """Row after row: the earliest earlier kept row of this shard sharing a band with row
    ``i`` and similar to it (``-1``: none, the row is kept and its keys go into a
    multimap, open addressing with linear probing). Rows ``dropped`` already (by an earlier
    shard's row) are skipped and never kept."""
    n, bands = keys.shape
    size = 16
    while size < 3 * n * bands // 2:  # load at most 2/3 (when every row is kept)
        size *= 2
    mask = np.uint64(size - 1)
    slot_keys = np.zeros(size, np.uint64)
    slot_rows = np.full(size, -1, np.int32)
    owner = np.full(n, -1, np.int64)
    for i in range(n):
        if dropped[i]:
            continue
        best = n
        for j in range(bands):
            key = keys[i, j]
            s = key & mask
            while slot_rows[s] != -1:
                r = slot_rows[s]
                if slot_keys[s] == key and r < best and similar(small[i], small[r], need):
                    best = r
                s = (s + np.uint64(1)) & mask
        if best < n:
            owner[i] = best
            continue
        for j in range(bands):
            key = keys[i, j]
            s = key & mask
            while slot_rows[s] != -1:
                s = (s + np.uint64(1)) & mask
            slot_keys[s], slot_rows[s] = key, i
    return owner


@numba.njit(cache=True)
def merge_runs(k1, r1, k2, r2) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs merged into one (ties: the first run's entries first)."""
    keys = np.empty(len(k1) + len(k2), np.uint64)
    rows = np.empty(len(k1) + len(k2), np.uint32)
    p = q = 0
    for o in range(len(keys)):
        if q == len(k2) or (p < len(k1) and k1[p] <= k2[q]):
            keys[o], rows[o] = k1[p], r1[p]
            p += 1
        else:
            keys[o], rows[o] = k2[q], r2[q]
            q += 1
    return keys, rows


@numba.njit(cache=True)
def similar_pair_rows(a, rows_a, b, rows_b, need) -> np.ndarray:
    out = np.empty(len(rows_a), np.bool_)
    for k in range(len(rows_a)):
        out[k] = similar(a[rows_a[k]], b[rows_b[k]], need)
    return out
