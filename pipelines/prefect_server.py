"""The Prefect API server a command's flows talk to: the one ``PREFECT_API_URL`` names, a
persistent local server reused across commands, or a temporary one for this command only.

Which one :func:`prefect_api` picks, in order:

1. ``PREFECT_API_URL`` (the environment or the active Prefect profile): that server, always;
   nothing is started.
2. The persistent local server (``aligncurate server start``), when it runs for the same
   ``PREFECT_HOME`` (so the same database). With ``ALIGNCURATE_PREFECT_SERVER=start`` a
   build starts it on first use; by default (``reuse``) a build only uses it when it is
   running, and never leaves a process behind that the user did not ask for.
3. A temporary server for this command (``ALIGNCURATE_PREFECT_SERVER=temporary`` forces it),
   stopped when the command ends: normally, on an error, on Ctrl-C, on SIGTERM or SIGHUP
   (the command then exits 128 + the signal), and, when the command is killed with
   SIGKILL, by the server itself: it watches its parent's pid and shuts down when the parent
   is gone. It runs in its own session, so the command records its flow run as crashed
   before it stops the server.

The servers are ``uvicorn`` serving ``prefect.server.api.server:create_app`` on loopback,
started through ``python -m pipelines.prefect_server`` (which adds the parent watch). The
persistent server's pid, port and URL live in ``server.json`` under
``$ALIGNCURATE_STATE/prefect-server`` (default ``$XDG_CACHE_HOME/aligncurate/prefect-server``,
i.e. ``~/.cache/aligncurate/prefect-server``), next to its log, ``server.log``. Its
database is Prefect's own (``PREFECT_HOME``'s ``prefect.db`` or
``PREFECT_API_DATABASE_CONNECTION_URL``), the one temporary servers use, so the run history
is the same whichever served a build.

Only the standard library is imported at module level: the server process runs this file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

STATE_ENV = "ALIGNCURATE_STATE"
MODE_ENV = "ALIGNCURATE_PREFECT_SERVER"
Mode = Literal["reuse", "start", "temporary"]
MODES: tuple[Mode, ...] = ("reuse", "start", "temporary")
HOST = "127.0.0.1"
#: Seconds a server gets to answer its health check (a first start creates the database).
START_TIMEOUT = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
STOP_TIMEOUT = 15.0
#: How often a temporary server checks that the command that started it is alive.
PARENT_POLL_S = 0.5
#: Environment of a temporary server: no UI, only the services an ephemeral server runs.
TEMPORARY_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class ServerError(RuntimeError):
    """A local Prefect server that cannot be started, or one that belongs elsewhere."""


@dataclass(frozen=True)
class ServerInfo:
    """A persistent server, as recorded in ``server.json``."""

    pid: int
    port: int
    url: str
    prefect_home: str
    database: str | None
    started_at: float
    log: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def state_dir() -> Path:
    """Where the persistent server's ``server.json``, lock and log live."""
    root = os.environ.get(STATE_ENV)
    if root:
        return Path(root).expanduser() / "prefect-server"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "aligncurate" / "prefect-server"


def _identity() -> tuple[str, str | None]:
    """The Prefect home and database a server started now would serve."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser().resolve()
    return str(home), os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")


def mode() -> Mode:
    """``ALIGNCURATE_PREFECT_SERVER``: reuse (the default), start or temporary."""
    value = os.environ.get(MODE_ENV, "reuse").strip().lower() or "reuse"
    if value not in MODES:
        raise ServerError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value  # type: ignore[return-value]


# ---------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _is_our_server(pid: int) -> bool:
    """Whether ``pid`` runs this module (not a process that reused a stale pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"pipelines.prefect_server" in cmdline and alive(pid)


#: Loopback needs no proxy: an ``http_proxy`` in the environment must not answer for it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the API at ``url`` answers its health check."""
    try:
        with _DIRECT.open(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _spawn(port: int, log: Path, *, parent: int | None, env: dict[str, str]) -> subprocess.Popen:
    """``python -m pipelines.prefect_server --port PORT [--parent PID --log LOG]``, in its
    own session, its output appended to ``log``."""
    command = [sys.executable, "-m", "pipelines.prefect_server", "--port", str(port)]
    if parent is not None:
        command += ["--parent", str(parent), "--log", str(log)]
    full = {**os.environ, **env}
    full.pop("PREFECT_API_URL", None)
    with log.open("ab") as sink:
        return subprocess.Popen(
            command,
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _terminate(proc: subprocess.Popen | int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM a server (uvicorn shuts down cleanly), SIGKILL it if it lingers."""
    pid = proc if isinstance(proc, int) else proc.pid
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if isinstance(proc, subprocess.Popen):
                if proc.poll() is not None:
                    return
            elif not alive(pid):
                return
            time.sleep(0.05)


def _started(log: Path, *, parent: int | None, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A server that answers its health check: started on a free port (another, up to three
    tries, when the port was taken meanwhile); killed again if anything goes wrong."""
    for _attempt in range(3):
        port = _free_port()
        url = f"http://{HOST}:{port}/api"
        proc = _spawn(port, log, parent=parent, env=env)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if healthy(url, timeout=1.0):
                    return proc, url
                time.sleep(0.1)
        except BaseException:
            _terminate(proc)
            raise
        if proc.poll() is None:
            _terminate(proc)
            break
        if "address already in use" not in log.read_text(errors="replace").lower():
            break
    tail = log.read_text(errors="replace")[-2000:]
    raise ServerError(f"the Prefect server did not start (log {log}): {tail.strip()}")


# ------------------------------------------------------------------- persistent server


@contextlib.contextmanager
def state_lock() -> Iterator[Path]:
    """The state folder, locked against other commands starting or stopping the server."""
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _recorded(folder: Path) -> ServerInfo | None:
    """The server ``server.json`` records if its process still runs; a stale file (the
    process gone, or its pid reused) is removed."""
    path = folder / "server.json"
    try:
        info = ServerInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if not _is_our_server(info.pid):
        path.unlink(missing_ok=True)
        return None
    return info


def _write(folder: Path, info: ServerInfo) -> None:
    from storage.atomic import write_json_atomic  # not at module level: `storage` is heavy

    write_json_atomic(folder / "server.json", info.to_dict())


def status() -> dict[str, object]:
    """``{"state": "running" | "unhealthy" | "stopped", ...}`` of the persistent server;
    ``reusable`` says whether this environment's commands would use it (the same
    ``PREFECT_HOME`` and database, and no ``PREFECT_API_URL``)."""
    with state_lock() as folder:
        info = _recorded(folder)
    if info is None:
        return {"state": "stopped", "state_dir": str(folder)}
    state = "running" if healthy(info.url) else "unhealthy"
    same = (info.prefect_home, info.database) == _identity()
    return {
        "state": state,
        **info.to_dict(),
        "state_dir": str(folder),
        "reusable": state == "running" and same and not configured_url(),
    }


def start() -> tuple[ServerInfo, bool]:
    """The persistent server, started unless it runs already; ``(info, started_now)``.
    One that runs for another ``PREFECT_HOME`` or database is an error (stop it first)."""
    with state_lock() as folder:
        info = _recorded(folder)
        if info is not None:
            if (info.prefect_home, info.database) != _identity():
                raise ServerError(
                    f"a local Prefect server (pid {info.pid}, {info.url}) runs for "
                    f"PREFECT_HOME={info.prefect_home}; `aligncurate server stop` it first"
                )
            if healthy(info.url):
                return info, False
            _terminate(info.pid)  # alive but not answering: replace it
        log = folder / "server.log"
        proc, url = _started(log, parent=None, env={})
        home, database = _identity()
        info = ServerInfo(
            pid=proc.pid,
            port=int(url.rsplit(":", 1)[1].split("/")[0]),
            url=url,
            prefect_home=home,
            database=database,
            started_at=time.time(),
            log=str(log),
        )
        _write(folder, info)
        return info, True


def stop() -> ServerInfo | None:
    """Stop the persistent server; the one stopped, or ``None`` when none ran."""
    with state_lock() as folder:
        info = _recorded(folder)
        if info is not None:
            _terminate(info.pid)
        (folder / "server.json").unlink(missing_ok=True)
        return info


def _reusable() -> str | None:
    """The persistent server's URL when this environment's commands may use it."""
    folder = state_dir()
    if not (folder / "server.json").exists():
        return None  # the common case, without taking the lock
    with state_lock() as locked:
        info = _recorded(locked)
    if info is None or (info.prefect_home, info.database) != _identity():
        return None
    return info.url if healthy(info.url) else None


# -------------------------------------------------------------------- a command's server


def configured_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active Prefect profile."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    """A server for this command only, stopped at the end; it also stops itself when this
    process dies without stopping it (SIGKILL)."""
    fd, name = tempfile.mkstemp(prefix="aligncurate-prefect-server-", suffix=".log")
    os.close(fd)
    log = Path(name)
    proc, url = _started(log, parent=os.getpid(), env=TEMPORARY_ENV)
    try:
        yield url
    finally:
        _terminate(proc)
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def _api_url_in_environment(url: str) -> Iterator[None]:
    """``PREFECT_API_URL`` in the environment for the block: for threads that do not inherit
    Prefect's settings context, and for child processes (Dask workers)."""
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


def _api_settings(url: str, *, ui: bool) -> dict[Any, Any]:
    """Prefect's settings that point it at ``url``. Without a UI (a temporary server), no
    "View at <url>" links are logged."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    return {PREFECT_API_URL: url, **({} if ui else {PREFECT_UI_URL: ""})}


def _drain() -> None:
    """Send the flow's queued logs and events while the server still answers and before
    the command's own last lines: sent at exit instead, they would meet a stopped temporary
    server and Prefect's retries, or print Prefect's warnings after the command's error."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that cleanup runs as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP become :class:`Terminated` (once: a repeated signal does not
    interrupt the cleanup), and leave the block as ``SystemExit(128 + signal)``. Prefect's
    flow engine marks the flow run crashed and re-sends the signal, which lands here. Once a
    signal came, whatever leaves the block leaves it as that exit: a library may swallow
    :class:`Terminated` or replace it (pydantic-core turned one raised during a validation
    into a ``ValidationError``, and the build exited 1 with its traceback). Only the main
    thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if not received:
            received.append(signum)
            raise Terminated(signum)

    # A signal ignored when the command started (SIGHUP under nohup) stays ignored.
    saved = {
        sig: signal.signal(sig, handler)
        for sig in SIGNALS
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    except BaseException:
        if not received:
            raise
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)
    if received:
        raise SystemExit(128 + received[0])


#: Where a user asks for flow-run heartbeats (:func:`heartbeat_settings`).
HEARTBEAT_VARIABLES = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def heartbeat_settings() -> dict[Any, Any]:
    """The settings that turn flow-run heartbeats off, unless the environment or the active
    Prefect profile asks for them. Prefect 3.6 sends one every 180 s by default, for
    automations that detect crashed runs of deployments (scheduled builds run by a worker
    keep them); its heartbeat thread sleeps in 1 s steps and the end of every flow run waits
    for it: 0.5 s on average, half of what a small build spends outside its flow."""
    from prefect.context import get_settings_context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    profile = {setting.name for setting in get_settings_context().profile.settings}
    if any(name in os.environ or name in profile for name in HEARTBEAT_VARIABLES):
        return {}
    return {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The API URL for this command's flows (module docstring), active in Prefect's settings
    for the block; a temporary server is stopped when the block ends, however it ends.
    Flow runs send no heartbeats unless asked (:func:`heartbeat_settings`). The settings
    change in one step: each copy of Prefect's settings costs about 15 ms."""
    from prefect.settings import temporary_settings

    with signals_as_exit(), contextlib.ExitStack() as stack:
        updates = heartbeat_settings()
        url = configured_url()
        if not url:
            chosen = mode()
            reused = None if chosen == "temporary" else _reusable()
            if reused is None and chosen == "start":
                reused = start()[0].url
            ui = reused is not None
            url = reused or stack.enter_context(temporary_server())
            stack.enter_context(_api_url_in_environment(url))
            updates |= _api_settings(url, ui=ui)
        if updates:
            stack.enter_context(temporary_settings(updates=updates))
        # The flow's queued logs and events are sent before the command prints its last
        # words (which stay last on stderr), and before a temporary server stops.
        stack.callback(_drain)
        yield url


# ------------------------------------------------------------------------- the server


def _watch_parent(parent: int, log: Path | None) -> None:
    """Shut this server down once ``parent`` is gone (it was killed without stopping us),
    removing ``log``: the parent would have shown it on a failed start, or removed it."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    if log is not None:
        log.unlink(missing_ok=True)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(STOP_TIMEOUT)
    os._exit(1)


def serve(argv: list[str] | None = None) -> None:
    """Run the Prefect API on loopback (the server process's entry point)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.prefect_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, help="stop when this process is gone")
    parser.add_argument("--log", type=Path, help="the parent's log of this server")
    args = parser.parse_args(argv)
    if args.parent is not None:
        watch = threading.Thread(target=_watch_parent, args=(args.parent, args.log), daemon=True)
        watch.start()
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host=HOST,
        port=args.port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    serve()
