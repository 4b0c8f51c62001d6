"""The versioned dataset store: one Delta Lake table per dataset, partitioned by split.

Layout under the store root (a local path or an ``s3://bucket/prefix`` URI)::

    <root>/<name>/                     Delta table, partitioned by ``split``
    <root>/<name>/_delta_log/          Delta's log: one commit per build
    <root>/<name>/_aligncurate/tags.json   tag -> version (Delta ignores ``_`` dirs)
    <root>/_work/, <root>/_cache/      reserved for the pipeline

Every build is one ``overwrite`` commit holding the full dataset, so a version is a
complete, self-contained dataset and old versions stay readable. A commit streams the
build's shards through pyarrow's Parquet writer into new data files and then adds them
in one Delta transaction (``deltalake.transaction``): memory stays bounded and it runs at
pyarrow's speed (``write_deltalake`` buffers too much for million-row builds). Row order
is kept: shards in the order given, rows in shard order. All file access goes
through URIs (``deltalake`` and ``pyarrow.fs``) with ``storage_options`` passed through, so an
``s3://`` root is configuration, not a code change.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from queue import Empty, Full, Queue
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import DeltaError, TableNotFoundError
from deltalake.transaction import AddAction, create_table_with_add_actions

from storage.names import (
    RESERVED,
    SPLITS,
    Ref,
    StoreError,
    parse_ref,
    validate_name,
    validate_split,
    validate_tag,
)
from transforms.schema import REJECT_FIELDS, SCHEMA

if TYPE_CHECKING:
    from storage.diff import DatasetDiff

ENV_STORE = "ALIGNCURATE_STORE"
DEFAULT_STORE = "./datasets"
BATCH_ROWS = 32_768
"""Rows per streamed batch on commit and read: bounds memory, keeps Arrow kernels busy."""
TARGET_FILE_BYTES = 128 * 1024 * 1024
"""A commit starts a new data file once the current one reaches this size."""

_META_PREFIX = "aligncurate.meta."
_JSON_KEYS = "aligncurate.json_keys"
_ROWS_KEY = "aligncurate.rows"
_COMMIT_ID = "aligncurate.commit_id"
_TAGS_FILE = "_aligncurate/tags.json"
_TABLE_CONFIG = {"delta.enableExpiredLogCleanup": "false"}
"""Versions are the product: never let Delta expire old log entries (and with them,
the ability to read old versions)."""


def default_store() -> str:
    """The store root: ``$ALIGNCURATE_STORE`` or ``./datasets``; local paths made absolute."""
    return _normalize_root(os.environ.get(ENV_STORE) or DEFAULT_STORE)


def _normalize_root(root: str) -> str:
    if root.startswith("file://"):
        root = root.removeprefix("file://")
    if "://" in root:
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root))


@dataclass(frozen=True)
class VersionInfo:
    """One committed version: when, the build's metadata, its tags and rows per split."""

    version: int
    timestamp: datetime
    metadata: dict[str, Any]
    tags: list[str]
    rows: dict[str, int] = field(default_factory=dict)


class DatasetStore:
    """Versioned datasets under one root. The constructor does no I/O."""

    def __init__(self, root: str | None = None, storage_options: dict[str, str] | None = None):
        self.root = _normalize_root(root) if root else default_store()
        self.storage_options = dict(storage_options) if storage_options else None

    def __repr__(self) -> str:
        return f"DatasetStore({self.root!r})"

    # -- locations ---------------------------------------------------------------------

    def uri(self, name: str) -> str:
        """The table URI of dataset ``name`` (validated)."""
        return f"{self.root}/{validate_name(name)}"

    @cached_property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return _filesystem(self.root, self.storage_options)

    def _path(self, *parts: str) -> str:
        """A path on :attr:`_fs` below the root."""
        return "/".join([self._fs[1].rstrip("/"), *parts])

    # -- datasets and versions -----------------------------------------------------------

    def exists(self, name: str) -> bool:
        """Whether ``name`` has at least one committed version."""
        return DeltaTable.is_deltatable(self.uri(name), self.storage_options)

    def datasets(self) -> list[str]:
        """Names of the datasets in the store, sorted."""
        fs, base = self._fs
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        names = sorted(
            info.base_name
            for info in infos
            if info.type == pafs.FileType.Directory and _is_valid_name(info.base_name)
        )
        return [name for name in names if self.exists(name)]

    def _table(self, name: str, version: int | None = None) -> DeltaTable:
        uri = self.uri(name)
        try:
            return DeltaTable(uri, version=version, storage_options=self.storage_options)
        except TableNotFoundError:
            known = ", ".join(self.datasets()[:20]) or "none"
            raise StoreError(
                f"unknown dataset {name!r} in store {self.root} (known: {known})"
            ) from None
        except DeltaError as exc:
            what = "latest version" if version is None else f"version {version}"
            raise StoreError(f"{what} of dataset {name!r} cannot be loaded: {exc}") from exc

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, oldest first, with metadata and tags."""
        history = self._table(name).history()
        by_version: dict[int, list[str]] = {}
        for tag, version in self.tags(name).items():
            by_version.setdefault(version, []).append(tag)
        infos = [
            VersionInfo(
                version=int(entry["version"]),
                timestamp=datetime.fromtimestamp(entry["timestamp"] / 1000, tz=UTC),
                metadata=_decode_metadata(entry),
                tags=sorted(by_version.get(int(entry["version"]), [])),
                rows=json.loads(entry.get(_ROWS_KEY, "{}")),
            )
            for entry in history
        ]
        return sorted(infos, key=lambda info: info.version)

    def resolve(self, ref: Ref | str) -> tuple[str, int]:
        """The dataset name and concrete version a reference points at.

        Raises:
            StoreError: unknown dataset, version or tag, or bad reference syntax.
        """
        ref = parse_ref(ref)
        latest = self._table(ref.name).version()
        if ref.version is not None:
            if ref.version > latest:
                raise StoreError(
                    f"unknown version {ref.version} of dataset {ref.name!r}; "
                    f"versions are 0..{latest}"
                )
            return ref.name, ref.version
        if ref.tag is not None:
            tags = self.tags(ref.name)
            if ref.tag not in tags:
                known = ", ".join(sorted(tags)) or "none"
                raise StoreError(f"unknown tag {ref.tag!r} of dataset {ref.name!r} (tags: {known})")
            return ref.name, tags[ref.tag]
        return ref.name, latest

    def _open(self, ref: Ref | str) -> tuple[str, int, DeltaTable]:
        name, version = self.resolve(ref)
        return name, version, self._table(name, version)

    # -- commit --------------------------------------------------------------------------

    def commit(
        self,
        name: str,
        train_files: Sequence[str],
        rejected_files: Sequence[str],
        metadata: Mapping[str, Any],
    ) -> int:
        """Commit one build as a new version: all shards in one atomic Delta commit.

        The shards (Parquet files: ``train`` ones with the canonical schema plus stage
        columns, ``rejected`` ones with the rejected schema) are read footer-first to
        unify their schemas (see :func:`_unify`); then their batches are streamed through
        pyarrow's Parquet writer into the table's data files (bounded memory, no whole
        table in RAM) and the files are committed in one Delta transaction. The new
        version replaces the whole dataset (``mode="overwrite"``) and may change its
        schema. If anything fails, no version is created; data files written before a
        failure are removed again.

        Args:
            name: dataset name.
            train_files, rejected_files: Parquet shard paths or URIs.
            metadata: build metadata; non-string values are stored as JSON.

        Returns:
            The new version number.

        Raises:
            StoreError: bad name or metadata, unreadable shard, incompatible column
                types, or a failed write.
        """
        name = validate_name(name)
        plan = _ShardPlan.build(
            [
                (split, path, self._shard_fs(path))
                for split, paths in (("train", train_files), ("rejected", rejected_files))
                for path in paths
            ]
        )
        custom = _encode_metadata(metadata)
        custom[_ROWS_KEY] = json.dumps(plan.rows)
        custom[_COMMIT_ID] = commit_id = uuid.uuid4().hex
        properties = CommitProperties(custom_metadata=custom)
        delta_schema = plan.delta_schema  # fails before any write on types Delta lacks
        uri = self.uri(name)
        created = not DeltaTable.is_deltatable(uri, self.storage_options)

        parts = _PartWriter(self._fs[0], self._path(name), plan.file_schema)
        try:
            actions = parts.write(plan)
        except BaseException:
            parts.discard()  # nothing references these files: remove them
            raise
        try:
            if created:
                create_table_with_add_actions(
                    uri,
                    delta_schema,
                    actions,
                    mode="error",
                    partition_by=["split"],
                    name=name,
                    configuration=_TABLE_CONFIG,
                    storage_options=self.storage_options,
                    commit_properties=properties,
                )
            else:
                self._table(name).create_write_transaction(
                    actions,
                    mode="overwrite",
                    schema=delta_schema,
                    partition_by=["split"],
                    commit_properties=properties,
                )
        except DeltaError as exc:  # files stay: a commit may fail after it landed
            raise StoreError(f"commit to dataset {name!r} failed: {exc}") from exc
        table = self._table(name)
        for entry in table.history(limit=20):
            if entry.get(_COMMIT_ID) == commit_id:
                return int(entry["version"])
        return table.version()  # pragma: no cover - more than 20 concurrent commits

    def _shard_fs(self, path: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem of a shard: the store's own one when the shard lives under it."""
        if "://" not in path or path.startswith("file://"):
            return pafs.LocalFileSystem(), path.removeprefix("file://")
        if path.startswith(self.root + "/"):
            return self._fs[0], self._path(path[len(self.root) + 1 :])
        return pafs.FileSystem.from_uri(path)

    # -- reading -------------------------------------------------------------------------

    def schema(self, ref: Ref | str) -> pa.Schema:
        """The Arrow schema of a version, including the ``split`` column."""
        return self._open(ref)[2].to_pyarrow_dataset().schema

    def batches(
        self,
        ref: Ref | str,
        split: str | None = "train",
        columns: list[str] | None = None,
        batch_size: int = BATCH_ROWS,
    ) -> Iterator[pa.RecordBatch]:
        """Stream a version's rows in batches (bounded memory). ``split=None``: both
        splits, with the ``split`` column."""
        dataset = self._dataset(ref, split)
        selected = _select_columns(dataset.schema, columns, with_split=split is None)
        return dataset.to_batches(columns=selected, batch_size=batch_size)

    def read(
        self, ref: Ref | str, split: str | None = "train", columns: list[str] | None = None
    ) -> pa.Table:
        """A version's rows as a table. ``split=None``: both splits, with ``split``."""
        dataset = self._dataset(ref, split)
        selected = _select_columns(dataset.schema, columns, with_split=split is None)
        return dataset.to_table(columns=selected)

    def _dataset(self, ref: Ref | str, split: str | None) -> Any:
        if split is not None:
            validate_split(split)
        table = self._open(ref)[2]
        predicate = [("split", "=", split)] if split is not None else None
        return table.to_pyarrow_dataset(file_pruning_predicate=predicate)

    def files(self, ref: Ref | str, split: str = "train") -> list[str]:
        """The Parquet file URIs holding exactly one version's split.

        ``datasets.load_dataset("parquet", data_files=store.files("sft@prod"))`` loads
        that version (the files lack the ``split`` partition column).
        """
        validate_split(split)
        table = self._open(ref)[2]
        return table.file_uris(file_pruning_predicate=[("split", "=", split)])

    # -- tags ----------------------------------------------------------------------------

    def tags(self, name: str) -> dict[str, int]:
        """Tag -> version for dataset ``name``."""
        return {tag: entry["version"] for tag, entry in self._read_tags(name).items()}

    def tag(self, ref: Ref | str, tag: str) -> int:
        """Point ``tag`` at the version ``ref`` resolves to (moving it if it exists).

        Returns:
            The tagged version.
        """
        validate_tag(tag)
        name, version = self.resolve(ref)
        tags = self._read_tags(name)
        tags[tag] = {"version": version, "tagged_at": datetime.now(UTC).isoformat()}
        self._write_tags(name, tags)
        return version

    def untag(self, name: str, tag: str) -> int:
        """Remove ``tag`` from dataset ``name``; returns the version it pointed at."""
        tags = self._read_tags(name)
        if tag not in tags:
            raise StoreError(f"unknown tag {tag!r} of dataset {name!r}")
        version = int(tags.pop(tag)["version"])
        self._write_tags(name, tags)
        return version

    def _tags_path(self, name: str) -> str:
        return self._path(validate_name(name), _TAGS_FILE)

    def _read_tags(self, name: str) -> dict[str, dict[str, Any]]:
        fs, path = self._fs[0], self._tags_path(name)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return {}
        with fs.open_input_stream(path) as stream:
            return dict(json.loads(stream.read().decode("utf-8"))["tags"])

    def _write_tags(self, name: str, tags: Mapping[str, Any]) -> None:
        """Write the tags file via a temporary file and a rename (atomic locally and on S3)."""
        self._table(name)  # the dataset must exist
        fs, path = self._fs[0], self._tags_path(name)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        data = json.dumps({"tags": dict(sorted(tags.items()))}, indent=2).encode("utf-8")
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        fs.move(tmp, path)

    # -- diff ----------------------------------------------------------------------------

    def diff(self, a: Ref | str, b: Ref | str, examples: int = 5) -> DatasetDiff:
        """Row-level differences between two versions (see :mod:`storage.diff`)."""
        from storage.diff import diff_versions

        return diff_versions(self, a, b, examples)


# -- commit internals ------------------------------------------------------------------


@dataclass
class _Shard:
    split: str
    path: str  # as given, for messages
    filesystem: pafs.FileSystem
    fs_path: str  # the path on ``filesystem``
    schema: pa.Schema
    rows: int


@dataclass
class _ShardPlan:
    """The unified schema of a build's shards, and their batches conformed to it."""

    shards: list[_Shard]
    schema: pa.Schema  # the table schema, ``split`` last

    @classmethod
    def build(cls, sources: Sequence[tuple[str, str, tuple[pafs.FileSystem, str]]]) -> _ShardPlan:
        shards = [_read_footer(split, path, fs_path) for split, path, fs_path in sources]
        return cls(shards, _unify([(shard.path, shard.schema) for shard in shards]))

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

    def batches(self, split: str) -> Iterator[pa.RecordBatch]:
        """The ``split`` shards' rows, conformed to :attr:`file_schema`, batch by batch."""
        schema = self.file_schema
        for shard in self.shards:
            if shard.split != split:
                continue
            parquet = pq.ParquetFile(shard.fs_path, filesystem=shard.filesystem)
            row = 0
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                try:
                    yield _conform_batch(batch, schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                    rows = f"rows {row}..{row + batch.num_rows - 1}"
                    raise StoreError(f"{split} shard {shard.path}: {rows}: {exc}") from exc
                row += batch.num_rows


class _PartWriter:
    """Writes a plan's rows as Delta data files ``split=<split>/part-*.parquet`` with
    pyarrow (streaming, one row group per batch, a new file every ~128 MiB) and returns
    the ``AddAction``s for the commit."""

    def __init__(self, fs: pafs.FileSystem, table_path: str, schema: pa.Schema):
        self.fs, self.table_path, self.schema = fs, table_path, schema
        self.written: list[str] = []
        self.prefix = uuid.uuid4().hex

    def write(self, plan: _ShardPlan) -> list[AddAction]:
        return [action for split in SPLITS for action in self._write_split(split, plan)]

    def _write_split(self, split: str, plan: _ShardPlan) -> list[AddAction]:
        actions: list[AddAction] = []
        current: tuple[str, pa.NativeFile, pq.ParquetWriter] | None = None
        rows = 0
        for batch in _prefetch(plan.batches(split)):
            if current is None:
                current, rows = self._open(split, len(actions)), 0
            current[2].write_batch(batch)
            rows += batch.num_rows
            if current[1].tell() >= TARGET_FILE_BYTES:
                actions.append(self._close(split, current, rows))
                current = None
        if current is not None:
            actions.append(self._close(split, current, rows))
        return actions

    def _open(self, split: str, index: int) -> tuple[str, pa.NativeFile, pq.ParquetWriter]:
        relative = f"split={split}/part-{index:05d}-{self.prefix}.snappy.parquet"
        path = f"{self.table_path}/{relative}"
        if index == 0:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.written.append(path)
        stream = self.fs.open_output_stream(path)
        writer = pq.ParquetWriter(stream, self.schema, compression="snappy", coerce_timestamps="us")
        return relative, stream, writer

    def _close(
        self, split: str, current: tuple[str, pa.NativeFile, pq.ParquetWriter], rows: int
    ) -> AddAction:
        relative, stream, writer = current
        writer.close()
        size = stream.tell()
        stream.close()
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


def _read_footer(split: str, path: str, fs_path: tuple[pafs.FileSystem, str]) -> _Shard:
    filesystem, local = fs_path
    try:
        parquet = pq.ParquetFile(local, filesystem=filesystem)
        return _Shard(
            split, path, filesystem, local, parquet.schema_arrow, parquet.metadata.num_rows
        )
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"cannot read {split} shard {path}: {exc}") from exc


def _unify(schemas: Sequence[tuple[str, pa.Schema]]) -> pa.Schema:
    """Canonical columns (canonical types) first, then stage columns in order of first
    appearance (types unified across shards, see :func:`_storable`), then
    ``reject_stage``, ``reject_reason``, then the ``split`` partition column. Every field
    is nullable: the rejected split may lack canonical values."""
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
        fields.append(pa.field(name, _storable(unified.field(name).type)))
    fields += [f.with_nullable(True) for f in REJECT_FIELDS]
    fields.append(pa.field("split", pa.string()))
    return pa.schema(fields)


def _storable(dtype: pa.DataType) -> pa.DataType:
    """The type a stage column is stored as: Delta has no large/view, dictionary, null or
    unsigned types, and microsecond timestamps."""
    if pa.types.is_null(dtype):
        return pa.string()
    if pa.types.is_dictionary(dtype):
        return _storable(dtype.value_type)
    if pa.types.is_unsigned_integer(dtype):
        return {8: pa.int16(), 16: pa.int32()}.get(dtype.bit_width, pa.int64())
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return pa.binary()
    if pa.types.is_large_list(dtype) or pa.types.is_list_view(dtype):
        return pa.list_(_storable(dtype.value_type))
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


def _conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
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


# -- metadata, names, filesystems --------------------------------------------------------


def _encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Commit metadata as Delta custom metadata: strings as-is, everything else as JSON."""
    out: dict[str, str] = {}
    json_keys: list[str] = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise StoreError(f"metadata keys must be non-empty strings, got {key!r}")
        if isinstance(value, str):
            out[_META_PREFIX + key] = value
            continue
        try:
            out[_META_PREFIX + key] = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"metadata {key!r} is not JSON-serialisable: {exc}") from exc
        json_keys.append(key)
    out[_JSON_KEYS] = json.dumps(json_keys)
    return out


def _decode_metadata(entry: Mapping[str, Any]) -> dict[str, Any]:
    json_keys = set(json.loads(entry.get(_JSON_KEYS, "[]")))
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key.startswith(_META_PREFIX):
            name = key[len(_META_PREFIX) :]
            out[name] = json.loads(value) if name in json_keys else value
    return out


def _is_valid_name(name: str) -> bool:
    if name in RESERVED:
        return False
    try:
        validate_name(name)
    except StoreError:
        return False
    return True


_S3_OPTIONS = {
    "access_key_id": "access_key",
    "secret_access_key": "secret_key",
    "session_token": "session_token",
    "token": "session_token",
    "region": "region",
    "default_region": "region",
    "endpoint": "endpoint_override",
    "endpoint_url": "endpoint_override",
}


def _filesystem(
    root: str, storage_options: Mapping[str, str] | None
) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and base path for ``root``.

    ``storage_options`` use deltalake's (object_store's) keys, e.g. ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_ALLOW_HTTP``; they are mapped onto ``S3FileSystem``.
    """
    if "://" not in root:
        return pafs.LocalFileSystem(), root
    if not storage_options:
        return pafs.FileSystem.from_uri(root)
    if not root.startswith("s3://"):
        raise StoreError(f"storage_options are only supported for s3:// roots, not {root}")
    kwargs: dict[str, Any] = {}
    for key, value in storage_options.items():
        name = key.lower().removeprefix("aws_")
        if name == "allow_http":
            kwargs.setdefault("scheme", "http" if value.lower() == "true" else "https")
        elif name in _S3_OPTIONS:
            target = _S3_OPTIONS[name]
            if target == "endpoint_override" and "://" in value:
                scheme, value = value.split("://", 1)
                kwargs["scheme"] = scheme
            kwargs[target] = value
    return pafs.S3FileSystem(**kwargs), root.removeprefix("s3://")


def _select_columns(schema: pa.Schema, columns: list[str] | None, with_split: bool) -> list[str]:
    names = schema.names
    if columns is None:
        return names if with_split else [n for n in names if n != "split"]
    missing = [c for c in columns if c not in names]
    if missing:
        raise StoreError(f"unknown column(s) {', '.join(missing)}; columns: {', '.join(names)}")
    if with_split and "split" not in columns:
        return [*columns, "split"]
    return list(columns)
