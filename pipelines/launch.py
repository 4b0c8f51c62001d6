"""The ``aligncurate`` console script: runs the command in the warm runner when one serves
this caller (:mod:`pipelines.warm`, started by ``aligncurate server start``), else here.

Only the standard library and :mod:`pipelines.warm_client` (standard library only) are
imported before that choice, so a command the runner serves costs an interpreter start and
a socket, not Prefect's import.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn


def _exit_on_signal(signum: int, frame: object) -> NoReturn:
    signal.signal(signum, signal.SIG_IGN)  # once: a second one must not cut the exit short
    raise SystemExit(128 + signum)


def main() -> None:
    """Until a command installs its own unwinding (``_signals_exit``, a build's server
    handling), SIGTERM and SIGHUP end it quietly with 128 + signal: nothing has been written
    yet (tests/test_command_signals.py)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # under nohup SIGHUP stays ignored
            signal.signal(sig, _exit_on_signal)
    from pipelines.warm_client import run_remote

    code = run_remote(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from pipelines.cli import main as run_here

    run_here()


if __name__ == "__main__":  # pragma: no cover
    main()
