"""Exact and near dedup partitioned by key hash (pipelines/partitioned.py) decide as the
ordered pass: the same train and rejected rows, the same reasons, on real corpus rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from corpora import enlarged_gsm8k

from pipelines.build import build_dataset
from pipelines.runners import RunnerOptions, build_flow, dedup_partitions
from storage.dataset import DatasetStore
from transforms.partitioned_dedup import bucket_runs, candidate_pairs, keep_first


def _keep_first_by_row(i: np.ndarray, j: np.ndarray) -> tuple[list[int], list[int]]:
    """The ordered pass's rule, row after row: drop a row with a kept earlier neighbour,
    naming the earliest."""
    earlier: dict[int, set[int]] = {}
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        earlier.setdefault(b, set()).add(a)
    kept: set[int] = set()
    dropped, owners = [], []
    for row in range(int(j.max()) + 1 if len(j) else 0):
        owner = min(earlier.get(row, set()) & kept, default=None)
        if owner is None:
            kept.add(row)
        else:
            dropped.append(row)
            owners.append(owner)
    return dropped, owners


@pytest.mark.parametrize("sequential_after", [0, 8])
def test_keep_first_matches_the_row_by_row_rule(
    sequential_after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random graphs (chains of near duplicates among them), decided by the vectorised
    rounds and by the row-by-row finish."""
    import transforms.partitioned_dedup as module

    monkeypatch.setattr(module, "_SEQUENTIAL_AFTER", sequential_after)
    rng = np.random.default_rng(7)
    for _ in range(200):
        rows, count = int(rng.integers(2, 50)), int(rng.integers(0, 150))
        a, b = rng.integers(0, rows, count), rng.integers(0, rows, count)
        i, j = np.minimum(a, b)[a != b], np.maximum(a, b)[a != b]
        expected = _keep_first_by_row(i, j)
        dropped, owners = keep_first(i, j)
        assert (dropped.tolist(), owners.tolist()) == expected
        for far in (10**7, 2**33):  # the merge numbers the rows it sees; rows past 32 bits
            dropped, owners = keep_first(i + far, j + far)
            assert ((dropped - far).tolist(), (owners - far).tolist()) == expected
    chain = np.arange(40)
    dropped, owners = keep_first(chain, chain + 1)  # 0-1-2-...: every other row kept
    assert dropped.tolist() == list(range(1, 41, 2)) and owners.tolist() == list(range(0, 40, 2))


def test_buckets_pair_only_the_checked_rows() -> None:
    keys = np.array([[5], [3], [5], [3], [9], [5], [3]], dtype=np.uint64)
    rows = np.array([10, 11, 11, 12, 12, 13, 13])
    bucket_rows, ends = bucket_runs(keys, rows)
    # key 3: rows 11, 12, 13; key 5: rows 10, 11, 13; key 9 (one row) dropped
    assert bucket_rows.tolist() == [11, 12, 13, 10, 11, 13]
    assert ends.tolist() == [3, 3, 3, 6, 6, 6]
    first, later = candidate_pairs(ends, np.array([True, False, False, False, True, False]))
    assert list(zip(bucket_rows[first].tolist(), bucket_rows[later].tolist(), strict=True)) == [
        (11, 12),
        (11, 13),
        (11, 13),
    ]


def test_buckets_match_a_dictionary_of_keys() -> None:
    """Random keys of one and two words: every bucket of two rows or more, rows distinct
    and ascending, and its checked rows paired with every later row."""
    rng = np.random.default_rng(3)
    for words in (1, 2):
        keys = rng.integers(0, 6, (300, words)).astype(np.uint64)
        rows = np.sort(rng.integers(0, 120, 300))
        expected: dict[tuple[int, ...], list[int]] = {}
        for key, row in zip(map(tuple, keys.tolist()), rows.tolist(), strict=True):
            if row not in expected.setdefault(key, []):
                expected[key].append(row)
        bucket_rows, ends = bucket_runs(keys, rows)
        bounds = np.unique(ends)
        got = [bucket_rows[s:e].tolist() for s, e in zip([0, *bounds[:-1]], bounds, strict=True)]
        assert sorted(got) == sorted(v for v in expected.values() if len(v) > 1)
        first, later = candidate_pairs(ends, np.ones(len(ends), dtype=bool))
        assert len(first) == sum(len(v) * (len(v) - 1) // 2 for v in expected.values())
        assert (ends[first] == ends[later]).all() and (
            bucket_rows[first] < bucket_rows[later]
        ).all()


def _spec(folder: Path, shared_data: Path) -> Path:
    """Four sources, one shard each: GSM8K, GSM8K's copies 0 and 1 (near duplicates across
    shards; copy 0 repeats the first source exactly) and GPTeacher's toolformer rows."""
    gsm8k = shared_data / "instructions" / "gsm8k_train_alpaca.json"
    sources = [
        {"path": str(gsm8k)},
        {"path": str(enlarged_gsm8k(shared_data, folder / "a.jsonl", 2000, start=6000))},
        {"path": str(enlarged_gsm8k(shared_data, folder / "b.jsonl", 2000, start=9000))},
        {"path": str(shared_data / "instructions" / "gpteacher_toolformer.json")},
    ]
    stages = [{"normalize": {}}, {"exact_dedup": {}}, {"near_dedup": {}}, {"filter": {}}]
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "dedup", "sources": sources, "stages": stages}))
    return path


def _assert_same(left: Path, right: Path) -> None:
    a, b = DatasetStore(str(left)), DatasetStore(str(right))
    for split in ("train", "rejected"):
        assert a.read("dedup", split).equals(b.read("dedup", split)), split
    stages = a.read("dedup", "rejected").column("reject_stage").to_pylist()
    assert stages.count("exact_dedup") == 1473 and stages.count("near_dedup") >= 1000


@pytest.mark.usefixtures("prefect_harness")
def test_partitioned_dedup_on_threads_matches_the_ordered_pass(
    tmp_path: Path, shared_data: Path
) -> None:
    spec = str(_spec(tmp_path, shared_data))
    ordered = build_dataset(spec, store=str(tmp_path / "ordered"))
    split = build_dataset(spec, store=str(tmp_path / "split"), partitions=3)
    assert split["counts"] == ordered["counts"]
    _assert_same(tmp_path / "ordered", tmp_path / "split")
    # the partitioned last segment wrote its train shards as data files: linked in
    files = DatasetStore(str(tmp_path / "split")).files("dedup")
    assert [os.stat(f).st_nlink for f in files] == [2] * len(files) != []
    assert len(list((tmp_path / "split").rglob("partitioned/*/p3/buckets/p*/sigs.npy"))) == 3 * 2
    # near dedup needed more than one round (rows the first merge kept, verified later)
    assert len(list((tmp_path / "split").rglob("partitioned/*/p3/round-2/dropped.npy"))) >= 1


@pytest.mark.usefixtures("prefect_harness")
def test_partitioned_dedup_on_a_2_worker_local_cluster_matches_the_ordered_pass(
    tmp_path: Path, shared_data: Path
) -> None:
    """``--runner dask`` partitions by default (4 partitions for 2 workers)."""
    options = RunnerOptions(runner="dask", dask_workers=2)
    assert dedup_partitions(options) == 4
    spec = str(_spec(tmp_path, shared_data))
    ordered = build_dataset(spec, store=str(tmp_path / "ordered"))
    split = build_flow(options)(spec, str(tmp_path / "dask"))
    assert split["counts"] == ordered["counts"]
    _assert_same(tmp_path / "ordered", tmp_path / "dask")
    assert len(list((tmp_path / "dask").rglob("partitioned/*/p4/buckets/p*/sigs.npy"))) == 4 * 2


@pytest.mark.usefixtures("prefect_harness")
def test_a_build_with_no_rows_commits_an_empty_version_when_partitioned(tmp_path: Path) -> None:
    """``allow_empty`` with a header-only CSV: no shards reach the partitioned stages."""
    (tmp_path / "mmlu.csv").write_bytes(b"question,A,B,C,D,target\n")
    stages = [{"normalize": {}}, {"exact_dedup": {}}, {"near_dedup": {}}]
    spec = {"name": "empty", "sources": [{"path": "mmlu.csv"}], "stages": stages}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**spec, "allow_empty": True}))
    summary = build_dataset(str(tmp_path / "spec.yaml"), store=str(tmp_path / "s"), partitions=2)
    assert (summary["version"], summary["rows"]["in"], summary["rows"]["train"]) == (0, 0, 0)
