"""Crash-safe resume, end to end: ``kill -9`` the ``aligncurate build`` console script
during ingest, mid-scoring in CRaFT and during commit, then run the same command again;
and two builds of one dataset at once.

Each killed run must leave no version; each rerun must commit a train split identical to
an uninterrupted build's, and a rerun after a kill mid-scoring must not pay again for the
generations that had completed. Timing is observed, never injected: the test polls what
the build writes (ingest shards, rows in the SQLite generation cache, the data files of
the commit) and kills the process group (the build and any processes it started) the
moment it sees them.

Cost control: the builds share the session's Prefect test server (``PREFECT_API_URL``)
instead of starting an ephemeral one each, and the CRaFT spec scores 60 fact-world
questions with ``craft_wo_flow`` (CRaFT's certainty scoring, without the rehearsal
fine-tune: rehearsal is one cached Prefect task, resumed as a unit, see test_craft.py) and
``cache_batch: 32``, so the generation cache fills in two batches (32 + 28 requests). The
CRaFT builds score through the session's ``vllm serve`` (``vllm_server``, engine
``openai``) rather than starting a vLLM engine in each child process; the in-process vLLM
path of a build is covered by test_craft.py and test_cli_engines.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from corpora import enlarged_gsm8k

from storage.dataset import DatasetStore

EXE = Path(sys.executable).with_name("aligncurate")
FACTS = 60  # two generation-cache batches of CACHE_BATCH requests
CACHE_BATCH = 32
CORPUS_ROWS = 90_000  # ingest and commit take seconds, not milliseconds


# -- running and killing builds ------------------------------------------------------------


class Build:
    """``aligncurate build SPEC --store STORE --json`` in its own process group."""

    def __init__(self, spec: Path, store: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.out = log.with_suffix(".out")
        with self.out.open("w") as out, log.open("w") as err:
            self.proc = subprocess.Popen(
                [str(EXE), "build", str(spec), "--store", str(store), "--json"],
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )

    def kill_when(self, seen: Callable[[], bool], timeout: float = 240) -> None:
        """``kill -9`` the build's process group as soon as ``seen()`` holds."""
        deadline = time.monotonic() + timeout
        while not seen():
            if self.proc.poll() is not None:
                pytest.fail(f"the build ended before the kill point: {self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"kill point not reached in {timeout} s: {self.tail()}")
            time.sleep(0.005)
        self.kill()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def summary(self, timeout: float = 300) -> dict:
        """Wait for the build; its ``--json`` summary (the last JSON object on stdout:
        vLLM logs to stdout too)."""
        code = self.proc.wait(timeout=timeout)
        assert code == 0, self.tail()
        text = self.out.read_text()
        return json.loads(text[text.rindex("\n{\n") + 1 :] if "\n{\n" in text else text)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def _env(tmp: Path, api_url: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp / "prefect-home")}
    env.pop("ALIGNCURATE_CACHE", None)  # the generation cache lives in each store's _cache
    return env


def _train(store: Path, name: str) -> pa.Table:
    return DatasetStore(str(store)).read(name).sort_by("id")


def _has_version(store: Path, name: str) -> bool:
    return DatasetStore(str(store)).exists(name)


def _segments_with_shards(shards: Path) -> list[Path]:
    """The segment folders under ``shards`` that hold a shard (scratch or data file)."""
    folders = shards.iterdir() if shards.is_dir() else []
    return [folder for folder in folders if any(_shard_files(folder.glob("*")))]


def _shard_files(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths if p.suffix in {".arrow", ".parquet"}]


def _files(folder: Path, pattern: str) -> Callable[[], bool]:
    return lambda: folder.is_dir() and any(folder.rglob(pattern))


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_url(prefect_harness: None) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def corpus_spec(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A no-model spec over a large real corpus (GSM8K in Alpaca form, repeated; see
    :func:`corpora.enlarged_gsm8k`): ingest → normalize → exact dedup → filter."""
    folder = tmp_path_factory.mktemp("corpus")
    enlarged_gsm8k(shared_data, folder / "gsm8k_x.jsonl", CORPUS_ROWS)
    spec = folder / "spec.yaml"
    stages = [{"normalize": {}}, {"exact_dedup": {}}, {"filter": {"max_chars": 1500}}]
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "gsm8k-resume",
                "sources": [{"path": "gsm8k_x.jsonl"}],
                "ingest": {"batch_rows": 8192},
                "stages": stages,
            }
        )
    )
    return spec


@pytest.fixture(scope="module")
def craft_spec(tmp_path_factory: pytest.TempPathFactory, fact_world, vllm_server) -> Path:
    """CRaFT scoring through the session's ``vllm serve`` (engine ``openai``): the builds in
    child processes start no vLLM engine of their own (each one cost 30-60 s of CPU here)."""
    folder = tmp_path_factory.mktemp("fw")
    lines = Path(fact_world.facts_path).read_text().splitlines()[:FACTS]
    (folder / "facts.jsonl").write_text("\n".join(lines) + "\n")
    spec = folder / "spec.yaml"
    craft = {
        "model": str(fact_world.model_dir),
        "engine": "openai",
        "url": vllm_server.url,
        "method": "craft_wo_flow",
        "static_conflict": False,
        "cache_batch": CACHE_BATCH,
    }
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "fw-resume",
                "sources": [{"path": "facts.jsonl", "format": "open_qa"}],
                "stages": [{"normalize": {}}, {"exact_dedup": {}}, {"craft": craft}],
            }
        )
    )
    return spec


@pytest.fixture(scope="module")
def corpus_reference(corpus_spec: Path, api_url: str, tmp_path_factory) -> dict:
    """One uninterrupted build of the corpus spec: the reference for its reruns."""
    tmp = tmp_path_factory.mktemp("corpus-ref")
    summary = Build(corpus_spec, tmp / "store", _env(tmp, api_url), tmp / "build.log").summary()
    return {"summary": summary, "train": _train(tmp / "store", "gsm8k-resume")}


# -- tests -------------------------------------------------------------------------------


def test_kill_during_ingest_then_during_the_last_segment_then_rerun(
    corpus_spec: Path, corpus_reference: dict, api_url: str, tmp_path: Path
) -> None:
    store, env = tmp_path / "store", _env(tmp_path, api_url)
    name = "gsm8k-resume"
    shards = store / "_work" / name / "shards"

    killed = Build(corpus_spec, store, env, tmp_path / "ingest.log")
    killed.kill_when(_files(shards, "*.arrow"))  # the first ingest shard is on disk
    assert not _has_version(store, name)

    # The last segment writes the version's data files (the commit then links them in, in
    # milliseconds: too short a window to kill it in): kill it once it has begun them.
    killed = Build(corpus_spec, store, env, tmp_path / "commit.log")
    killed.kill_when(lambda: len(_segments_with_shards(shards)) >= 2)
    assert not _has_version(store, name)
    assert len(_segments_with_shards(shards)) >= 2  # ingest's, and the last segment's

    summary = Build(corpus_spec, store, env, tmp_path / "rerun.log").summary()
    assert summary["version"] == 0
    assert summary["rows"] == corpus_reference["summary"]["rows"]
    assert summary["counts"] == corpus_reference["summary"]["counts"]
    assert _train(store, name).equals(corpus_reference["train"])


def test_kill_mid_scoring_in_craft_then_rerun_pays_only_for_the_rest(
    craft_spec: Path, api_url: str, tmp_path: Path
) -> None:
    name = "fw-resume"
    ref_store = tmp_path / "reference"
    # The reference first, to the end: the shared server then sees the same batches (32 +
    # 28 requests) in the reference as in the killed run and its rerun.
    reference = Build(craft_spec, ref_store, _env(tmp_path, api_url), tmp_path / "ref.log")
    expected = reference.summary(timeout=400)

    store, env = tmp_path / "store", _env(tmp_path, api_url)
    cache = store / "_cache"
    killed = Build(craft_spec, store, env, tmp_path / "killed.log")
    killed.kill_when(lambda: _rows(cache) > 0, timeout=400)
    assert not _has_version(store, name)
    done = _rows(cache)
    assert done == CACHE_BATCH  # killed between the two scoring batches

    rerun = Build(craft_spec, store, env, tmp_path / "rerun.log").summary(timeout=400)
    assert rerun["version"] == 0
    assert expected["misses"] == FACTS
    assert rerun["hits"] == done  # the completed batch is read back
    assert rerun["misses"] == FACTS - done < expected["misses"]
    assert rerun["counts"] == expected["counts"]
    assert _train(store, name).equals(_train(ref_store, name))


def test_two_builds_at_once_both_commit_and_the_table_stays_readable(
    corpus_spec: Path, corpus_reference: dict, api_url: str, tmp_path: Path
) -> None:
    store, env = tmp_path / "store", _env(tmp_path, api_url)
    name = "gsm8k-resume"
    builds = [Build(corpus_spec, store, env, tmp_path / f"b{i}.log") for i in range(2)]
    summaries = [b.summary() for b in builds]
    assert sorted(s["version"] for s in summaries) == [0, 1]  # the loser retried onto v1
    datasets = DatasetStore(str(store))
    infos = datasets.versions(name)
    assert [v.version for v in infos] == [0, 1]
    assert {v.metadata["build_id"] for v in infos} == {s["build_id"] for s in summaries}
    for info in infos:
        train = datasets.read(f"{name}@{info.version}").sort_by("id")
        assert train.equals(corpus_reference["train"]), _difference(
            train, corpus_reference["train"], [b.tail() for b in builds]
        )
        assert (
            datasets.read(f"{name}@{info.version}", split="rejected").num_rows
            == (corpus_reference["summary"]["rows"]["rejected"])
        )


def _difference(got: pa.Table, want: pa.Table, logs: list[str]) -> str:
    """What differs between two tables (for a failure message): rows, schema, columns."""
    if got.num_rows != want.num_rows:
        return f"{got.num_rows} rows against {want.num_rows}; logs: {logs}"
    if got.schema != want.schema:
        return f"schema {got.schema} against {want.schema}"
    columns = [c for c in want.column_names if not got.column(c).equals(want.column(c))]
    first = columns[0] if columns else None
    at = next((i for i in range(got.num_rows) if first and got[first][i] != want[first][i]), None)
    example = f"; row {at}: {got[first][at]} against {want[first][at]}" if at is not None else ""
    return f"columns {columns} differ{example}; logs: {logs}"


def _rows(cache: Path) -> int:
    """Rows in the generation cache (SQLite, WAL: readable while the build writes)."""
    path = cache / "generations.sqlite"
    if not path.is_file():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        try:
            return int(db.execute("SELECT count(*) FROM generations").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return 0
