"""The caller's side of the warm runner (:mod:`pipelines.warm`): what must match between a
caller and the runner, the framing of their messages, and handing a command over.

Only the standard library is imported: the console script imports this before anything
heavy, so a command the runner serves costs an interpreter start and a socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import socket
import struct
import sys
from pathlib import Path
from types import FrameType
from typing import Any

WARM_ENV = "ALIGNCURATE_WARM"
SOCKET_NAME = "warm.sock"
#: Environment variables a library reads when it is imported (Prefect's settings, the
#: locale, BLAS and OpenMP threads, allocators, typer, matplotlib): the caller's must equal
#: the runner's. The others are set in the forked command before anything reads them.
IMPORT_TIME_PREFIXES = (
    "PREFECT_",
    "PYTHON",
    "OMP_",
    "OPENBLAS_",
    "MKL_",
    "GOTO_",
    "MALLOC_",
    "JE_",
    "_RJEM_",
    "LD_",
    "ARROW_",
    "MPL",
    "PANDAS_",
    "NUMBA_",
    "TYPER_",
)
IMPORT_TIME_NAMES = frozenset(
    {
        "HOME",
        "LANG",
        "LANGUAGE",
        "LC_ALL",
        "LC_CTYPE",
        "LC_NUMERIC",
        "LC_MESSAGES",
        "TZ",
        "XDG_CONFIG_HOME",
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "DO_NOT_TRACK",
        "VIRTUAL_ENV",
    }
)
#: Limits the command takes from its caller (a lower one than the runner's is applied).
RLIMITS = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_NOFILE", "RLIMIT_CPU", "RLIMIT_FSIZE")
#: Forwarded to the command as they are (SIGTSTP and SIGCONT: see :func:`_follow`).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: How long a caller waits for the runner to say it started the command.
REPLY_TIMEOUT = 30.0
#: The refusal when only this module's code differs: the runner restarts with the new code.
CODE_CHANGED = "the runner was started from other code (it restarts)"
_LENGTH = struct.Struct("!I")


def state_folder() -> Path:
    from pipelines.prefect_server import state_dir  # standard library only, too

    return state_dir()


def code_hash() -> str:
    """This file's hash: a runner started from other code speaks another protocol."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def fingerprint() -> dict[str, Any]:
    """What must match between a caller and the runner: the interpreter and this module's
    code, the environment variables read at import time, the control group, and the
    Prefect settings files Prefect read when it was imported (its profiles, and
    ``prefect.toml``, ``.env`` or ``pyproject.toml`` in the working folder where they hold
    Prefect settings; a ``matplotlibrc`` there)."""
    env = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(IMPORT_TIME_PREFIXES) or k in IMPORT_TIME_NAMES
    }
    try:
        cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        cgroup = ""
    return {
        "executable": f"{os.path.realpath(sys.executable)} ({sys.prefix})",
        "code": code_hash(),
        "env": env,
        "cgroup": cgroup,
        "files": _settings_files(),
    }


def _settings_files() -> dict[str, str | None]:
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    found: dict[str, str | None] = {}
    for path, mark in (
        (profiles.expanduser(), b""),
        (Path("prefect.toml"), b""),
        (Path(".env"), b"PREFECT_"),
        (Path("pyproject.toml"), b"[tool.prefect"),
        (Path("matplotlibrc"), b""),
    ):
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        found[str(path)] = hashlib.sha256(data).hexdigest() if data and mark in data else None
    return found


def mismatch(runner: dict[str, Any], caller: dict[str, Any]) -> str:
    """Why a caller with fingerprint ``caller`` is refused ("" when it is not)."""
    if runner.get("executable") != caller.get("executable"):
        return f"another interpreter ({runner.get('executable')})"
    if runner.get("cgroup") != caller.get("cgroup"):
        return "another control group"
    if names := _differing(runner.get("env", {}), caller.get("env", {})):
        return f"environment variables differ: {names}"
    if files := _differing(runner.get("files", {}), caller.get("files", {})):
        return f"Prefect settings files differ: {files}"
    return CODE_CHANGED if runner.get("code") != caller.get("code") else ""


def _differing(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k)))


def process_attributes() -> dict[str, Any]:
    """What a forked command takes from its caller besides the environment: the umask, CPU
    affinity, niceness and resource limits."""
    umask = os.umask(0)
    os.umask(umask)
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in RLIMITS}
    return {
        "umask": umask,
        "affinity": sorted(os.sched_getaffinity(0)),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "limits": limits,
    }


# ------------------------------------------------------------------------ the framing


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """One message: its length (4 bytes) and its JSON, with ``fds`` on its first byte."""
    data = json.dumps(message).encode()
    frame = _LENGTH.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [frame], fds)
        if sent < len(frame):  # sendall(b"") still writes, and fails once the peer has gone
            sock.sendall(frame[sent:])
    else:
        sock.sendall(frame)


def receive(sock: socket.socket, *, with_fds: bool = False) -> tuple[dict[str, Any], list[int]]:
    """Exactly one message (and the descriptors sent with it); nothing after it is read.
    ``EOFError`` when the peer closed first, ``ValueError`` when the message is not JSON;
    descriptors received are closed on any error."""
    fds: list[int] = []
    try:
        if with_fds:
            head, got, _flags, _addr = socket.recv_fds(sock, _LENGTH.size, 3)
            fds = list(got)
        else:
            head = sock.recv(_LENGTH.size)
        head += _exactly(sock, _LENGTH.size - len(head)) if head else b""
        if not head:
            raise EOFError
        body = _exactly(sock, _LENGTH.unpack(head)[0])
        message = json.loads(body)
        if not isinstance(message, dict):
            raise ValueError("a message is a JSON object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------- the caller


def run_remote(argv: list[str]) -> int | None:
    """Run ``aligncurate ARGV`` in the warm runner; its exit code, or ``None`` when no
    runner serves this caller (the command then runs here, as if there were none)."""
    if os.environ.get(WARM_ENV, "1").strip() == "0" or (argv and argv[0] == "server"):
        return None
    try:
        path = state_folder() / SOCKET_NAME
        if path.stat().st_uid != os.getuid():
            return None  # another user's socket: never hand it our terminal and environment
    except (OSError, RuntimeError):  # none there (or no home folder)
        return None
    pending: list[int] = []
    saved = _catch(FORWARDED, lambda signum, frame: pending.append(signum))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        request = {
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "path": sys.path,
            "process": process_attributes(),
            "fingerprint": fingerprint(),
        }
        send(sock, request, [0, 1, 2])
        sock.settimeout(REPLY_TIMEOUT)
        reply, _ = receive(sock)
    except TimeoutError:
        # It may have started the command: running it here as well could run it twice.
        sys.stderr.write(
            f"error: the warm runner did not answer in {REPLY_TIMEOUT:.0f} s; "
            f"{WARM_ENV}=0 runs the command without it\n"
        )
        return 1
    except (OSError, EOFError, ValueError):  # refused before it started anything
        reply = {}
    if "pid" not in reply:
        sock.close()
        _restore(saved, pending)
        return None
    sock.settimeout(None)
    return _follow(sock, int(reply["pid"]), pending)


def _catch(signals: tuple[int, ...], handler: Any) -> dict[int, Any]:
    """Install ``handler`` for ``signals`` (not for one ignored, as SIGHUP under nohup);
    the handlers they had."""
    return {
        sig: signal.signal(sig, handler)
        for sig in signals
        if signal.getsignal(sig) is not signal.SIG_IGN
    }


def _restore(saved: dict[int, Any], pending: list[int]) -> None:
    """Put the handlers back, then deliver what arrived meanwhile to this process."""
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    for signum in pending:
        os.kill(os.getpid(), signum)


def _follow(sock: socket.socket, pid: int, pending: list[int]) -> int:
    """Forward this process's signals to the command (those that came before its pid too)
    and wait for its exit code. Ctrl-Z stops the command, then this process; ``fg`` or
    ``bg`` continues both."""

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def suspend(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def resume(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    _catch(FORWARDED, forward)
    _catch((signal.SIGTSTP,), suspend)
    signal.signal(signal.SIGCONT, resume)
    for signum in pending:
        forward(signum, None)
    with sock:
        try:
            reply, _ = receive(sock)
        except (EOFError, OSError, ValueError):
            sys.stderr.write("error: the warm runner stopped before the command ended\n")
            return 1
    return int(reply["exit"])
