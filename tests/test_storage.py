"""The versioned store on real Delta tables in tmp_path: commit, versions, read, files,
tags, names, diff, atomicity and schema evolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipelines.segments import ShardWriter, read_shard, shard_rows
from storage import DatasetStore, Ref, StoreError, default_store, parse_ref, validate_name
from storage.commit import write_data_file
from transforms.schema import REJECTED_SCHEMA, SCHEMA, conform, messages, rejected, validate

TOOLS = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
)
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})


def _row(i: int, row_id: str, response: str) -> dict[str, Any]:
    """Row ``i`` of a cycle of four shapes: system+user, a tool exchange, multi-turn QA, MCQ."""
    kind = i % 4
    row: dict[str, Any] = {
        "id": row_id,
        "source": "unit",
        "source_index": i,
        "task": "instruction",
        "tools": None,
        "response": response,
        "references": None,
        "choices": None,
        "origin": "corpus",
        "original_response": None,
    }
    if kind == 0:
        row["prompt"] = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Say hi #{i}"},
        ]
    elif kind == 1:
        row["prompt"] = [
            {"role": "user", "content": f"Weather in Paris? #{i}"},
            {"role": "tool_call", "content": CALL},
            {"role": "tool", "content": '{"temp_c": 21}'},
        ]
        row["tools"] = TOOLS
    elif kind == 2:
        row["task"] = "open_qa"
        row["prompt"] = [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": f"And of Italy? #{i}"},
        ]
        row["references"] = ["Rome"]
    else:
        row["task"] = "mcq"
        row["prompt"] = [{"role": "user", "content": f"2+2? A) 3 B) 4 #{i}"}]
        row["choices"] = ["3", "4"]
        row["references"] = ["B"]
    return row


def canonical_table(ids: Sequence[str], response: str = "ok", **stage: Sequence[Any]) -> pa.Table:
    """A valid canonical table with one row per id (plus optional stage columns)."""
    rows = [_row(i, row_id, f"{response} {row_id}") for i, row_id in enumerate(ids)]
    columns = {f.name: [r[f.name] for r in rows] for f in SCHEMA if f.name != "prompt"}
    table = pa.table(
        {**columns, "prompt": messages(r["prompt"] for r in rows)},
    )
    table = conform(table).cast(SCHEMA)
    validate(table)
    for name, values in stage.items():
        table = table.append_column(name, pa.array(values))
    return table


def rejected_table(ids: Sequence[str], reason: str = "too long") -> pa.Table:
    """Rejected rows with the rejected schema."""
    return conform(rejected(canonical_table(ids, "bad"), "filter", reason), REJECTED_SCHEMA)


def write_shard(table: pa.Table, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def commit_build(
    store: DatasetStore,
    name: str,
    tmp: Path,
    train: pa.Table,
    rejected_rows: pa.Table | None = None,
    metadata: dict[str, Any] | None = None,
    shards: int = 2,
) -> int:
    """Write ``train`` as ``shards`` Parquet shards (and the rejected rows) and commit."""
    build = tmp / f"shards-{len(list(tmp.glob('shards-*')))}"
    step = max(1, -(-train.num_rows // shards))
    train_files = [
        write_shard(train.slice(start, step), build / f"train-{start}.parquet")
        for start in range(0, train.num_rows, step)
    ]
    rejected_files = (
        [write_shard(rejected_rows, build / "rejected-0.parquet")]
        if rejected_rows is not None
        else []
    )
    return store.commit(name, train_files, rejected_files, metadata or {"build_id": "test"})


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    return DatasetStore(str(tmp_path / "store"))


@pytest.fixture
def two_versions(store: DatasetStore, tmp_path: Path) -> DatasetStore:
    """sft@0: train a000..a007 + rejected r000..r001; sft@1: train b000..b005."""
    commit_build(store, "sft", tmp_path, canonical_table(ids("a", 8)), rejected_table(ids("r", 2)))
    commit_build(store, "sft", tmp_path, canonical_table(ids("b", 6)))
    return store


def train_ids(store: DatasetStore, ref: str) -> list[str]:
    return sorted(store.read(ref, columns=["id"])["id"].to_pylist())


# -- names and refs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft", "sft-v2", "a.b_c", "0day"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("../x", "separator"),
        ("a/b", "separator"),
        ("/abs", "separator"),
        ("..", "traversal"),
        ("a..b", "traversal"),
        ("_work", "reserved"),
        ("_cache", "reserved"),
        ("_delta_log", "must start with a letter or digit"),
        (".hidden", "must start with a letter or digit"),
        ("a b", "only letters"),
        ("x" * 200, "longer than"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        validate_name(name)


def test_parse_ref() -> None:
    assert parse_ref("sft") == Ref("sft", None)
    assert parse_ref("sft@3") == Ref("sft", "3")
    assert parse_ref("sft@3").version == 3
    assert parse_ref("sft@prod") == Ref("sft", "prod")
    assert parse_ref("sft@prod").tag == "prod"
    assert parse_ref("sft@latest") == Ref("sft", None)
    assert str(parse_ref("sft@007")) == "sft@7"
    for bad in ["", "sft@", "@3", "sft@1@2", "sft@-1", "../x@1", "sft@a/b"]:
        with pytest.raises(StoreError):
            parse_ref(bad)


def test_default_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ALIGNCURATE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_store() == str(tmp_path / "datasets")
    monkeypatch.setenv("ALIGNCURATE_STORE", "s3://bucket/prefix/")
    assert default_store() == "s3://bucket/prefix"
    assert DatasetStore().root == "s3://bucket/prefix"  # no I/O in the constructor
    assert DatasetStore("rel").root == str(tmp_path / "rel")


# -- commit, versions, read ----------------------------------------------------------------


def test_commit_versions_and_metadata_round_trip(store: DatasetStore, tmp_path: Path) -> None:
    metadata = {
        "build_id": "run-1",
        "spec_hash": "123",  # a string that looks like JSON stays a string
        "stage_counts": {"filter": {"in": 10, "kept": 8, "rejected": 2}},
        "inputs": ["a.jsonl", "b.jsonl"],
        "seed": 7,
    }
    train, bad = canonical_table(ids("a", 8)), rejected_table(ids("r", 2))
    assert commit_build(store, "sft", tmp_path, train, bad, metadata) == 0
    assert commit_build(store, "sft", tmp_path, canonical_table(ids("b", 3))) == 1
    assert store.datasets() == ["sft"]

    versions = store.versions("sft")
    assert [v.version for v in versions] == [0, 1]
    assert versions[0].metadata == metadata
    assert versions[1].metadata == {"build_id": "test"}
    assert versions[0].rows == {"train": 8, "rejected": 2}
    assert versions[1].rows == {"train": 3, "rejected": 0}
    assert all(isinstance(v.timestamp, datetime) and v.timestamp.tzinfo for v in versions)
    assert versions[0].timestamp <= versions[1].timestamp


def test_read_by_number_tag_and_latest(two_versions: DatasetStore) -> None:
    store = two_versions
    assert train_ids(store, "sft") == ids("b", 6)
    assert train_ids(store, "sft@latest") == ids("b", 6)
    assert train_ids(store, "sft@0") == ids("a", 8)
    assert store.tag("sft@0", "prod") == 0
    assert train_ids(store, "sft@prod") == ids("a", 8)
    assert store.resolve("sft@prod") == ("sft", 0)
    assert store.resolve(Ref("sft")) == ("sft", 1)

    rejected_rows = store.read("sft@0", split="rejected")
    assert sorted(rejected_rows["id"].to_pylist()) == ids("r", 2)
    assert set(rejected_rows["reject_reason"].to_pylist()) == {"too long"}

    both = store.read("sft@0", split=None, columns=["id"])
    assert both.column_names == ["id", "split"]
    assert sorted(both.filter(pa.compute.equal(both["split"], "rejected"))["id"].to_pylist()) == (
        ids("r", 2)
    )
    full = store.read("sft@0")
    assert full.column_names[: len(SCHEMA)] == SCHEMA.names
    assert "split" not in full.column_names
    prompts = full.sort_by("id")["prompt"].to_pylist()
    assert prompts[1][1] == {"role": "tool_call", "content": CALL}
    with pytest.raises(StoreError, match="unknown column"):
        store.read("sft", columns=["nope"])
    with pytest.raises(StoreError, match="unknown split"):
        store.read("sft", split="test")


def test_files_load_exactly_one_version(two_versions: DatasetStore, tmp_path: Path) -> None:
    store = two_versions
    files = store.files("sft@0")
    assert files and all(f.endswith(".parquet") and "split=train" in f for f in files)
    loaded = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert sorted(loaded["id"]) == ids("a", 8)
    assert loaded[0]["prompt"][0]["role"] in {"system", "user"}
    assert sorted(pd.read_parquet(files)["id"]) == ids("a", 8)
    assert sorted(pd.read_parquet(store.files("sft@1"))["id"]) == ids("b", 6)
    assert sorted(pd.read_parquet(store.files("sft@0", "rejected"))["id"]) == ids("r", 2)
    assert store.files("sft@1", "rejected") == []


def test_load_one_version(two_versions: DatasetStore, tmp_path: Path) -> None:
    """``load`` gives an HF ``Dataset`` of exactly one version's split (read from its file
    list), and ``to_pandas`` a DataFrame; the table folder itself is the trap they avoid."""
    store = two_versions
    store.tag("sft@0", "golden")
    cache = str(tmp_path / "hf")
    golden = store.load("sft@golden", cache_dir=cache)
    assert isinstance(golden, datasets.Dataset)
    assert sorted(golden["id"]) == ids("a", 8) and "split" not in golden.column_names
    assert golden.column_names == store.read("sft@0").column_names
    assert sorted(store.load("sft", cache_dir=cache)["id"]) == ids("b", 6)
    assert sorted(store.load("sft@0", "rejected", cache_dir=cache)["id"]) == ids("r", 2)
    empty = store.load("sft@1", "rejected", cache_dir=cache)
    assert len(empty) == 0 and "reject_reason" in empty.column_names
    with pytest.raises(StoreError, match="unknown split"):
        store.load("sft", "test")

    frame = store.to_pandas("sft@golden")
    assert isinstance(frame, pd.DataFrame) and sorted(frame["id"]) == ids("a", 8)
    both = store.to_pandas("sft@0", split=None)
    assert both["split"].value_counts().to_dict() == {"train": 8, "rejected": 2}

    # The trap: the table folder holds every version's files and the Delta log.
    table = store.uri("sft")
    assert len(pd.read_parquet(table)) == 8 + 2 + 6  # both versions mixed
    assert len(pd.read_parquet(sorted(Path(table).glob("split=train/*.parquet")))) == 8 + 6
    with pytest.raises(pa.ArrowInvalid, match="Parquet magic bytes"):  # _delta_log/*.json
        datasets.load_dataset("parquet", data_dir=table, cache_dir=cache)


def test_to_polars_says_when_polars_is_missing(
    two_versions: DatasetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "polars", None)  # as if not installed
    with pytest.raises(ImportError, match="needs polars, which is not installed: pip install"):
        two_versions.to_polars("sft@0")


def test_to_polars(two_versions: DatasetStore) -> None:
    polars = pytest.importorskip("polars")  # not a dependency: only where it is installed
    frame = two_versions.to_polars("sft@0")
    assert isinstance(frame, polars.DataFrame) and sorted(frame["id"]) == ids("a", 8)
    assert two_versions.to_polars("sft@0", None)["split"].value_counts().height == 2
    # polars' own time travel reads the same version through deltalake.
    delta = polars.read_delta(two_versions.uri("sft"), version=0).filter(split="train")
    assert sorted(delta["id"]) == ids("a", 8)


def test_tags(two_versions: DatasetStore) -> None:
    store = two_versions
    assert store.tag("sft", "prod") == 1
    assert store.tag("sft@0", "baseline") == 0
    assert store.tags("sft") == {"prod": 1, "baseline": 0}
    assert store.tag("sft@baseline", "prod") == 0  # re-tagging moves the tag
    assert store.tags("sft") == {"prod": 0, "baseline": 0}
    assert store.set_tag("sft@1", "prod") == (0, 1)  # (where it was, where it is)
    assert store.set_tag("sft@0", "prod") == (1, 0)
    assert store.set_tag("sft@0", "new") == (None, 0) and store.untag("sft", "new") == 0
    assert [v.tags for v in store.versions("sft")] == [["baseline", "prod"], []]
    assert store.untag("sft", "baseline") == 0
    assert store.tags("sft") == {"prod": 0}

    for bad, message in [("3", "integer"), ("-2", "integer"), ("latest", "reserved")]:
        with pytest.raises(StoreError, match=message):
            store.tag("sft", bad)
    with pytest.raises(StoreError, match="separator"):
        store.tag("sft", "a/b")
    with pytest.raises(StoreError, match=r"unknown tag 'nope'.*prod"):
        store.resolve("sft@nope")
    with pytest.raises(StoreError, match="unknown version 9"):
        store.tag("sft@9", "x")
    with pytest.raises(StoreError, match="unknown dataset"):
        store.tag("other", "x")

    # Delta ignores the tags file: a vacuum would not delete it.
    table = DeltaTable(store.uri("sft"))
    doomed = table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=True)
    assert not [f for f in doomed if "_aligncurate" in f]


def test_unknown_dataset_and_version(two_versions: DatasetStore) -> None:
    store = two_versions
    with pytest.raises(StoreError, match=r"unknown dataset 'nope'.*known: sft"):
        store.read("nope")
    with pytest.raises(StoreError, match=r"unknown version 5 .*0\.\.1"):
        store.read("sft@5")
    with pytest.raises(StoreError, match="unknown dataset"):
        store.versions("nope")
    with pytest.raises(StoreError, match="reserved"):
        store.read("_work")
    with pytest.raises(StoreError, match="separator"):
        store.files("../sft")


def test_datasets_lists_only_tables(store: DatasetStore, tmp_path: Path) -> None:
    assert store.datasets() == []  # root does not exist yet
    for reserved in ["_work", "_cache", "not-a-table"]:
        (Path(store.root) / reserved).mkdir(parents=True)
    commit_build(store, "b", tmp_path, canonical_table(ids("x", 2)))
    commit_build(store, "a", tmp_path, canonical_table(ids("x", 2)))
    assert store.datasets() == ["a", "b"]


def test_empty_splits(store: DatasetStore, tmp_path: Path) -> None:
    assert store.commit("empty", [], [], {"note": "nothing"}) == 0
    assert store.read("empty").num_rows == 0
    assert store.read("empty").column_names[: len(SCHEMA)] == SCHEMA.names
    assert store.files("empty") == []
    assert commit_build(store, "empty", tmp_path, canonical_table(ids("a", 3))) == 1
    assert store.read("empty@0", split=None).num_rows == 0
    assert store.commit("empty", [], [], {}) == 2  # an overwrite with nothing empties it
    assert store.read("empty", split=None).num_rows == 0
    assert store.read("empty@1").num_rows == 3


def test_large_builds_roll_over_files(
    store: DatasetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("storage.dataset.TARGET_FILE_BYTES", 1)  # a new file per batch
    monkeypatch.setattr("storage.dataset.BATCH_ROWS", 3)
    commit_build(store, "sft", tmp_path, canonical_table(ids("a", 10)), shards=2)
    files = store.files("sft")
    assert len(files) == 4  # 2 shards x (3 + 2) rows, 3-row batches
    assert sorted(pd.read_parquet(files)["id"]) == ids("a", 10)
    assert store.read("sft")["id"].to_pylist() == ids("a", 10)  # shard and row order kept
    assert DeltaTable(store.uri("sft")).count() == 10  # per-file row stats are recorded


def test_data_files_keep_statistics_of_the_few_valued_and_numeric_columns(
    store: DatasetStore, tmp_path: Path
) -> None:
    """Min/max statistics are written for numeric and dictionary columns (pruning can use
    them), not for text; the rows read back the same either way."""
    table = canonical_table(ids("a", 6), score=[0.5, 0.1, 0.9, 0.2, 0.3, 0.4])
    commit_build(store, "sft", tmp_path, table, shards=1)
    (path,) = store.files("sft")
    group = pq.read_metadata(path).row_group(0)
    stats = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    with_stats = {name for name, column in stats.items() if column.is_stats_set}
    assert {"source", "task", "origin", "prompt.list.element.role", "source_index", "score"} <= (
        with_stats
    )
    assert not {"id", "response", "prompt.list.element.content", "reject_reason"} & with_stats
    assert stats["score"].statistics.min == 0.1 and stats["score"].statistics.max == 0.9
    assert store.read("sft").select(table.column_names).to_pylist() == table.to_pylist()


def test_parallel_writers_keep_shard_and_row_order(
    store: DatasetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of consecutive shards are written on their own threads; the version reads back
    in shard and row order, with the rows split between the runs' files. A split of fewer
    rows than a batch stays one run."""
    monkeypatch.setattr("storage.dataset.BATCH_ROWS", 4)
    build = tmp_path / "shards"
    sizes = [7, 1, 12, 0, 9, 30, 4]
    train, start = [], 0
    for index, size in enumerate(sizes):
        table = canonical_table(ids("p", sum(sizes))).slice(start, size)
        train.append(write_shard(table, build / f"train-{index}.parquet"))
        start += size
    rejected = rejected_table(ids("r", 5))
    rejected_files = [
        write_shard(rejected.slice(0, 2), build / "rejected-0.parquet"),
        write_shard(rejected.slice(2), build / "rejected-1.parquet"),
    ]
    store.commit("par", train, rejected_files, {"build_id": "t"}, threads=3)
    assert store.read("par")["id"].to_pylist() == ids("p", sum(sizes))
    assert store.read("par", "rejected")["id"].to_pylist() == ids("r", 5)
    parts = [Path(f).name for f in store.files("par")]
    assert len({name.split("-")[1] for name in parts}) == 3  # three runs wrote train files
    rejected_parts = [Path(f).name for f in store.files("par", split="rejected")]
    assert [name.split("-")[1] for name in rejected_parts] == ["000"]  # 5 rows, 2 shards: 1 run


def write_data_shard(table: pa.Table, path: Path) -> str:
    """A shard written as a build's last segment writes it: a data file of the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert write_data_file(table, str(path))
    return str(path)


def test_shards_written_as_data_files_are_linked_in_unread(
    store: DatasetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards written as data files of the table (its file schema, its encoding) become its
    data files as they are: hard links, never read, in shard order between shards that are
    written anew. A marked shard whose columns differ from the table's (another shard has a
    stage column) is written anew, the missing column null; the version reads back the same
    as one committed from plain shards."""
    monkeypatch.setattr("storage.dataset.BATCH_ROWS", 4)
    rows = canonical_table(ids("p", 30))
    build = tmp_path / "shards"
    cuts = [(0, 7, write_data_shard), (7, 5, write_shard), (12, 4, write_shard)]
    cuts += [(16, 6, write_data_shard), (22, 8, write_data_shard)]
    train = [write(rows.slice(a, n), build / f"train-{a}.parquet") for a, n, write in cuts]
    rejected = [write_data_shard(rejected_table(ids("r", 3)), build / "rejected-0.parquet")]
    hours_ago = time.time() - 3 * 3600  # a reused shard: gc must not take its link for old
    for path in [*train, *rejected]:
        os.utime(path, (hours_ago, hours_ago))
    store.commit("linked", train, rejected, {"build_id": "t"}, threads=2)
    files = [*store.files("linked"), *store.files("linked", split="rejected")]
    assert min(os.stat(f).st_mtime for f in files) > time.time() - 600
    plain = [
        write_shard(pq.read_table(path), build / f"plain-{i}.parquet")
        for i, path in enumerate(train)
    ]
    store.commit(
        "plain",
        plain,
        [write_shard(rejected_table(ids("r", 3)), build / "r.parquet")],
        {"build_id": "t"},
    )

    for split in ("train", "rejected"):
        assert store.read("linked", split).equals(store.read("plain", split))
    inodes = {os.stat(path).st_ino: path for path in [*train, *rejected]}
    linked = [inodes.get(os.stat(f).st_ino) for f in store.files("linked")]
    assert linked == [train[0], None, None, train[3], train[4]]  # 2 plain shards, 2 runs
    [rejected_file] = store.files("linked", split="rejected")
    assert os.stat(rejected_file).st_ino == os.stat(rejected[0]).st_ino

    # a stage column in one shard: the marked shard without it is written anew
    scored = canonical_table(ids("s", 4), score=[0.5, 1.0, 1.5, 2.0])
    shards = [write_data_shard(rows.slice(0, 5), build / "x-0.parquet")]
    shards += [write_data_shard(scored, build / "x-1.parquet")]
    store.commit("mixed", shards, [], {"build_id": "t"})
    inodes = {os.stat(path).st_ino: path for path in shards}
    assert [inodes.get(os.stat(f).st_ino) for f in store.files("mixed")] == [None, shards[1]]
    assert store.read("mixed")["score"].to_pylist() == [None] * 5 + [0.5, 1.0, 1.5, 2.0]


def test_a_stage_column_whose_type_the_commit_settles_is_written_plain(
    store: DatasetStore, tmp_path: Path
) -> None:
    """A null-typed stage column (all null in this shard) is unified with the other shards'
    type by the commit: such a shard is not made a data file on its own."""
    empty = canonical_table(ids("a", 2)).append_column("score", pa.nulls(2))
    scored = canonical_table(ids("b", 2), score=[0.5, 1.5])
    assert not write_data_file(empty, str(tmp_path / "data.parquet"))
    writer = ShardWriter(tmp_path / "shards", final=True)
    shards = [writer.write_shard(i, table, [])[0] for i, table in enumerate([empty, scored])]
    store.commit("scores", shards, [], {"build_id": "t"})
    assert store.read("scores")["score"].to_pylist() == [None, None, 0.5, 1.5]


def test_a_shard_of_unstorable_columns_is_written_plain(tmp_path: Path) -> None:
    """``write_data_file`` writes nothing for columns the table cannot store (the commit
    then names the shard, as for any shard), and a shard writer falls back to a plain file."""
    table = canonical_table(ids("a", 2)).append_column("split", pa.array(["x", "y"]))
    assert not write_data_file(table, str(tmp_path / "data.parquet"))
    assert not (tmp_path / "data.parquet").exists()
    writer = ShardWriter(tmp_path / "shards", final=True)
    train, _ = writer.write_shard(0, table, [])
    assert pq.read_table(train).equals(table)


def test_scratch_shards_are_ipc_files_read_back_as_written(tmp_path: Path) -> None:
    """A shard a later segment reads is an Arrow IPC file; read back (memory-mapped) it
    equals what was written, and its row count comes from its metadata. Its rejected rows
    are a data file."""
    table = pa.concat_tables([canonical_table(ids("a", 3)), canonical_table(ids("b", 2))])
    writer = ShardWriter(tmp_path / "shards")
    train, rejected = writer.write_shard(0, table, [rejected_table(ids("r", 2))])
    assert train.endswith("train-00000.arrow") and rejected.endswith("rejected-00000.parquet")
    assert read_shard(train).equals(table) and shard_rows(train) == 5
    assert pq.read_table(rejected).num_rows == shard_rows(rejected) == 2


def test_a_scratch_shard_unifies_dictionaries_that_differ_between_chunks(tmp_path: Path) -> None:
    """An IPC file holds one dictionary per field: chunks whose dictionaries differ (here
    inside a list) are unified, and the rows read back as written."""
    kinds = pa.list_(pa.dictionary(pa.int32(), pa.string()))
    tags = pa.chunked_array([pa.array([["x"]], kinds), pa.array([["y", "x"]], kinds)])
    table = pa.concat_tables(
        [canonical_table(ids("a", 1)), canonical_table(ids("b", 1))]
    ).append_column("tags", tags)
    train, _ = ShardWriter(tmp_path / "shards").write_shard(0, table, [])
    assert train.endswith(".arrow")
    assert read_shard(train)["tags"].to_pylist() == [["x"], ["y", "x"]]


def test_the_commit_takes_scratch_shards_as_they_are(store: DatasetStore, tmp_path: Path) -> None:
    """A cached segment written for a later one hands its IPC scratch shards to the commit
    when the chain has become shorter: the version holds their rows, in order, beside a
    data file's; their columns read alike (``read_columns``, the build's summary)."""
    from pipelines.segments import read_columns
    from transforms.response.stats import shard_stats

    first = pa.concat_tables([canonical_table(ids("a", 3)), canonical_table(ids("b", 2))])
    second = canonical_table(ids("c", 4))
    scratch, _ = ShardWriter(tmp_path / "scratch").write_shard(0, first, [])
    data, _ = ShardWriter(tmp_path / "data", final=True).write_shard(1, second, [])
    assert scratch.endswith(".arrow") and data.endswith(".parquet")
    store.commit("mixed", [scratch, data], [], {"build_id": "t"})
    assert store.read("mixed")["id"].to_pylist() == ids("a", 3) + ids("b", 2) + ids("c", 4)
    for path, table in ((scratch, first), (data, second)):
        assert read_columns(path, ["id", "nope"]).to_pydict() == {"id": table["id"].to_pylist()}
    parquet, _ = ShardWriter(tmp_path / "data", final=True).write_shard(0, first, [])
    stats = shard_stats([scratch, data], read_columns=read_columns)
    assert stats["rows"] == 9 and stats == shard_stats([parquet, data])


def test_an_ipc_file_is_never_adopted_and_a_data_file_read_back_loses_its_mark(
    store: DatasetStore, tmp_path: Path
) -> None:
    """A data file read back as a later segment's input (``read_shard``) loses the data-file
    mark, and an IPC file is never adopted even when it carries the mark and exactly the
    table's file schema: its rows are written into a data file of their own."""
    from pyarrow import fs as pafs

    from storage.commit import DATA_FILE_KEY, ShardPlan, ShardSource

    data, _ = ShardWriter(tmp_path / "data", final=True).write_shard(
        0, canonical_table(ids("a", 5)), []
    )
    marked = pq.read_table(data)
    assert DATA_FILE_KEY in marked.schema.metadata
    assert DATA_FILE_KEY not in (read_shard(data).schema.metadata or {})
    assert read_shard(data).equals(marked.replace_schema_metadata(None))
    # a scratch shard of rows kept from the marked table as it was (read without the fix)
    ipc, _ = ShardWriter(tmp_path / "scratch").write_shard(0, marked, [])
    source = ShardSource("train", ipc, pafs.LocalFileSystem(), ipc)
    plan = ShardPlan.build([source], batch_rows=2)
    assert DATA_FILE_KEY in plan.shards[0].schema.metadata  # the mark came along
    assert plan.shards[0].schema.equals(plan.file_schema)  # all else would let it be adopted
    assert not plan.adoptable(plan.shards[0])
    assert [b.num_rows for b in plan.batches(plan.shards)] == [2, 2, 1]  # cut to batch_rows
    store.commit("marked", [ipc], [], {"build_id": "t"})
    assert store.read("marked")["id"].to_pylist() == ids("a", 5)
    assert all(os.stat(f).st_ino != os.stat(ipc).st_ino for f in store.files("marked"))


# -- reads in a fresh interpreter ---------------------------------------------------------

EXIT_SCRIPT = """
import sys
from storage import DatasetStore
store = DatasetStore(sys.argv[1])
if sys.argv[2] == "read":
    print(store.read("sft", split=None).num_rows)
else:  # one batch, then the stream is dropped with its read-ahead still running
    print(next(iter(store.batches("sft", split=None, batch_size=4))).num_rows)
"""


def run_exit_script(root: str, mode: str, runs: int, parallel: int = 2) -> list[tuple[int, str]]:
    """``EXIT_SCRIPT`` in ``runs`` fresh interpreters, ``parallel`` at a time (contention
    widens the window of a race at interpreter exit): exit codes (-1: hung) and outputs."""
    repo = Path(__file__).resolve().parents[1]
    results: list[tuple[int, str]] = []
    for start in range(0, runs, parallel):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", EXIT_SCRIPT, root, mode],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=repo,
            )
            for _ in range(min(parallel, runs - start))
        ]
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                results.append((-1, out.strip()))
            else:
                results.append((proc.returncode, out.strip()))
    return results


@pytest.mark.parametrize(("mode", "runs", "rows"), [("read", 10, "15"), ("stream", 4, "2")])
def test_reads_in_a_fresh_interpreter_exit_cleanly(
    store: DatasetStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    runs: int,
    rows: str,
) -> None:
    """A script that reads a whole version (both splits), or drops a batch stream early,
    exits with 0. Data files used to be read through deltalake's Python filesystem
    handler: Arrow's I/O threads then held Python buffers, and one released at interpreter
    exit aborted the process ("terminate called without an active exception") or, with a
    stream's read-ahead still running, hung or crashed it."""
    monkeypatch.setattr("storage.dataset.TARGET_FILE_BYTES", 1)  # a file per 2-row batch
    monkeypatch.setattr("storage.dataset.BATCH_ROWS", 2)
    commit_build(store, "sft", tmp_path, canonical_table(ids("a", 10)), rejected_table(ids("r", 5)))
    assert len(store.files("sft")) + len(store.files("sft", "rejected")) > 8
    assert run_exit_script(store.root, mode, runs) == [(0, rows)] * runs


# -- diff ------------------------------------------------------------------------------


def test_diff(store: DatasetStore, tmp_path: Path) -> None:
    # a: train a000..a005, rejected r000; b: a000, a001 unchanged; a002 content changed;
    # a003 moved to rejected; a004, a005 and r000 removed; c000, c001 added.
    base = canonical_table(ids("a", 6))
    commit_build(store, "sft", tmp_path, base, rejected_table(["r000"]))
    keep = base.slice(0, 2)
    response = SCHEMA.get_field_index("response")
    changed = base.slice(2, 1).set_column(response, SCHEMA.field("response"), pa.array(["NEW"]))
    moved = conform(rejected(base.slice(3, 1), "dedup", "duplicate"), REJECTED_SCHEMA)
    new = canonical_table(["c000", "c001"])
    train = pa.concat_tables([keep, changed, new])
    commit_build(store, "sft", tmp_path, train, moved)

    diff = store.diff("sft@0", "sft@1", examples=1)
    assert (diff.added, diff.removed, diff.changed, diff.moved, diff.unchanged) == (2, 3, 2, 1, 2)
    assert diff.added_examples == ["c000"]
    assert diff.removed_examples == ["a004"]
    assert diff.changed_examples == ["a002"]
    assert diff.moved_examples == ["a003"]
    assert diff.rows_a == {"train": 6, "rejected": 1}
    assert diff.rows_b == {"train": 5, "rejected": 1}
    assert (diff.a, diff.b) == ("sft@0", "sft@1")
    as_json = json.loads(json.dumps(diff.to_dict()))
    assert as_json["changed"] == 2 and as_json["columns_added"] == []

    same = store.diff("sft@1", "sft")
    assert (same.added, same.removed, same.changed, same.unchanged) == (0, 0, 0, 6)


# -- atomicity and schema ----------------------------------------------------------------


def test_failed_commits_leave_no_version(two_versions: DatasetStore, tmp_path: Path) -> None:
    store = two_versions
    good = write_shard(canonical_table(ids("z", 3)), tmp_path / "bad" / "good.parquet")

    with pytest.raises(StoreError, match=r"cannot read train shard .*missing\.parquet"):
        store.commit("sft", [good, str(tmp_path / "missing.parquet")], [], {})

    wrong_type = canonical_table(ids("w", 2)).drop_columns(["prompt"])
    wrong_type = wrong_type.append_column("prompt", pa.array(["not a list", "x"]))
    wrong = write_shard(wrong_type, tmp_path / "bad" / "wrong.parquet")
    with pytest.raises(StoreError, match="column 'prompt' has type string"):
        store.commit("sft", [good, wrong], [], {})

    # Castable type, bad data: fails while streaming, after Delta has written files.
    table = canonical_table(ids("s", 40_000))
    bad_data = table.set_column(
        table.schema.get_field_index("source_index"),
        "source_index",
        pa.array([str(i) for i in range(39_999)] + ["not-a-number"]),
    )
    late = write_shard(bad_data, tmp_path / "bad" / "late.parquet")
    with pytest.raises(StoreError, match=r"late.parquet: rows .*not-a-number"):
        store.commit("sft", [good, late], [], {})

    with pytest.raises(StoreError, match="not JSON-serialisable"):
        store.commit("sft", [good], [], {"when": datetime.now()})

    assert [v.version for v in store.versions("sft")] == [0, 1]
    assert train_ids(store, "sft") == ids("b", 6)
    assert train_ids(store, "sft@0") == ids("a", 8)
    # The failed commit's data files were removed again: only committed files remain.
    on_disk = {str(p) for p in Path(store.uri("sft")).glob("split=*/*.parquet")}
    committed = {
        f for v in ("sft@0", "sft@1") for s in ("train", "rejected") for f in store.files(v, s)
    }
    assert on_disk == committed

    # A failed first commit creates no dataset.
    with pytest.raises(StoreError):
        store.commit("fresh", [good, late], [], {})
    assert store.datasets() == ["sft"]
    with pytest.raises(StoreError, match="unknown dataset 'fresh'"):
        store.versions("fresh")


def test_schema_evolution(store: DatasetStore, tmp_path: Path) -> None:
    row_ids = ids("a", 4)
    commit_build(store, "sft", tmp_path, canonical_table(row_ids))
    scored = canonical_table(row_ids, certainty_init=[0.1, 0.2, 0.3, 0.4])
    bad = rejected_table(["r000"]).append_column("craft_label", pa.array(["drop"]))
    commit_build(store, "sft", tmp_path, scored, bad)

    assert "certainty_init" not in store.read("sft@0").column_names
    latest = store.read("sft", split=None)
    names = latest.column_names
    assert names[: len(SCHEMA)] == SCHEMA.names
    assert names[len(SCHEMA) :] == [
        "certainty_init",
        "craft_label",
        "reject_stage",
        "reject_reason",
        "split",
    ]
    by_split = {
        s: latest.filter(pa.compute.equal(latest["split"], s)) for s in ("train", "rejected")
    }
    assert by_split["train"]["craft_label"].null_count == 4
    assert by_split["rejected"]["certainty_init"].null_count == 1
    assert sorted(by_split["train"]["certainty_init"].to_pylist()) == [0.1, 0.2, 0.3, 0.4]

    diff = store.diff("sft@0", "sft@1")
    assert diff.columns_added == ["certainty_init", "craft_label"]
    assert (diff.added, diff.removed, diff.changed, diff.unchanged) == (1, 0, 0, 4)


def test_stage_column_types_unify(store: DatasetStore, tmp_path: Path) -> None:
    first = canonical_table(ids("a", 2), score=pa.array([1, 2], pa.int32()))
    second = canonical_table(ids("b", 2), score=pa.array([3, 4], pa.int64()))
    shard_a = write_shard(first, tmp_path / "u" / "a.parquet")
    shard_b = write_shard(second, tmp_path / "u" / "b.parquet")
    store.commit("sft", [shard_a, shard_b], [], {})
    assert store.read("sft").schema.field("score").type == pa.int64()

    text = canonical_table(ids("c", 2), score=["x", "y"])
    shard_c = write_shard(text, tmp_path / "u" / "c.parquet")
    with pytest.raises(StoreError, match="stage column 'score' has incompatible types"):
        store.commit("sft", [shard_a, shard_c], [], {})
    odd = canonical_table(ids("d", 2), small=pa.array([1, 255], pa.uint8()))
    odd = odd.append_column("label", pa.array(["x", "y"]).dictionary_encode())
    store.commit("sft", [write_shard(odd, tmp_path / "u" / "odd.parquet")], [], {})
    stored = store.read("sft")
    assert stored.schema.field("small").type == pa.int16()
    assert stored.schema.field("label").type == pa.string()
    assert sorted(stored["small"].to_pylist()) == [1, 255]

    versions = len(store.versions("sft"))
    timing = canonical_table(ids("e", 2), took=pa.array([1, 2], pa.duration("s")))
    shard_e = write_shard(timing, tmp_path / "u" / "e.parquet")
    with pytest.raises(StoreError, match="cannot be stored in Delta"):
        store.commit("sft", [shard_e], [], {})
    assert len(store.versions("sft")) == versions

    with_split = first.append_column("split", pa.array(["a", "b"]))
    shard_d = write_shard(with_split, tmp_path / "u" / "d.parquet")
    with pytest.raises(StoreError, match="'split' is reserved"):
        store.commit("sft", [shard_d], [], {})


def test_full_disk_during_commit_leaves_no_version(small_disk: Path, tmp_path: Path) -> None:
    store = DatasetStore(str(small_disk / "store"))
    assert commit_build(store, "full", tmp_path, canonical_table(ids("a", 10))) == 0
    # ~8 MB of incompressible responses cannot fit in what is left of 1 MiB
    noise = [os.urandom(4000).hex() for _ in range(1000)]
    big = canonical_table(ids("b", 1000)).set_column(
        SCHEMA.get_field_index("response"), "response", pa.array(noise)
    )
    with pytest.raises(StoreError, match=r"no version was committed.*No space left"):
        commit_build(store, "full", tmp_path, big)
    assert [v.version for v in store.versions("full")] == [0]
    assert sorted(store.read("full", "train").column("id").to_pylist()) == sorted(ids("a", 10))
    table_files = {p.name for p in (small_disk / "store").rglob("*.parquet")}
    assert table_files == {Path(f).name for f in store.files("full@0", "train")}  # no strays
