"""Scheduled builds on a real Prefect server whose database is a real PostgreSQL.

One throwaway PostgreSQL cluster and one ``prefect server start`` on loopback per module;
``aligncurate schedule`` creates the deployment, the test triggers a run and a real
``prefect worker start --run-once`` on a process pool executes it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import api, postgres_cluster, prefect_server
from system_deps import require

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "aligncurate-test"


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh PostgreSQL cluster (asyncpg URL). Without PostgreSQL (``make system-deps``
    installs it) the module's tests skip, or fail under CI."""
    require("postgresql")
    with postgres_cluster() as url:
        yield url


@pytest.fixture(scope="module")
def server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Prefect API URL of a server whose database is ``database``."""
    home = tmp_path_factory.mktemp("prefect-pg-server")
    with prefect_server(home, {"PREFECT_API_DATABASE_CONNECTION_URL": database}) as url:
        yield url


def _postgres_deployments(database: str) -> set[str]:
    """Deployment names read straight from PostgreSQL: the server really stores there."""
    import asyncio

    import asyncpg

    async def names() -> set[str]:
        connection = await asyncpg.connect(database.replace("postgresql+asyncpg", "postgresql"))
        try:
            return {r["name"] for r in await connection.fetch("SELECT name FROM deployment")}
        finally:
            await connection.close()

    return asyncio.run(names())


def _env(url: str, home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)}


def _run(args: list[str], env: dict[str, str], timeout: float = 300, cwd: Path = REPO) -> Any:
    proc = subprocess.run(
        args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


def _aligncurate(*args: str, env: dict[str, str]) -> Any:
    return json.loads(_run([str(BIN / "aligncurate"), *args, "--json"], env).stdout)


def test_scheduled_build_runs_on_a_worker_and_records_its_flow_run(
    server: str, database: str, tmp_path: Path
) -> None:
    from storage.dataset import DatasetStore

    env = _env(server, tmp_path / "home")
    store = tmp_path / "store"
    spec = "examples/demo/spec.yaml"
    created = _aligncurate(
        "schedule", spec, "--cron", "0 3 * * *", "--pool", POOL, "--store", str(store), env=env
    )
    assert created["name"] == "build_dataset/demo-sft"
    assert created["work_pool"] == POOL
    assert created["parameters"] == {
        "spec_path": str(REPO / spec),
        "store": str(store),
    }
    # Rescheduling updates the same deployment.
    updated = _aligncurate(
        "schedule", spec, "--cron", "30 4 * * 1", "--pool", POOL, "--store", str(store), env=env
    )
    assert updated["id"] == created["id"]
    assert updated["cron"] == ["30 4 * * 1"]
    assert "demo-sft" in _postgres_deployments(database)
    listed = {d["name"]: d for d in _aligncurate("schedule", "--list", env=env)}
    shown = listed["build_dataset/demo-sft"]
    assert shown["id"] == created["id"]
    runs = [dt.datetime.fromisoformat(t) for t in shown["next_runs"]]
    assert len(runs) == 3 and runs == sorted(runs)
    now = dt.datetime.now(dt.UTC)
    for when in runs:
        assert when > now
        assert (when.weekday(), when.hour, when.minute) == (0, 4, 30)
    pool = api(server, f"/work_pools/{POOL}")
    assert pool["type"] == "process"

    flow_run = api(server, f"/deployments/{created['id']}/create_flow_run", {})
    worker = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"]
    _run(worker, env, timeout=420)

    state = api(server, f"/flow_runs/{flow_run['id']}")["state"]
    assert state["type"] == "COMPLETED", state
    (version,) = DatasetStore(str(store)).versions("demo-sft")
    assert version.metadata["build_id"] == flow_run["id"]
    assert version.rows["train"] > 0


def test_prefect_yaml_deploys_every_example_spec(server: str, tmp_path: Path) -> None:
    from pipelines.spec import load_spec

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    declared = {d["parameters"]["spec_path"]: d for d in config["deployments"]}
    examples = {str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*.yaml")}
    examples |= {"examples/demo/spec.yaml"}
    tracked = set(
        subprocess.run(
            ["git", "ls-files", "examples"], capture_output=True, text=True, cwd=REPO, check=True
        ).stdout.split()
    )
    assert examples & tracked <= set(declared), "an example spec has no deployment"
    for path, deployment in declared.items():
        assert deployment["name"] == load_spec(REPO / path).name
        assert deployment["entrypoint"] == "pipelines/build.py:build_dataset"

    env = _env(server, tmp_path / "home")
    pool = config["definitions"]["work_pool"]["name"]
    _run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    stored = {
        d["name"]: d for d in api(server, "/deployments/filter", {}) if d["work_pool_name"] == pool
    }
    assert set(stored) == {d["name"] for d in config["deployments"]}
    for deployment in config["deployments"]:
        got = stored[deployment["name"]]
        assert got["parameters"] == deployment["parameters"]
        assert got["entrypoint"] == deployment["entrypoint"]
        assert [s["active"] for s in got["schedules"]] == [
            s["active"] for s in deployment["schedules"]
        ]
        assert got["pull_steps"] == config["pull"]

    # A worker started elsewhere runs the demo from the checkout $ALIGNCURATE_HOME names.
    from storage.dataset import DatasetStore

    store = tmp_path / "store"
    demo = stored["demo-sft"]["id"]
    flow_run = api(
        server, f"/deployments/{demo}/create_flow_run", {"parameters": {"store": str(store)}}
    )
    worker = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"]
    _run(worker, {**env, "ALIGNCURATE_HOME": str(REPO)}, timeout=420, cwd=tmp_path)
    assert api(server, f"/flow_runs/{flow_run['id']}")["state"]["type"] == "COMPLETED"
    (version,) = DatasetStore(str(store)).versions("demo-sft")
    assert version.metadata["build_id"] == flow_run["id"]


def _schedule_error(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = str(BIN / "aligncurate")
    args = [exe, "schedule", "examples/demo/spec.yaml", "--cron", "0 3 * * *"]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "set PREFECT_API_URL"),
        ("http://127.0.0.1:9/api", "Prefect server at http://127.0.0.1:9/api is unreachable"),
    ],
)
def test_no_server_is_one_clear_line(url: str | None, message: str, tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    if url:
        env["PREFECT_API_URL"] = url
    proc = _schedule_error(env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_build_with_an_unreachable_server_is_one_line_and_no_version(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": url}
    store = tmp_path / "store"
    args = [str(BIN / "aligncurate"), "build", "examples/demo/spec.yaml", "--store", str(store)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: Prefect server at {url} is unreachable")
    assert not store.exists()


def test_bad_cron_and_time_zone_are_named(tmp_path: Path) -> None:
    exe = str(BIN / "aligncurate")
    args = [exe, "schedule", "examples/demo/spec.yaml", "--cron", "0 3 * *"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    proc = subprocess.run(
        [*args, "--timezone", "Mars/Base"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "Invalid cron string" in line and "Invalid timezone" in line
