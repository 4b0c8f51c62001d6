"""The build flow against a real Prefect server (``prefect server start`` on loopback)."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import build_demo_with_console_script
from servers import prefect_server as start_prefect_server


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server with its own SQLite database, stopped at the end."""
    with start_prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


def test_build_runs_on_a_real_server_and_records_its_flow_run(
    prefect_server: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "h")}
    build_id = build_demo_with_console_script(tmp_path / "store", env)["build_id"]

    with urllib.request.urlopen(f"{prefect_server}/flow_runs/{build_id}", timeout=10) as response:
        run = json.loads(response.read())
    assert run["id"] == build_id
    assert run["state"]["type"] == "COMPLETED"
    request = urllib.request.Request(
        f"{prefect_server}/artifacts/filter",
        data=json.dumps({}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        artifacts = json.loads(response.read())
    keys = {a["key"] for a in artifacts if a["flow_run_id"] == build_id}
    assert keys == {"demo-sft-build-summary", "demo-sft-stage-counts", "demo-sft-report"}
