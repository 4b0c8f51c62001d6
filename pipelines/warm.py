"""The warm runner: an interpreter with the heavy libraries already imported, which runs
``aligncurate`` commands in forked copies of itself, so that a command does not pay for
importing Prefect, pyarrow, deltalake, pandas and matplotlib each time (about 1.5 s of CPU).

``aligncurate server start`` starts it beside the persistent Prefect server, and ``server
stop`` stops both. The console script (:mod:`pipelines.launch`, through
:mod:`pipelines.warm_client`) connects to its Unix socket, ``warm.sock`` in the server's
state folder, and sends the command line, the working folder, the environment,
``sys.path``, its umask, CPU affinity, niceness and resource limits, and its own standard
input, output and error (the descriptors themselves, ``SCM_RIGHTS``). The runner forks; the
copy takes all of those and runs the command as the console script would. The runner keeps
this project's modules imported too, and a command uses them only when the caller would
import the very same files, unchanged since the runner imported them (:class:`Project`);
otherwise it imports them all afresh, so an edited checkout is what runs (an edited
:mod:`pipelines.warm_client` makes the runner refuse and restart). Output goes
straight to the caller's terminal or pipe, and the caller exits with the command's exit
code. The caller forwards its signals to the command; if the caller dies, the runner sends
the command SIGTERM, and if the runner dies, its commands get SIGTERM.

The runner refuses a command, which then runs in the caller's own process as before, when
anything :func:`pipelines.warm_client.fingerprint` covers differs (the interpreter, the
environment variables and settings files that libraries read when they are imported, the
control group), or when a package was installed, upgraded or removed since the runner
started (it then restarts itself once its running commands have ended).
``ALIGNCURATE_WARM=0`` turns it off for a command.

The runner runs no Python thread; the native threads that pyarrow and numpy start at import
(jemalloc's background threads, OpenBLAS's workers) register fork handlers. Resource use
(``time``, ``RUSAGE_CHILDREN``) is counted to the runner's children, not to the caller.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import importlib
import json
import os
import resource
import selectors
import signal
import site
import socket
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from pipelines.warm_client import (
    CODE_CHANGED,
    SOCKET_NAME,
    fingerprint,
    mismatch,
    receive,
    send,
    state_folder,
)

STATE_NAME = "warm.json"
#: The project's own packages: kept by the runner, used by a command only while unchanged.
PROJECT_PACKAGES = ("pipelines", "storage", "transforms", "engines", "examples")
#: Imported afresh by every command: they make rich Consoles at import, which read the
#: terminal and the environment (colours, width, ``NO_COLOR``) of the process they are in.
FRESH = ("pipelines.cli", "pipelines.server_cli")
#: What the runner imports: the command line, what a build imports, and the libraries a
#: build imports only when it runs (the report's matplotlib, Prefect's encoders and graphs).
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
RUNNER_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
START_TIMEOUT = 120.0
#: How long ``stop`` waits for the commands the runner still runs.
STOP_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


def socket_path() -> Path:
    return state_folder() / SOCKET_NAME


def _packages_stamp() -> list[tuple[str, int]]:
    """The site-packages folders' modification times: installing, upgrading or removing a
    package adds or removes a ``*.dist-info`` folder there, which changes them."""
    stamp = []
    for folder in site.getsitepackages():
        with contextlib.suppress(OSError):
            stamp.append((folder, os.stat(folder).st_mtime_ns))
    return stamp


# ------------------------------------------------------------- the project's own modules


@dataclass(frozen=True)
class Project:
    """Where this project's packages are found, and every module file in them (its
    modification and change times, size and inode): taken by the runner before it imports
    them, and again by each command with the caller's ``sys.path``. A command uses the
    runner's imported modules only when the two agree. Kept modules must not read the
    environment or the terminal when imported (those are the caller's: :data:`FRESH`)."""

    origins: tuple[tuple[str, str | None], ...]
    files: tuple[tuple[str, tuple[int, int, int, int]], ...]

    @classmethod
    def now(cls) -> Project:
        origins = tuple((name, _origin(name)) for name in PROJECT_PACKAGES)
        files: list[tuple[str, tuple[int, int, int, int]]] = []
        for _, origin in origins:
            if origin is None:
                continue
            for root, folders, names in os.walk(os.path.dirname(origin)):
                # subpackages only: not __pycache__, data, or a store a build made there
                folders[:] = [f for f in folders if os.path.isfile(f"{root}/{f}/__init__.py")]
                for name in sorted(n for n in names if n.endswith(".py")):
                    with contextlib.suppress(OSError):
                        stat = os.stat(path := os.path.join(root, name))
                        files.append(
                            (path, (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino))
                        )
        return cls(origins, tuple(files))

    @property
    def keepable(self) -> bool:
        """Every package found, each in a regular package (a namespace package could take
        its modules from several folders)."""
        return all(origin and origin.endswith("__init__.py") for _, origin in self.origins)

    def use_or_forget(self) -> None:
        """In a command: keep the runner's modules if this caller would import the same
        unchanged files, else forget them all, the ``pipelines`` package and the runner's
        client module included; forget the :data:`FRESH` ones either way."""
        unchanged = self.keepable and Project.now() == self
        _forget(FRESH if unchanged else PROJECT_PACKAGES)


def _origin(package: str) -> str | None:
    """The file a fresh ``import package`` would load, from ``sys.path`` and the import
    hooks (an editable install's finder), whether or not it is imported already."""
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(package, None) if find_spec else None
        if spec is not None:
            return spec.origin
    return None


def _forget(prefixes: tuple[str, ...]) -> None:
    """Drop the modules named by ``prefixes`` (and their submodules) from ``sys.modules``,
    so that they are imported again. (The runner itself runs as ``__main__``, with what it
    uses of :mod:`pipelines.warm_client` already bound.)"""
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


def _remember_logging_config() -> None:
    """Work Prefect's logging configuration out once. Each command redoes Prefect's logging
    set-up for its own terminal (:meth:`Request._adopt`), from the same settings and
    environment variables as the runner's (:func:`fingerprint` makes sure), so only the
    settings file can make the configuration differ; working it out from Prefect's
    settings costs about 30 ms. Under other settings (a ``temporary_settings`` block in
    a command) it is worked out afresh."""
    from prefect.logging import configuration
    from prefect.settings import get_current_settings

    load = configuration.load_logging_config
    settings = get_current_settings()
    known: dict[tuple[str, int, int, int], dict[str, Any]] = {}

    def remembered(path: Path) -> dict[str, Any]:
        if get_current_settings() is not settings:  # inside a command's own settings
            return load(path)
        stat = os.stat(path)
        key = (str(path), stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
        if key not in known:
            known[key] = load(path)
        return copy.deepcopy(known[key])

    configuration.load_logging_config = remembered
    configuration.setup_logging(incremental=False)


# --------------------------------------------------------------------- a forked command


@dataclass
class Request:
    """A command to run in a forked copy of the runner."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    path: list[str]
    process: dict[str, Any]
    fds: list[int]

    @classmethod
    def parse(cls, message: dict[str, Any], fds: list[int]) -> Request:
        """The request in ``message``; ``ValueError`` when it is not one."""
        try:
            request = cls(
                argv=[str(a) for a in message["argv"]],
                cwd=str(message["cwd"]),
                env={str(k): str(v) for k, v in message["env"].items()},
                path=[str(p) for p in message["path"]],
                process=dict(message["process"]),
                fds=fds,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a request: {exc!r}") from None
        if len(fds) != 3:
            raise ValueError("a request carries the caller's stdin, stdout and stderr")
        return request

    def run(self, project: Project) -> int:
        """Become the caller's command, then run the console script's ``main`` with the
        runner's ``project`` modules or fresh ones; its exit code (an exception escaping
        it prints its traceback and gives 1)."""
        self._adopt()
        project.use_or_forget()
        sys.argv = ["aligncurate", *self.argv]
        try:
            from pipelines.cli import main

            main()
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            print(exc.code, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        except BaseException:  # as the interpreter would: the traceback, then 1
            traceback.print_exc()
            return 1
        return 0

    def _adopt(self) -> None:
        """The caller's descriptors, folder, environment, ``sys.path`` and process
        attributes; Prefect's console log handlers redone for the caller's stream."""
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in set(self.fds) - {0, 1, 2}:
            os.close(fd)
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.env)
        sys.path[:] = self.path  # the project's modules are found where the caller finds them
        os.umask(int(self.process["umask"]))
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, self.process["affinity"])
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, int(self.process["nice"]))
        for name, (soft, hard) in self.process["limits"].items():
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(getattr(resource, name), (soft, hard))
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())
        # Prefect's console handlers read the terminal (colours, width, NO_COLOR) when made.
        from prefect.logging.configuration import setup_logging

        setup_logging(incremental=False)


def _exit_now(code: int) -> NoReturn:
    """End the command as the interpreter would (threads joined, ``atexit`` handlers run:
    Prefect sends its queued logs and events there; 120 when the output cannot be flushed),
    but without tearing down every module of the runner's large heap, which takes a quarter
    of a second and changes nothing. These are CPython's own steps, private names."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:
        sys.exit(code)
    shutdown()
    run_exitfuncs()
    for stream in {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}:
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)


# ---------------------------------------------------------------------------- the runner


class Runner:
    """The runner's accept loop: one process, no Python threads."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.bound = os.stat(listener.getsockname())
        self.fingerprint = fingerprint()
        self.stamp = _packages_stamp()
        self.children: dict[int, socket.socket | None] = {}
        self.stopping = False
        self.restarting = False
        self.selector = selectors.DefaultSelector()
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)

    def serve(self) -> Request | None:
        """Serve until stopped (``None``); returns a :class:`Request` only in a command's
        forked process. A runner whose packages changed execs a fresh one once idle."""
        signal.set_wakeup_fd(self.wake_write)
        for sig in RUNNER_SIGNALS:
            signal.signal(sig, self._note_signal)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        while self.children or not (self.stopping or self.restarting):
            for key, _ in self.selector.select(timeout=1.0):
                try:
                    if key.data == "accept" and self.listener.fileno() != -1:
                        if (request := self._accept()) is not None:
                            return request
                    elif key.data == "wake":
                        os.read(self.wake_read, 512)
                    elif key.data != "accept":
                        self._caller_closed(key.fileobj, key.data)  # type: ignore[arg-type]
                except Exception:  # one bad request must not end the runner
                    traceback.print_exc()
            self._reap()
            if (self.stopping or self.restarting) and self.listener.fileno() != -1:
                self._close_listener()  # no new commands; the running ones finish
        self._close_listener()
        if self.restarting and not self.stopping:
            os.execv(sys.executable, [sys.executable, "-P", "-m", "pipelines.warm"])
        return None

    def _note_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:
            self.stopping = True

    def _close_listener(self) -> None:
        """Stop listening, and remove the socket file if it is still ours (a newer runner
        may have bound the path since)."""
        if self.listener.fileno() == -1:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        path = self.listener.getsockname()
        self.listener.close()
        with contextlib.suppress(OSError):
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (self.bound.st_dev, self.bound.st_ino):
                os.unlink(path)

    def _accept(self) -> Request | None:
        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            if _peer_uid(conn) != os.getuid():
                raise ValueError("a caller of another user")
            conn.settimeout(5.0)
            message, fds = receive(conn, with_fds=True)
            if _packages_stamp() != self.stamp:
                self.restarting = True
                refusal = "packages changed since the runner started"
            else:
                refusal = mismatch(self.fingerprint, message.get("fingerprint") or {})
                self.restarting = refusal == CODE_CHANGED  # restart with the new code
            request = None if refusal else Request.parse(message, fds)
        except (OSError, EOFError, ValueError) as exc:
            refusal, request = f"bad request: {exc}", None
        if request is None:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                send(conn, {"refused": refusal})
            conn.close()
            return None
        return self._fork(conn, request)

    def _fork(self, conn: socket.socket, request: Request) -> Request | None:
        """Fork the command with the runner's signal handlers blocked, so that a signal
        meant for it cannot land on the runner's handler in its first instants."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, RUNNER_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, RUNNER_SIGNALS)
            for fd in request.fds:
                os.close(fd)
            conn.close()
            raise
        if pid == 0:
            self._become_child(conn)
            return request
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RUNNER_SIGNALS)
        for fd in request.fds:
            os.close(fd)
        self.children[pid] = conn
        try:
            send(conn, {"pid": pid})
        except OSError:
            self._caller_closed(conn, pid)
            return None
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, pid)
        return None

    def _become_child(self, conn: socket.socket) -> None:
        """In the forked command: the default signal handling, SIGTERM when the runner
        dies, and none of the runner's sockets or pipe."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RUNNER_SIGNALS)
        self.selector.close()
        for sock in (conn, self.listener, *self.children.values()):
            if sock is not None:
                sock.close()
        os.close(self.wake_read)
        os.close(self.wake_write)

    def _caller_closed(self, conn: socket.socket, pid: int) -> None:
        """A caller's socket became readable: it has gone (it sends nothing after the
        request), so its command is asked to stop."""
        with contextlib.suppress(BlockingIOError):
            try:
                if conn.recv(1):
                    return
            except OSError:
                pass  # reset: gone too
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()
        self.children[pid] = None
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
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                send(conn, {"exit": 128 - code if code < 0 else code})
            conn.close()


def _peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def preload() -> Project:
    """Import what commands import; the project's files as they were before."""
    project = Project.now()
    for name in PRELOAD:
        importlib.import_module(name)
    _remember_logging_config()
    gc.collect()
    gc.freeze()  # the forked commands then share these pages instead of copying them
    return project


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
    project = preload()
    listener.listen(16)
    request = Runner(listener).serve()
    if request is None:
        return 0
    _exit_now(request.run(project))


# ------------------------------------------------------------------- start, stop, status


class RunnerError(RuntimeError):
    """A warm runner that could not be started or stopped."""


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
        info = RunnerInfo(**json.loads((state_folder() / STATE_NAME).read_text()))
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

    folder = state_folder()
    log = folder / "warm.log"
    path = folder / SOCKET_NAME
    if len(os.fsencode(path)) > 107:
        raise RunnerError(f"the socket path is too long for a Unix socket: {path}")
    with log.open("ab") as sink:
        # -P: the folder this runs in is not searched for `pipelines` before the install
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipelines.warm"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not (path.exists() and answers(path)):  # bound before the preload, listening after
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            tail = log.read_text(errors="replace")[-2000:].strip()
            raise RunnerError(f"the warm runner did not start (log {log}): {tail}")
        time.sleep(0.05)
    info = RunnerInfo(proc.pid, str(path), time.time(), fingerprint())
    write_json_atomic(folder / STATE_NAME, asdict(info))
    return info


def stop() -> tuple[RunnerInfo | None, bool]:
    """Stop the warm runner once the commands it runs have ended (it takes no new ones
    meanwhile); ``(the runner, whether it has stopped)``. One still running commands
    after ``STOP_TIMEOUT`` keeps its ``warm.json`` and stops when they end."""
    from pipelines.prefect_server import alive, state_lock

    with state_lock() as folder:
        info = _recorded()
        if info is None:
            (folder / STATE_NAME).unlink(missing_ok=True)
            return None, True
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while alive(info.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(info.pid):
            return info, False
        (folder / STATE_NAME).unlink(missing_ok=True)
        return info, True


def status() -> dict[str, Any]:
    """Whether the warm runner runs, and whether it would serve this caller."""
    info = _recorded()
    if info is None:
        return {"state": "stopped"}
    why = mismatch(info.fingerprint, fingerprint())
    return {
        "state": "running",
        "pid": info.pid,
        "socket": info.socket,
        "serves": not why,
        "why": why,
    }


if __name__ == "__main__":
    sys.exit(main())
