"""KeySet's spilled runs (records in temporary files) against a dict, with keys that share
their first word, merges cut into many blocks, and pickles."""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest

from transforms import keyset as keyset_module
from transforms.keyset import RECORD, KeySet, group_keys, mapped_words, merge_path, release

Reference = dict[tuple[int, int], tuple[int, int]]


def _shard(rng: np.random.Generator, size: int, known: list[tuple[int, int]]) -> np.ndarray:
    """``size`` keys: random ones, ones sharing a few first words (many per word), and
    about a fifth already seen (``known``), possibly repeated."""
    hi = rng.integers(0, 2**64 - 1, size=size, dtype=np.uint64)
    lo = rng.integers(0, 2**64 - 1, size=size, dtype=np.uint64)
    shared = rng.random(size) < 0.3
    hi[shared] = rng.integers(0, 6, size=int(shared.sum()), dtype=np.uint64)
    lo[shared] = rng.integers(0, 400, size=int(shared.sum()), dtype=np.uint64)
    keys = np.stack([hi, lo], axis=1)
    if known:
        old = rng.integers(0, len(known), size=size // 5)
        keys[: len(old)] = np.array(known, np.uint64)[old]
    return keys


def _feed(keyset: KeySet, reference: Reference, keys: np.ndarray, rng: np.random.Generator) -> int:
    """The stage's use: find the shard's distinct keys, check them against ``reference``,
    add the new ones with random values. Returns how many were found."""
    distinct, _, _ = group_keys(keys)
    found, values = keyset.find(distinct)
    for key, hit, value in zip(distinct.tolist(), found.tolist(), values.tolist(), strict=True):
        assert hit == (tuple(key) in reference)
        assert tuple(value) == reference.get(tuple(key), (0, 0))
    new = distinct[~found]
    new_values = rng.integers(0, 2**64 - 1, size=(len(new), 2), dtype=np.uint64)
    reference.update(zip(map(tuple, new.tolist()), map(tuple, new_values.tolist()), strict=True))
    keyset.add(new, new_values)
    assert len(keyset) == len(reference)
    return int(found.sum())


def _spilled(keyset: KeySet) -> list:
    return [run for run in keyset.runs if run.file is not None]


def test_spilled_runs_decide_as_a_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    """With runs of 100 keys or more spilled and merges cut every 16 keys, every lookup
    (values read back from the files) matches a dict, shared first words included; spilled
    runs keep only their first words in memory, and merged runs' files are closed."""
    monkeypatch.setattr(keyset_module, "MERGE_BLOCK", 16)
    rng = np.random.default_rng(5)
    keyset, reference = KeySet(spill_keys=100), {}
    found = 0
    for size in (60, 50, 70, 300, 40, 90, 500, 30, 200, 80, 120, 700, 10, 260):
        files = [run.file for run in _spilled(keyset)]
        found += _feed(keyset, reference, _shard(rng, size, list(reference)), rng)
        merged = [f for f in files if all(run.file is not f for run in keyset.runs)]
        assert all(f.closed for f in merged)
    assert found > 300
    spilled = _spilled(keyset)
    assert spilled and len(keyset.runs) < 6
    in_memory = [run for run in keyset.runs if run.file is None]
    assert all(len(run) < 100 for run in in_memory)
    assert keyset.nbytes == 8 * len(keyset) + sum(run.records.nbytes for run in in_memory)
    assert keyset.spilled_bytes == 8 * RECORD * sum(len(run) for run in spilled)
    for run in spilled:  # runs are sorted by first word; the file holds just the records
        assert (run.hi[1:] >= run.hi[:-1]).all()
        assert run.file.seek(0, 2) == 8 * RECORD * len(run)
    hi = np.concatenate([run.hi for run in keyset.runs])
    assert len(np.unique(hi)) < len(hi)  # first words are shared within or across runs


def test_spilled_keyset_pickles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle holds the spilled records; the loaded set spills again, into files of its
    own, and decides as the original (and as a dict) from then on."""
    monkeypatch.setattr(keyset_module, "MERGE_BLOCK", 32)
    rng = np.random.default_rng(8)
    keyset, reference = KeySet(spill_keys=64), {}
    for size in (200, 90, 150, 40):
        _feed(keyset, reference, _shard(rng, size, list(reference)), rng)
    loaded: KeySet = pickle.loads(pickle.dumps(keyset))
    assert loaded.spill_keys == 64 and len(loaded) == len(keyset)
    assert [len(run) for run in loaded.runs] == [len(run) for run in keyset.runs]
    assert [run.file is None for run in loaded.runs] == [run.file is None for run in keyset.runs]
    assert _spilled(loaded) and all(
        a.file is not b.file for a, b in zip(_spilled(loaded), _spilled(keyset), strict=True)
    )
    copy = dict(reference)
    for size in (120, 300):
        keys = _shard(rng, size, list(reference))
        _feed(keyset, reference, keys, np.random.default_rng(size))
        _feed(loaded, copy, keys, np.random.default_rng(size))
    assert copy == reference


@pytest.mark.parametrize("block", [1, 3, 8, 1000])
def test_merge_path_cuts_a_stable_merge_into_small_pieces(block: int) -> None:
    """The pieces between the cuts, each sorted, give the whole merge in order (older
    values first among equal ones), none with more than ``block`` values of either run."""
    rng = np.random.default_rng(block)
    old = np.sort(rng.integers(0, 30, size=50, dtype=np.uint64))
    new = np.sort(rng.integers(0, 30, size=37, dtype=np.uint64))
    cuts_old, cuts_new = merge_path(old, new, block)
    assert (cuts_old[0], cuts_new[0], cuts_old[-1], cuts_new[-1]) == (0, 0, len(old), len(new))
    assert (np.diff(cuts_old) >= 0).all() and (np.diff(cuts_new) >= 0).all()
    assert (np.diff(cuts_old) <= block).all() and (np.diff(cuts_new) <= block).all()
    tagged = np.concatenate([old * 2, new * 2 + 1])  # even: from old; ties put old first
    pieces = [
        np.sort(np.concatenate([tagged[i0:i1], tagged[len(old) + j0 : len(old) + j1]]))
        for i0, i1, j0, j1 in zip(
            cuts_old[:-1], cuts_old[1:], cuts_new[:-1], cuts_new[1:], strict=True
        )
    ]
    assert np.concatenate(pieces).tolist() == sorted(tagged.tolist())


def test_spilled_records_leave_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary files are unlinked as soon as they are made: the temporary folder
    stays empty while the set holds spilled runs (so a killed process leaves nothing)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rng = np.random.default_rng(2)
    keyset, reference = KeySet(spill_keys=50), {}
    for size in (80, 80, 200):
        _feed(keyset, reference, _shard(rng, size, list(reference)), rng)
    assert _spilled(keyset) and os.listdir(tmp_path) == []
    assert all(os.fstat(run.file.fileno()).st_nlink == 0 for run in _spilled(keyset))


def test_release_gives_back_whole_pages_of_mapped_words() -> None:
    """Released words of a mapped array read as zeros (their pages were given back), up to
    the last whole page before ``stop``; the rest, and arrays of the heap, are kept."""
    words = mapped_words(5000)
    words[:] = 7
    release(words, 4000)
    cut = 4000 * 8 // mmap.PAGESIZE * mmap.PAGESIZE // 8
    assert 0 < cut <= 4000
    assert not words[:cut].any() and (words[cut:] == 7).all()
    heap = np.full(5000, 7, np.uint64)
    release(heap, 4000)
    assert (heap == 7).all()


def test_a_full_temporary_folder_names_itself_and_the_room_needed(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spilling into a full temporary folder (a 1 MiB tmpfs) fails with an error that names
    the folder, the bytes a key needs there and TMPDIR, not a bare ``[Errno 28]``."""
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    rng = np.random.default_rng(3)
    keyset = KeySet(spill_keys=1000)
    with pytest.raises(keyset_module.SpillError) as error:
        for _ in range(20):  # 20 runs of 50,000 keys: 24 MB of records
            keyset.add(_shard(rng, 50_000, []), rng.integers(0, 2**63, (50_000, 2), np.uint64))
    message = str(error.value)
    assert str(small_disk) in message and "24 bytes per distinct key" in message
    assert "TMPDIR" in message and error.value.errno == errno.ENOSPC
    assert message.startswith("the key set could not spill")  # no "[Errno 28]"
    assert str(pickle.loads(pickle.dumps(error.value))) == message  # as a Prefect result
