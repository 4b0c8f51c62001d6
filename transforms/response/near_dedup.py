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
  index. Computed here by a Numba kernel (one pass over a shard's shingles, the loop over
  the permutations vectorised), because datasketch computes them one row at a time in
  Python (``MinHash.bulk`` too), and rensa, the fast Rust library, uses another hash
  family (R-MinHash) and hands its matrices out only as Python lists;
- banding, the index and the verification are hand-written (Numba kernels, compiled once
  and cached with ``cache=True``), because rensa's ``RMinHashLSH`` answers queries only
  for its own ``RMinHash`` objects and keeps no signatures to verify a candidate against,
  and datasketch's ``MinHashLSH`` goes row by row in Python. The ordered pass is itself a
  row-by-row loop, compiled: each row looks up its band keys among earlier shards' kept
  rows (sorted runs with radix tables) and then among this shard's earlier kept rows (an
  open-addressing multimap), verifying only a candidate earlier than the best found.

A duplicate is decided by the number of equal minhashes, as datasketch's ``jaccard``
does. With ``signature_bits=32`` (the default) the decisions are datasketch's exactly (the
same permutations, the same bands, the same count): ``bench/dedup.py`` checks it on 200k
rows. Fewer bits (b-bit minwise hashing, Li & König 2010) halve or quarter the stored
signatures, but a chance match of the low bits (probability ``2^-bits`` per permutation)
can tip a pair at the threshold: with 16 bits, one pair of 104,841 on the 200k-row
benchmark corpus.

Memory is bounded by the kept rows, never their texts: per kept row its id (32 bytes), its
signature (``signature_bits`` × 128 / 8 = 512 bytes at the default), ``b`` band keys (12
bytes each) and about one byte of radix table per key: about 750 bytes per kept row at the
defaults (480 with 16 bits).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from transforms.memory import release_freed_memory
from transforms.response.shingles import normalised, raw_texts
from transforms.schema import rejected
from transforms.stage import StageResult, reject_table
from transforms.text import byte_chunks

STAGE = "near_dedup"


class NearDedupParams(BaseModel):
    """MinHash LSH settings (published defaults: word 5-grams, 128 permutations, 0.8)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(default=0.8, gt=0, lt=1)
    num_perm: int = Field(default=128, ge=16, le=1024)
    ngram: int = Field(default=5, ge=1)
    bands: int | None = Field(default=None, ge=1, description="default: optimal for threshold")
    false_negative_weight: float = Field(default=0.95, gt=0, lt=1)
    seed: int = Field(default=1, description="datasketch's default seed")
    signature_bits: Literal[8, 16, 32] = 32


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


def _kernels() -> ModuleType:
    """:mod:`transforms.response.minhash_kernels`, imported (with Numba) on first use."""
    from transforms.response import minhash_kernels

    return minhash_kernels


def lsh_shape(params: NearDedupParams) -> tuple[int, int]:
    """``(bands, rows per band)`` of the index."""
    if params.bands:
        return params.bands, params.num_perm // params.bands
    return optimal_bands(params.threshold, params.num_perm, params.false_negative_weight)


@cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)``, each ``(num_perm,)`` uint32: datasketch's ``affine32`` parameters for
    ``seed`` (odd multipliers, then offsets, drawn by ``RandomState(seed)``)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    a.flags.writeable = b.flags.writeable = False  # cached and shared across threads
    return a, b


def minhash_matrix(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """``(rows, num_perm)`` uint32 signatures of the rows whose shingle hashes are
    ``hashes[offsets[i]:offsets[i + 1]]`` (every row has at least one): datasketch's
    ``affine32`` MinHash of the low 32 bits of each hash, compiled (one pass over the
    shingles, a row at a time)."""
    a, b = permutations(num_perm, seed)
    offsets = offsets.astype(np.int64)
    if len(offsets) > 1 and np.diff(offsets).min() < 1:
        raise ValueError("minhash_matrix: every row needs at least one shingle")
    return _kernels().minhash_rows(hashes.astype(np.uint64, copy=False), offsets, a, b)


def _text_signatures(texts: pa.Array, params: NearDedupParams) -> np.ndarray:
    a, b = permutations(params.num_perm, params.seed)
    rows = _kernels().signature_rows
    parts = [rows(data, bounds, params.ngram, a, b) for _, data, bounds in byte_chunks(texts)]
    if not parts:
        return np.zeros((0, params.num_perm), np.uint32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def signatures(table: pa.Table, params: NearDedupParams) -> np.ndarray:
    """``(rows, num_perm)`` uint32 MinHash signatures of each row's shingles (those of
    :func:`~transforms.response.shingles.row_texts`)."""
    text, non_ascii = raw_texts(table)
    sig = _text_signatures(text, params)
    if len(non_ascii):  # hashed again once normalised: no copy of the whole text
        sig[non_ascii] = _text_signatures(normalised(text.take(pa.array(non_ascii))), params)
    return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint64 keys: each band's ``rows`` values folded, salted by the band
    (the shingles' fold of ``[j + 1, *values]``, compiled)."""
    return _kernels().band_key_rows(np.ascontiguousarray(sig), bands, rows)


_RUN_RATIO = 4


class Run(NamedTuple):
    """Band keys of kept rows, sorted, with the kept number of each, and a radix table
    over the top ``64 - shift`` bits of the keys (4 to 8 keys per bucket): a lookup reads
    one bucket instead of a binary search."""

    keys: np.ndarray
    kept: np.ndarray
    table: np.ndarray
    shift: int

    @classmethod
    def of(cls, keys: np.ndarray, kept: np.ndarray) -> Run:
        if len(keys) >= 2**31:  # the radix table holds int32 positions
            raise ValueError(
                f"near_dedup: {len(keys):,} band keys in one run (2^31 at most: about 134M "
                "kept rows at 16 bands); run the build with --partitions"
            )
        bits = max(1, (len(keys) // 8).bit_length())
        return cls(keys, kept, _kernels().radix_table(keys, 64 - bits), 64 - bits)


class NearDedupIndex:
    """The kept rows seen so far: ids, compact signatures, and their band keys in sorted
    runs for lookup. The state the ordered stage carries across shards.

    Each shard's kept rows add one sorted run of band keys; a run is merged into the one
    before it while that one is at most :data:`_RUN_RATIO` times as large, so the runs
    shrink geometrically (a lookup searches O(log shards) runs, a few in practice: later
    shards keep fewer rows, and a plain binary counter would leave one run per shard) and
    the merging costs O(n log n) over a build. Signatures live in one buffer, resized in
    place (``realloc``) to the rows kept: it is most of the index, and a grown copy would
    hold it twice at its largest.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._sigs = np.zeros((0, 0), dtype=np.uint16)
        self.runs: list[Run] = []

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sigs(self) -> np.ndarray:
        """``(kept rows, num_perm)`` compact signatures."""
        return self._sigs[: len(self.ids)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (signature buffer included), plus 32 per id."""
        runs = sum(r.keys.nbytes + r.kept.nbytes + r.table.nbytes for r in self.runs)
        return self._sigs.nbytes + runs + 32 * len(self.ids)

    def earliest_similar(self, keys: np.ndarray, small: np.ndarray, need: int) -> np.ndarray:
        """For each row of ``keys`` (n × bands) with compact signatures ``small``: the
        earliest kept row that shares a band with it and has at least ``need`` equal
        minhashes, or ``len(self)`` when none does."""
        best = np.full(len(keys), len(self), np.int64)
        for run in self.runs:
            _kernels().best_in_run(keys, small, self.sigs, need, *run, best)
        return best

    def add(self, ids: list[str], sigs: np.ndarray, keys: np.ndarray) -> None:
        start, end = len(self.ids), len(self.ids) + len(ids)
        if self._sigs.shape[1:] != sigs.shape[1:] or self._sigs.dtype != sigs.dtype:
            self._sigs = np.zeros((0, *sigs.shape[1:]), sigs.dtype)
        if self._sigs.shape[0] < end:
            try:  # to the rows needed, in place (realloc: no copy held beside it)
                self._sigs.resize((end, *sigs.shape[1:]), refcheck=True)
            except ValueError:  # a view of it is alive: a copy, a quarter larger
                rows = max(end, self._sigs.shape[0] * 5 // 4)
                grown = np.zeros((rows, *sigs.shape[1:]), sigs.dtype)
                grown[:start] = self._sigs[:start]
                self._sigs = grown
        self._sigs[start:end] = sigs
        self.ids.extend(ids)
        numbers = np.repeat(np.arange(start, end, dtype=np.uint32), keys.shape[1])
        order = np.argsort(keys.ravel(), kind="stable")
        run = (keys.ravel()[order], numbers[order])
        while self.runs and len(self.runs[-1].keys) <= _RUN_RATIO * len(run[0]):
            earlier = self.runs.pop()
            run = _kernels().merge_runs(earlier.keys, earlier.kept, *run)
        self.runs.append(Run.of(*run))


def _compact(sig: np.ndarray, bits: int) -> np.ndarray:
    if bits == 32:
        return sig
    dtype = np.uint16 if bits == 16 else np.uint8
    return (sig & np.uint32((1 << bits) - 1)).astype(dtype)


def _chance(bits: int) -> float:
    """The chance that two different ``bits``-bit minhashes are equal, corrected out of the
    estimate below 32 bits (b-bit minwise hashing); at 32 bits none is, so that a pair
    reaches the threshold exactly when datasketch's ``jaccard`` does (with the correction,
    96 of 128 equal fell just short of 0.75)."""
    return 2.0**-bits if bits < 32 else 0.0


def estimated_jaccard(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """Jaccard estimates of the rows of ``a`` against the rows of ``b`` (pairwise, or one
    row against many) from ``bits``-bit minhashes (chance matches, ``2^-bits``, corrected
    below 32 bits; at 32, the plain share of equal minhashes, as datasketch's ``jaccard``)."""
    match = (b == a).mean(axis=-1)
    chance = _chance(bits)
    return (match - chance) / (1 - chance)


@cache
def _min_matches(num_perm: int, bits: int, threshold: float) -> int:
    """The fewest equal minhashes (of ``num_perm``) whose :func:`estimated_jaccard` reaches
    ``threshold``: the same float arithmetic, so comparing counts decides as the estimate."""
    chance = _chance(bits)
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
    """Which pairs ``(a[rows_a[k]], b[rows_b[k]])`` reach ``threshold``: their equal
    minhashes counted (compiled, no gathered copies) against the fewest that reach it."""
    need = _min_matches(a.shape[1], bits, threshold)
    return _kernels().similar_pair_rows(a, np.asarray(rows_a), b, np.asarray(rows_b), need)


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
    release_freed_memory()  # the last shard's temporaries (its tables, kept by nobody now)
    if prepared is None:
        prepared = prepare(table, params)
        release_freed_memory()  # the joined text and full signatures prepare made
    small, keys = prepared["signatures"], prepared["band_keys"]
    if small.shape != (n, params.num_perm) or keys.shape != (n, b):
        raise ValueError(
            f"near_dedup: prepared arrays {small.shape} / {keys.shape} do not fit a shard "
            f"of {n} rows with {params.num_perm} permutations in {b} bands"
        )
    ids = table.column("id").to_pylist()
    need = _min_matches(params.num_perm, params.signature_bits, params.threshold)
    # Against the kept rows of earlier shards (all earlier than this shard's): the earliest
    # similar one; then inside this shard, in row order, the earliest earlier kept row.
    earlier = index.earliest_similar(keys, small, need)
    dropped = earlier < len(index)
    inside = _kernels().owners_in_shard(keys, small, need, dropped)
    kept = ~dropped & (inside < 0)
    reasons = [
        f"near_duplicate_of:{index.ids[e] if e < len(index) else ids[s]}"
        for e, s in zip(earlier[~kept].tolist(), inside[~kept].tolist(), strict=True)
    ]
    keep = pa.array(kept)
    index.add([ids[i] for i in np.flatnonzero(kept)], small[kept], keys[kept])
    return StageResult(
        kept=table.filter(keep),
        rejected=reject_table(rejected(table.filter(pc.invert(keep)), STAGE, reasons)),
        stats={"bands": b, "rows_per_band": r, "index_rows": len(index)},
    )
