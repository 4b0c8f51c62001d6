"""Shard work on threads within one task, results in order.

The heavy parts of a shard's work (Arrow kernels, numpy, Parquet encoding) release the
GIL, so a task that feeds shards one after the other can keep every core busy by working
on the next shards while it writes the current one. Results come back in input order, and
at most ``workers + 1`` items are in flight, so memory stays bounded.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS_ENV = "ALIGNCURATE_SHARD_THREADS"


def shard_threads() -> int:
    """Threads a task gives its shards: ``ALIGNCURATE_SHARD_THREADS``, else one per core
    this process may use."""
    configured = os.environ.get(WORKERS_ENV)
    return max(1, int(configured)) if configured else len(os.sched_getaffinity(0))


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int | None = None
) -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads, yielded in input order. An exception in
    ``fn`` is raised at its item's turn; work not yet started is then cancelled."""
    workers = workers or shard_threads()
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="aligncurate-shard") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
