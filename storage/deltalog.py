"""Reading a table's Delta log and data files directly, entry by entry.

``deltalake`` replays the whole log to open a version and, when one entry is damaged, says
only that some JSON was bad. These helpers read each ``_delta_log/<version>.json`` on its
own, so that the store can name the damaged entry (:mod:`storage.dataset`), check a table
(:mod:`storage.doctor`) and find files no version references (:mod:`storage.gc`). They
read through a ``pyarrow`` filesystem, so they work on a local store and on ``s3://``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import pyarrow.fs as pafs

from storage.metadata import ROWS_KEY

LOG_DIR = "_delta_log"
_COMMIT = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint(\.\d+\.\d+)?\.parquet$")
_ACTIONS = frozenset(
    {
        "add",
        "remove",
        "metaData",
        "protocol",
        "commitInfo",
        "txn",
        "cdc",
        "domainMetadata",
        "checkpointMetadata",
        "sidecar",
    }
)


def first_line(exc: BaseException) -> str:
    """A ``deltalake`` error's message without the Rust backtrace it can end with."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def entry_name(version: int) -> str:
    """The log entry of ``version``, relative to the table folder."""
    return f"{LOG_DIR}/{version:020d}.json"


@dataclass(frozen=True)
class LogEntry:
    """One commit of the log: the files it adds (path -> size) and removes, or why it
    cannot be used (``problem``)."""

    version: int
    adds: dict[str, int] = field(default_factory=dict)
    removes: frozenset[str] = frozenset()
    problem: str | None = None

    @property
    def name(self) -> str:
        return entry_name(self.version)


@dataclass(frozen=True)
class LogListing:
    """The versions the log folder holds commit entries and checkpoints for."""

    commits: list[int]
    checkpoints: list[int]

    @property
    def latest(self) -> int | None:
        return self.commits[-1] if self.commits else None

    def gaps(self) -> list[int]:
        """Versions with no entry between the first one needed and the latest: Delta needs
        every entry after the newest checkpoint at or below a version (or from 0)."""
        if not self.commits:
            return []
        present = set(self.commits)
        start = self.checkpoints[0] + 1 if self.checkpoints and 0 not in present else 0
        return [v for v in range(start, self.commits[-1] + 1) if v not in present]


def list_log(fs: pafs.FileSystem, table: str) -> LogListing:
    """The commit and checkpoint versions in ``table``'s log (one listing, no reads)."""
    infos = fs.get_file_info(pafs.FileSelector(f"{table}/{LOG_DIR}", allow_not_found=True))
    commits, checkpoints = [], []
    for info in infos:
        if (match := _COMMIT.match(info.base_name)) is not None:
            commits.append(int(match.group(1)))
        elif (match := _CHECKPOINT.match(info.base_name)) is not None:
            checkpoints.append(int(match.group(1)))
    return LogListing(sorted(commits), sorted(set(checkpoints)))


def read_entry(fs: pafs.FileSystem, table: str, version: int) -> LogEntry:
    """Read and check one log entry: every line a Delta action, and, for a commit the store
    wrote, its files holding the rows its metadata records (an entry cut at a line end
    is valid JSON but lacks files)."""
    try:
        with fs.open_input_stream(f"{table}/{entry_name(version)}") as stream:
            text = stream.read().decode("utf-8")
    except FileNotFoundError:
        return LogEntry(version, problem="the entry is missing")
    except OSError as exc:
        return LogEntry(version, problem=f"the entry cannot be read ({exc})")
    except UnicodeDecodeError as exc:
        return LogEntry(version, problem=f"not UTF-8 text (byte {exc.start})")
    actions: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            action = json.loads(line)
        except json.JSONDecodeError as exc:
            return LogEntry(
                version,
                problem=f"line {number} is not valid JSON ({exc.msg}: column {exc.colno}), "
                "the entry was truncated or overwritten",
            )
        if not isinstance(action, dict) or not _ACTIONS & action.keys():
            return LogEntry(version, problem=f"line {number} is not a Delta action")
        actions.append(action)
    if not actions:
        return LogEntry(version, problem="the entry is empty")
    return _entry(version, actions)


def _entry(version: int, actions: list[dict[str, Any]]) -> LogEntry:
    adds = {_path(a["add"]["path"]): int(a["add"].get("size") or 0) for a in actions if "add" in a}
    removes = frozenset(_path(a["remove"]["path"]) for a in actions if "remove" in a)
    problem = None
    if version == 0 and not {"protocol", "metaData"} <= {k for a in actions for k in a}:
        problem = "it lacks the table's protocol and schema: truncated"
    info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
    if problem is None and ROWS_KEY in info:
        problem = _rows_problem(json.loads(info[ROWS_KEY]), actions)
    return LogEntry(version, adds, removes, problem)


def _rows_problem(recorded: dict[str, int], actions: list[dict[str, Any]]) -> str | None:
    """Every store commit holds the whole dataset: its added files' row counts must add up
    to the rows its metadata records."""
    held: dict[str, int] = {}
    for action in actions:
        add = action.get("add")
        if add is None:
            continue
        stats = json.loads(add.get("stats") or "{}")
        if "numRecords" not in stats:
            return None  # not written by the store: no row counts to compare
        split = (add.get("partitionValues") or {}).get("split", "")
        held[split] = held.get(split, 0) + int(stats["numRecords"])
    short = {s: n for s, n in recorded.items() if held.get(s, 0) != n}
    if not short:
        return None
    found = ", ".join(f"{s}: {held.get(s, 0)} of {n} rows" for s, n in sorted(short.items()))
    return f"it lists too few data files ({found}): truncated"


def _path(path: str) -> str:
    """A log path as a path below the table (Delta percent-encodes them)."""
    return unquote(path)


def read_log(fs: pafs.FileSystem, table: str, versions: Iterable[int]) -> list[LogEntry]:
    """The entries of ``versions``, in the order given."""
    return [read_entry(fs, table, version) for version in versions]


def first_damage(fs: pafs.FileSystem, table: str, upto: int | None = None) -> LogEntry | None:
    """The oldest damaged or missing entry a reader of version ``upto`` (default: the
    latest) replays, or None when they are all intact."""
    listing = list_log(fs, table)
    if listing.latest is None:
        return None
    last = listing.latest if upto is None else min(upto, listing.latest)
    base = max((c for c in listing.checkpoints if c <= last), default=-1)
    present = set(listing.commits)
    for version in range(base + 1, last + 1):
        entry = read_entry(fs, table, version) if version in present else None
        if entry is None or entry.problem is not None:
            return entry or LogEntry(version, problem="the entry is missing")
    return None


@dataclass(frozen=True)
class DataFile:
    """A data file in the table folder: path below it, size and last modification."""

    path: str
    size: int
    modified: datetime | None


def data_files(fs: pafs.FileSystem, table: str) -> dict[str, DataFile]:
    """Every data file below ``table`` by its relative path: all files but those in or
    below a folder (or named) starting with ``_`` or ``.`` (the log, tags, evaluations),
    which Delta and the store keep for themselves."""
    found: dict[str, DataFile] = {}
    selector = pafs.FileSelector(table, recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(table) :].lstrip("/")
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        modified = info.mtime
        if modified is not None and modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        found[relative] = DataFile(relative, int(info.size or 0), modified)
    return found
