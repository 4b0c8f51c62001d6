"""``aligncurate gc NAME``: delete the data files that no version references, once they
are older than a grace period.

A commit writes its data files first and adds them to the log in one transaction at the
end (:mod:`storage.commit`). A build killed in between (kill -9, a lost machine) leaves
files that no version will ever reference. Every version stays readable (overwrite
commits remove files from the latest version only), so every file any log entry ever
added is kept. The files a running build has written but not committed yet are young:
the grace period (default 1 hour, longer than a commit's write phase) keeps them, so gc is
safe while builds run. Nothing is deleted when a log entry cannot be read (it may name any
file; ``aligncurate doctor`` says how to recover) or when the log is incomplete.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.fs as pafs

from storage.dataset import DatasetStore
from storage.deltalog import DataFile, data_files, list_log, read_log
from storage.names import StoreError

DEFAULT_GRACE = timedelta(hours=1)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_grace(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d`` (or ``0``) as a duration.

    Raises:
        StoreError: anything else.
    """
    text = text.strip().lower()
    if text == "0":
        return timedelta(0)
    match = _DURATION.match(text)
    if match is None:
        raise StoreError(f"bad grace period {text!r}: use a number and s, m, h or d, e.g. 1h")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass
class GcResult:
    """What :func:`collect_garbage` deleted (or, on a dry run, would delete) and kept."""

    name: str
    table: str
    grace_seconds: float
    dry_run: bool
    deleted: list[str]  # unreferenced and older than the grace period, below the table
    deleted_bytes: int
    young: list[str]  # unreferenced, inside the grace period: kept
    referenced: int  # data files some version reads: kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        grace = timedelta(seconds=self.grace_seconds)
        return [
            f"{self.name}: {verb} {len(self.deleted)} unreferenced data files "
            f"({self.deleted_bytes} bytes); kept {len(self.young)} younger than {grace} "
            f"and {self.referenced} that versions reference",
            *(f"  {verb} {path}" for path in self.deleted),
        ]


def collect_garbage(
    store: DatasetStore,
    name: str,
    grace: timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
    now: datetime | None = None,
) -> GcResult:
    """Delete ``name``'s Parquet files that no log entry adds and that were last modified
    before ``now - grace`` (see the module docstring).

    Raises:
        StoreError: unknown dataset, or a damaged or incomplete log (nothing deleted).
    """
    if grace < timedelta(0):
        raise StoreError(f"the grace period must not be negative, got {grace}")
    store.check()  # an unreachable or refused object store: a clear error, not OSError
    fs, table = store.table_location(name)
    # Files first, then the log: a file committed after the listing is young or unlisted.
    files = [f for f in data_files(fs, table).values() if f.path.endswith(".parquet")]
    listing = list_log(fs, table)
    latest = listing.latest
    if latest is None:
        store.resolve(name)  # raises: unknown dataset
        raise StoreError(f"dataset {name!r} has no log entries")  # pragma: no cover
    if listing.commits[0] != 0 or listing.gaps():
        raise StoreError(
            f"gc of dataset {name!r} stopped, nothing deleted: its log lacks entries "
            f"(it starts at version {listing.commits[0]}), so what they referenced is unknown"
        )
    referenced = _referenced(fs, table, name, range(latest + 1))
    cutoff = (now or datetime.now(UTC)) - grace
    unreferenced = [f for f in files if f.path not in referenced]
    old = [f for f in unreferenced if f.modified is not None and f.modified <= cutoff]
    # A commit that landed while the log was read references its files too.
    newer = [v for v in list_log(fs, table).commits if v > latest]
    referenced |= _referenced(fs, table, name, newer)
    old = [f for f in old if f.path not in referenced]
    if not dry_run:
        _delete(fs, table, old)
    gone = {f.path for f in old}
    return GcResult(
        name=name,
        table=store.uri(name),
        grace_seconds=grace.total_seconds(),
        dry_run=dry_run,
        deleted=sorted(f.path for f in old),
        deleted_bytes=sum(f.size for f in old),
        young=sorted(f.path for f in unreferenced if f.path not in gone | referenced),
        referenced=sum(f.path in referenced for f in files),
    )


def _referenced(fs: pafs.FileSystem, table: str, name: str, versions: Iterable[int]) -> set[str]:
    """Every file the log entries of ``versions`` add or remove.

    Raises:
        StoreError: an entry is missing or damaged.
    """
    files: set[str] = set()
    for entry in read_log(fs, table, versions):
        if entry.problem is not None:
            raise StoreError(
                f"gc of dataset {name!r} stopped, nothing deleted: its log entry "
                f"{entry.name} (version {entry.version}) is unusable: {entry.problem}; "
                f"`aligncurate doctor {name}` says how to recover"
            )
        files |= entry.adds.keys() | entry.removes
    return files


def _delete(fs: pafs.FileSystem, table: str, files: list[DataFile]) -> None:
    for file in files:
        try:
            fs.delete_file(f"{table}/{file.path}")
        except FileNotFoundError:  # another gc got there first
            continue
