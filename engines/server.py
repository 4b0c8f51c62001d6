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
        self.extra_args = CPU_FLAGS if extra_args is None else extra_args
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None

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
            *self.extra_args,
        ]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd

    def start(self) -> VLLMServer:
        self.port = self.port or free_port()
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        repo = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self.healthy():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise EngineError(
                    f"vllm serve exited with code {code} while starting"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"vllm serve did not become healthy in {self.startup_timeout}s")
            time.sleep(0.5)
        return self

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

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
