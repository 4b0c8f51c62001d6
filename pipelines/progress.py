"""Progress bars for long CLI work: ingest by rows, stages by shards, the commit, and
generation by requests.

Design. The flow stays free of terminal UI and of log-text parsing: the build's code tells
a tiny, process-wide event API what it did, with :func:`emit` (``read`` rows of a source,
an ordered ``stage``'s shards, the ``commit``, ``generate`` requests of an engine).
:func:`emit` is a no-op when nothing listens; a listener's error is logged at DEBUG and
never breaks a build. ``aligncurate build`` listens (:func:`listening`) and turns events
into rich bars. Listeners are module-level, not context variables, because events come
from Prefect's task threads and from the shard threads of :mod:`pipelines.parallel`,
which do not inherit the caller's context. Generation batches arrive the same way:
:class:`engines.cached.CachedEngine` calls its module's ``batch_listener`` (engines do not
import pipelines), which :func:`listening` points at :func:`emit` while it listens;
``aligncurate generate`` instead passes a ``progress`` callback to
:meth:`~engines.cached.CachedEngine.generate`.

Which events come from where: a source's rows while it is read, from the ingest task; its
total once the flow has the task's result (so a cached task, which reads nothing, still
fills its bar); each shard of an ordered stage from its task, and the stage's total from
the flow; the commit from the flow. The tasks still log these steps for the run log (the
Prefect UI's logs of a worker's build); the bars never read log text. With ``--runner
dask`` the ingest tasks run in worker processes, whose events reach no listener: those bars
jump to their totals when the flow gets each result, and the build's bars still all
complete.

Log lines and bars share the terminal: while bars show, each Prefect console handler that
writes to a terminal prints through the bars' console (:class:`_AboveBars`), so rich draws
every log line above the live bars and never through one. Dask worker processes print
their own console lines, outside this process: they come while no ingest bar is drawn
yet, but a Dask ``prepare`` task's lines (near dedup) can still cross a drawn bar.

Bars are drawn only when stdout is a terminal and ``--json`` is off, so scripted output
stays clean.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TextIO

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
from rich.text import Text

from engines import cached

Kind = Literal["read", "stage", "commit", "generate"]


@dataclass(frozen=True)
class Event:
    """``done`` of ``total`` (``None``: not known yet) for one piece of build work.
    ``name``: the source's path (``read``), the stage (``stage``), the dataset
    (``commit``) or the engine kind (``generate``)."""

    kind: Kind
    name: str
    done: int
    total: int | None = None


Listener = Callable[[Event], None]
_listeners: list[Listener] = []
_lock = threading.Lock()
_log = logging.getLogger(__name__)


def emit(kind: Kind, name: str, done: int, total: int | None = None) -> None:
    """Tell every listener in this process; nothing happens when none listens."""
    with _lock:
        listeners = tuple(_listeners)
    event = Event(kind, name, done, total)
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # progress must never break a build
            _log.debug("progress listener failed on %s", event, exc_info=True)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """``listener`` hears every event emitted in this process while the block runs,
    generation batches of :class:`~engines.cached.CachedEngine` included."""
    with _lock:
        _listeners.append(listener)
    previous, cached.batch_listener = cached.batch_listener, partial(emit, "generate")
    try:
        yield
    finally:
        cached.batch_listener = previous
        with _lock:
            _listeners.remove(listener)


def wanted(as_json: bool, stream: TextIO | None = None) -> bool:
    """Bars only for people: not under ``--json`` and only when stdout is a terminal."""
    stream = sys.stdout if stream is None else stream
    return not as_json and stream.isatty()


LABELS: dict[Kind, tuple[str, str]] = {
    "read": ("reading {name}", "rows"),
    "stage": ("stage {name}", "shards"),
    "commit": ("commit {name}", "versions"),
    "generate": ("generate ({name})", "requests"),
}
"""Each event kind's bar: its label and its unit."""


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

    def requests(self, label: str) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for ``CachedEngine.generate``."""
        return lambda done, total: self.update(label, done, total, "requests")

    def __call__(self, event: Event) -> None:
        """A :data:`Listener`: move the event's bar (a source by its file name)."""
        label, unit = LABELS[event.kind]
        name = Path(event.name).name if event.kind == "read" else event.name
        self.update(label.format(name=name), event.done, event.total, unit)


class _AboveBars(io.TextIOBase):
    """The stream of a Prefect console handler while bars show: each line written to it
    (styled with ANSI codes) is printed through the bars' console, which draws it above
    the live bars. rich's own ``FileProxy`` cannot serve, as a ``Console`` unwraps it."""

    def __init__(self, console: Console, terminal: TextIO) -> None:
        super().__init__()
        self.console = console
        self.terminal = terminal
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self.console.print(Text("\n").join(map(Text.from_ansi, lines)), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.write("\n")

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()


def _console_handlers() -> list[Any]:
    """Every Prefect console handler of every logger, each once."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found = {
        id(h): h
        for logger in loggers
        for h in getattr(logger, "handlers", ())
        if isinstance(h, PrefectConsoleHandler)
    }
    return list(found.values())


@contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """Prefect's console handlers that write to a terminal print through ``console``
    while the block runs; one that writes elsewhere (a file) keeps its stream."""
    routed = []
    for handler in _console_handlers():
        own = handler.console
        if own.file.isatty():
            routed.append((own, own.file))
            own.file = _AboveBars(console, own.file)
    try:
        yield
    finally:
        for own, file in routed:
            own.file.flush()
            own.file = file


@contextmanager
def bars(enabled: bool, console: Console) -> Iterator[Bars | None]:
    """Live bars on ``console`` while the block runs, with Prefect's console log lines
    printed above them; ``None`` (and nothing drawn) when not ``enabled``."""
    if not enabled:
        yield None
        return
    shown = Bars(console)
    with shown.progress, _logs_above(console):
        yield shown


@contextmanager
def build_bars(enabled: bool, console: Console) -> Iterator[Bars | None]:
    """Bars for one ``build_dataset`` run, moved by the events it emits."""
    with ExitStack() as stack:
        shown = stack.enter_context(bars(enabled, console))
        if shown is not None:
            stack.enter_context(listening(shown))
        yield shown
