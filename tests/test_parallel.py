"""Shard threads: results in order, errors at their item's turn, one bounded budget for
every task of a build."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.parallel import WORKERS_ENV, ordered_map

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


@pytest.fixture(autouse=True)
def two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKERS_ENV, "2")


def test_results_come_back_in_input_order() -> None:
    def slow_for_small(n: int) -> int:
        time.sleep(0.002 * (20 - n % 20))
        return n * n

    assert list(ordered_map(slow_for_small, range(60))) == [n * n for n in range(60)]


def test_an_error_is_raised_at_its_items_turn() -> None:
    def fail_on_five(n: int) -> int:
        if n == 5:
            raise ValueError("item 5")
        return n

    seen = []
    with pytest.raises(ValueError, match="item 5"):
        for value in ordered_map(fail_on_five, range(20)):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]


def test_concurrent_tasks_share_one_budget_without_waiting_on_each_other() -> None:
    """Four task threads at once, each consuming slowly: all finish, in order, and never
    more than 2 x 2 items are in flight across them."""
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def work(n: int) -> int:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.003)
        return n

    def consumed(n: int) -> int:  # the in-flight item ends when its result is taken
        with lock:
            state["now"] -= 1
        return n

    results: dict[int, list[int]] = {}

    def task(k: int) -> None:
        out = []
        for value in ordered_map(work, range(k * 100, k * 100 + 40)):
            out.append(consumed(value))
            time.sleep(0.001)
        results[k] = out

    threads = [threading.Thread(target=task, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert {k: v for k, v in results.items()} == {
        k: list(range(k * 100, k * 100 + 40)) for k in range(4)
    }
    assert state["most"] <= 4


@pytest.mark.parametrize(("chosen", "backend"), [(None, "jemalloc"), ("system", "system")])
def test_a_build_process_uses_a_pool_that_returns_freed_pages(
    chosen: str | None, backend: str, tmp_path: Path
) -> None:
    """Importing the pipelines makes jemalloc Arrow's pool, unless
    ``ARROW_DEFAULT_MEMORY_POOL`` chose one; a build's ingest allocates from it."""
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n')
    script = (
        "import sys\n"
        "from pipelines.build import ingest_source\n"
        "from pipelines.spec import SourceSpec\n"
        "import pyarrow as pa\n"
        "from transforms.ingest import IngestParams\n"
        "source = SourceSpec(path=sys.argv[1])\n"
        "out = ingest_source.fn('k', source, IngestParams(), [], sys.argv[2])\n"
        "print(pa.default_memory_pool().backend_name, out.counts['ingest']['kept'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != POOL_ENV}
    if chosen:
        env[POOL_ENV] = chosen
    done = subprocess.run(
        [sys.executable, "-c", script, str(corpus), str(tmp_path / "shards")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == [backend, "1"]
