"""Progress bars of long CLI work: they follow a real build, and stay out of scripted output
(``--json``, or stdout that is not a terminal)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo" / "spec.yaml"
EXE = str(Path(sys.executable).with_name("aligncurate"))
CURSOR_HIDE = "\x1b[?25l"  # rich's live display hides the cursor while it draws


def test_bars_follow_a_real_build(prefect_harness: None, tmp_path: Path) -> None:
    from pipelines.build import build_dataset
    from pipelines.progress import build_bars
    from pipelines.spec import load_spec

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    with build_bars(True, console, load_spec(DEMO)) as shown:
        assert shown is not None
        summary = build_dataset(str(DEMO), store=str(tmp_path / "store"))
    bars = {t.description: t for t in shown.progress.tasks}

    readers = {k: t for k, t in bars.items() if k.startswith("reading ")}
    assert len(readers) == len(load_spec(DEMO).sources)
    assert sum(t.completed for t in readers.values()) == summary["rows"]["in"]
    assert all(t.finished and t.fields["unit"] == "rows" for t in readers.values())
    stage = bars["stage exact_dedup"]
    assert (stage.completed, stage.total) == (len(readers), len(readers))  # one shard a source
    commit = bars["commit demo-sft"]
    assert commit.finished and commit.completed == 1
    drawn = screen.getvalue()
    assert "commit demo-sft" in drawn and CURSOR_HIDE in drawn


def _on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``args`` with stdout on a pseudo-terminal; its stdout (``\\r\\n`` as ``\\n``)
    and stderr."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=subprocess.PIPE, env=env, cwd=REPO)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    code = proc.wait(timeout=300)
    return code, b"".join(chunks).decode().replace("\r\n", "\n"), stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("prefect-home")
    environment = {**os.environ, "PREFECT_HOME": str(home), "COLUMNS": "120"}
    environment.pop("PREFECT_API_URL", None)
    return environment


def test_json_stays_clean_json_on_a_terminal(env: dict[str, str], tmp_path: Path) -> None:
    args = [EXE, "build", str(DEMO), "--store", str(tmp_path / "store"), "--json"]
    code, stdout, stderr = _on_a_terminal(args, env)
    assert code == 0, stderr[-3000:]
    assert "\x1b" not in stdout and "reading " not in stdout
    summary = json.loads(stdout)
    assert summary["name"] == "demo-sft" and summary["version"] == 0
    assert "reading " not in stderr and CURSOR_HIDE not in stderr


def test_no_bars_when_stdout_is_not_a_terminal(env: dict[str, str], tmp_path: Path) -> None:
    args = [EXE, "build", str(DEMO), "--store", str(tmp_path / "store")]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo-sft@0 committed" in proc.stdout
    for stream in (proc.stdout, proc.stderr):
        assert "reading " not in stream and "commit demo-sft" not in stream
        assert CURSOR_HIDE not in stream


def test_wanted_only_for_a_terminal_without_json() -> None:
    from pipelines.progress import wanted

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal, open(os.devnull, "w") as null:
        assert wanted(False, terminal)
        assert not wanted(True, terminal)
        assert not wanted(False, null)
    os.close(master)
