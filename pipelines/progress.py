"""Progress bars for long CLI work: ingest by rows, stages by shards, the commit, and
generation by requests.

The flow stays free of terminal UI: during ``aligncurate build`` a logging handler reads the
build's own Prefect task-run log records (``<source>: N rows read``, ``<stage>: shard i/n``,
``Finished in state ...``) and the generation cache's ``<engine>: i/n requests`` records,
and moves rich bars; ``aligncurate generate`` passes a callback to
:meth:`engines.cached.CachedEngine.generate`. Bars are drawn only when stdout is a terminal
and ``--json`` is off, so scripted output stays clean.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from engines.cached import REQUESTS_MESSAGE

TASK_LOGGER = "prefect.task_runs"
GENERATION_LOGGER = "engines.cached"  # engines.cached.REQUESTS_MESSAGE, in-process stages
INGEST_MESSAGE = "%s: %d rows read"  # pipelines.build.ingest_source
SHARD_MESSAGE = "%s: shard %d/%d"  # pipelines.build.run_segment
FINISHED = "Finished in state"  # Prefect's task-engine line at the end of every task run


def wanted(as_json: bool, stream: TextIO | None = None) -> bool:
    """Bars only for people: not under ``--json`` and only when stdout is a terminal."""
    stream = sys.stdout if stream is None else stream
    return not as_json and stream.isatty()


class Bars:
    """Named rich progress bars (thread-safe: Prefect runs ingest tasks in threads)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._ids: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def update(self, key: str, completed: int, total: int | None = None, unit: str = "") -> None:
        """Set bar ``key`` (created on first use) to ``completed`` of ``total``."""
        with self._lock:
            if key not in self._ids:
                self._ids[key] = self.progress.add_task(key, total=total, unit=unit)
            self.progress.update(self._ids[key], completed=completed, total=total)

    def finish(self, key: str) -> None:
        """Mark bar ``key`` complete (its total becomes what it counted)."""
        with self._lock:
            if key in self._ids:
                task = self.progress.tasks[self._ids[key]]
                total = task.total if task.total is not None else task.completed
                self.progress.update(self._ids[key], completed=total, total=total)

    def requests(self, label: str) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for ``CachedEngine.generate``."""
        return lambda done, total: self.update(label, done, total, "requests")


class BuildLogBars(logging.Handler):
    """Moves bars from the build flow's task-run log records.

    It knows from the spec how many ingest and segment tasks the build runs, so it shows
    the commit as started once all of them have finished (cached ones included)."""

    def __init__(self, bars: Bars, name: str, sources: int, segments: int) -> None:
        super().__init__(logging.INFO)
        self.bars = bars
        self.name = name
        self.waiting = sources + segments
        self.sources: dict[str, str] = {}  # task run → bar of its source

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._handle(record)
        except Exception:  # a progress bar must never break a build
            self.handleError(record)

    def _handle(self, record: logging.LogRecord) -> None:
        run = str(getattr(record, "task_run_name", "") or "")
        args: Any = record.args
        if record.msg == REQUESTS_MESSAGE and isinstance(args, tuple):
            kind, done, total = args
            self.bars.update(f"generate ({kind})", int(done), int(total), "requests")
        elif record.msg == INGEST_MESSAGE and isinstance(args, tuple):
            path, rows = args
            key = f"reading {Path(str(path)).name}"
            self.sources[run] = key
            self.bars.update(key, int(rows), None, "rows")
        elif record.msg == SHARD_MESSAGE and isinstance(args, tuple):
            stage, done, total = args
            self.bars.update(f"stage {stage}", int(done), int(total), "shards")
        elif isinstance(record.msg, str) and record.msg.startswith(FINISHED):
            if run.startswith("commit"):
                self.bars.update(f"commit {self.name}", 1, 1, "versions")
            elif run.startswith(("ingest", "ordered-segment")):
                if run in self.sources:
                    self.bars.finish(self.sources[run])
                self.waiting -= 1
                if self.waiting == 0:
                    self.bars.update(f"commit {self.name}", 0, 1, "versions")


@contextmanager
def bars(enabled: bool, console: Console) -> Iterator[Bars | None]:
    """Live bars on ``console`` while the block runs; ``None`` (and nothing drawn) when
    not ``enabled``."""
    if not enabled:
        yield None
        return
    shown = Bars(console)
    with shown.progress:
        yield shown


@contextmanager
def build_bars(enabled: bool, console: Console, spec: Any) -> Iterator[Bars | None]:
    """Bars for one ``build_dataset`` run of ``spec`` (a loaded :class:`BuildSpec`)."""
    from pipelines.segments import ChainStep, split_segments

    with bars(enabled, console) as shown:
        if shown is None:
            yield None
            return
        chain = [ChainStep.of(s.name, s.params) for s in spec.stages]
        handler = BuildLogBars(shown, spec.name, len(spec.sources), len(split_segments(chain)) - 1)
        tasks, generation = logging.getLogger(TASK_LOGGER), logging.getLogger(GENERATION_LOGGER)
        # Generation records are for the bars only: INFO, not passed on to other handlers.
        saved = generation.level, generation.propagate
        generation.setLevel(logging.INFO)
        generation.propagate = False
        for logger in (tasks, generation):
            logger.addHandler(handler)
        try:
            yield shown
        finally:
            for logger in (tasks, generation):
                logger.removeHandler(handler)
            generation.setLevel(saved[0])
            generation.propagate = saved[1]
