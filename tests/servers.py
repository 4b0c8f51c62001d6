"""Real servers on loopback for tests: ``prefect server start`` and a throwaway PostgreSQL."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
POSTGRES_BIN = Path("/usr/lib/postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, path: str, body: dict[str, Any] | None = None, timeout: float = 20) -> Any:
    """A Prefect API call: GET ``url + path``, or POST ``body`` as JSON; the decoded reply."""
    request = urllib.request.Request(
        f"{url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def migrated_home(home: Path) -> Path:
    """``home`` as a new ``PREFECT_HOME`` whose SQLite database is empty and already
    migrated: a copy of one that ``prefect server database upgrade`` made once per Prefect
    version (in the temporary folder, under a lock the test workers share). A server started
    there skips Prefect's migrations, about 5 CPU-seconds; the suite starts some thirty."""
    home.mkdir(parents=True, exist_ok=True)
    database = home / "prefect.db"
    if database.exists():
        return home
    template = Path(tempfile.gettempdir()) / f"aligncurate-prefect-db-{version('prefect')}"
    template.mkdir(exist_ok=True)
    with (template / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (template / "prefect.db").exists():
            work = Path(tempfile.mkdtemp(dir=template))
            env = {**os.environ, "PREFECT_HOME": str(work)}
            for name in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
                env.pop(name, None)
            subprocess.run(
                [str(BIN / "prefect"), "server", "database", "upgrade", "-y"],
                env=env,
                capture_output=True,
                check=True,
                timeout=300,
            )
            os.replace(work / "prefect.db", template / "prefect.db")
            shutil.rmtree(work)
    shutil.copyfile(template / "prefect.db", database)
    return home


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def prefect_server(home: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real ``prefect server start`` on a free loopback port (its database: SQLite under
    ``home``, unless ``env`` sets ``PREFECT_API_DATABASE_CONNECTION_URL``); yields the API
    URL and stops the server's process group at the end."""
    port = free_port()
    if "PREFECT_API_DATABASE_CONNECTION_URL" not in (env or {}):
        migrated_home(home)
    full = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **(env or {}),
    }
    full.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"prefect server did not start: {log_path.read_text()}")
            time.sleep(0.5)
        try:
            yield url
        finally:
            _stop(proc)


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries (``/usr/lib/postgresql/N/bin``)."""
    versions = sorted(POSTGRES_BIN.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free loopback port, trust auth;
    run as the ``postgres`` user when we are root (postgres refuses to run as root). Yields
    the asyncpg URL of its ``postgres`` database; the cluster is stopped and deleted after."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="aligncurate-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*args: str) -> None:
        proc = subprocess.run(
            [*as_user, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {proc.stdout}{proc.stderr}")

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = str(root / "pg.log")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", log, "-w", "start")
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        try:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)
