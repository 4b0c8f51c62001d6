"""Shard threads: results in order, errors at their item's turn, one bounded budget for
every task of a build."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.parallel import WORKERS_ENV, ordered_map


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
