"""An ``s3://`` store against a real S3-compatible server on loopback (moto[server], with
request signing enforced): build, versions, inspect, diff, tag, export, atomic concurrent
commits, ``datasets.load_dataset`` over a version's train files, and clear errors with no
partial version for an unreachable endpoint or a refused credential."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from s3server import S3Server, moto_s3
from typer.testing import CliRunner

from pipelines.cli import app
from storage.commit import ADOPT_COPIES, write_data_file
from storage.dataset import DatasetStore, StoreError

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "examples" / "demo" / "spec.yaml"
ROOT = "s3://aligncurate/team/datasets"
runner = CliRunner()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_s3(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def cli_json(env: dict[str, str], *args: str) -> object:
    code, out, err = cli(env, *args, "--json")
    assert code == 0, (out, err)
    return json.loads(out)


@pytest.fixture(scope="module")
def built(s3: S3Server, work: Path, prefect_harness: None) -> dict:
    """The demo spec built into the S3 store through the CLI (one Prefect build)."""
    env = s3.env(ALIGNCURATE_WORK=str(work))
    return cli_json(env, "build", str(SPEC), "--store", ROOT)  # type: ignore[return-value]


def store(s3: S3Server) -> DatasetStore:
    """A store configured explicitly (the CLI tests configure it through ``AWS_*``)."""
    options = {k: v for k, v in s3.env().items()}
    return DatasetStore(ROOT, storage_options=options)


def test_build_commits_to_s3_with_a_local_work_folder(
    built: dict, s3: S3Server, work: Path
) -> None:
    assert built["version"] == 0 and built["rows"]["in"] == 530
    keys = s3.list("team/datasets/demo-sft/")
    assert "team/datasets/demo-sft/_delta_log/00000000000000000000.json" in keys
    assert any(k.startswith("team/datasets/demo-sft/split=train/part-") for k in keys)
    assert not any("/_work/" in k or "/_cache/" in k for k in s3.list())  # scratch stays local
    shards = list(work.rglob("train-*"))
    assert shards and all(p.is_relative_to(work) for p in shards)
    assert store(s3).read("demo-sft").num_rows == built["rows"]["train"]


def test_versions_inspect_tag_export_through_aws_env(
    built: dict, s3: S3Server, tmp_path: Path
) -> None:
    env = s3.env()
    versions = cli_json(env, "versions", "demo-sft", "--store", ROOT)
    assert [v["version"] for v in versions] == [0]  # type: ignore[union-attr]
    assert versions[0]["metadata"]["build_id"] == built["build_id"]  # type: ignore[index]
    report = cli_json(env, "inspect", "demo-sft@0", "--store", ROOT)
    assert report["rows"] == built["rows"]["train"] + built["rows"]["rejected"]  # type: ignore[index]
    assert cli_json(env, "tag", "demo-sft@0", "prod", "--store", ROOT)["version"] == 0  # type: ignore[index]
    assert "team/datasets/demo-sft/_aligncurate/tags.json" in s3.list()
    out = tmp_path / "export"
    cli_json(
        env,
        "export",
        "demo-sft@prod",
        "--format",
        "trl_messages",
        "--out",
        str(out),
        "--store",
        ROOT,
    )
    exported = sorted(out.rglob("*.jsonl")) + sorted(out.rglob("*.parquet"))
    assert exported, list(out.rglob("*"))


def test_diff_and_concurrent_commits_are_atomic(built: dict, s3: S3Server, tmp_path: Path) -> None:
    """Four commits race for the next version: each gets its own version, the Delta log
    has exactly one entry per version (conditional puts on S3), every version reads, and
    ``diff`` against the build shows the rows they dropped."""
    datasets = store(s3)
    train = datasets.read("demo-sft@0")
    rejected = tmp_path / "rejected.parquet"
    pq.write_table(datasets.read("demo-sft@0", split="rejected"), rejected)
    shards = []
    for i in range(4):
        path = tmp_path / f"train-{i}.parquet"
        pq.write_table(train.slice(i + 1), path)  # version k drops the first rows
        shards.append(str(path))
    results: dict[int, int | BaseException] = {}
    barrier = threading.Barrier(4)

    def commit(i: int) -> None:
        barrier.wait()
        try:
            results[i] = datasets.commit(
                "demo-sft", [shards[i]], [str(rejected)], {"build_id": f"race-{i}"}
            )
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [1, 2, 3, 4], results  # type: ignore[type-var]
    log = [k for k in s3.list("team/datasets/demo-sft/_delta_log/") if k.endswith(".json")]
    assert len(log) == 5
    for version, info in enumerate(datasets.versions("demo-sft")):
        assert info.version == version
        if version:
            i = int(info.metadata["build_id"].removeprefix("race-"))
            assert results[i] == version
            assert datasets.read(f"demo-sft@{version}").num_rows == train.num_rows - i - 1
    diff = cli_json(s3.env(), "diff", "demo-sft@0", f"demo-sft@{results[3]}", "--store", ROOT)
    assert diff["removed"] == 4 and diff["added"] == 0  # type: ignore[index]


def test_data_file_shards_are_copied_onto_s3_byte_for_byte_in_order(
    built: dict, s3: S3Server, tmp_path: Path
) -> None:
    """Shards written as data files are adopted by a commit to S3: copied unread (several
    at once), each one file of the version, byte for byte, and the rows in shard order."""
    datasets = store(s3)
    train = datasets.read("demo-sft@0")
    count = ADOPT_COPIES + 2  # more shards than copies at once
    shards = []
    for i in range(count):
        path = tmp_path / f"train-{i}.parquet"
        assert write_data_file(train.slice(i * 20, 20), str(path))
        shards.append(str(path))
    version = datasets.commit("adopted", shards, [], {"build_id": "adopt"})
    assert datasets.read(f"adopted@{version}").equals(train.slice(0, 20 * count))
    client: Any = s3.client()
    keys = [f.removeprefix(f"s3://{s3.bucket}/") for f in datasets.files(f"adopted@{version}")]
    bodies = [client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() for key in keys]
    assert bodies == [Path(p).read_bytes() for p in shards]


def test_load_dataset_reads_a_versions_train_files_from_s3(built: dict, s3: S3Server) -> None:
    from datasets import load_dataset

    datasets = store(s3)
    files = datasets.files("demo-sft@0")
    assert files and all(f.startswith(f"{ROOT}/demo-sft/split=train/") for f in files)
    loaded = load_dataset(
        "parquet", data_files=files, split="train", storage_options=datasets.fsspec_options()
    )
    expected = datasets.read("demo-sft@0")
    assert loaded.num_rows == expected.num_rows == built["rows"]["train"]
    assert loaded["id"] == expected.column("id").to_pylist()


UNREACHABLE = "<an endpoint on a closed port>"


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as it is held: bound, never
    listening, so no server started meanwhile can take it (a port merely found free when
    the tests were collected was later taken by another test's server, and the build
    waited on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "credentials were refused"),
        ({"AWS_ENDPOINT_URL": UNREACHABLE}, "cannot reach the S3 endpoint"),
    ],
    ids=["bad-credential", "unreachable-endpoint"],
)
def test_bad_credential_or_endpoint_fails_clearly_with_no_version(
    built: dict, s3: S3Server, work: Path, override: dict[str, str], message: str
) -> None:
    with closed_port() as port:
        endpoint = {
            k: v.replace(UNREACHABLE, f"http://127.0.0.1:{port}") for k, v in override.items()
        }
        check_fails_clearly(built, s3, work, endpoint, message)


def check_fails_clearly(
    built: dict, s3: S3Server, work: Path, override: dict[str, str], message: str
) -> None:
    before = [v.version for v in store(s3).versions("demo-sft")]
    env = s3.env(ALIGNCURATE_WORK=str(work), **override)
    code, out, err = cli(env, "build", str(SPEC), "--store", ROOT, "--json")
    assert code == 2, (out, err)
    assert message in err and ROOT in err
    code, _, err = cli(env, "versions", "demo-sft", "--store", ROOT)
    assert code == 2 and message in err
    assert [v.version for v in store(s3).versions("demo-sft")] == before
    with pytest.raises(StoreError, match=message):
        DatasetStore(ROOT, storage_options=env).check()
