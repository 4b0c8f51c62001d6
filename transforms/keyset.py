"""A compact, exact set of 128-bit keys, each with a 128-bit value, as sorted numpy runs.

Keys and values are held as pairs of ``uint64`` words (the raw 16 bytes of an XXH3-128
digest, see :func:`hex_words`), 32 bytes per key in all, instead of a dict of hex strings
(about 200 bytes per key). The set is log-structured, as an LSM tree's levels (O'Neil et
al., 1996, "The log-structured merge-tree"): each :meth:`KeySet.add` appends one run sorted
by the key's first word, and a run is merged into the one before it while it is at least
as large (a binary counter), so a lookup searches O(log n) runs and merging costs
O(n log n) in all.

As in an LSM tree's disk components, a run of at least ``spill_keys`` keys (default
:data:`SPILL_KEYS`) keeps only its sorted first words in memory, 8 bytes per key; its
*records* (the key's second word and the value, 24 bytes) lie in the same order in an
anonymous temporary file (:func:`tempfile.TemporaryFile`, in ``TMPDIR``: unlinked at once,
so nothing is left behind even if the process is killed; the page cache, not the process,
holds what is read often). A lookup searches the first words, then reads with one
``pread`` each only the records of its candidates (the keys present, about one row in ten
in a build, and the rare keys that share a first word), never through a memory map of the
file, whose touched pages would count in the resident set. Merges stream both runs in
blocks of at most :data:`MERGE_BLOCK` keys of each (cut on the two runs' merge path), in
buffers reused from block to block; a spilled run's first words are in an anonymous memory
map of their own (:func:`mapped_words`), and a merge gives back the pages of its inputs'
first words as it goes, so even the largest merge holds about one copy of the set's first
words, not two. Smaller runs keep their records in memory. On disk, the set takes 24 bytes
per key of the spilled runs, and a merge the records of its inputs and its output.

Keys compare as full 128 bits, so the set is exact: runs are ordered by the first word
only, and a lookup reads and compares the second word of every record sharing its first
word (with hashes, rarely more than one: some pair of n keys shares a first word with
probability about n^2 / 2^65).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import repeat
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.ids import contiguous

Words = np.ndarray
"""``(n, 2)`` ``uint64``: the 16 raw bytes of a 128-bit digest (memory order)."""

SPILL_KEYS = 1 << 20
"""Runs of at least this many keys keep only their first words in memory (see above): the
runs below it (of different sizes but for a moment) hold fewer keys than this, 32 bytes
each (32 MiB at most). Each merge level at or above it writes every record to a file once
more: with ``1 << 18``, ``bench/dedup_state.py`` added 4M keys about 0.2 s slower (two
levels more), for a peak RSS 35 MiB lower at 1M keys that grew by 7.7 bytes per key
from 1M to 4M keys (9.6 with ``1 << 20``)."""
MERGE_BLOCK = 1 << 16
"""Keys of each run merged at a time (a block of two is at most 4 MiB of records)."""
RECORD = 3
"""``uint64`` words of a record: the key's second word, then the value's two words."""
_WORD = 8  # bytes per word
_DROPPED = np.zeros(0, np.uint64)  # stands in for a merged run's first words


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
    are disjoint. Runs of at least ``spill_keys`` keys keep their records in a temporary
    file (see the module's docstring). Picklable: a pickle holds every record, and its
    runs spill again when loaded."""

    def __init__(self, spill_keys: int = SPILL_KEYS) -> None:
        self.spill_keys = spill_keys
        self.runs: list[Run] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    @property
    def nbytes(self) -> int:
        """Bytes of arrays in memory: first words, and the records of the unspilled runs
        (not the spilled records, see :attr:`spilled_bytes`)."""
        return sum(run.nbytes for run in self.runs)

    @property
    def spilled_bytes(self) -> int:
        """Bytes of records in temporary files."""
        return sum(RECORD * _WORD * len(run) for run in self.runs if run.file is not None)

    def find(self, keys: Words) -> tuple[np.ndarray, Words]:
        """Which of ``keys`` (distinct; sorted keeps the lookups cache-friendly and the
        reads in file order) are in the set, and their values (zeros where absent)."""
        found = np.zeros(len(keys), dtype=bool)
        values = np.zeros((len(keys), 2), dtype=np.uint64)
        todo = np.arange(len(keys))
        for run in reversed(self.runs):  # newest (smallest) first
            if not len(todo):
                break
            hit, run_values = run.find(keys[todo, 0], keys[todo, 1])
            found[todo[hit]] = True
            values[todo[hit]] = run_values
            todo = np.delete(todo, hit)
        return found, values

    def add(self, keys: Words, values: Words) -> None:
        """Add ``keys``, distinct, sorted as :func:`group_keys` returns them and absent from
        the set, with their values."""
        if not len(keys):
            return
        records = np.concatenate([keys[:, 1:], values], axis=1)
        self.runs.append(Run.of(keys[:, 0], records, len(keys) >= self.spill_keys))
        while len(self.runs) > 1 and len(self.runs[-1]) >= len(self.runs[-2]):
            newer, older = self.runs.pop(), self.runs.pop()
            spill = len(older) + len(newer) >= self.spill_keys
            self.runs.append(merge(older, newer, spill))


class Run:
    """One run: its keys' first words (sorted, in memory) and their records in the same
    order, ``(n, RECORD)`` ``uint64``, in memory or spilled to ``file``. Keys that share a
    first word may be in any order. Pickles as its arrays, and spills again when loaded."""

    __slots__ = ("file", "hi", "records")

    def __init__(
        self, hi: np.ndarray, records: np.ndarray | None, file: IO[bytes] | None = None
    ) -> None:
        self.hi, self.records, self.file = hi, records, file

    @classmethod
    def of(cls, hi: np.ndarray, records: np.ndarray, spill: bool) -> Run:
        """A run of ``hi`` (sorted) and ``records`` (copied), spilled if ``spill``."""
        writer = RunWriter(len(hi), spill)
        writer.write(hi, records)
        return writer.finish()

    def __reduce__(self) -> tuple:
        records = np.empty((len(self), RECORD), np.uint64)
        self.read_into(records, 0)
        return Run.of, (self.hi, records, self.file is not None)

    def __len__(self) -> int:
        return len(self.hi)

    @property
    def nbytes(self) -> int:
        """Bytes in memory (the first words, and the records unless spilled)."""
        return self.hi.nbytes + (self.records.nbytes if self.records is not None else 0)

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fill ``out`` with the records from ``start`` on."""
        if self.records is not None:
            out[:] = self.records[start : start + len(out)]
        else:
            assert self.file is not None
            _pread_into(self.file.fileno(), out, start * RECORD * _WORD)

    def gather(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """The records of the spans ``starts[i]`` to ``stops[i]``, one after the other:
        one ``pread`` a span if spilled."""
        if self.records is not None:
            return np.take(self.records, _spans(starts, stops), axis=0)
        assert self.file is not None
        size = RECORD * _WORD
        data = b"".join(
            map(
                os.pread,
                repeat(self.file.fileno()),
                (size * (stops - starts)).tolist(),
                (size * starts).tolist(),
            )
        )
        if len(data) != size * int((stops - starts).sum()):
            raise OSError("short read from a spilled run")
        return np.frombuffer(data, np.uint64).reshape(-1, RECORD)

    def find(self, key_hi: np.ndarray, key_lo: np.ndarray) -> tuple[np.ndarray, Words]:
        """Which keys are in the run (indices into ``key_hi``, ascending) and their values.
        Only the records whose first word is a key's are read."""
        start = np.searchsorted(self.hi, key_hi)
        candidates = np.flatnonzero(_holds(self.hi, start, key_hi))
        start, key_hi = start[candidates], key_hi[candidates]
        stop = start + 1
        shared = np.flatnonzero(_holds(self.hi, stop, key_hi))  # rare: a first word shared
        stop[shared] = np.searchsorted(self.hi, key_hi[shared], side="right")
        records = self.gather(start, stop)
        owner = np.repeat(candidates, stop - start)
        match = records[:, 0] == key_lo[owner]
        return owner[match], records[match, 1:]

    def close(self) -> None:
        """Drop the arrays and the file (once merged into another run)."""
        self.hi, self.records = _DROPPED, None
        if self.file is not None:
            self.file.close()
            self.file = None


class RunWriter:
    """Builds a run of ``n`` keys from blocks given in order: into arrays, or (``spill``)
    the first words into :func:`mapped_words` and the records into an anonymous temporary
    file."""

    def __init__(self, n: int, spill: bool) -> None:
        self.n, self.done = n, 0
        # The file lives as long as the run (closed by Run.close, or when collected).
        with _spilling():
            self.file = tempfile.TemporaryFile(buffering=0) if spill else None  # noqa: SIM115
        self.hi = mapped_words(n) if spill else np.empty(n, np.uint64)
        self.records = np.empty((0 if spill else n, RECORD), np.uint64)

    def write(self, hi: np.ndarray, records: np.ndarray) -> None:
        """Append keys (first words ``hi``) and their records."""
        start, stop = self.done, self.done + len(hi)
        self.hi[start:stop] = hi
        if self.file is None:
            self.records[start:stop] = records
        else:
            with _spilling():
                _pwrite(self.file.fileno(), records, start * RECORD * _WORD)
        self.done = stop

    def finish(self) -> Run:
        """The run (all ``n`` keys written)."""
        assert self.done == self.n
        return Run(self.hi, None if self.file else self.records, self.file)


def merge(older: Run, newer: Run, spill: bool) -> Run:
    """One run from two (disjoint keys), spilled if ``spill``; consumes both. Block by
    block (see :func:`merge_path`) in buffers reused from block to block, each block a
    near-linear timsort of two sorted pieces; the first words of the blocks merged are
    given back (:func:`release`) as the merged run's are written."""
    writer = RunWriter(len(older) + len(newer), spill)
    cuts_old, cuts_new = merge_path(older.hi, newer.hi, MERGE_BLOCK)
    size = min(2 * MERGE_BLOCK, writer.n)
    hi_in, hi_out = np.empty(size, np.uint64), np.empty(size, np.uint64)
    records_in, records_out = (np.empty((size, RECORD), np.uint64) for _ in range(2))
    for i0, i1, j0, j1 in zip(
        cuts_old[:-1], cuts_old[1:], cuts_new[:-1], cuts_new[1:], strict=True
    ):
        split, n = i1 - i0, i1 - i0 + j1 - j0
        hi_in[:split], hi_in[split:n] = older.hi[i0:i1], newer.hi[j0:j1]
        older.read_into(records_in[:split], i0)
        newer.read_into(records_in[split:n], j0)
        order = np.argsort(hi_in[:n], kind="stable")
        writer.write(
            np.take(hi_in, order, out=hi_out[:n], mode="clip"),  # "raise" buffers out
            np.take(records_in, order, axis=0, out=records_out[:n], mode="clip"),
        )
        release(older.hi, i1)
        release(newer.hi, j1)
    older.close()
    newer.close()
    return writer.finish()


def merge_path(old: np.ndarray, new: np.ndarray, block: int) -> tuple[list[int], list[int]]:
    """Cuts ``(i, j)`` of the stable merge of two sorted arrays (``old`` first among equal
    values): its first ``i + j`` values are ``old[:i]`` and ``new[:j]``. They run from
    ``(0, 0)`` to the ends, cut at every multiple of ``block`` in either array, so no piece
    holds more than ``block`` values of each."""
    at_old = np.arange(0, len(old), block)
    at_new = np.arange(0, len(new), block)
    i = np.concatenate([[0], at_old, np.searchsorted(old, new[at_new], side="right"), [len(old)]])
    j = np.concatenate([[0], np.searchsorted(new, old[at_old]), at_new, [len(new)]])
    order = np.argsort(i + j, kind="stable")  # one step of the path adds 1 to i or to j
    return i[order].tolist(), j[order].tolist()


def _holds(words: np.ndarray, where: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Whether ``words[where]`` is ``values`` (false where ``where`` is past the end)."""
    return (where < len(words)) & (words[np.minimum(where, len(words) - 1)] == values)


def _spans(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The indices ``starts[k]`` to ``stops[k]``, for each ``k`` in turn."""
    counts = stops - starts
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(ends[-1] if len(ends) else 0)


def mapped_words(n: int) -> np.ndarray:
    """``n`` zero ``uint64`` words in a private anonymous memory map of their own: its
    pages are resident once written, given back by :func:`release` and when the array is
    collected (the heap would keep a freed run's pages: glibc serves blocks up to 32 MiB
    from it once one was freed)."""
    memory = mmap.mmap(-1, max(n, 1) * _WORD, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(memory, np.uint64, count=n)


def release(words: np.ndarray, stop: int) -> None:
    """Give back the whole memory pages of ``words[:stop]``, which read as zeros from then
    on, if ``words`` is from :func:`mapped_words` (else nothing)."""
    base = words.base
    if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
        size = stop * words.itemsize // mmap.PAGESIZE * mmap.PAGESIZE
        if size:
            base.obj.madvise(mmap.MADV_DONTNEED, 0, size)


class SpillError(OSError):
    """A spilled run's records could not be written to the temporary folder (``errno`` is
    the cause's; the message is the whole story, without the ``[Errno N]`` prefix)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@contextmanager
def _spilling() -> Iterator[None]:
    """Name the temporary folder, and what it must hold, in an error writing a spilled run
    (a full disk's bare ``[Errno 28] No space left on device`` names neither)."""
    try:
        yield
    except OSError as exc:
        raise SpillError(
            exc.errno,
            f"the key set could not spill its records to the temporary folder "
            f"{tempfile.gettempdir()} ({exc.strerror or exc}): it needs about {RECORD * _WORD} "
            f"bytes per distinct key there (and twice that while merging); set TMPDIR to a "
            f"folder with room",
        ) from exc


def _pwrite(fd: int, array: np.ndarray, offset: int) -> None:
    """Write ``array``'s bytes at ``offset``."""
    view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill ``out`` (contiguous) with the bytes at ``offset``."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    while view:
        done = os.preadv(fd, [view], offset)
        if not done:
            raise OSError("short read from a spilled run")
        view, offset = view[done:], offset + done
