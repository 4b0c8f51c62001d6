"""The build flow against a real Prefect server (``prefect server start`` on loopback)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import build_demo_with_console_script
from servers import api
from servers import prefect_server as start_prefect_server

from pipelines.prefect_server import signals_as_exit


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
    artifacts = api(prefect_server, "/artifacts/filter", {})
    keys = {a["key"] for a in artifacts if a["flow_run_id"] == build_id}
    assert keys == {"demo-sft-build-summary", "demo-sft-stage-counts", "demo-sft-report"}


def _heartbeats(url: str, flow_run: str, wait: float) -> int:
    """The heartbeat events the server holds for ``flow_run`` (waiting up to ``wait`` s for
    one: events are stored a moment after they are sent)."""
    query = {"filter": {"event": {"prefix": ["prefect.flow-run.heartbeat"]}}, "limit": 50}
    deadline = time.monotonic() + wait
    while True:
        events = api(url, "/events/filter", query)["events"]
        found = [e for e in events if e["resource"]["prefect.resource.id"].endswith(flow_run)]
        if found or time.monotonic() > deadline:
            return len(found)
        time.sleep(0.5)


def test_a_build_sends_heartbeats_only_when_asked(prefect_server: str, tmp_path: Path) -> None:
    """Prefect's default heartbeat makes every flow run wait for its thread at the end
    (pipelines/prefect_server.py): builds send none unless the environment asks."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "h")}
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    asked = {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    with_beats = build_demo_with_console_script(tmp_path / "a", asked)["build_id"]
    assert _heartbeats(prefect_server, with_beats, wait=30) >= 1
    without = build_demo_with_console_script(tmp_path / "b", env)["build_id"]
    assert _heartbeats(prefect_server, without, wait=3) == 0


@pytest.mark.fast
@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "swallowed"])
def test_a_signal_leaves_as_its_exit_whatever_a_library_made_of_it(replaced: bool) -> None:
    """A library that catches the signal's exception and raises its own (pydantic-core's
    ValidationError in a CI run) or carries on: the block still exits 128 + signal."""
    with pytest.raises(SystemExit) as left, signals_as_exit():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt as exc:
            if replaced:
                raise ValueError("1 validation error") from exc
    assert left.value.code == 128 + signal.SIGTERM
