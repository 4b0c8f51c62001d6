"""Progress bars of long CLI work: they follow a real build's progress events, share the
terminal with Prefect's log lines without being written through, and stay out of scripted
output (``--json``, or stdout that is not a terminal)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from servers import migrated_home

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo" / "spec.yaml"
EXE = str(Path(sys.executable).with_name("aligncurate"))
CURSOR_HIDE = "\x1b[?25l"  # rich's live display hides the cursor while it draws
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d+ \| INFO +\|")  # Prefect's console format
BAR = re.compile(r"\d+/(\d+|\?) +(rows|shards|versions|requests)")


def test_bars_follow_a_real_build(prefect_harness: None, tmp_path: Path) -> None:
    from pipelines.build import build_dataset
    from pipelines.progress import build_bars
    from pipelines.spec import load_spec

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    with build_bars(True, console) as shown:
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


def _fact_prompts(world: object, n: int) -> list[str]:
    return [f"Question: {f['question']}\nAnswer:" for f in world.facts()[:n]]  # type: ignore[attr-defined]


def test_generation_inside_a_build_moves_a_requests_bar(fact_world: object, tmp_path: Path) -> None:
    """Model-backed stages call ``CachedEngine.generate`` without a callback: its batches
    reach the bars through ``engines.cached.batch_listener``, unset again afterwards."""
    from engines import Request, Sampling, make_engine
    from engines import cached as cached_module
    from engines.cached import CachedEngine
    from pipelines.progress import build_bars
    from storage.gencache import GenerationCache

    engine = make_engine("transformers", fact_world.model_dir)  # type: ignore[attr-defined]
    cached = CachedEngine(engine, GenerationCache(tmp_path / "cache"), batch_size=2)
    sampling = Sampling(temperature=0.0, max_tokens=4)
    requests = [Request(p, sampling, seed=i) for i, p in enumerate(_fact_prompts(fact_world, 5))]
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    with build_bars(True, console) as shown:
        assert shown is not None
        cached.generate(requests)
    bar = {t.description: t for t in shown.progress.tasks}["generate (transformers)"]
    assert (bar.completed, bar.total, bar.fields["unit"]) == (5, 5, "requests")
    assert cached.stats.engine_calls == 3  # batches of 2, 2 and 1
    assert "5/5" in screen.getvalue()
    assert cached_module.batch_listener is None  # nobody listens after the build


def test_generate_command_shows_requests_on_a_terminal(
    fact_world: object, env: dict[str, str], tmp_path: Path
) -> None:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = _fact_prompts(fact_world, 3)
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    model = str(fact_world.model_dir)  # type: ignore[attr-defined]
    args = [EXE, "generate", "--model", model, "--engine", "transformers", "--in", str(source)]
    args += ["--out", str(target), "--max-tokens", "4", "--store", str(tmp_path / "store")]
    code, stdout, stderr = _on_a_terminal(args, env)
    assert code == 0, stderr[-3000:]
    assert CURSOR_HIDE in stdout and "generate" in stdout and "3/3" in stdout
    assert "requests" in stdout
    assert len(target.read_text().splitlines()) == 3


def _on_a_terminal(
    args: list[str], env: dict[str, str], stderr_too: bool = False
) -> tuple[int, str, str]:
    """Run ``args`` with stdout (and stderr, if ``stderr_too``) on a pseudo-terminal; what
    the terminal got (``\\r\\n`` as ``\\n``) and stderr (empty if ``stderr_too``)."""
    master, slave = pty.openpty()
    stderr = slave if stderr_too else subprocess.PIPE
    proc = subprocess.Popen(args, stdout=slave, stderr=stderr, env=env, cwd=REPO)
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
    home = migrated_home(tmp_path_factory.mktemp("prefect-home"))
    environment = {**os.environ, "PREFECT_HOME": str(home), "COLUMNS": "120"}
    environment.pop("PREFECT_API_URL", None)
    return environment


def test_log_lines_print_above_the_bars_not_through_them(
    env: dict[str, str], tmp_path: Path
) -> None:
    """As on a person's terminal, stdout and stderr are one pseudo-terminal: Prefect's INFO
    lines show, the bars show, and no log line is written into a bar's line. What the
    terminal keeps of a line is what follows its last carriage return."""
    args = [EXE, "build", str(DEMO), "--store", str(tmp_path / "store")]
    code, screen, _ = _on_a_terminal(args, env, stderr_too=True)
    assert code == 0, screen[-3000:]
    assert CURSOR_HIDE in screen and "demo-sft@0 committed" in ANSI.sub("", screen)
    pieces = re.split(r"[\r\n]", ANSI.sub("", screen))
    assert any(BAR.search(p) and "stage exact_dedup" in p for p in pieces)
    assert any(LOG_LINE.search(p) for p in pieces)  # Prefect's console lines still print
    through = [p for p in pieces if BAR.search(p) and LOG_LINE.search(p)]
    assert not through, through[:3]


def test_events_reach_listeners_and_never_break_the_emitter() -> None:
    from pipelines.progress import Event, emit, listening

    emit("read", "nobody-listens.jsonl", 1)  # no listener: nothing happens
    heard: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("a broken bar")

    with listening(broken), listening(heard.append):
        emit("stage", "exact_dedup", 1, 2)
    emit("stage", "exact_dedup", 2, 2)  # after the block: not heard
    assert heard == [Event("stage", "exact_dedup", 1, 2)]


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
