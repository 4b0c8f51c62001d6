"""``aligncurate doctor NAME``: check every log entry and every data file a version reads,
say which versions can still be read and how to recover the rest.

Each ``_delta_log`` entry is read on its own (:mod:`storage.deltalog`); the versions are
replayed from them, so a damaged entry costs the versions that replay it and no others.
Versions past a damaged entry are tried with ``deltalake`` (a checkpoint may still cover
them). Every file a readable version lists must be in the table folder with the size the
log records; tags must point at readable versions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from storage.dataset import TAGS_FILE, DatasetStore
from storage.deltalog import DataFile, LogEntry, data_files, first_line, list_log, read_log
from storage.names import StoreError

DAMAGED_DIR = "_aligncurate/damaged"
"""Where the recovery steps move unusable log entries: out of the log, kept for a backup."""


@dataclass(frozen=True)
class Problem:
    """One fault: a log entry, a data file or a tag, and the versions it costs."""

    kind: str  # "log_entry", "data_file" or "tag"
    where: str  # path below the table folder, or the tag
    detail: str
    versions: list[int] = field(default_factory=list)
    entry: int | None = None  # a log entry's version


@dataclass
class DoctorReport:
    """What :func:`diagnose` found for one dataset."""

    name: str
    table: str
    latest: int
    readable: list[int]
    unreadable: dict[int, str]
    problems: list[Problem]
    recovery: list[str]
    files_checked: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        """The report for a terminal."""
        head = (
            f"dataset {self.name} ({self.table}): versions 0..{self.latest}, "
            f"{self.files_checked} data files checked"
        )
        if self.ok:
            return [head, "ok: every log entry is intact and every version can be read"]
        out = [head]
        for problem in self.problems:
            costs = f" (unreadable: {_versions(problem.versions)})" if problem.versions else ""
            out.append(f"DAMAGED {problem.kind} {problem.where}: {problem.detail}{costs}")
        out.append(f"readable versions: {spans(self.readable) or 'none'}")
        out.append(f"unreadable versions: {spans(sorted(self.unreadable)) or 'none'}")
        out += ["how to recover:", *(f"  - {step}" for step in self.recovery)]
        return out


def spans(versions: Iterable[int]) -> str:
    """``0..2, 5`` for ``[0, 1, 2, 5]``."""
    runs: list[list[int]] = []
    for v in sorted(versions):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def diagnose(store: DatasetStore, name: str) -> DoctorReport:
    """Check dataset ``name`` (see the module docstring).

    Raises:
        StoreError: ``name`` is not a dataset of the store.
    """
    store.check()  # an unreachable or refused object store: a clear error, not OSError
    fs, table = store.table_location(name)
    listing = list_log(fs, table)
    if listing.latest is None:
        store.resolve(name)  # raises: unknown dataset
        raise StoreError(f"dataset {name!r} has no log entries")  # pragma: no cover
    present = data_files(fs, table)
    entries = {e.version: e for e in read_log(fs, table, listing.commits)}
    entries |= {v: LogEntry(v, problem="the entry is missing") for v in listing.gaps()}
    snapshots, unreadable = _replay(store, name, listing.latest, entries)
    problems = [
        Problem(
            "log_entry", e.name, e.problem, [v for v in unreadable if v >= e.version], e.version
        )
        for e in sorted(entries.values(), key=lambda e: e.version)
        if e.problem is not None
    ]
    problems += _file_problems(snapshots, present, unreadable)
    readable = sorted(v for v in snapshots if v not in unreadable)
    problems += _tag_problems(store, name, listing.latest, readable)
    report = DoctorReport(
        name=name,
        table=store.uri(name),
        latest=listing.latest,
        readable=readable,
        unreadable=dict(sorted(unreadable.items())),
        problems=problems,
        recovery=[],
        files_checked=len({path for files in snapshots.values() for path in files}),
    )
    report.recovery = _recovery(report, local=not store.remote)
    return report


def _replay(
    store: DatasetStore, name: str, latest: int, entries: dict[int, LogEntry]
) -> tuple[dict[int, dict[str, int]], dict[int, str]]:
    """Each version's files (path -> size) replayed from the entries, and why the versions
    that cannot be loaded cannot. After a damaged entry (or where the log was expired),
    ``deltalake`` loads the version: a checkpoint may still cover it."""
    snapshots: dict[int, dict[str, int]] = {}
    unreadable: dict[int, str] = {}
    live: dict[str, int] | None = {}
    for version in range(latest + 1):
        entry = entries.get(version)
        if entry is not None and entry.problem is not None:
            unreadable[version] = f"its log entry {entry.name} is unusable"
            live = None
            continue
        if entry is None or live is None:
            live, why = _load_files(store, name, version)
            if live is None:
                unreadable[version] = why
                continue
        else:
            live = {p: s for p, s in live.items() if p not in entry.removes} | entry.adds
        snapshots[version] = live
    return snapshots, unreadable


def _load_files(store: DatasetStore, name: str, version: int) -> tuple[dict[str, int] | None, str]:
    try:
        table = DeltaTable(store.uri(name), version=version, storage_options=store.storage_options)
        actions = table.get_add_actions(flatten=True).to_pydict()
    except DeltaError as exc:
        return None, f"deltalake cannot load it: {first_line(exc)}"
    return dict(zip(actions["path"], actions["size_bytes"], strict=True)), ""


def _file_problems(
    snapshots: dict[int, dict[str, int]],
    present: dict[str, DataFile],
    unreadable: dict[int, str],
) -> list[Problem]:
    """Missing or resized data files; each makes the versions listing it unreadable."""
    faults: dict[str, tuple[str, list[int]]] = {}
    for version, files in snapshots.items():
        for path, size in files.items():
            found = present.get(path)
            if "://" in path or (found is not None and (not size or found.size == size)):
                continue  # an absolute URI is outside the table folder: not checked
            fault = "missing" if found is None else "truncated or replaced"
            detail = fault if found is None else f"{fault}: {found.size} bytes, the log says {size}"
            faults.setdefault(path, (detail, []))[1].append(version)
            unreadable.setdefault(version, f"its data file {path} is {fault}")
    return [Problem("data_file", path, detail, vs) for path, (detail, vs) in sorted(faults.items())]


def _tag_problems(
    store: DatasetStore, name: str, latest: int, readable: list[int]
) -> list[Problem]:
    try:
        tags = store.tags(name)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return [Problem("tags_file", TAGS_FILE, f"cannot be read ({exc})")]
    problems = []
    for tag, version in sorted(tags.items()):
        if version > latest:
            detail = f"points at version {version}, which is not in the log"
        elif version not in readable:
            detail = f"points at version {version}, which cannot be read"
        else:
            continue
        problems.append(Problem("tag", tag, detail, [version]))
    return problems


def _recovery(report: DoctorReport, local: bool) -> list[str]:
    """What to do: read the newest readable version meanwhile, restore what a backup
    has, and otherwise move the tags off and give up the versions that cannot be read."""
    if report.ok:
        return []
    name, table = report.name, report.table
    newest = max(report.readable, default=None)
    steps = []
    if newest is not None and newest != report.latest:
        steps.append(f"read {name}@{newest} (the newest readable version) meanwhile")
    for problem in report.problems:
        if problem.kind in ("log_entry", "data_file"):
            gain = f": it makes {_versions(problem.versions)} readable again"
            steps.append(
                f"restore {table}/{problem.where} from a backup if you have one"
                + (gain if problem.versions else "")
            )
        elif problem.kind == "tags_file":
            steps.append(f"repair or delete {table}/{TAGS_FILE} (it maps tags to versions)")
        elif newest is not None:
            steps.append(
                f"move tag {problem.where!r} to a readable version, e.g. "
                f"`aligncurate tag {name}@{newest} {problem.where}`"
            )
    damaged = [p.entry for p in report.problems if p.entry is not None]
    if damaged:
        first = min(damaged)
        tail = range(first, report.latest + 1)
        names = " ".join(f"{table}/_delta_log/{v:020d}.json" for v in tail)
        move = (
            f"mkdir -p {table}/{DAMAGED_DIR} && mv {names} {table}/{DAMAGED_DIR}/"
            if local
            else f"move {names} to {table}/{DAMAGED_DIR}/"
        )
        then = f"{name}@{first - 1} is the latest again" if first else "no version remains"
        steps.append(
            f"without a backup, give up {_versions(list(tail))}: with no build of {name} "
            f"running and no tag on them, {move}; {then}, and `aligncurate gc {name}` "
            "deletes the data files only they used"
        )
    return steps


def _versions(versions: list[int]) -> str:
    return f"version {versions[0]}" if len(versions) == 1 else f"versions {spans(versions)}"
