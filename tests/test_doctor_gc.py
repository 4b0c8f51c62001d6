"""Damage and leftovers, on real Delta tables in tmp_path: a damaged log entry, missing or
truncated data files (``aligncurate doctor``), files of a commit killed with SIGKILL
before its transaction (``aligncurate gc``), and Prefect's pickled task failures under
``_work/<name>/results`` (cleared once stale)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_storage import canonical_table, commit_build, ids, train_ids
from typer.testing import CliRunner

from pipelines.cli import app
from storage import DatasetStore, StoreError
from storage.doctor import diagnose
from storage.gc import collect_garbage, parse_grace

runner = CliRunner()
LOG = "_delta_log"
HOUR = 3600


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def entry(store: DatasetStore, version: int) -> Path:
    return Path(store.root) / "sft" / LOG / f"{version:020d}.json"


def parquet_files(store: DatasetStore) -> set[str]:
    table = Path(store.root) / "sft"
    return {str(p.relative_to(table)) for p in table.rglob("*.parquet") if LOG not in p.parts}


def age(paths: list[Path], seconds: float) -> None:
    """Set the files' modification time ``seconds`` into the past."""
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


@pytest.fixture
def three(tmp_path: Path) -> DatasetStore:
    """sft@0: a000..a003, sft@1: b000..b004, sft@2: c000..c005; tag ``prod`` on 1."""
    store = DatasetStore(str(tmp_path / "store"))
    for prefix, n in (("a", 4), ("b", 5), ("c", 6)):
        commit_build(store, "sft", tmp_path, canonical_table(ids(prefix, n)))
    store.tag("sft@1", "prod")
    return store


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- a damaged log entry ------------------------------------------------------------------


def test_damaged_latest_entry_leaves_older_versions_readable(three: DatasetStore) -> None:
    truncate(entry(three, 2))
    assert train_ids(three, "sft@0") == ids("a", 4)
    assert train_ids(three, "sft@1") == ids("b", 5)
    assert train_ids(three, "sft@prod") == ids("b", 5)
    assert three.files("sft@1")
    with pytest.raises(StoreError) as failure:
        three.read("sft")
    message = str(failure.value)
    assert f"{three.root}/sft/{LOG}/00000000000000000002.json" in message
    assert "(version 2)" in message and "sft@1" in message and "aligncurate doctor sft" in message
    assert "\n" not in message and "<unknown>" not in message  # no Rust backtrace
    with pytest.raises(StoreError, match=r"unknown version 3 of .*versions are 0\.\.2"):
        three.read("sft@3")


def test_commit_onto_a_damaged_latest_fails_before_writing(
    three: DatasetStore, tmp_path: Path
) -> None:
    truncate(entry(three, 2))
    before = parquet_files(three)
    with pytest.raises(StoreError, match=r"00000000000000000002\.json"):
        commit_build(three, "sft", tmp_path, canonical_table(ids("d", 3)))
    assert parquet_files(three) == before


def test_doctor_reports_a_damaged_entry_and_its_recovery_works(three: DatasetStore) -> None:
    code, stdout, _ = cli("doctor", "sft", "--store", three.root)
    assert code == 0 and "ok" in stdout

    truncate(entry(three, 2))
    code, stdout, _ = cli("doctor", "sft", "--store", three.root, "--json")
    assert code == 1
    report = json.loads(stdout)
    assert report["ok"] is False
    assert report["readable"] == [0, 1] and list(report["unreadable"]) == ["2"]
    [problem] = report["problems"]
    assert problem["kind"] == "log_entry"
    assert problem["where"] == f"{LOG}/00000000000000000002.json"
    assert "not valid JSON" in problem["detail"] and problem["versions"] == [2]
    recovery = " ".join(report["recovery"])
    assert "sft@1" in recovery and "backup" in recovery and "mv " in recovery

    code, text, _ = cli("doctor", "sft", "--store", three.root)
    assert code == 1 and "00000000000000000002.json" in text and "how to recover" in text

    # gc refuses while the log is damaged: the entry may reference any file.
    files = parquet_files(three)
    code, _, stderr = cli("gc", "sft", "--grace", "0", "--store", three.root)
    assert code == 2 and "nothing deleted" in stderr and "00000000000000000002.json" in stderr
    assert parquet_files(three) == files

    # The recovery the report gives: move the entry out of the log, then gc.
    damaged = Path(three.root) / "sft" / "_aligncurate" / "damaged"
    damaged.mkdir(parents=True)
    shutil.move(entry(three, 2), damaged)
    assert cli("doctor", "sft", "--store", three.root)[0] == 0
    assert train_ids(three, "sft") == ids("b", 5)
    code, stdout, _ = cli("gc", "sft", "--grace", "0", "--store", three.root, "--json")
    assert code == 0
    [gone] = json.loads(stdout)["deleted"]
    assert parquet_files(three) == files - {gone}
    assert train_ids(three, "sft@0") == ids("a", 4)


def test_entry_cut_at_a_line_end_is_found(three: DatasetStore) -> None:
    """Valid JSON, but the adds are gone: the rows the commit records are not there."""
    path = entry(three, 2)
    path.write_text(path.read_text().splitlines()[0] + "\n")  # commitInfo only
    report = json.loads(cli("doctor", "sft", "--store", three.root, "--json")[1])
    [problem] = report["problems"]
    assert problem["where"].endswith("00000000000000000002.json")
    assert "train: 0 of 6 rows" in problem["detail"]


def test_doctor_finds_missing_and_truncated_data_files_and_bad_tags(
    three: DatasetStore,
) -> None:
    table = Path(three.root) / "sft"
    [v0] = [table / f for f in three.files("sft@0")]
    [v1] = [table / f for f in three.files("sft@1")]
    v0.unlink()
    truncate(v1)
    code, stdout, _ = cli("doctor", "sft", "--store", three.root, "--json")
    assert code == 1
    report = json.loads(stdout)
    assert report["readable"] == [2]
    problems = {p["where"]: p for p in report["problems"]}
    assert problems[str(v0.relative_to(table))]["detail"] == "missing"
    assert problems[str(v0.relative_to(table))]["versions"] == [0]
    assert problems[str(v1.relative_to(table))]["detail"].startswith("truncated or replaced")
    assert problems["prod"]["kind"] == "tag" and problems["prod"]["versions"] == [1]
    assert any("aligncurate tag sft@2 prod" in step for step in report["recovery"])


# -- gc ------------------------------------------------------------------------------------

KILLED_COMMIT = """
import os, signal, sys
import storage.commit
from storage import DatasetStore

def killed(*args, **kwargs):  # SIGKILL between writing the data files and the commit
    os.kill(os.getpid(), signal.SIGKILL)

storage.commit._transact = killed
DatasetStore(sys.argv[1]).commit("sft", sys.argv[2:], [], {"build_id": "killed"})
"""


def killed_commit(store: DatasetStore, tmp_path: Path, prefix: str) -> set[str]:
    """Run a real commit in a child process, SIGKILL it after its data files are written
    and before its Delta transaction; the files it left behind."""
    shard = tmp_path / f"{prefix}.parquet"
    pq.write_table(canonical_table(ids(prefix, 7)), shard)
    before = parquet_files(store)
    done = subprocess.run(
        [sys.executable, "-c", KILLED_COMMIT, store.root, str(shard)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    left = parquet_files(store) - before
    assert left  # the killed commit left its data files
    return left


def test_gc_deletes_only_old_unreferenced_files(three: DatasetStore, tmp_path: Path) -> None:
    table = Path(three.root) / "sft"
    versions = {v: train_ids(three, f"sft@{v}") for v in range(3)}
    old = killed_commit(three, tmp_path, "x")
    young = killed_commit(three, tmp_path, "y")  # as a build still writing would leave them
    assert [v.version for v in three.versions("sft")] == [0, 1, 2]
    referenced = parquet_files(three) - old - young
    age([table / p for p in parquet_files(three) - young], 2 * HOUR)

    code, stdout, _ = cli("gc", "sft", "--dry-run", "--json", "--store", three.root)
    assert code == 0
    dry = json.loads(stdout)
    assert set(dry["deleted"]) == old and set(dry["young"]) == young
    assert dry["referenced"] == len(referenced) and dry["dry_run"] is True
    assert parquet_files(three) == referenced | old | young  # a dry run deletes nothing

    code, stdout, _ = cli("gc", "sft", "--store", three.root)
    assert code == 0 and f"deleted {len(old)} unreferenced data files" in stdout
    assert parquet_files(three) == referenced | young
    for version, rows in versions.items():  # every version still reads, row for row
        assert train_ids(three, f"sft@{version}") == rows
    assert cli("doctor", "sft", "--store", three.root)[0] == 0

    code, stdout, _ = cli("gc", "sft", "--grace", "30m", "--json", "--store", three.root)
    assert json.loads(stdout)["deleted"] == []  # the young files are minutes old
    code, stdout, _ = cli("gc", "sft", "--grace", "0", "--json", "--store", three.root)
    assert set(json.loads(stdout)["deleted"]) == young
    assert parquet_files(three) == referenced


def test_parse_grace() -> None:
    assert parse_grace("1h").total_seconds() == HOUR
    assert parse_grace("30m").total_seconds() == 1800
    assert parse_grace("2d").total_seconds() == 2 * 24 * HOUR
    assert parse_grace("0").total_seconds() == 0
    for bad in ["", "1", "-1h", "1w", "h"]:
        with pytest.raises(StoreError, match="grace period"):
            parse_grace(bad)


def test_doctor_and_gc_on_an_s3_store(tmp_path: Path) -> None:
    """The same checks through ``pyarrow``'s S3 filesystem, against a real S3 server."""
    from s3server import moto_s3

    with moto_s3(tmp_path / "moto.log") as s3:
        store = DatasetStore("s3://aligncurate/ds", storage_options=s3.env())
        for prefix, n in (("a", 4), ("b", 5)):
            commit_build(store, "sft", tmp_path, canonical_table(ids(prefix, n)))
        fs, table = store.table_location("sft")
        with fs.open_output_stream(f"{table}/split=train/part-orphan.snappy.parquet") as out:
            out.write(b"PAR1 interrupted")
        with fs.open_input_stream(f"{table}/{LOG}/00000000000000000001.json") as stream:
            text = stream.read()
        with fs.open_output_stream(f"{table}/{LOG}/00000000000000000001.json") as out:
            out.write(text[: len(text) // 2])

        assert train_ids(store, "sft@0") == ids("a", 4)
        with pytest.raises(StoreError, match=r"00000000000000000001\.json \(version 1\)"):
            store.read("sft")
        code, stdout, _ = cli("doctor", "sft", "--json", "--store", store.root, env=s3.env())
        assert code == 1 and json.loads(stdout)["readable"] == [0]
        with pytest.raises(StoreError, match="nothing deleted"):
            collect_garbage(store, "sft", timedelta(0))

        fs.delete_file(f"{table}/{LOG}/00000000000000000001.json")  # give up version 1
        result = collect_garbage(store, "sft", timedelta(0))
        assert "split=train/part-orphan.snappy.parquet" in result.deleted
        assert len(result.deleted) == 2 and result.referenced == 1  # v1's file, the orphan
        assert train_ids(store, "sft") == ids("a", 4)
        assert diagnose(store, "sft").ok


# -- pickled task failures -----------------------------------------------------------------


def failures(results: Path) -> list[BaseException]:
    """The exceptions pickled in the Prefect result records under ``results``."""
    found = []
    for path in results.glob("*"):
        if path.is_file():
            record = json.loads(path.read_text())
            value = pickle.loads(base64.b64decode(record["result"]))
            if isinstance(value, BaseException):
                found.append(value)
    return found


@pytest.mark.usefixtures("prefect_harness")
def test_pickled_failures_are_cleared_when_the_build_later_succeeds(tmp_path: Path) -> None:
    from pipelines.build import build_dataset

    source = tmp_path / "late.jsonl"
    source.write_text(
        '{"instruction": "a", "input": "", "output": "b"}\n'
        '{"instruction": "c", "input": "", "output": \n'
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "res", "sources": [{"path": str(source)}]}))
    store = tmp_path / "store"
    results = store / "_work" / "res" / "results"
    assert build_dataset(str(spec), store=str(store), return_state=True).is_failed()
    assert build_dataset(str(spec), store=str(store), return_state=True).is_failed()
    assert len(failures(results)) == 2

    source.write_text(source.read_text().replace('"output": \n', '"output": "d"}\n'))
    assert build_dataset(str(spec), store=str(store))["version"] == 0
    assert failures(results) == []
    assert not list((results / "failed").glob("*"))


@pytest.mark.usefixtures("prefect_harness")
def test_a_task_that_succeeds_after_failing_clears_its_failure(tmp_path: Path) -> None:
    """The same task key fails, then succeeds, in flows that both fail: the success alone
    clears the pickled failure (not a build's commit)."""
    from prefect import flow
    from prefect.filesystems import LocalFileSystem

    from pipelines.build import ingest_source
    from pipelines.spec import SourceSpec
    from transforms.ingest import IngestParams

    results = tmp_path / "results"
    storage = LocalFileSystem(basepath=str(results))
    storage.save(f"test-failures-{os.getpid()}", overwrite=True)
    task = ingest_source.with_options(result_storage=storage)
    source = tmp_path / "rows.jsonl"

    @flow
    def run_then_fail() -> None:
        spec = SourceSpec(path=str(source))
        task("same-key", spec, IngestParams(), [], str(tmp_path / "shards"))
        raise RuntimeError("a later task of the build fails")

    source.write_text('{"instruction": "a", "input": "", "output": \n')
    assert run_then_fail(return_state=True).is_failed()
    assert len(failures(results)) == 1
    source.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    assert run_then_fail(return_state=True).is_failed()
    assert failures(results) == []
