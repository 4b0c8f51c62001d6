"""The commit writer: a build's shards → one new version, in one atomic Delta commit.

Shards are Parquet files, or Arrow IPC files (``.arrow``: a build's scratch shards, which
a cached segment may hand to a commit when it has become the chain's last).

A commit runs in three steps:

1. **Plan.** Every shard's footer is read (no data) and the schemas are unified
   (:func:`unify_schemas`): canonical columns first, then stage columns in order of first
   appearance, then the reject columns and the ``split`` partition column. Types Delta
   cannot store fail here, before anything is written.
2. **Write.** A shard already written as a data file of this table (:func:`write_data_file`,
   the table's file schema and encoding) is *adopted*: hard-linked into the table (copied
   where a link is impossible), not read. The other shards' batches are read (in a prefetch
   thread when one run is written), conformed to the unified schema and streamed through
   pyarrow's Parquet writer into the table's data files,
   ``split=<split>/part-NNNNN-<uuid>.snappy.parquet``, a new file every
   ``target_file_bytes``. Memory stays bounded by a few batches; row order is kept.
3. **Commit.** One Delta transaction adds the files: ``create_table_with_add_actions`` for a
   new dataset, an ``overwrite`` write transaction otherwise. The commit's custom metadata
   holds the build metadata (:mod:`storage.metadata`).

``write_deltalake`` would do steps 2 and 3 in one call, but it buffers too much for
million-row builds; this runs at pyarrow's speed in bounded memory. If anything fails
before the transaction, the data files written so far are removed and no version exists.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from queue import Empty, Full, Queue
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction, create_table_with_add_actions

from storage.metadata import commit_id_of, encode_metadata
from storage.names import SPLITS, StoreError
from transforms.memory import release_freed_memory
from transforms.schema import REJECT_FIELDS, SCHEMA

TABLE_CONFIG = {"delta.enableExpiredLogCleanup": "false"}
DICTIONARY_COLUMNS = ("source", "task", "origin", "prompt.list.element.role", "reject_stage")
"""Columns with few distinct values, dictionary-encoded in the data files. Text columns are
mostly distinct: trying a dictionary there costs Parquet's writer a third of its time
(1M rows: 1.24 s against 2.01 s) for files of the same size."""
"""Versions are the product: never let Delta expire old log entries (and with them,
the ability to read old versions)."""


def statistics_columns(schema: pa.Schema) -> list[str]:
    """The Parquet columns (leaf paths) whose min/max statistics the data files carry:
    every column but the text ones, except the few-valued :data:`DICTIONARY_COLUMNS`.
    Min/max of prompts, responses or hash ids prune nothing and took a sixth of the
    writer's time (262k rows: 488 ms against 407 ms); values and schema are unchanged."""
    columns: list[str] = []

    def walk(dtype: pa.DataType, path: str) -> None:
        if pa.types.is_struct(dtype):
            for child in dtype:
                walk(child.type, f"{path}.{child.name}")
        elif pa.types.is_map(dtype):
            walk(dtype.key_type, f"{path}.key_value.key")
            walk(dtype.item_type, f"{path}.key_value.value")
        elif pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
            walk(dtype.value_type, f"{path}.list.element")
        elif path in DICTIONARY_COLUMNS or not (
            pa.types.is_string(dtype)
            or pa.types.is_large_string(dtype)
            or pa.types.is_binary(dtype)
            or pa.types.is_large_binary(dtype)
        ):
            columns.append(path)

    for field in schema:
        walk(field.type, field.name)
    return columns


ARROW_SUFFIX = ".arrow"
"""A shard with this suffix is an Arrow IPC file (a build's scratch shard); any other is
Parquet. The commit reads both."""
DATA_FILE_KEY = b"aligncurate.data_file"
DATA_FILE_VERSION = b"1"
"""Schema metadata of a shard written by :func:`write_data_file`: the commit adopts it."""
ROW_GROUP_ROWS = 32_768
"""Rows per row group of a shard written as a data file (the commit writes a row group per
read batch, ``storage.dataset.BATCH_ROWS``, the same size)."""


ADOPT_COPIES = 8
"""Adopted shards copied at once onto another filesystem (an object store): each copy is
an upload that waits on the network, not on a core."""


def data_file_options(schema: pa.Schema) -> dict[str, Any]:
    """The Parquet writer options of the table's data files (one place for both writers)."""
    return {
        "compression": "snappy",
        "coerce_timestamps": "us",
        "use_dictionary": list(DICTIONARY_COLUMNS),
        "write_statistics": statistics_columns(schema),
    }


def write_data_file(table: pa.Table, where: str) -> bool:
    """Write ``table`` at ``where`` as a data file of the table its rows will be committed to
    when all of a build's shards share its columns: conformed to :func:`unify_schemas` of its
    own schema (less ``split``), in the data files' encoding, marked for adoption. Returns
    False, writing nothing, when its columns cannot be stored (the commit then reports it) or
    a stage column's type would change (a null or dictionary column: the commit unifies
    those across the shards first).
    """
    fixed = {f.name for f in [*SCHEMA, *REJECT_FIELDS]}
    if any(f.name not in fixed and storable_type(f.type) != f.type for f in table.schema):
        return False  # a stage column's type is settled across shards, by the commit
    try:
        schema = unify_schemas([(where, table.schema)])
    except StoreError:
        return False
    schema = schema.remove(schema.get_field_index("split"))
    try:
        batches = [conform_batch(batch, schema) for batch in table.to_batches()]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    conformed = pa.Table.from_batches(batches, schema)
    conformed = conformed.replace_schema_metadata({DATA_FILE_KEY: DATA_FILE_VERSION})
    pq.write_table(conformed, where, row_group_size=ROW_GROUP_ROWS, **data_file_options(schema))
    return True


class ShardSource(NamedTuple):
    """One shard to commit: its split, its path as given (for messages) and where it is."""

    split: str
    path: str
    filesystem: pafs.FileSystem
    fs_path: str  # the path on ``filesystem``


@dataclass(frozen=True)
class CommitTarget:
    """The dataset a commit goes to."""

    name: str
    uri: str  # the table URI, for deltalake
    filesystem: pafs.FileSystem  # the store's filesystem, for the data files
    path: str  # the table's path on ``filesystem``
    storage_options: dict[str, str] | None
    open_table: Callable[[], DeltaTable]  # the latest snapshot; raises StoreError


def commit_shards(
    target: CommitTarget,
    shards: Sequence[ShardSource],
    metadata: Mapping[str, Any],
    *,
    batch_rows: int,
    target_file_bytes: int,
    threads: int = 1,
) -> int:
    """Commit ``shards`` as the new (complete) content of ``target``; returns its version.
    ``threads``: runs of shards written at once (see :meth:`PartWriter.write`).

    Raises:
        StoreError: bad metadata, unreadable shard, incompatible column types, or a
            failed write.
    """
    plan = ShardPlan.build(shards, batch_rows)
    commit_id = uuid.uuid4().hex
    properties = CommitProperties(custom_metadata=encode_metadata(metadata, plan.rows, commit_id))
    _ = plan.delta_schema  # fails before any write on types Delta lacks
    created = not DeltaTable.is_deltatable(target.uri, target.storage_options)
    if not created:
        target.open_table()  # a damaged latest version fails now, before any file is written

    # The build's stages are done: hand the pages their temporaries freed back first, so
    # that the writer threads' new heaps do not come on top of them (1M rows: the commit's
    # peak RSS 734-806 -> 641-649 MiB)
    release_freed_memory()
    parts = PartWriter(target.filesystem, target.path, plan.file_schema, target_file_bytes)
    try:
        actions = parts.write(plan, threads)
    except OSError as exc:  # a full disk, a lost mount, a refused object store
        parts.discard()  # nothing references these files: remove them
        raise StoreError(
            f"writing the data files of dataset {target.name!r} failed, no version was "
            f"committed: {exc}"
        ) from exc
    except BaseException:
        parts.discard()
        raise
    _transact(target, plan, actions, properties, created)
    return _landed_version(target, commit_id)


def _landed_version(target: CommitTarget, commit_id: str, search: int = 50) -> int:
    """The version whose log entry carries ``commit_id``, read from the log files
    themselves: while other builds commit, ``DeltaTable.history()`` can number its entries
    off by the commits that landed between its two listings of the log."""
    latest = target.open_table().version()
    for version in range(latest, max(-1, latest - search), -1):
        path = f"{target.path}/_delta_log/{version:020d}.json"
        with target.filesystem.open_input_stream(path) as stream:
            lines = stream.read().decode("utf-8").splitlines()
        for line in lines:
            info = json.loads(line).get("commitInfo") if line.strip() else None
            if info is not None and commit_id_of(info) == commit_id:
                return version
    raise StoreError(  # pragma: no cover - more than `search` concurrent commits
        f"commit to dataset {target.name!r} landed, but not in its last {search} versions"
    )


COMMIT_ATTEMPTS = 5
"""Tries of the Delta transaction when another build commits first (see :func:`_transact`)."""


def _transact(
    target: CommitTarget,
    plan: ShardPlan,
    actions: list[AddAction],
    properties: CommitProperties,
    created: bool,
) -> None:
    """Add the written files in one Delta transaction; on a concurrent commit, retry onto
    the newer version.

    Two builds of one dataset may race. The log entry of a version is created atomically
    (a rename locally, a conditional put on S3, see :mod:`storage.s3`), so exactly one of
    them gets each version; the other sees ``CommitFailedError`` (its snapshot is stale)
    or, when both created the dataset, a table that now exists. Every build commits the
    complete dataset (``overwrite``), so the loser re-reads the latest snapshot and
    commits on top of it: both builds become versions, in commit order.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            if created:
                create_table_with_add_actions(
                    target.uri,
                    plan.delta_schema,
                    actions,
                    mode="error",
                    partition_by=["split"],
                    name=target.name,
                    configuration=TABLE_CONFIG,
                    storage_options=target.storage_options,
                    commit_properties=properties,
                )
            else:
                target.open_table().create_write_transaction(
                    actions,
                    mode="overwrite",
                    schema=plan.delta_schema,
                    partition_by=["split"],
                    commit_properties=properties,
                )
            return
        except DeltaError as exc:  # files stay: a commit may fail after it landed
            raced = isinstance(exc, CommitFailedError) or (
                created and DeltaTable.is_deltatable(target.uri, target.storage_options)
            )
            if not raced or attempt == COMMIT_ATTEMPTS:
                tries = f" after {attempt} attempts (concurrent builds)" if raced else ""
                raise StoreError(f"commit to dataset {target.name!r} failed{tries}: {exc}") from exc
            created = False


# -- the plan ----------------------------------------------------------------------------


@dataclass
class _Shard:
    split: str
    path: str  # as given, for messages
    filesystem: pafs.FileSystem
    fs_path: str  # the path on ``filesystem``
    schema: pa.Schema
    rows: int


@dataclass
class ShardPlan:
    """The unified schema of a build's shards, and their batches conformed to it."""

    shards: list[_Shard]
    schema: pa.Schema  # the table schema, ``split`` last
    batch_rows: int

    @classmethod
    def build(cls, sources: Sequence[ShardSource], batch_rows: int) -> ShardPlan:
        """Read every shard's footer and unify the schemas (no data is read)."""
        shards = [_read_footer(source) for source in sources]
        schema = unify_schemas([(shard.path, shard.schema) for shard in shards])
        return cls(shards, schema, batch_rows)

    @property
    def rows(self) -> dict[str, int]:
        return {split: sum(s.rows for s in self.shards if s.split == split) for split in SPLITS}

    @property
    def file_schema(self) -> pa.Schema:
        """Data files hold every column but the ``split`` partition column."""
        return self.schema.remove(self.schema.get_field_index("split"))

    @cached_property
    def delta_schema(self) -> DeltaSchema:
        try:
            return DeltaSchema.from_arrow(self.schema)
        except Exception as exc:  # deltalake raises several types for unsupported types
            raise StoreError(f"the shards' schema cannot be stored in Delta: {exc}") from exc

    def adoptable(self, shard: _Shard) -> bool:
        """Whether ``shard`` was written as a data file of this table (a Parquet file with
        the marker, and exactly the table's file schema): it is then linked in, not read
        and written. An IPC file never is, whatever metadata its rows carried."""
        if shard.fs_path.endswith(ARROW_SUFFIX):
            return False
        marker = (shard.schema.metadata or {}).get(DATA_FILE_KEY)
        return marker == DATA_FILE_VERSION and shard.schema.equals(self.file_schema)

    def stretches(self, split: str) -> Iterator[tuple[bool, list[_Shard]]]:
        """The ``split`` shards as maximal runs of consecutive shards that are all
        adoptable or all not, in order."""
        shards = [shard for shard in self.shards if shard.split == split]
        for adopt, stretch in itertools.groupby(shards, key=self.adoptable):
            yield adopt, list(stretch)

    @staticmethod
    def groups(shards: Sequence[_Shard], count: int) -> list[list[_Shard]]:
        """``shards`` in at most ``count`` runs of consecutive shards with about the same
        number of rows each (none empty)."""
        total = sum(shard.rows for shard in shards)
        if total == 0:
            return [list(shards)] if shards else []
        groups: list[list[_Shard]] = [[]]
        done = 0
        for shard in shards:
            if groups[-1] and len(groups) < count and done >= total * len(groups) / count:
                groups.append([])
            groups[-1].append(shard)
            done += shard.rows
        return [group for group in groups if group]

    def batches(self, shards: Sequence[_Shard]) -> Iterator[pa.RecordBatch]:
        """The rows of ``shards``, conformed to :attr:`file_schema`, batch by batch."""
        schema = self.file_schema
        for shard in shards:
            row = 0
            for batch in _shard_batches(shard, self.batch_rows):
                try:
                    yield conform_batch(batch, schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                    rows = f"rows {row}..{row + batch.num_rows - 1}"
                    raise StoreError(f"{shard.split} shard {shard.path}: {rows}: {exc}") from exc
                row += batch.num_rows


def _shard_batches(shard: _Shard, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A shard's rows in batches of at most ``batch_rows`` (each a row group of the data
    file): read so from a Parquet file; an IPC file's record batches cut to that size."""
    if not shard.fs_path.endswith(ARROW_SUFFIX):
        parquet = pq.ParquetFile(shard.fs_path, filesystem=shard.filesystem)
        yield from parquet.iter_batches(batch_size=batch_rows)
        return
    local = isinstance(shard.filesystem, pafs.LocalFileSystem)
    # a local file is mapped: a batch's pages are the page cache's, not this process's
    opened = (
        pa.memory_map(shard.fs_path) if local else shard.filesystem.open_input_file(shard.fs_path)
    )
    with opened as file:
        reader = pa.ipc.open_file(file)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            for start in range(0, batch.num_rows, batch_rows):
                yield batch.slice(start, batch_rows)


def _read_footer(source: ShardSource) -> _Shard:
    split, path, filesystem, fs_path = source
    try:
        if fs_path.endswith(ARROW_SUFFIX):
            with filesystem.open_input_file(fs_path) as file:
                reader = pa.ipc.open_file(file)
                return _Shard(split, path, filesystem, fs_path, reader.schema, reader.count_rows())
        parquet = pq.ParquetFile(fs_path, filesystem=filesystem)
        return _Shard(
            split, path, filesystem, fs_path, parquet.schema_arrow, parquet.metadata.num_rows
        )
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"cannot read {split} shard {path}: {exc}") from exc


# -- schema unification ------------------------------------------------------------------


def unify_schemas(schemas: Sequence[tuple[str, pa.Schema]]) -> pa.Schema:
    """The table schema of shards given as ``(path, schema)``.

    Canonical columns (canonical types) first, then stage columns in order of first
    appearance (types unified across shards, see :func:`storable_type`), then
    ``reject_stage``, ``reject_reason``, then the ``split`` partition column. Every field
    is nullable: the rejected split may lack canonical values.

    Raises:
        StoreError: a shard has a ``split`` column, a canonical column of a type that does
            not cast to the canonical one, or a stage column whose types do not unify.
    """
    fixed = {f.name: f for f in [*SCHEMA, *REJECT_FIELDS]}
    stage: dict[str, list[tuple[str, pa.DataType]]] = {}
    for path, schema in schemas:
        for column in schema:
            if column.name == "split":
                raise StoreError(f"shard {path}: column 'split' is reserved for the partition")
            target = fixed.get(column.name)
            if target is None:
                stage.setdefault(column.name, []).append((path, column.type))
            elif not _castable(column.type, target.type):
                raise StoreError(
                    f"shard {path}: column {column.name!r} has type {column.type}, "
                    f"expected {target.type}"
                )
    fields = [f.with_nullable(True) for f in SCHEMA]
    for name, typed in stage.items():
        try:
            unified = pa.unify_schemas(
                [pa.schema([pa.field(name, t)]) for _, t in typed], promote_options="permissive"
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            seen = "; ".join(f"{path}: {t}" for path, t in typed)
            raise StoreError(f"stage column {name!r} has incompatible types ({seen})") from exc
        fields.append(pa.field(name, storable_type(unified.field(name).type)))
    fields += [f.with_nullable(True) for f in REJECT_FIELDS]
    fields.append(pa.field("split", pa.string()))
    return pa.schema(fields)


def storable_type(dtype: pa.DataType) -> pa.DataType:
    """The type a stage column is stored as: Delta has no large/view, dictionary, null or
    unsigned types, and microsecond timestamps."""
    if pa.types.is_null(dtype):
        return pa.string()
    if pa.types.is_dictionary(dtype):
        return storable_type(dtype.value_type)
    if pa.types.is_unsigned_integer(dtype):
        return {8: pa.int16(), 16: pa.int32()}.get(dtype.bit_width, pa.int64())
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return pa.binary()
    if pa.types.is_large_list(dtype) or pa.types.is_list_view(dtype):
        return pa.list_(storable_type(dtype.value_type))
    if pa.types.is_timestamp(dtype):
        return pa.timestamp("us", dtype.tz)
    return dtype


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    if source == target or pa.types.is_null(source):
        return True
    try:
        pa.array([], source).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    return True


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with ``schema``'s columns in order: missing ones null, others cast."""
    n = batch.num_rows
    arrays: list[pa.Array] = []
    for target in schema:
        index = batch.schema.get_field_index(target.name)
        if index < 0:
            arrays.append(pa.nulls(n, target.type))
            continue
        column = batch.column(index)
        arrays.append(column if column.type == target.type else column.cast(target.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# -- data files --------------------------------------------------------------------------


class PartWriter:
    """Writes a plan's rows as Delta data files ``split=<split>/part-*.parquet`` with
    pyarrow (streaming, one row group per batch, a new file once one reaches
    ``target_file_bytes``) and returns the ``AddAction``s for the commit."""

    def __init__(
        self, fs: pafs.FileSystem, table_path: str, schema: pa.Schema, target_file_bytes: int
    ):
        self.fs, self.table_path, self.schema = fs, table_path, schema
        self.target_file_bytes = target_file_bytes
        self.written: list[str] = []
        self.prefix = uuid.uuid4().hex
        self.options = data_file_options(schema)

    def write(self, plan: ShardPlan, threads: int = 1) -> list[AddAction]:
        """Each split's shards in order: adoptable ones linked in (:meth:`_adopt`), the
        others in up to ``threads`` runs of consecutive shards per stretch, each run written
        by its own thread into its own files (Parquet encoding and compression release the
        GIL); the actions keep the shards' order."""
        jobs: list[tuple[str, int, list[_Shard], bool]] = []  # split, run, shards, adopt
        for split in SPLITS:
            runs: list[tuple[bool, list[_Shard]]] = []
            for adopt, stretch in plan.stretches(split):
                if adopt:
                    runs += [(True, [shard]) for shard in stretch]
                    continue
                rows = sum(shard.rows for shard in stretch)
                count = max(1, min(threads, rows // plan.batch_rows))  # a small one: one file
                runs += [(False, group) for group in plan.groups(stretch, count)]
            jobs += [(split, run, shards, adopt) for run, (adopt, shards) in enumerate(runs)]
        writes = [job[:3] for job in jobs if not job[3]]
        if threads == 1 or len(writes) <= 1:
            written = {job[:2]: self._write_run(*job, plan, prefetch=True) for job in writes}
        else:
            # Several runs at once keep the cores busy without a reader thread each; with
            # one, each run's queue of read batches held a third of the commit's Arrow
            # memory (1M rows, 2 runs: 252 -> 156 MiB at its peak, 632 -> 472 MiB peak RSS).
            with ThreadPoolExecutor(threads, thread_name_prefix="aligncurate-commit") as pool:
                futures = {
                    job[:2]: pool.submit(self._write_run, *job, plan, prefetch=False)
                    for job in writes
                }
                written = {run: future.result() for run, future in futures.items()}
        written |= self._adopt_all([(split, run, shards[0]) for split, run, shards, a in jobs if a])
        return [action for split, run, _, _ in jobs for action in written[split, run]]

    def _adopt_all(
        self, jobs: list[tuple[str, int, _Shard]]
    ) -> dict[tuple[str, int], list[AddAction]]:
        """:meth:`_adopt` each ``(split, run, shard)``: links one after the other, copies to
        another filesystem (an object store) :data:`ADOPT_COPIES` at a time."""
        if len(jobs) <= 1 or all(self._linkable(shard) for _, _, shard in jobs):
            actions = [self._adopt(*job) for job in jobs]
        else:
            with ThreadPoolExecutor(
                min(ADOPT_COPIES, len(jobs)), thread_name_prefix="aligncurate-adopt"
            ) as pool:
                actions = list(pool.map(lambda job: self._adopt(*job), jobs))
        runs = [(split, run) for split, run, _ in jobs]
        return {run: [action] for run, action in zip(runs, actions, strict=True)}

    def _linkable(self, shard: _Shard) -> bool:
        return self.fs.type_name == shard.filesystem.type_name == "local"

    def _adopt(self, split: str, run: int, shard: _Shard) -> AddAction:
        """Link (or copy) a shard written as a data file into the table, unread."""
        relative = f"split={split}/part-{run:03d}-00000-{self.prefix}.snappy.parquet"
        path = f"{self.table_path}/{relative}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.written.append(path)
        if self._linkable(shard) and _hard_link(shard.fs_path, path):
            # gc removes unreferenced files by age: the link would keep the shard's mtime
            # and look old before the commit lands (nothing reads a shard's mtime)
            os.utime(path)
        else:  # another filesystem or device, or one without hard links: a copy
            pafs.copy_files(
                shard.fs_path,
                path,
                source_filesystem=shard.filesystem,
                destination_filesystem=self.fs,
            )
        return self._action(split, relative, self.fs.get_file_info(path).size, shard.rows)

    def _write_run(
        self, split: str, run: int, shards: Sequence[_Shard], plan: ShardPlan, *, prefetch: bool
    ) -> list[AddAction]:
        actions: list[AddAction] = []
        current: tuple[str, pa.NativeFile, pq.ParquetWriter] | None = None
        rows = 0
        batches = plan.batches(shards)
        try:
            for batch in _prefetch(batches) if prefetch else batches:
                if current is None:
                    current, rows = self._open(split, run, len(actions)), 0
                current[2].write_batch(batch)
                rows += batch.num_rows
                if current[1].tell() >= self.target_file_bytes:
                    actions.append(self._close(split, current, rows))
                    current = None
            if current is not None:
                actions.append(self._close(split, current, rows))
        except BaseException:
            if current is not None:  # close it now, so that discard() removes a whole file
                with contextlib.suppress(Exception):
                    current[2].close()
                    current[1].close()
            raise
        return actions

    def _open(
        self, split: str, run: int, index: int
    ) -> tuple[str, pa.NativeFile, pq.ParquetWriter]:
        relative = f"split={split}/part-{run:03d}-{index:05d}-{self.prefix}.snappy.parquet"
        path = f"{self.table_path}/{relative}"
        if index == 0:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.written.append(path)
        stream = self.fs.open_output_stream(path)
        writer = pq.ParquetWriter(stream, self.schema, **self.options)
        return relative, stream, writer

    def _close(
        self, split: str, current: tuple[str, pa.NativeFile, pq.ParquetWriter], rows: int
    ) -> AddAction:
        relative, stream, writer = current
        writer.close()
        size = stream.tell()
        stream.close()
        return self._action(split, relative, size, rows)

    @staticmethod
    def _action(split: str, relative: str, size: int, rows: int) -> AddAction:
        return AddAction(
            path=relative,
            size=size,
            partition_values={"split": split},
            modification_time=int(datetime.now(UTC).timestamp() * 1000),
            data_change=True,
            stats=json.dumps({"numRecords": rows}),
        )

    def discard(self) -> None:
        """Best-effort removal of the files written so far (after a failure)."""
        for path in self.written:
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)


def _hard_link(source: str, target: str) -> bool:
    """Hard-link ``target`` to ``source``; False where the filesystem refuses."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _prefetch(batches: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Read and conform the next batches in a thread while the current one is encoded
    (both release the GIL); at most ``depth`` batches wait, so memory stays bounded."""
    queue: Queue[tuple[str, Any]] = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        queue.put(("batch", batch), timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
            queue.put(("done", None))
        except BaseException as exc:  # handed to the consumer
            queue.put(("error", exc))

    thread = threading.Thread(target=produce, name="aligncurate-commit-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(Empty):
            while True:
                queue.get_nowait()
        thread.join()
