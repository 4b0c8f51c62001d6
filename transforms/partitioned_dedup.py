"""Keep-first deduplication with its state partitioned by key hash: the pure parts.

The ordered passes of ``exact_dedup`` and ``near_dedup`` decide row by row, in build order:
a row is dropped when an earlier *kept* row shares a key with it (the key digest; an LSH
band key) and, for near dedup, is verified similar; it names the earliest such kept row.
The kept rows are the lexicographically first maximal independent set (greedy MIS in
row order) of the graph whose edges are the verified pairs. This module computes the same
set without one process holding every key:

1. :func:`partition_entries`: each shard's ``(key, global row)`` entries, grouped by
   ``key % partitions`` (keys are hash values already: digests, folded band keys);
2. :func:`bucket_runs`, per partition: the entries sorted by key, keeping only buckets
   (equal keys) of two rows or more; :func:`candidate_pairs`: the pairs ``(i, j)``, ``i <
   j`` in one bucket, for the ``i`` being checked this round. Enumerating every pair of a
   bucket is quadratic (a text repeated 100 times gives 100² / 2 pairs per band), so each
   round verifies only rows that may be kept: the first row of each bucket in round 1, then
   the rows the last merge kept that were not checked yet;
3. :func:`keep_first`, the merge: the greedy keep-first over the verified edges so far.
   Once a round checks no new row, every pair ``(i, j)`` with ``i`` kept has been verified,
   so the kept set and each dropped row's owner (its earliest kept neighbour) are those of
   the ordered pass: a kept row has no kept earlier neighbour among all verified pairs,
   and a dropped one has one. The rounds are those of the iterative MIS of Blelloch,
   Fineman and Shun (SPAA 2012, "Greedy sequential maximal independent set and matching
   are parallel on average"), applied to the edges, here in numpy.

Exact dedup is the one-band case with no verification: every pair in a bucket is a
duplicate, the bucket's first row is the only one checked, and one round suffices.

The shape follows NeMo Curator's fuzzy dedup (LSH buckets → edges → a global pass) but
keeps build order and keep-first, where NeMo Curator takes connected components (which
would drop rows that are only transitively similar; the ordered pass does not).
"""

from __future__ import annotations

import numpy as np

_SEQUENTIAL_AFTER = 8
"""Rounds of the vectorised merge before the rest is finished row by row (long chains
of near duplicates decide one link per round)."""


def partition_entries(
    keys: np.ndarray, first_row: int, partitions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard's entries grouped by partition: ``keys`` is ``(rows, bands, words)``
    ``uint64`` (one word per band key; two for a 128-bit digest); row ``k`` of the shard is
    global row ``first_row + k``. Returns ``(keys (entries, words), global rows (entries,)
    int64, offsets (partitions + 1,))``: partition ``p``'s entries are
    ``offsets[p]:offsets[p + 1]``, in row order within each."""
    rows, bands, words = keys.shape
    flat = keys.reshape(rows * bands, words)
    owners = np.repeat(np.arange(first_row, first_row + rows, dtype=np.int64), bands)
    part = flat[:, 0] % np.uint64(partitions)
    order = np.argsort(part, kind="stable")
    counts = np.bincount(part.astype(np.int64), minlength=partitions)
    offsets = np.zeros(partitions + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return np.ascontiguousarray(flat[order]), owners[order], offsets


def bucket_runs(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries ``(keys (m, words), rows (m,))`` in row order, sorted into buckets of equal
    key, each bucket's rows distinct and ascending; buckets of one row are dropped (they
    make no pair). Returns ``(rows, ends)``: ``ends[a]`` is one past the last entry of the
    bucket holding entry ``a``."""
    if keys.shape[1] == 1:
        order = np.argsort(keys[:, 0], kind="stable")  # stable: rows stay ascending
    else:
        order = np.lexsort((rows, *keys.T[::-1]))  # the first word is the primary key
    k, r = keys[order], rows[order]
    same_key = np.ones(len(r), dtype=bool)
    same_key[0:1] = False
    same_key[1:] = (k[1:] == k[:-1]).all(axis=1)
    repeated = np.zeros(len(r), dtype=bool)  # one row holding one key in two bands
    repeated[1:] = same_key[1:] & (r[1:] == r[:-1])
    k, r, same_key = k[~repeated], r[~repeated], same_key[~repeated]
    starts = np.flatnonzero(~same_key)
    sizes = np.diff(np.append(starts, len(r)))
    ends = np.repeat(starts + sizes, sizes)
    keep = np.repeat(sizes > 1, sizes)
    kept_rows, kept_ends = r[keep], ends[keep]
    # positions shift when singletons go: ends in the new numbering
    shift = np.cumsum(~keep)
    return kept_rows, kept_ends - shift[kept_ends - 1]


def bucket_firsts(ends: np.ndarray) -> np.ndarray:
    """Which entries start their bucket (round 1 checks these)."""
    first = np.ones(len(ends), dtype=bool)
    first[1:] = ends[1:] != ends[:-1]
    return first


def candidate_pairs(ends: np.ndarray, check: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry pairs ``(a, b)``, ``a < b`` in one bucket, for every entry ``a`` with
    ``check[a]``: the pairs to verify this round."""
    checked = np.flatnonzero(check)
    later = ends[checked] - checked - 1
    total = int(later.sum())
    first = np.repeat(checked, later)
    step = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(later) - later, later)
    return first, first + step + 1


def dedupe_edges(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct edges ``(i, j)`` sorted by ``j`` then ``i`` (one ``int64`` sort of
    ``j · 2^32 + i`` while rows fit 32 bits, else a lexicographic sort)."""
    i, j = i.astype(np.int64), j.astype(np.int64)
    if len(i) and max(int(i.max()), int(j.max())) < 1 << 31:
        pair = np.sort((j << 32) | i)
        pair = pair[np.r_[True, pair[1:] != pair[:-1]]] if len(pair) else pair
        return pair & 0xFFFFFFFF, pair >> 32
    order = np.lexsort((i, j))
    i, j = i[order], j[order]
    new = np.ones(len(i), dtype=bool)
    new[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[new], j[new]


def keep_first(
    i: np.ndarray, j: np.ndarray, distinct: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The greedy keep-first over the edges ``(i, j)``, ``i < j`` (any order, repeats
    allowed; ``distinct``: they come from :func:`dedupe_edges` already): a row is dropped
    when one of its earlier neighbours is kept, and names the earliest kept one. Rows
    without an earlier neighbour are kept. Returns ``(dropped rows, their owners)``,
    sorted by row.

    Vectorised in rounds: a row whose earliest neighbour not yet dropped is kept is
    dropped; one whose earlier neighbours are all dropped is kept. The earliest undecided
    row is decided in every round, so the rounds end; after :data:`_SEQUENTIAL_AFTER` of
    them the rest is decided row by row."""
    if not distinct:
        i, j = dedupe_edges(i.astype(np.int64), j.astype(np.int64))
    if np.any(i >= j):
        raise ValueError("keep_first: every edge must point from an earlier row to a later one")
    if len(j) and int(j[-1]) < 4 * len(j) + 1024:  # rows as they are: arrays that small
        nodes = np.arange(int(j[-1]) + 1)
        ci, cj = i, j
    else:  # numbered among the rows that have an edge
        nodes, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)
        ci, cj = inverse[: len(i)], inverse[len(i) :]
    undecided, kept, dropped = 0, 1, 2
    state = np.full(len(nodes), kept, dtype=np.int8)
    state[cj] = undecided
    owner = np.full(len(nodes), -1, dtype=np.int64)
    for _ in range(_SEQUENTIAL_AFTER):
        if not len(cj):
            break
        starts = np.flatnonzero(np.r_[True, cj[1:] != cj[:-1]])
        alive = state[ci] != dropped
        position = np.where(alive, np.arange(len(ci)), len(ci))
        first = np.minimum.reduceat(position, starts)
        rows = cj[starts]
        none = first == len(ci)
        state[rows[none]] = kept
        hit = ~none
        hit[hit] = state[ci[first[hit]]] == kept
        state[rows[hit]] = dropped
        owner[rows[hit]] = ci[first[hit]]
        rest = state[cj] == undecided
        ci, cj = ci[rest], cj[rest]
    _sequential(state, owner, ci, cj)
    out = np.flatnonzero(state == dropped)
    return nodes[out], nodes[owner[out]]


def _sequential(state: np.ndarray, owner: np.ndarray, ci: np.ndarray, cj: np.ndarray) -> None:
    """The rest of :func:`keep_first`, row by row over the edges sorted by ``(j, i)``: at
    row ``j``'s turn every earlier row is decided."""
    undecided, kept, dropped = 0, 1, 2
    previous = -1
    for a, b in zip(ci.tolist(), cj.tolist(), strict=True):
        if b != previous:
            if previous >= 0 and state[previous] == undecided:
                state[previous] = kept
            previous = b
        if state[b] == undecided and state[a] == kept:
            state[b], owner[b] = dropped, a
    if previous >= 0 and state[previous] == undecided:
        state[previous] = kept
