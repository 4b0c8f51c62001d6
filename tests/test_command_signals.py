"""Signals and faults for ``export``, ``report`` and ``generate`` (#15), like the build's in
tests/test_server_lifecycle.py: a real console-script process is signalled mid-run; it
exits 128 + signal (130 for Ctrl-C, 143 for SIGTERM), leaves no partial output under the
final name nor temporary files, and no child process. A bad ``--out`` is one ``error:``
line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import default_signals
from test_storage import canonical_table, commit_build, ids

from storage import DatasetStore

EXE = Path(sys.executable).with_name("aligncurate")
ROWS = 60_000


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A version large enough that export and report take a few seconds."""
    tmp = tmp_path_factory.mktemp("big")
    datasets = DatasetStore(str(tmp / "store"))
    commit_build(datasets, "sft", tmp, canonical_table(ids("a", ROWS)))
    return datasets.root


def _env() -> dict[str, str]:
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def _start(command: list[str]) -> subprocess.Popen[str]:
    """``command`` with Ctrl-C and hang-up at their default dispositions
    (:func:`conftest.default_signals`)."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=default_signals,
    )


def _signal_mid_run(command: list[str], started: Path, sig: int) -> tuple[int, str, set[int]]:
    """Start ``command``; once ``started`` exists (it began writing), send ``sig``. The exit
    code, stderr, and the PIDs of its children seen while it ran."""
    proc = _start(command)
    children: set[int] = set()
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        children |= {c.pid for c in _children(proc.pid)}
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"it ended before the signal: {proc.returncode} {proc.stderr.read()}")
    children |= {c.pid for c in _children(proc.pid)}
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, children


def _wait_for(seen: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    """Poll until ``seen()`` holds while ``proc`` runs (it must still run then)."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _holds(seen):
        assert time.monotonic() < deadline, "not seen in 120 s"
        time.sleep(0.002)
    assert proc.poll() is None, f"it ended first: {proc.returncode} {proc.stderr.read()}"


def _holds(seen: Callable[[], bool]) -> bool:
    try:
        return seen()
    except FileNotFoundError:  # /proc/PID is gone: the process has just ended
        return False


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (``SigCgt`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(pids: set[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_export_signalled_mid_run_leaves_no_output(
    tmp_path: Path, big_store: str, sig: int, code: int
) -> None:
    out = tmp_path / "out"
    command = [str(EXE), "export", "sft", "--format", "jsonl", "--out", str(out)]
    rc, err, children = _signal_mid_run([*command, "--store", big_store], out, sig)
    assert rc == code, err
    assert "Traceback" not in err, err
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert left == [], left
    assert _alive(children) == []


@pytest.fixture(scope="module")
def report_seconds(tmp_path_factory: pytest.TempPathFactory, big_store: str) -> float:
    """How long an unsignalled report of the big version takes (and that it works)."""
    out = tmp_path_factory.mktemp("report") / "whole"
    started = time.monotonic()
    subprocess.run(
        [str(EXE), "report", "sft", "--out", str(out), "--store", big_store],
        check=True,
        capture_output=True,
        env=_env(),
        timeout=300,
    )
    assert (out / "index.html").stat().st_size > 0
    return time.monotonic() - started


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_report_signalled_mid_run_leaves_no_output(
    tmp_path: Path, big_store: str, report_seconds: float, sig: int, code: int
) -> None:
    out = tmp_path / "report"
    proc = _start([str(EXE), "report", "sft", "--out", str(out), "--store", big_store])
    # The command imports pyarrow inside its signal handling, as the first step of its work:
    # libarrow mapped means the report's own unwinding is in place and its work has begun.
    # (A fixed share of an unsignalled run's time failed both ways under two workers: before
    # start-up had ended, and after the report had finished.)
    _wait_for(lambda: "libarrow" in Path(f"/proc/{proc.pid}/maps").read_text(), proc)
    children = {c.pid for c in _children(proc.pid)}
    assert proc.poll() is None, "it ended before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert left == [], left
    assert _alive(children) == []


def _generate(model: Path, source: Path, target: Path, *extra: str) -> list[str]:
    return [
        str(EXE),
        "generate",
        "--model",
        str(model),
        "--in",
        str(source),
        "--out",
        str(target),
        "--engine",
        "transformers",
        "--store",
        str(target.parent / "store"),
        *extra,
    ]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Fact {i}:"}) + "\n" for i in range(400)))
    return source


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_generate_signalled_mid_run_leaves_no_output(
    fact_world, tmp_path: Path, prompts: Path, sig: int, code: int
) -> None:
    """Signalled once the generation cache is being written (the engine is running)."""
    out = tmp_path / "gen" / "samples.jsonl"
    out.parent.mkdir()
    command = _generate(fact_world.model_dir, prompts, out, "--max-tokens", "64", "--n", "4")
    rc, err, children = _signal_mid_run(command, out.parent / "store", sig)
    assert rc == code, err
    assert "Traceback" not in err, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["store"]
    assert _alive(children) == []


def _one_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith("error: "), lines
    return lines[0]


def test_generate_out_that_is_a_folder_fails_before_the_engine_starts(
    fact_world, tmp_path: Path, prompts: Path
) -> None:
    folder = tmp_path / "taken"
    folder.mkdir()
    started = time.monotonic()
    proc = subprocess.run(
        _generate(fact_world.model_dir, prompts, folder),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert str(folder) in _one_error(proc)
    assert list(folder.iterdir()) == []
    assert not (tmp_path / "store").exists(), "the engine ran before --out was checked"
    assert time.monotonic() - started < 120


def test_generate_out_under_a_file_is_one_error_line(
    fact_world, tmp_path: Path, prompts: Path
) -> None:
    (tmp_path / "afile").write_text("mine")
    proc = subprocess.run(
        _generate(fact_world.model_dir, prompts, tmp_path / "afile" / "o.jsonl"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert "afile" in _one_error(proc)
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("command", ["export", "report"])
def test_missing_input_and_bad_out_are_one_error_line(
    tmp_path: Path, big_store: str, command: str
) -> None:
    (tmp_path / "afile").write_text("mine")
    fmt = ["--format", "jsonl"] if command == "export" else []
    for ref, out in [("nope", tmp_path / "o"), ("sft", tmp_path / "afile" / "sub")]:
        proc = subprocess.run(
            [str(EXE), command, ref, *fmt, "--out", str(out), "--store", big_store],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        _one_error(proc)
        assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_at_start_up_exits_quietly_with_128_plus_it(big_store: str, sig: int) -> None:
    """``versions`` installs no handling of its own: the console script catches the signal
    from its start and exits 128 + signal with no traceback and nothing on stdout. Each try
    signals it the moment it catches the signal; at least one of three must land before the
    command has imported its work (no libarrow yet: a loaded machine can be later)."""
    early = []
    for _ in range(3):
        proc = _start([str(EXE), "versions", "sft", "--store", big_store])
        _wait_for(lambda: _catches(proc.pid, sig), proc)  # noqa: B023 - used at once
        early.append("libarrow" not in Path(f"/proc/{proc.pid}/maps").read_text())
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert "Traceback" not in err, err
        assert out == ""
        if early[-1]:
            break
    assert any(early), "pyarrow was loaded before the signal could be caught, three times"
