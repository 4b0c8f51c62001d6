"""The warm runner: an interpreter with the heavy libraries already imported, which runs
``aligncurate`` commands in forked copies of itself, so that a command does not pay for
importing Prefect, pyarrow, deltalake and pandas each time (about 1.5 s of a small build).

``aligncurate server start`` starts it beside the persistent Prefect server, and ``server
stop`` stops both. The console script (:mod:`pipelines.launch`) connects to its Unix socket,
``warm.sock`` in the server's state folder, and sends the command line, the working folder,
the environment and its own standard input, output and error (the descriptors themselves,
``SCM_RIGHTS``). The runner forks; the copy takes those descriptors as its own 0, 1 and 2,
the folder and the environment, imports this project's modules afresh (they are never kept
in the runner, so an edited checkout is always what runs) and runs the command as the
console script would. Output goes straight to the caller's terminal or pipe, and the
caller exits with the command's exit code. The caller forwards SIGINT, SIGTERM and SIGHUP
to the command; if the caller dies, the runner sends the command SIGTERM.

The runner refuses a command, which then runs in the caller's own process as before, when
the caller's interpreter, or an environment variable read when libraries are imported
(:data:`IMPORT_TIME_PREFIXES`: Prefect's settings, locale, threads, allocators) differs from
the runner's, or when a package was installed, upgraded or removed since the runner started
(it then restarts itself). ``ALIGNCURATE_WARM=0`` turns it off for a command.

Only the standard library is imported at module level: the console script imports this.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import json
import os
import selectors
import signal
import site
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

WARM_ENV = "ALIGNCURATE_WARM"
SOCKET_NAME = "warm.sock"
STATE_NAME = "warm.json"
#: Environment variables a library may read when it is imported: the caller's must equal the
#: runner's (the others are set in the forked command before anything reads them).
IMPORT_TIME_PREFIXES = (
    "PREFECT_",
    "PYTHON",
    "LANG",
    "LC_",
    "HOME",
    "XDG_",
    "TZ",
    "OMP_",
    "MALLOC_",
    "LD_",
    "ARROW_",
    "MPL",
    "PANDAS_",
    "NUMBA_",
    "DO_NOT_TRACK",
    "VIRTUAL_ENV",
)
#: The project's own packages: imported afresh by every command, never kept in the runner.
PROJECT_PACKAGES = ("pipelines", "storage", "transforms", "engines", "examples")
#: What the runner imports (and then forgets the project's modules, keeping the libraries
#: they imported): the command line, what a build imports, and the libraries a build
#: imports only when it runs (the report's matplotlib, Prefect's encoders and graphs).
PRELOAD = (
    "pipelines.cli",
    "pipelines.build",
    "pipelines.spec",
    "pipelines.report",
    "storage.dataset",
    "matplotlib.figure",
    "matplotlib.backends.backend_svg",
    "fastapi.encoders",
    "prefect.utilities.visualization",
)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
START_TIMEOUT = 120.0
#: How long a caller waits for the runner to say it started the command.
REPLY_TIMEOUT = 30.0
#: How long ``stop`` waits for the commands the runner still runs.
STOP_TIMEOUT = 30.0
_LENGTH = struct.Struct("!I")


def _state_folder() -> Path:
    from pipelines.prefect_server import state_dir

    return state_dir()


def socket_path() -> Path:
    return _state_folder() / SOCKET_NAME


def fingerprint() -> dict[str, Any]:
    """What must match between a caller and the runner: the interpreter, the environment
    variables read at import time, and the Prefect settings files Prefect read then (its
    profiles, and ``prefect.toml``, ``.env`` or ``pyproject.toml`` in the working folder
    where they hold Prefect settings)."""
    return {
        "executable": f"{os.path.realpath(sys.executable)} ({sys.prefix})",
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(IMPORT_TIME_PREFIXES)},
        "prefect_files": _prefect_files(),
    }


def _prefect_files() -> dict[str, str | None]:
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    found: dict[str, str | None] = {}
    for path, mark in (
        (profiles.expanduser(), b""),
        (Path("prefect.toml"), b""),
        (Path(".env"), b"PREFECT_"),
        (Path("pyproject.toml"), b"[tool.prefect"),
    ):
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        found[str(path)] = hashlib.sha256(data).hexdigest() if data and mark in data else None
    return found


def _packages_stamp() -> list[tuple[str, int]]:
    """The site-packages folders' modification times: installing, upgrading or removing a
    package adds or removes a ``*.dist-info`` folder there, which changes them."""
    stamp = []
    for folder in site.getsitepackages():
        with contextlib.suppress(OSError):
            stamp.append((folder, os.stat(folder).st_mtime_ns))
    return stamp


# ------------------------------------------------------------------------ the protocol


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    frame = _LENGTH.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [frame[:4096]], fds)
        sock.sendall(frame[4096:])
    else:
        sock.sendall(frame)


def _receive(sock: socket.socket, *, with_fds: bool = False) -> tuple[dict[str, Any], list[int]]:
    """One message (and the descriptors sent with it); ``EOFError`` when the peer closed."""
    buffer, fds = b"", []
    size = None
    while size is None or len(buffer) < _LENGTH.size + size:
        if with_fds and not fds:
            chunk, got, _flags, _addr = socket.recv_fds(sock, 65536, 3)
            fds = list(got)
        else:
            chunk = sock.recv(65536)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise EOFError
        buffer += chunk
        if size is None and len(buffer) >= _LENGTH.size:
            size = _LENGTH.unpack_from(buffer)[0]
    return json.loads(buffer[_LENGTH.size : _LENGTH.size + size]), fds


# -------------------------------------------------------------------------- the caller


def run_remote(argv: list[str]) -> int | None:
    """Run ``aligncurate ARGV`` in the warm runner; its exit code, or ``None`` when no
    runner serves this caller (the command then runs here)."""
    if os.environ.get(WARM_ENV, "1").strip() == "0" or (argv and argv[0] == "server"):
        return None
    try:
        path = socket_path()
    except RuntimeError:  # no home folder: no state folder, no runner
        return None
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        request = {
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "path": sys.path,
            "fingerprint": fingerprint(),
        }
        _send(sock, request, [0, 1, 2])
        sock.settimeout(REPLY_TIMEOUT)
        reply, _ = _receive(sock)
    except TimeoutError:
        # It may have started the command: running it here as well could run it twice.
        sys.stderr.write(
            f"error: the warm runner did not answer in {REPLY_TIMEOUT:.0f} s; "
            f"{WARM_ENV}=0 runs the command without it\n"
        )
        return 1
    except (OSError, EOFError, ValueError):  # refused before it started anything
        sock.close()
        return None
    if "pid" not in reply:
        sock.close()
        return None
    sock.settimeout(None)
    return _follow(sock, int(reply["pid"]))


def _follow(sock: socket.socket, pid: int) -> int:
    """Forward this process's signals to the command and wait for its exit code."""

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, forward)
    with sock:
        try:
            reply, _ = _receive(sock)
        except EOFError:
            sys.stderr.write("error: the warm runner stopped before the command ended\n")
            return 1
    return int(reply["exit"])


# -------------------------------------------------------------------------- the runner


@dataclass
class Request:
    """A command to run in a forked copy of the runner."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    path: list[str]
    fds: list[int]

    def run(self) -> int:
        """Become the caller's command: its descriptors, folder and environment; then run
        the console script's ``main`` (which raises ``SystemExit``)."""
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in set(self.fds) - {0, 1, 2}:
            os.close(fd)
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.env)
        sys.path[:] = self.path  # the project's modules are found where the caller finds them
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())
        _recolour_prefect_consoles()
        sys.argv = ["aligncurate", *self.argv]
        from pipelines.cli import main

        try:
            main()
        except SystemExit as exc:
            code = exc.code
            if code is None or isinstance(code, int):
                return code or 0
            print(code, file=sys.stderr)
            return 1
        return 0


def _recolour_prefect_consoles() -> None:
    """Prefect's console log handlers chose their colours when the runner imported Prefect,
    writing to its log file: none. Let them choose again for the caller's stream (rich keeps
    the choice in a private attribute; re-running Prefect's logging set-up costs 0.1 s)."""
    from pipelines.progress import console_handlers

    for handler in console_handlers():
        console = handler.console
        with contextlib.suppress(AttributeError):
            console._color_system = console._detect_color_system()


class Runner:
    """The runner's accept loop: one process, one thread, no Python code of the project."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.fingerprint = fingerprint()
        self.stamp = _packages_stamp()
        self.children: dict[int, socket.socket] = {}
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)

    def serve(self) -> Request | None:
        """Serve until stopped (``None``); returns a :class:`Request` only in a command's
        forked process."""
        signal.set_wakeup_fd(self.wake_write)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._note_signal)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        while not (self.stopping and not self.children):
            for key, _ in self.selector.select(timeout=1.0):
                if self.stopping and key.data == "accept":
                    continue
                if key.data == "accept":
                    request = self._accept()
                    if request is not None:
                        return request
                elif key.data == "wake":
                    os.read(self.wake_read, 512)
                else:
                    self._caller_closed(key.fileobj, key.data)  # type: ignore[arg-type]
            self._reap()
            if self.stopping and self.listener.fileno() != -1:
                self.selector.unregister(self.listener)
                self.listener.close()  # no new commands; the running ones finish
        return None

    def _note_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:
            self.stopping = True

    def _accept(self) -> Request | None:
        conn, _ = self.listener.accept()
        conn.settimeout(5.0)
        try:
            message, fds = _receive(conn, with_fds=True)
        except (OSError, EOFError, ValueError):
            conn.close()
            return None
        stale = _packages_stamp() != self.stamp
        refusal = (
            "packages changed since the runner started"
            if stale
            else _mismatch(self.fingerprint, message["fingerprint"])
            or ("" if len(fds) == 3 else "standard streams missing")
        )
        if refusal:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                _send(conn, {"refused": refusal})
            conn.close()
            if stale:
                self._restart()
            return None
        pid = os.fork()
        if pid == 0:
            self._become_child(conn)
            return Request(message["argv"], message["cwd"], message["env"], message["path"], fds)
        for fd in fds:
            os.close(fd)
        try:
            _send(conn, {"pid": pid})
        except OSError:
            os.kill(pid, signal.SIGTERM)
        conn.setblocking(False)
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        return None

    def _become_child(self, conn: socket.socket) -> None:
        """In the forked command: drop the runner's sockets, pipe and signal handling."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        for sock in (conn, self.listener, *self.children.values()):
            sock.close()
        os.close(self.wake_read)
        os.close(self.wake_write)

    def _caller_closed(self, conn: socket.socket, pid: int) -> None:
        """A caller's socket became readable: it has gone (it sends nothing after the
        request), so its command is asked to stop."""
        with contextlib.suppress(BlockingIOError):
            if conn.recv(1):
                return
        self.selector.unregister(conn)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                _send(conn, {"exit": 128 - code if code < 0 else code})
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn)
            conn.close()

    def _restart(self) -> None:
        """Packages changed: stop taking commands (callers meanwhile run theirs in place),
        and once the running ones have ended, start a fresh runner in place of this one
        (same pid)."""
        self.selector.unregister(self.listener)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path())
        while self.children:
            time.sleep(0.1)
            self._reap()
        os.execv(sys.executable, [sys.executable, "-m", "pipelines.warm"])


def preload() -> None:
    """Import what commands import, then forget the project's own modules."""
    for name in PRELOAD:
        importlib.import_module(name)
    for name in [n for n in sys.modules if n.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    gc.collect()
    gc.freeze()  # the forked commands then share these pages instead of copying them


def main() -> int:
    """``python -m pipelines.warm``: bind the socket, preload, serve."""
    path = socket_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    preload()
    listener.listen(16)
    request = Runner(listener).serve()
    if request is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return 0
    _exit_now(request.run())


def _exit_now(code: int) -> NoReturn:
    """End the command as the interpreter would (threads joined, ``atexit`` handlers run:
    Prefect sends its queued logs and events there), but without tearing down every module
    of the runner's large heap, which took a quarter of a second and changes nothing."""
    import atexit
    import threading

    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx does first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ------------------------------------------------------------------- start, stop, status


class RunnerError(RuntimeError):
    """A warm runner that could not be started."""


@dataclass(frozen=True)
class RunnerInfo:
    """A running warm runner, as recorded in ``warm.json``."""

    pid: int
    socket: str
    started_at: float
    fingerprint: dict[str, Any]


def _recorded() -> RunnerInfo | None:
    from pipelines.prefect_server import alive

    try:
        info = RunnerInfo(**json.loads((_state_folder() / STATE_NAME).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    try:
        cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes()
    except OSError:
        return None
    return info if b"pipelines.warm" in cmdline and alive(info.pid) else None


def answers(path: Path) -> bool:
    """Whether a runner listens at ``path`` (it binds before its preload, listens after)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def start() -> tuple[RunnerInfo, bool]:
    """The warm runner, started unless it runs already; ``(info, started_now)``."""
    from pipelines.prefect_server import state_lock

    with state_lock():
        info = _recorded()
        return (info, False) if info is not None else (_spawn(), True)


def _spawn() -> RunnerInfo:
    from storage.atomic import write_json_atomic

    folder = _state_folder()
    log = folder / "warm.log"
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.warm"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    path = folder / SOCKET_NAME
    deadline = time.monotonic() + START_TIMEOUT
    # The socket is bound before the preload and listened on after it.
    while not (path.exists() and answers(path)):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            tail = log.read_text(errors="replace")[-2000:].strip()
            raise RunnerError(f"the warm runner did not start (log {log}): {tail}")
        time.sleep(0.05)
    info = RunnerInfo(proc.pid, str(path), time.time(), fingerprint())
    write_json_atomic(folder / STATE_NAME, info.__dict__)
    return info


def stop() -> RunnerInfo | None:
    """Stop the warm runner (commands it runs finish first); the one stopped, or ``None``."""
    from pipelines.prefect_server import alive, state_lock

    with state_lock() as folder:
        info = _recorded()
        if info is not None:
            os.kill(info.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while alive(info.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        (folder / STATE_NAME).unlink(missing_ok=True)
        return info


def status() -> dict[str, Any]:
    """Whether the warm runner runs, and whether it would serve this environment."""
    info = _recorded()
    if info is None:
        return {"state": "stopped"}
    why = _mismatch(info.fingerprint, fingerprint())
    return {
        "state": "running",
        "pid": info.pid,
        "socket": info.socket,
        "serves": not why,
        "why": why,
    }


def _mismatch(runner: dict[str, Any], caller: dict[str, Any]) -> str:
    """Why a caller with ``caller``'s fingerprint is refused ("" when it is not)."""
    if runner["executable"] != caller["executable"]:
        return f"another interpreter ({runner['executable']})"
    names = _differing(runner["env"], caller["env"])
    if names:
        return f"environment variables differ: {names}"
    files = _differing(runner["prefect_files"], caller["prefect_files"])
    return f"Prefect settings files differ: {files}" if files else ""


def _differing(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k)))


if __name__ == "__main__":
    sys.exit(main())
