"""Scale-out: ``--runner dask`` on a 2-worker LocalCluster, model work spread over two real
``vllm serve`` processes, and a Dask worker killed during a build."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from corpora import enlarged_gsm8k
from typer.testing import CliRunner

from engines.server import VLLMServer
from pipelines.cli import app
from pipelines.runners import RunnerError, RunnerOptions, build_flow, task_runner
from storage.dataset import DatasetStore
from transforms.craft.query import QueryParams

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo" / "spec.yaml"
FACTS = 40
runner = CliRunner()


def _tables(store: Path, name: str) -> tuple:
    datasets = DatasetStore(str(store))
    return datasets.read(name), datasets.read(name, split="rejected")


def test_dask_runner_output_is_identical_to_the_default_runners(
    prefect_harness: None, tmp_path: Path
) -> None:
    """The demo spec (5 sources: 5 ingest tasks on the workers) with near dedup after
    normalize (its signatures: one prepare task per shard on the workers), through the CLI."""
    spec = yaml.safe_load(DEMO.read_text())
    for source in spec["sources"]:
        source["path"] = str(DEMO.parent / source["path"])
    spec["stages"].insert(1, {"near_dedup": {}})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = runner.invoke(app, ["build", str(path), "--store", str(tmp_path / "threads")])
    assert code.exit_code == 0, code.stderr
    result = runner.invoke(
        app, ["build", str(path), "--store", str(tmp_path / "dask"), "--runner", "dask"]
    )
    assert result.exit_code == 0, result.stderr
    for a, b in zip(
        _tables(tmp_path / "threads", "demo-sft"),
        _tables(tmp_path / "dask", "demo-sft"),
        strict=True,
    ):
        assert a.num_rows > 0 and a.equals(b)
    rejected = _tables(tmp_path / "dask", "demo-sft")[1]
    assert "near_dedup" in rejected.column("reject_stage").to_pylist()
    # near dedup ran partitioned (on by default under --runner dask: 2 partitions per worker
    # of the 2-worker LocalCluster): one scattered signature file per ingest shard (5 sources)
    assert len(list((tmp_path / "dask").rglob("partitioned/*/p4/scatter/*.sigs.npy"))) == 5


def test_runner_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RunnerError, match="needs --runner dask"):
        task_runner(RunnerOptions(dask_address="tcp://127.0.0.1:8786"))
    with pytest.raises(RunnerError, match="expected a scheduler URL"):
        task_runner(RunnerOptions(runner="dask", dask_address="127.0.0.1:8786"))
    result = runner.invoke(app, ["build", str(DEMO), "--runner", "ray"])
    assert result.exit_code == 2 and "threads or dask" in result.stderr
    result = runner.invoke(app, ["build", str(DEMO), "--partitions", "-1"])
    assert result.exit_code == 2 and "--partitions" in result.stderr
    monkeypatch.setenv("ALIGNCURATE_DEDUP_PARTITIONS", "four")
    with pytest.raises(RunnerError, match="ALIGNCURATE_DEDUP_PARTITIONS='four'"):
        build_flow(RunnerOptions(runner="dask"))


def test_a_dead_dask_worker_fails_the_build_with_no_version(
    prefect_harness: None, shared_data: Path, tmp_path: Path
) -> None:
    """An external cluster whose scheduler gives up on a task after one lost worker
    (``allowed-failures: 0``); the worker is killed (``SIGKILL``) once the ingest task has
    written its first shard."""
    import dask
    from distributed import Client, LocalCluster

    enlarged_gsm8k(shared_data, tmp_path / "big.jsonl", 120_000)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "big",
                "sources": [{"path": "big.jsonl"}],
                "ingest": {"batch_rows": 4096},
                "stages": [{"normalize": {}}],
            }
        )
    )
    store = tmp_path / "store"
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        pids = list(client.run(os.getpid).values())
        shards = store / "_work" / "big" / "shards"

        def kill_worker() -> None:
            deadline = time.monotonic() + 180
            while not (shards.is_dir() and any(shards.rglob("train-*"))):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_worker)
        killer.start()
        flow = build_flow(RunnerOptions(runner="dask", dask_address=cluster.scheduler_address))
        with pytest.raises(RunnerError, match="Dask worker died"):
            flow(str(spec), store=str(store))
        killer.join()
    assert not DatasetStore(str(store)).exists("big")


# -- model work over two vllm serve endpoints ------------------------------------------------


@pytest.fixture(scope="module")
def servers(
    request: pytest.FixtureRequest, fact_world, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[VLLMServer]]:
    """Two ``vllm serve`` processes of the fact-world model: the session's (tests/conftest.py)
    and a second one, started side by side (the second in a thread while the session's
    starts, unless it is already running)."""
    log = tmp_path_factory.mktemp("serve") / "serve-1.log"
    second = VLLMServer(fact_world.model_dir, max_model_len=512, log_path=log)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            second.start()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        try:
            first = request.getfixturevalue("vllm_server")
        finally:
            thread.join()
        if errors:
            raise errors[0]
        yield [first, second]
    finally:
        second.stop()


def _served(server: VLLMServer) -> float:
    """Sequences a server finished, from its Prometheus metrics."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def test_craft_scoring_on_dask_spreads_over_two_servers_and_caches_each_request_once(
    servers: list[VLLMServer], fact_world, prefect_harness: None, tmp_path: Path
) -> None:
    lines = Path(fact_world.facts_path).read_text().splitlines()[:FACTS]
    (tmp_path / "facts.jsonl").write_text("\n".join(lines) + "\n")

    def spec(urls: str) -> Path:
        craft = {
            "model": str(fact_world.model_dir),
            "engine": "openai",
            "url": urls,
            "method": "craft_wo_flow",
            "static_conflict": False,
        }
        path = tmp_path / f"spec-{len(urls.split(','))}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "name": "fw-dask",
                    "sources": [{"path": "facts.jsonl", "format": "open_qa"}],
                    "stages": [{"normalize": {}}, {"craft": craft}],
                }
            )
        )
        return path

    before = [_served(s) for s in servers]
    both = ",".join(s.url for s in servers)
    os.environ["ALIGNCURATE_CACHE"] = str(tmp_path / "cache")
    try:
        first = build_flow(RunnerOptions(runner="dask"))(str(spec(both)), str(tmp_path / "a"))
        served = [_served(s) - b for s, b in zip(servers, before, strict=True)]
        assert first["cache"]["misses"] == FACTS
        # vLLM counts each of a request's n samples as one finished sequence
        sequences = FACTS * QueryParams().samples
        assert sum(served) == sequences and min(served) == sequences // 2  # spread evenly
        # one server, another store, the same cache: every generation is a hit
        again = build_flow(RunnerOptions())(str(spec(servers[0].url)), str(tmp_path / "b"))
    finally:
        os.environ.pop("ALIGNCURATE_CACHE", None)
    assert again["cache"] == {"hits": FACTS, "misses": 0, "engine_calls": 0}
    assert [_served(s) - b for s, b in zip(servers, before, strict=True)] == served
    assert _tables(tmp_path / "a", "fw-dask")[0].equals(_tables(tmp_path / "b", "fw-dask")[0])
