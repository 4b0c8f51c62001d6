"""Shard work on threads, results in order.

The heavy parts of a shard's work (Arrow kernels, numpy, Parquet encoding) release the
GIL, so a task that feeds shards one after the other can keep every core busy by working
on the next shards while it writes the current one. Every call shares one process-wide
pool of :func:`shard_threads` threads, and one budget of items in flight (twice the
threads), so a build whose task runner runs several tasks at once still uses one thread
per core and holds a bounded number of shards in memory. Each call gets its results back
in input order.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS_ENV = "ALIGNCURATE_SHARD_THREADS"


def shard_threads() -> int:
    """Threads for shard work: ``ALIGNCURATE_SHARD_THREADS``, else the cores this process
    may use (its CPU affinity, capped by a cgroup v2 CPU quota when there is one)."""
    configured = os.environ.get(WORKERS_ENV)
    if configured:
        return max(1, int(configured))
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, _cgroup_quota() or cores))


def _cgroup_quota() -> int | None:
    """Whole CPUs of the cgroup v2 quota (``cpu.max``), rounded up; None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else -(-int(quota) // int(period))


@cache
def _shared(workers: int) -> tuple[ThreadPoolExecutor, threading.Semaphore]:
    pool = ThreadPoolExecutor(workers, thread_name_prefix="aligncurate-shard")
    return pool, threading.Semaphore(2 * workers)


def ordered_map(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn`` over ``items`` on the shared shard threads, yielded in input order.

    A call holds at most ``threads + 1`` items, and all calls together at most twice the
    threads (a call waiting for room first hands back the results it already has, so
    calls never wait on each other). An exception in ``fn`` is raised at its item's turn;
    the call's work not yet started is then cancelled.
    """
    workers = shard_threads()
    if workers == 1:
        yield from map(fn, items)
        return
    pool, budget = _shared(workers)
    pending: deque[Future[R]] = deque()

    def oldest() -> R:
        try:
            return pending.popleft().result()
        finally:
            budget.release()

    try:
        for item in items:
            while not budget.acquire(blocking=not pending):
                yield oldest()
            pending.append(pool.submit(fn, item))
            del item  # the future holds it while it is needed; not the loop while it waits
            if len(pending) > workers:
                yield oldest()
        while pending:
            yield oldest()
    finally:
        for future in pending:
            future.cancel()
            budget.release()
