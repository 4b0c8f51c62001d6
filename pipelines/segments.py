"""Run chains of stages over shards, writing shards. No Prefect here.

The flow splits the spec's chain into *segments*: the first is ingest plus the local
stages before the first ordered stage; each later one starts at an ordered stage and runs
the local stages that follow it. A segment writes, for each input shard, one ``train``
shard and (when it rejected anything) one ``rejected`` shard: Parquet data files of the
table where no later segment reads them, Arrow IPC scratch files where one does. A cached
segment's shards serve either way when the chain changes after it (its last-ness is not in
its cache key): a segment added after it reads its data files, and the commit reads its
scratch files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from pipelines.stages import stage
from storage.atomic import atomic_path
from storage.commit import ARROW_SUFFIX, DATA_FILE_KEY, write_data_file
from transforms.registry import StageContext, StageDef
from transforms.response.stats import parquet_columns
from transforms.stage import StageResult

Counts = dict[str, dict[str, int]]
# Scratch shards (read by the next segment) are Arrow IPC files (storage.commit.ARROW_SUFFIX),
# uncompressed: a write is a copy of the buffers and a read maps the file, with no encoding
# either way (16,384 rows of instruction text: 2.6 + 0.3 ms, against 9 + 8 ms for Parquet).
# A last segment's shard that cannot be a data file: Parquet without compression or
# dictionaries (3x faster writes).
_SHARD_OPTIONS: dict[str, Any] = {
    "compression": "none",
    "use_dictionary": False,
    "write_statistics": False,
}


@dataclass(frozen=True)
class ChainStep:
    """A stage with its validated parameters."""

    definition: StageDef
    params: BaseModel

    @classmethod
    def of(cls, name: str, params: BaseModel) -> ChainStep:
        return cls(stage(name), params)


@dataclass
class SegmentOutput:
    """What a segment task returns (and Prefect persists): shard paths and counts."""

    key: str
    train: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    counts: Counts = field(default_factory=dict)
    produced_by: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    """Statistics of whole-table stages, by stage name (engine calls among them)."""


CONTENT_ID_STAGES = frozenset({"normalize", "filter"})
"""Stages that leave every row's id the hash of its (source, prompt, response): normalize
hashes again the ids of the rows it changes, and filter changes no row."""


def content_ids(sources: int, segments: list[list[ChainStep]], index: int) -> bool:
    """Whether the rows entering segment ``index`` come from one source with ids that hash
    their content: then equal ids mean equal (prompt, response), and exact dedup keys rows
    by id (:data:`transforms.dedup.ID_KEYS`). Ingest hashes the ids; every stage before the
    segment must be one of :data:`CONTENT_ID_STAGES`."""
    before = (step.definition.name for chain in segments[:index] for step in chain)
    return sources == 1 and all(name in CONTENT_ID_STAGES for name in before)


def split_segments(chain: list[ChainStep]) -> list[list[ChainStep]]:
    """Cut the chain before every ordered stage. The first segment may be empty."""
    segments: list[list[ChainStep]] = [[]]
    for step in chain:
        if step.definition.starts_segment:
            segments.append([])
        segments[-1].append(step)
    return segments


def add_counts(total: Counts, name: str, counts: dict[str, int]) -> None:
    """Add one shard's accounting line for a stage into the running totals."""
    line = total.setdefault(name, {"in": 0, "kept": 0, "rejected": 0, "added": 0})
    for key, value in counts.items():
        line[key] = line.get(key, 0) + value


def merge_counts(parts: Iterable[Counts]) -> Counts:
    """Sum accounting lines stage by stage, keeping the chain order."""
    total: Counts = {}
    for part in parts:
        for name, counts in part.items():
            add_counts(total, name, counts)
    return total


def run_chain(
    result: StageResult,
    chain: list[ChainStep],
    counts: Counts,
    states: dict[str, Any] | None = None,
    context: StageContext | None = None,
    stats: dict[str, Any] | None = None,
    prepared: dict[str, Any] | None = None,
) -> tuple[pa.Table, list[pa.Table]]:
    """Feed a first result (ingest's, or a shard read back) through ``chain``.

    Returns the rows kept by the last stage and every stage's rejected rows. ``states``
    holds the carried state of ordered stages, by stage name; ``context`` is given to
    whole-table stages, whose statistics are collected into ``stats`` by stage name;
    ``prepared`` is the first stage's ``prepare`` of this shard, computed ahead.
    """
    rejected = [result.rejected] if result.rejected.num_rows else []
    table = result.kept
    for i, step in enumerate(chain):
        args: tuple[Any, ...] = (table, step.params)
        if step.definition.ordered:
            assert states is not None, "ordered stages need a state"
            args = (*args, states.setdefault(step.definition.name, step.definition.new_state()))
            if i == 0 and prepared is not None:
                args = (*args, prepared)
        elif step.definition.whole:
            assert context is not None, "whole-table stages need a context"
            args = (*args, context)
        out: StageResult = step.definition.run(*args)
        if step.definition.whole and stats is not None:
            stats[step.definition.name] = out.stats
        add_counts(counts, step.definition.name, out.counts(table.num_rows))
        if out.rejected.num_rows:
            rejected.append(out.rejected)
        table = out.kept
    return table, rejected


class ShardWriter:
    """Writes numbered shards into one folder; each file appears atomically (rename).

    Rows that no later stage reads (every ``rejected`` shard, and the ``train`` shards when
    ``final``) are written as data files of the table they will be committed to
    (:func:`storage.commit.write_data_file`), which the commit links in without reading
    them; the other shards are scratch files, written plain and fast for the next segment
    (and read by the commit instead when a later build's chain ends here)."""

    def __init__(self, folder: str | Path, *, final: bool = False) -> None:
        self.folder = Path(folder)
        self.final = final
        self.train: list[str] = []
        self.rejected: list[str] = []
        self.counts: Counts = {}

    def write_shard(
        self, index: int, kept: pa.Table, rejected: list[pa.Table]
    ) -> tuple[str, str | None]:
        """Write shard ``index`` (any thread, any order); :meth:`add` records it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        train = self._write(kept, f"train-{index:05d}", final=self.final)
        if not rejected:
            return train, None
        table = pa.concat_tables(rejected, promote_options="permissive")
        return train, self._write(table, f"rejected-{index:05d}", final=True)

    def record(self, written: Iterable[tuple[Counts, tuple[str, str | None]]]) -> Iterator[Counts]:
        """Record shards written by :meth:`write_shard` (their counts and paths, in shard
        order) and their counts into :attr:`counts`; yields the running counts after each."""
        for part, (train, rejected) in written:
            self.counts = merge_counts([self.counts, part])
            self.train.append(train)
            if rejected is not None:
                self.rejected.append(rejected)
            yield self.counts

    def _write(self, table: pa.Table, stem: str, *, final: bool) -> str:
        # Two builds of one spec at once write the same files (same key, same content) into
        # the same folder: atomic_path gives each its own temporary name.
        path = self.folder / f"{stem}{'.parquet' if final else ARROW_SUFFIX}"
        with atomic_path(path) as tmp:
            if not final:
                _write_ipc(table, tmp)
            elif not write_data_file(table, str(tmp)):
                pq.write_table(table, tmp, **_SHARD_OPTIONS)
        return str(path)


def _write_ipc(table: pa.Table, path: Path) -> None:
    # An IPC file has one dictionary per field (no replacement): chunks' dictionaries are
    # unified, as Parquet's writer does.
    options = pa.ipc.IpcWriteOptions(unify_dictionaries=True)
    with pa.ipc.new_file(str(path), table.schema, options=options) as writer:
        writer.write_table(table)


def read_shard(path: str) -> pa.Table:
    """One shard as a table: a scratch shard memory-mapped (its buffers are the file's
    pages, shared with the page cache), any other read from Parquet. A data file (a cached
    segment's, read by a segment added after it) loses its data-file marker: the rows a
    stage makes of it are not that file."""
    if path.endswith(ARROW_SUFFIX):
        with pa.memory_map(path) as source:  # the table's buffers keep the mapping alive
            return pa.ipc.open_file(source).read_all()
    table = pq.read_table(path)
    metadata = table.schema.metadata
    if metadata and DATA_FILE_KEY in metadata:
        rest = {k: v for k, v in metadata.items() if k != DATA_FILE_KEY}
        table = table.replace_schema_metadata(rest or None)
    return table


def read_columns(path: str, columns: Sequence[str]) -> pa.Table:
    """The ``columns`` a shard has: a scratch shard's selected from its mapping, a Parquet
    shard's read alone."""
    if not path.endswith(ARROW_SUFFIX):
        return parquet_columns(path, columns)
    table = read_shard(path)
    return table.select([c for c in columns if c in table.column_names])


def shard_rows(path: str) -> int:
    """A shard's row count, from its metadata (no rows read)."""
    if not path.endswith(ARROW_SUFFIX):
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).count_rows()


def write_prepared(
    folder: str | Path, name: str, table: pa.Table, arrays: dict[str, np.ndarray]
) -> str:
    """Write a shard's prepared arrays as ``<folder>/<name>.npz`` (atomically), with a
    digest of the rows they were computed from."""
    path = Path(folder) / f"{name}.npz"
    with atomic_path(path) as tmp:
        np.savez(tmp, _rows=_rows_digest(table), **arrays)
    return str(path)


def read_prepared(path: str, table: pa.Table) -> dict[str, np.ndarray] | None:
    """The arrays prepared for ``table``, or ``None`` when the file was computed from other
    rows (a shard rewritten since): the ordered stage then prepares them itself."""
    with np.load(path) as arrays:
        if not np.array_equal(arrays["_rows"], _rows_digest(table)):
            return None
        return {name: arrays[name] for name in arrays.files if name != "_rows"}


def _rows_digest(table: pa.Table) -> np.ndarray:
    """SHA-256 of the row count and the ``id`` column, as bytes."""
    ids = table.column("id").to_pylist() if "id" in table.column_names else []
    text = f"{table.num_rows}\n" + "\n".join(map(str, ids))
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint8)


def read_shards(paths: Iterable[str]) -> Iterator[StageResult]:
    """Read train shards back, one table each, as a first stage result."""
    for path in paths:
        yield StageResult(kept=read_shard(path))
