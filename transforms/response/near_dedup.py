"""Stage ``near_dedup``: near-duplicate removal with MinHash LSH over word 5-gram shingles.

MinHash (Broder 1997) estimates the Jaccard similarity of two rows' shingle sets; LSH
banding (Indyk & Motwani 1998; as in datasketch's ``MinHashLSH``) finds the candidate pairs
without comparing all of them. Defaults: word 5-grams of the prompt and the response
(:mod:`transforms.response.shingles`), 128 permutations, Jaccard threshold 0.8, and the
bands ``b`` and rows per band ``r`` that minimise the weighted false-positive and
false-negative areas under the S-curve (datasketch's optimisation, recomputed here).
Deviation from datasketch's default weights (0.5, 0.5): every candidate is verified
against the threshold, so a false positive costs one comparison while a false negative
keeps a duplicate; the default weights are (0.05, 0.95), giving ``b = 16, r = 8`` at 0.8
and 128 permutations: a pair at Jaccard 0.84 becomes a candidate with probability 0.99
(0.63 with (0.5, 0.5), which finds ``b = 9, r = 13``).

The stage is *ordered*: shards arrive in order with one :class:`NearDedupIndex` carried
across them, so a row is compared with every earlier kept row of the build. A row is a
duplicate when a kept row shares a band with it **and** their estimated Jaccard similarity
(from the stored signatures) is at least the threshold; it goes to ``rejected`` with
reason ``near_duplicate_of:<kept id>`` naming the earliest such kept row. The first
occurrence is kept. What needs no other row (shingles, signatures, band keys: most of the
cost) is :func:`prepare`, which the flow runs per shard ahead of the ordered pass.

What does what:

- signatures: datasketch's MinHash, scheme ``affine32`` (its default since 2.0): each
  shingle's 32-bit hash is mixed once with the MurmurHash3 finalizer, then permutation ``k``
  is ``a_k * h + b_k mod 2^32`` with the odd ``a_k`` and the ``b_k`` that
  ``numpy.random.RandomState(seed)`` draws, and the signature is the minimum per
  permutation. The values are bit for bit those of ``datasketch.MinHash(num_perm, seed,
  hashfunc=<our 32-bit shingle hash>)`` (a test checks it), so near_dedup decides as
  datasketch with the same permutations would, and its signatures can go into a datasketch
  index. Computed here with numpy over every shingle of a shard at once, because
  datasketch computes them one row at a time in Python (``MinHash.bulk`` too), and rensa,
  the fast Rust library, uses another hash family (R-MinHash) and hands its matrices out
  only as Python lists;
- banding, the index and the verification are hand-written with numpy, because rensa's
  ``RMinHashLSH`` answers queries only for its own ``RMinHash`` objects and keeps no
  signatures to verify a candidate against, and datasketch's ``MinHashLSH`` goes row by row.

Memory is bounded by the kept rows, never their texts: per kept row its id (32 bytes), its
signature cut to the low ``signature_bits`` bits of each permutation (b-bit minwise
hashing, Li & König 2010; 16 bits × 128 = 256 bytes) and ``b`` band keys (12 bytes each):
about 480 bytes per kept row at the defaults.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from transforms.response.shingles import fold, row_texts, shingle_hashes
from transforms.schema import rejected
from transforms.stage import StageResult, reject_table

STAGE = "near_dedup"
_CHUNK = 65_536  # pairs compared at once


class NearDedupParams(BaseModel):
    """MinHash LSH settings (published defaults: word 5-grams, 128 permutations, 0.8)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(default=0.8, gt=0, lt=1)
    num_perm: int = Field(default=128, ge=16, le=1024)
    ngram: int = Field(default=5, ge=1)
    bands: int | None = Field(default=None, ge=1, description="default: optimal for threshold")
    false_negative_weight: float = Field(default=0.95, gt=0, lt=1)
    seed: int = Field(default=1, description="datasketch's default seed")
    signature_bits: Literal[8, 16, 32] = 16


@cache
def optimal_bands(threshold: float, num_perm: int, fn_weight: float = 0.5) -> tuple[int, int]:
    """``(b, r)`` with ``b * r <= num_perm`` minimising ``(1 - fn_weight)`` × the
    false-positive area plus ``fn_weight`` × the false-negative area of the LSH S-curve
    ``1 - (1 - s^r)^b`` around ``threshold``."""
    best, best_err = (1, num_perm), float("inf")
    lo, hi = np.linspace(0, threshold, 512), np.linspace(threshold, 1, 512)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo**r) ** b, lo)
            fn = np.trapezoid((1 - hi**r) ** b, hi)
            err = (1 - fn_weight) * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def lsh_shape(params: NearDedupParams) -> tuple[int, int]:
    """``(bands, rows per band)`` of the index."""
    if params.bands:
        return params.bands, params.num_perm // params.bands
    return optimal_bands(params.threshold, params.num_perm, params.false_negative_weight)


_SHINGLES_PER_CHUNK = 16_384  # the (permutations x shingles) block stays in cache


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (a bijection), as datasketch pre-mixes input hashes."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


@cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)``, each ``(num_perm, 1)`` uint32: datasketch's ``affine32`` parameters for
    ``seed`` (odd multipliers, then offsets, drawn by ``RandomState(seed)``)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    a, b = a[:, None], b[:, None]
    a.flags.writeable = b.flags.writeable = False  # cached and shared across threads
    return a, b


def minhash_matrix(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """``(rows, num_perm)`` uint32 signatures of the rows whose shingle hashes are
    ``hashes[offsets[i]:offsets[i + 1]]`` (every row has at least one): datasketch's
    ``affine32`` MinHash of the low 32 bits of each hash, computed for a block of rows at a
    time as a ``(num_perm, shingles)`` product reduced per row."""
    a, b = permutations(num_perm, seed)
    offsets = offsets.astype(np.int64)
    if len(offsets) > 1 and np.diff(offsets).min() < 1:
        raise ValueError("minhash_matrix: every row needs at least one shingle")
    mixed = _fmix32((hashes & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    rows = len(offsets) - 1
    out = np.empty((rows, num_perm), dtype=np.uint32)
    # row blocks of about _SHINGLES_PER_CHUNK shingles; a longer row is a block of its own,
    # taken _SHINGLES_PER_CHUNK shingles at a time
    starts = np.searchsorted(offsets, np.arange(0, offsets[-1], _SHINGLES_PER_CHUNK))
    bounds = np.unique(np.append(starts, rows))
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        start, end = int(offsets[lo]), int(offsets[hi])
        if hi - lo == 1 and end - start > _SHINGLES_PER_CHUNK:
            out[lo] = np.iinfo(np.uint32).max
            for piece in range(start, end, _SHINGLES_PER_CHUNK):
                block = a * mixed[piece : min(end, piece + _SHINGLES_PER_CHUNK)]
                block += b
                np.minimum(out[lo], block.min(axis=1), out=out[lo])
            continue
        block = a * mixed[start:end]
        block += b
        out[lo:hi] = np.minimum.reduceat(block, offsets[lo:hi] - start, axis=1).T
    return out


def signatures(table: pa.Table, params: NearDedupParams) -> np.ndarray:
    """``(rows, num_perm)`` uint32 MinHash signatures of each row's shingles."""
    hashes, offsets = shingle_hashes(row_texts(table), params.ngram)
    return minhash_matrix(hashes, offsets, params.num_perm, params.seed)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint64 keys: each band's ``rows`` values folded, salted by the band."""
    out = np.empty((len(sig), bands), dtype=np.uint64)
    columns = sig.T.astype(np.uint64, order="C")  # one contiguous array per permutation
    for j in range(bands):
        salt = np.full(len(sig), j + 1, dtype=np.uint64)
        out[:, j] = fold([salt, *columns[j * rows : (j + 1) * rows]])
    return out


def _distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values (as ``np.unique``, which is many times slower here)."""
    values = np.sort(values)
    return values[_starts(values)]


def _starts(values: np.ndarray) -> np.ndarray:
    """Where each run of equal values of a sorted array starts (a boolean mask)."""
    mask = np.empty(len(values), dtype=bool)
    mask[:1] = True
    np.not_equal(values[1:], values[:-1], out=mask[1:])
    return mask


class NearDedupIndex:
    """The kept rows seen so far: ids, compact signatures, and their band keys in sorted
    runs for lookup. The state the ordered stage carries across shards.

    Each shard's kept rows add one sorted run of band keys; a run is merged into the one
    before it while it is at least as large (a binary counter), so a lookup searches
    O(log shards) runs and the merging costs O(n log n) over a build. Signatures live in
    a buffer that doubles when full.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._sigs = np.zeros((0, 0), dtype=np.uint16)
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, kept numbers)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sigs(self) -> np.ndarray:
        """``(kept rows, num_perm)`` compact signatures."""
        return self._sigs[: len(self.ids)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (signature buffer included), plus 32 per id."""
        runs = sum(k.nbytes + r.nbytes for k, r in self.runs)
        return self._sigs.nbytes + runs + 32 * len(self.ids)

    def candidates(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct ``(row, kept number)`` pairs: rows of ``keys`` (n × bands) and the kept
        rows that share a band with them, sorted by row then kept number."""
        bands = keys.shape[1]
        order = np.argsort(keys.ravel())  # sorted needles: searchsorted stays cache-friendly
        flat, owners = keys.ravel()[order], order // bands
        found_rows, found_kept = [], []
        for run_keys, run_rows in self.runs:
            left = np.searchsorted(run_keys, flat, side="left")
            count = np.searchsorted(run_keys, flat, side="right") - left
            total = int(count.sum())
            if total:
                found_rows.append(np.repeat(owners, count))
                first = np.repeat(left - (np.cumsum(count) - count), count)
                found_kept.append(run_rows[first + np.arange(total)].astype(np.int64))
        if not found_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        size = len(self.ids) + 1
        pair = _distinct(np.concatenate(found_rows) * size + np.concatenate(found_kept))
        return pair // size, pair % size

    def add(self, ids: list[str], sigs: np.ndarray, keys: np.ndarray) -> None:
        start, end = len(self.ids), len(self.ids) + len(ids)
        if self._sigs.shape[0] < end or self._sigs.shape[1] != sigs.shape[1]:
            grown = np.zeros((max(end, 2 * self._sigs.shape[0]), sigs.shape[1]), sigs.dtype)
            if start:
                grown[:start] = self._sigs[:start]
            self._sigs = grown
        self._sigs[start:end] = sigs
        self.ids.extend(ids)
        numbers = np.repeat(np.arange(start, end, dtype=np.uint32), keys.shape[1])
        order = np.argsort(keys.ravel(), kind="stable")
        self.runs.append((keys.ravel()[order], numbers[order]))
        while len(self.runs) > 1 and len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            (k2, r2), (k1, r1) = self.runs.pop(), self.runs.pop()
            merged_keys, merged_rows = np.concatenate([k1, k2]), np.concatenate([r1, r2])
            order = np.argsort(merged_keys, kind="stable")
            self.runs.append((merged_keys[order], merged_rows[order]))


def _compact(sig: np.ndarray, bits: int) -> np.ndarray:
    if bits == 32:
        return sig
    dtype = np.uint16 if bits == 16 else np.uint8
    return (sig & np.uint32((1 << bits) - 1)).astype(dtype)


def estimated_jaccard(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """Jaccard estimates of the rows of ``a`` against the rows of ``b`` (pairwise, or one
    row against many) from ``bits``-bit minhashes (chance matches, ``2^-bits``, corrected)."""
    match = (b == a).mean(axis=-1)
    chance = 2.0**-bits
    return (match - chance) / (1 - chance)


@cache
def _min_matches(num_perm: int, bits: int, threshold: float) -> int:
    """The fewest equal minhashes (of ``num_perm``) whose :func:`estimated_jaccard` reaches
    ``threshold``: the same float arithmetic, so comparing counts decides as the estimate."""
    chance = 2.0**-bits
    estimates = (np.arange(num_perm + 1) / num_perm - chance) / (1 - chance)
    reached = np.flatnonzero(estimates >= threshold)
    return int(reached[0]) if len(reached) else num_perm + 1


def similar_pairs(
    a: np.ndarray,
    rows_a: np.ndarray,
    b: np.ndarray,
    rows_b: np.ndarray,
    bits: int,
    threshold: float,
) -> np.ndarray:
    """Which pairs ``(a[rows_a[k]], b[rows_b[k]])`` reach ``threshold``: rows gathered and
    their equal minhashes counted in chunks (no float estimate per pair)."""
    out = np.zeros(len(rows_a), dtype=bool)
    need = _min_matches(a.shape[1], bits, threshold)
    for s in range(0, len(rows_a), _CHUNK):
        equal = a[rows_a[s : s + _CHUNK]] == b[rows_b[s : s + _CHUNK]]
        out[s : s + _CHUNK] = np.count_nonzero(equal, axis=1) >= need
    return out


def _shard_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``(earlier, later)`` row pairs of this shard that share a band key."""
    n, bands = keys.shape
    flat = keys.ravel()
    order = np.argsort(flat, kind="stable")  # ties stay in row order
    sorted_keys, sorted_rows = flat[order], (order // bands).astype(np.int64)
    earlier, later = [], []
    d = 1
    while d < len(flat):
        same = sorted_keys[d:] == sorted_keys[:-d]
        if not same.any():
            break
        earlier.append(sorted_rows[:-d][same])
        later.append(sorted_rows[d:][same])
        d += 1
    if not earlier:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    earlier_rows, later_rows = np.concatenate(earlier), np.concatenate(later)
    distinct = earlier_rows < later_rows
    pair = _distinct(later_rows[distinct] * n + earlier_rows[distinct])
    return pair % n, pair // n


Prepared = dict[str, np.ndarray]
"""What :func:`prepare` computes for a shard: ``signatures`` (compact) and ``band_keys``."""


def prepare(table: pa.Table, params: NearDedupParams) -> Prepared:
    """The work of near_dedup that needs no other row: each row's compact signature and
    band keys. It is most of the stage's cost (shingles, MinHash, band keys), so the flow
    runs it on every shard as shard-level tasks (spread over the workers by ``--runner
    dask``) before the ordered pass."""
    b, r = lsh_shape(params)
    sig = signatures(table, params) if table.num_rows else np.zeros((0, params.num_perm), np.uint32)
    return {"signatures": _compact(sig, params.signature_bits), "band_keys": band_keys(sig, b, r)}


def near_dedup(
    table: pa.Table, params: NearDedupParams, state: dict, prepared: Prepared | None = None
) -> StageResult:
    """Drop rows that are near duplicates of an earlier kept row (this shard or before).

    ``state`` is the carried dict; it holds the :class:`NearDedupIndex` under ``"index"``.
    ``prepared`` is :func:`prepare` of this table, when it was computed ahead.
    """
    index: NearDedupIndex = state.setdefault("index", NearDedupIndex())
    n = table.num_rows
    b, r = lsh_shape(params)
    prepared = prepare(table, params) if prepared is None else prepared
    small, keys = prepared["signatures"], prepared["band_keys"]
    if small.shape != (n, params.num_perm) or keys.shape != (n, b):
        raise ValueError(
            f"near_dedup: prepared arrays {small.shape} / {keys.shape} do not fit a shard "
            f"of {n} rows with {params.num_perm} permutations in {b} bands"
        )
    ids = table.column("id").to_pylist()
    bits, threshold = params.signature_bits, params.threshold
    owner: list[str | None] = [None] * n  # the kept row each duplicate names
    if len(index):  # against the kept rows of earlier shards: the earliest that is similar
        rows, numbers = index.candidates(keys)
        hit = similar_pairs(small, rows, index.sigs, numbers, bits, threshold)
        rows, numbers = rows[hit], numbers[hit]
        first = _starts(rows)  # rows are sorted: the earliest kept row of each
        for row, number in zip(rows[first].tolist(), numbers[first].tolist(), strict=True):
            owner[row] = index.ids[number]
    # Inside this shard, in row order: the earliest earlier row that is kept and similar.
    earlier, later = _shard_pairs(keys)
    hit = similar_pairs(small, earlier, small, later, bits, threshold)
    for j, i in zip(earlier[hit].tolist(), later[hit].tolist(), strict=True):
        if owner[i] is None and owner[j] is None:
            owner[i] = ids[j]
    kept = np.array([o is None for o in owner], dtype=bool)
    reasons = [f"near_duplicate_of:{o}" for o in owner if o is not None]
    keep = pa.array(kept)
    index.add([ids[i] for i in np.flatnonzero(kept)], small[kept], keys[kept])
    return StageResult(
        kept=table.filter(keep),
        rejected=reject_table(rejected(table.filter(pc.invert(keep)), STAGE, reasons)),
        stats={"bands": b, "rows_per_band": r, "index_rows": len(index)},
    )
