"""The Prefect server behind ``aligncurate build`` (#15 item 4, #16 item 6), with real
servers, real builds and real signals, checked by PID.

- A build's temporary server is stopped on SIGTERM or SIGHUP (the build exits 128 + the
  signal, its flow run recorded as crashed) and does not outlive a build killed with
  SIGKILL.
- ``aligncurate server start|status|stop`` runs one persistent server that builds reuse
  (they start no server of their own), or start on first use with
  ``ALIGNCURATE_PREFECT_SERVER=start``; ``PREFECT_API_URL`` wins over it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import REPO, default_signals
from servers import api, migrated_home, prefect_server

from pipelines.warm import PROJECT_PACKAGES, answers
from pipelines.warm_client import receive, send

EXE = str(Path(sys.executable).with_name("aligncurate"))
DEMO = REPO / "examples" / "demo" / "spec.yaml"
#: What a Prefect server process runs: Prefect's own temporary server (uvicorn serving
#: ``prefect.server.api.server``) or ours (``python -m pipelines.prefect_server``).
SERVER_MARKS = ("prefect.server.api", "pipelines.prefect_server")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: its own Prefect home and server state, no API URL."""
    full = {
        **os.environ,
        "PREFECT_HOME": str(migrated_home(tmp_path / "prefect-home")),
        "ALIGNCURATE_STATE": str(tmp_path / "state"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    for name in ("PREFECT_API_URL", "ALIGNCURATE_PREFECT_SERVER"):
        full.pop(name, None)
    return full


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _json(env: dict[str, str], *args: str, code: int = 0) -> dict:
    proc = _cli(env, *args, "--json")
    assert proc.returncode == code, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _servers(pid: int) -> list[psutil.Process]:
    """The Prefect server processes under ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if any(mark in " ".join(child.cmdline()) for mark in SERVER_MARKS):
                found.append(child)
        except psutil.Error:
            pass
    return found


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if not _gone(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _running_flow_runs(url: str) -> list[dict]:
    query = {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}
    return api(url, "/flow_runs/filter", query, timeout=5)


def _api_urls(server: psutil.Process) -> list[str]:
    try:
        sockets = server.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [
        f"http://127.0.0.1:{s.laddr.port}/api" for s in sockets if s.status == psutil.CONN_LISTEN
    ]


@pytest.fixture(scope="module")
def slow_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spec whose build runs for seconds: 300,000 distinct rows to ingest and dedup."""
    root = tmp_path_factory.mktemp("slow")
    with (root / "rows.jsonl").open("w") as sink:
        for i in range(300_000):
            row = {"instruction": f"What is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."}
            sink.write(json.dumps(row) + "\n")
    spec = root / "spec.yaml"
    spec.write_text(
        "name: slow\nsources:\n  - path: rows.jsonl\nstages:\n  - normalize: {}\n"
        "  - exact_dedup: {}\n"
    )
    return spec


@pytest.fixture
def build_in_flight(
    env: dict[str, str], slow_spec: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """A build of ``slow_spec`` held stopped (SIGSTOP) while its flow run is RUNNING on its
    server and its ingest has written a shard, with the pids of its Prefect server
    processes; whatever a test leaves alive is killed at the end. The build is stopped
    before its state is read, so a signal sent with :func:`_signal` lands mid-flow however
    late the test sends it: the build takes a few seconds, and a busy machine can answer
    the state query later than that (a CI run signalled a build that had already
    completed). Waiting for a shard puts the signal in the build's own work, not in
    Prefect's start of the flow run."""
    store = tmp_path / "store"
    shards = store / "_work" / "slow" / "shards"
    args = [EXE, "build", str(slow_spec), "--store", str(store), "--json"]
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
        # its own group: were this test's process to die while the build is stopped, the
        # orphaned group's stopped build would get SIGHUP and SIGCONT, and end
        process_group=0,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"the build ended early: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no flow run started"
            servers = _servers(proc.pid)
            pids = sorted({*pids, *(s.pid for s in servers)})
            urls = [url for s in servers for url in _api_urls(s)]
            if urls and shards.is_dir() and any(shards.rglob("train-*")):
                _stop(proc.pid)
                time.sleep(0.3)  # a state change already sent reaches the server
                with contextlib.suppress(OSError):
                    if any(_running_flow_runs(url) for url in urls):
                        break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.1)
        assert pids, "the build started no Prefect server"
        yield proc, pids
    finally:
        _kill([proc.pid, *pids])
        proc.wait()
        proc.stderr.close()


def _stop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped (or has ended: the caller checks)."""
    os.kill(pid, signal.SIGSTOP)
    while psutil.Process(pid).status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
        time.sleep(0.01)


def _signal(proc: subprocess.Popen, signum: signal.Signals) -> None:
    """Send ``signum`` to the stopped build of ``build_in_flight``, then let it run on."""
    proc.send_signal(signum)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_stops_the_builds_server(
    build_in_flight: tuple[subprocess.Popen, list[int]],
    env: dict[str, str],
    signum: signal.Signals,
) -> None:
    proc, servers = build_in_flight
    _signal(proc, signum)
    code = proc.wait(timeout=120)
    assert _wait_gone(servers, timeout=5) == [], "the server outlived the build"
    assert code == 128 + signum, proc.stderr.read()[-3000:]
    # the flow run was recorded as crashed while its server still ran
    with contextlib.closing(sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db")) as db:
        assert db.execute("SELECT state_type FROM flow_run").fetchall() == [("CRASHED",)]


def test_a_server_does_not_outlive_a_build_killed_with_sigkill(
    build_in_flight: tuple[subprocess.Popen, list[int]],
) -> None:
    proc, servers = build_in_flight
    logs = [Path(log) for pid in servers for log in _option(pid, "--log")]
    assert logs and all(log.is_file() for log in logs)
    _signal(proc, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert _wait_gone(servers, timeout=30) == [], "an orphaned server is still running"
    assert [log for log in logs if log.exists()] == [], "its log was left behind"


def _option(pid: int, name: str) -> list[str]:
    """The value of option ``name`` on process ``pid``'s command line, if it has one."""
    try:
        command = psutil.Process(pid).cmdline()
    except psutil.Error:
        return []
    return [command[command.index(name) + 1]] if name in command else []


def _build(env: dict[str, str], store: Path) -> tuple[dict, list[int]]:
    """Build the demo; its JSON summary and the pids of Prefect servers it started."""
    args = [EXE, "build", str(DEMO), "--store", str(store), "--json"]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen: set[int] = set()
    while proc.poll() is None:
        seen.update(s.pid for s in _servers(proc.pid))
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout), sorted(seen)


def test_server_start_status_stop_and_a_build_reusing_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    assert _json(env, "server", "status", code=1)["state"] == "stopped"
    started = _json(env, "server", "start")
    try:
        assert started["started"] is True
        url, pid = started["url"], started["pid"]
        assert not _gone(pid)
        assert _get(f"{url}/health") is True
        state = tmp_path / "state" / "prefect-server" / "server.json"
        assert json.loads(state.read_text())["pid"] == pid

        again = _json(env, "server", "start")
        assert (again["started"], again["pid"], again["url"]) == (False, pid, url)
        status = _json(env, "server", "status")
        assert (status["state"], status["pid"], status["reusable"]) == ("running", pid, True)

        summary, own_servers = _build(env, tmp_path / "store")
        assert own_servers == [], "the build started its own server beside the running one"
        run = _get(f"{url}/flow_runs/{summary['build_id']}")
        assert run is not None and run["state"]["type"] == "COMPLETED"

        stopped = _json(env, "server", "stop")
        assert (stopped["stopped"], stopped["pid"]) == (True, pid)
        assert _wait_gone([pid], timeout=5) == []
        assert not state.exists()
        assert _json(env, "server", "status", code=1)["state"] == "stopped"
        assert _json(env, "server", "stop")["stopped"] is False
    finally:
        _cli(env, "server", "stop")


def test_prefect_api_url_wins_over_the_local_server(env: dict[str, str], tmp_path: Path) -> None:
    local = _json(env, "server", "start")
    (tmp_path / "explicit-home").mkdir()
    try:
        with prefect_server(tmp_path / "explicit-home") as explicit:
            configured = {**env, "PREFECT_API_URL": explicit}
            summary, own_servers = _build(configured, tmp_path / "store")
            assert own_servers == []
            assert _get(f"{explicit}/flow_runs/{summary['build_id']}") is not None
            assert _get(f"{local['url']}/flow_runs/{summary['build_id']}") is None

            refused = _cli(configured, "server", "start")
            assert refused.returncode == 2
            assert "PREFECT_API_URL is set" in refused.stderr
    finally:
        _cli(env, "server", "stop")
        _kill([local["pid"]])


def test_start_mode_starts_the_server_on_first_use_and_reuses_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    auto = {**env, "ALIGNCURATE_PREFECT_SERVER": "start"}
    try:
        first, _ = _build(auto, tmp_path / "store")
        status = _json(env, "server", "status")
        assert status["state"] == "running"
        second, own_servers = _build(auto, tmp_path / "store")
        assert own_servers == []
        assert _json(env, "server", "status")["pid"] == status["pid"]
        for summary in (first, second):
            assert _get(f"{status['url']}/flow_runs/{summary['build_id']}") is not None
    finally:
        stopped = _json(env, "server", "stop")
    assert stopped["stopped"] is True
    assert _wait_gone([stopped["pid"]], timeout=5) == []


def test_a_stale_state_file_reads_as_stopped(env: dict[str, str], tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "state" / "prefect-server"
    folder.mkdir(parents=True)
    record = {
        "pid": dead.pid,
        "port": 9,
        "url": "http://127.0.0.1:9/api",
        "prefect_home": env["PREFECT_HOME"],
        "database": None,
        "started_at": 0.0,
        "log": str(folder / "server.log"),
    }
    (folder / "server.json").write_text(json.dumps(record))
    assert _json(env, "server", "status", code=1)["state"] == "stopped"
    assert not (folder / "server.json").exists()


def test_a_bad_server_mode_is_one_error_line(env: dict[str, str], tmp_path: Path) -> None:
    proc = _cli({**env, "ALIGNCURATE_PREFECT_SERVER": "always"}, "build", str(DEMO))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ALIGNCURATE_PREFECT_SERVER")


# ------------------------------------------------------------------- the warm runner


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], int]]:
    """``aligncurate server start``'s Prefect server and warm runner, for the module: the
    CLI's environment and the runner's pid."""
    root = tmp_path_factory.mktemp("warm")
    full = {
        **os.environ,
        "PREFECT_HOME": str(migrated_home(root / "prefect-home")),
        "ALIGNCURATE_STATE": str(root / "state"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    for name in ("PREFECT_API_URL", "ALIGNCURATE_PREFECT_SERVER", "ALIGNCURATE_WARM"):
        full.pop(name, None)
    started = _json(full, "server", "start")
    try:
        assert started["warm"]["state"] == "running", started
        yield full, started["warm"]["pid"]
    finally:
        stopped = _json(full, "server", "stop")
        assert stopped["warm_stopped"] is True
        assert _wait_gone([started["warm"]["pid"], started["pid"]], timeout=30) == []


def _commands_of(runner: int) -> set[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return {child.pid for child in psutil.Process(runner).children()}
    return set()


def _watched(proc: subprocess.Popen, runner: int) -> set[int]:
    """Wait for ``proc``; the runner's children seen meanwhile (its forked commands)."""
    seen: set[int] = set()
    while proc.poll() is None:
        seen |= _commands_of(runner)
        time.sleep(0.02)
    return seen


def test_a_command_runs_in_the_warm_runner(
    warm: tuple[dict[str, str], int], tmp_path: Path
) -> None:
    """The build runs in a fork of the runner, in the caller's folder (a relative
    ``--store``), writing to the caller's stdout; the caller gets its exit code."""
    env, runner = warm
    args = [EXE, "build", str(DEMO), "--store", "store", "--json"]
    proc = subprocess.Popen(
        args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    forked = _watched(proc, runner)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert forked, "no command ran in the warm runner"
    assert proc.pid not in forked and not _servers(runner)
    summary = json.loads(stdout)
    assert summary["rows"] == {"in": 530, "generated": 0, "train": 507, "rejected": 23}
    assert (tmp_path / "store" / "demo-sft" / "_delta_log").is_dir()

    status = _json(env, "server", "status")
    sock = Path(env["ALIGNCURATE_STATE"]) / "prefect-server" / "warm.sock"
    assert status["warm"] == {
        "state": "running",
        "pid": runner,
        "socket": str(sock),
        "serves": True,
        "why": "",
    }
    run = _get(f"{status['url']}/flow_runs/{summary['build_id']}")
    assert run is not None and run["state"]["type"] == "COMPLETED"

    # the command takes the caller's environment: the store from ALIGNCURATE_STORE
    store_env = {**env, "ALIGNCURATE_STORE": str(tmp_path / "store")}
    args = [EXE, "versions", "demo-sft", "--json"]
    listed = subprocess.Popen(args, env=store_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _watched(listed, runner), "the command did not run in the warm runner"
    stdout, stderr = listed.communicate()
    assert listed.returncode == 0, stderr
    assert [v["version"] for v in json.loads(stdout)] == [0]

    missing = subprocess.run(
        [EXE, "versions", "nope", "--store", "store"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: unknown dataset 'nope'"), missing.stderr


def test_bad_requests_and_vanished_callers_do_not_stop_the_runner(
    warm: tuple[dict[str, str], int], tmp_path: Path
) -> None:
    env, runner = warm
    sock_path = str(Path(env["ALIGNCURATE_STATE"]) / "prefect-server" / "warm.sock")
    with socket.socket(socket.AF_UNIX) as sock:  # not JSON, no descriptors
        sock.connect(sock_path)
        sock.sendall(b"\x00\x00\x00\x05hello")
        assert receive(sock)[0]["refused"].startswith("bad request")
    with socket.socket(socket.AF_UNIX) as sock:  # a caller that goes before saying anything
        sock.connect(sock_path)
    recorded = Path(env["ALIGNCURATE_STATE"]) / "prefect-server" / "warm.json"
    matching = json.loads(recorded.read_text())["fingerprint"]
    with socket.socket(socket.AF_UNIX) as sock:  # a request without its fields
        sock.connect(sock_path)
        send(sock, {"fingerprint": matching}, [0, 1, 2])
        assert receive(sock)[0]["refused"].startswith("bad request")
    assert not _gone(runner)
    args = [EXE, "versions", "nope", "--store", str(tmp_path / "store")]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _watched(proc, runner), "the runner stopped serving"
    assert proc.wait() == 2
    proc.stderr.close()  # type: ignore[union-attr]


def test_another_prefect_setting_runs_the_command_here(
    warm: tuple[dict[str, str], int], tmp_path: Path
) -> None:
    """Prefect reads its settings when imported: a caller whose settings differ (in the
    environment or in a settings file) is not served."""
    env, runner = warm
    other = {**env, "PREFECT_LOGGING_LEVEL": "WARNING"}
    status = _json(other, "server", "status")["warm"]
    assert status["serves"] is False
    assert status["why"] == "environment variables differ: PREFECT_LOGGING_LEVEL"
    args = [EXE, "build", str(DEMO), "--store", str(tmp_path / "store"), "--json"]
    proc = subprocess.Popen(args, env=other, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _watched(proc, runner) == set(), "the runner ran a command it should refuse"
    assert proc.wait() == 0, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]

    # Prefect also reads prefect.toml in the working folder when it is imported
    (tmp_path / "prefect.toml").write_text('[logging]\nlevel = "WARNING"\n')
    status = json.loads(_cli_in(env, tmp_path, "server", "status", "--json").stdout)["warm"]
    assert status["serves"] is False
    assert status["why"] == "Prefect settings files differ: prefect.toml"


def _cli_in(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def _forked_build(
    env: dict[str, str], runner: int, spec: Path, store: Path
) -> tuple[subprocess.Popen, int]:
    """A build of ``spec`` through the warm runner, its forked command held stopped
    (SIGSTOP) a second into its run; the caller and the command's pid. A test lets the
    command go on with :func:`_continue_once_pending`, so the signal it sends lands before
    the build could end, however slow the machine."""
    args = [EXE, "build", str(spec), "--store", str(store), "--json"]
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=default_signals,
    )
    deadline = time.monotonic() + 60
    while not (forked := _commands_of(runner)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no command ran in the warm runner"
        time.sleep(0.02)
    command = forked.pop()
    time.sleep(1.0)  # into the flow
    _stop(command)
    assert proc.poll() is None, "the build ended within a second"
    return proc, command


def _continue_once_pending(pid: int, signum: int, timeout: float = 60) -> None:
    """SIGCONT the stopped ``pid`` once ``signum`` waits for it (sent by its caller or the
    runner)."""
    deadline = time.monotonic() + timeout
    while not _pending(pid, signum):
        assert time.monotonic() < deadline, f"{signal.Signals(signum).name} never reached it"
        time.sleep(0.01)
    os.kill(pid, signal.SIGCONT)


def _pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` is pending for process ``pid`` (``/proc/PID/status``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [
        int(line.split()[1], 16)
        for line in status.splitlines()
        if line.startswith(("SigPnd:", "ShdPnd:"))
    ]
    return any(mask >> (signum - 1) & 1 for mask in masks)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_caller_reaches_the_command(
    warm: tuple[dict[str, str], int], slow_spec: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM to ``aligncurate`` stops the command in the runner as it would stop
    a command run in place: exit 130 or 143, no version left behind."""
    env, runner = warm
    proc, command = _forked_build(env, runner, slow_spec, tmp_path / "store")
    try:
        proc.send_signal(signum)
        _continue_once_pending(command, signum)
        code = proc.wait(timeout=120)
        stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
        assert code == 128 + signum, stderr[-3000:]
        assert _wait_gone([command], timeout=10) == []
        assert not (tmp_path / "store" / "slow" / "_delta_log").exists()
    finally:
        _kill([proc.pid, command])
        proc.stderr.close()  # type: ignore[union-attr]


def test_a_killed_caller_stops_its_command(
    warm: tuple[dict[str, str], int], slow_spec: Path, tmp_path: Path
) -> None:
    env, runner = warm
    proc, command = _forked_build(env, runner, slow_spec, tmp_path / "store")
    try:
        proc.kill()
        proc.wait()
        _continue_once_pending(command, signal.SIGTERM)  # from the runner
        assert _wait_gone([command], timeout=60) == [], "the command outlived its caller"
        assert not (tmp_path / "store" / "slow" / "_delta_log").exists()
        assert not _gone(runner)
    finally:
        _kill([command])
        proc.stderr.close()  # type: ignore[union-attr]


def test_an_install_restarts_the_runner(warm: tuple[dict[str, str], int], tmp_path: Path) -> None:
    """A package installed, upgraded or removed changes site-packages: the runner refuses
    the next command (which runs in place), restarts itself (same pid) and serves again."""
    import site

    env, runner = warm
    folder = Path(site.getsitepackages()[0])
    os.utime(folder)  # what pip's adding or removing a *.dist-info folder does
    args = [EXE, "versions", "nope", "--store", str(tmp_path / "store")]
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _watched(first, runner) == set(), "a runner with stale packages ran a command"
    assert first.wait() == 2, first.stderr.read()  # type: ignore[union-attr]
    first.stderr.close()  # type: ignore[union-attr]

    sock = Path(env["ALIGNCURATE_STATE"]) / "prefect-server" / "warm.sock"
    deadline = time.monotonic() + 120
    while not (sock.exists() and answers(sock)):  # bound, preloaded, listening
        assert time.monotonic() < deadline, "the runner did not come back"
        time.sleep(0.1)
    assert not _gone(runner)
    again = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _watched(again, runner), "the restarted runner did not run the command"
    assert again.wait() == 2, again.stderr.read()  # type: ignore[union-attr]
    again.stderr.close()  # type: ignore[union-attr]


def _copy_checkout(folder: Path) -> Path:
    for package in PROJECT_PACKAGES:
        shutil.copytree(
            REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return folder


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_an_edited_checkout_is_what_a_command_runs(tmp_path: Path) -> None:
    """The runner keeps the project's modules imported; a command uses them only while the
    files it would import are the ones the runner imported, unchanged. Edit one, and the
    next command runs the edit; run from another checkout that the same (relative)
    ``PYTHONPATH`` finds, and the command runs that checkout's code, all of it (a runner
    alone, on copies of the checkout)."""
    checkout, other = _copy_checkout(tmp_path / "a"), _copy_checkout(tmp_path / "b")
    _edit(other / "pipelines" / "cli.py", '"[red]error:[/red]', '"[red]fault:[/red]')
    _edit(other / "storage" / "dataset.py", 'f"unknown dataset {name!r}', 'f"no such {name!r}')
    env = {**os.environ, "PYTHONPATH": ".", "ALIGNCURATE_STATE": str(tmp_path)}
    env.pop("ALIGNCURATE_WARM", None)
    sock = tmp_path / "prefect-server" / "warm.sock"
    with (tmp_path / "warm.log").open("wb") as log:
        runner = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipelines.warm"],
            env=env,
            cwd=checkout,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 120
        while not (sock.exists() and answers(sock)):
            assert runner.poll() is None, (tmp_path / "warm.log").read_text()
            assert time.monotonic() < deadline, "the runner did not start"
            time.sleep(0.1)

        def unknown_dataset(cwd: Path) -> str:
            args = [EXE, "versions", "nope", "--store", str(tmp_path / "store")]
            proc = subprocess.Popen(
                args,
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert _watched(proc, runner.pid), "the command did not run in the runner"
            _, stderr = proc.communicate()
            assert proc.returncode == 2, stderr
            return stderr

        assert unknown_dataset(checkout).startswith("error: unknown dataset 'nope'")
        _edit(
            checkout / "storage" / "dataset.py",
            'f"unknown dataset {name!r}',
            'f"no dataset {name!r}',
        )
        assert unknown_dataset(checkout).startswith("error: no dataset 'nope'")
        assert unknown_dataset(other).startswith("fault: no such 'nope'")
    finally:
        runner.terminate()
        runner.wait(timeout=60)
