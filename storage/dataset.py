"""The versioned dataset store: one Delta Lake table per dataset, partitioned by split.

Layout under the store root (a local path or an ``s3://bucket/prefix`` URI)::

    <root>/<name>/                     Delta table, partitioned by ``split``
    <root>/<name>/_delta_log/          Delta's log: one commit per build
    <root>/<name>/_aligncurate/tags.json   tag -> version (Delta ignores ``_`` dirs)
    <root>/_work/, <root>/_cache/      reserved for the pipeline

Every build is one ``overwrite`` commit holding the full dataset, so a version is a
complete, self-contained dataset and old versions stay readable. The commit writer
(:mod:`storage.commit`) streams the build's shards into new data files and adds them in one
Delta transaction; row order is kept: shards in the order given, rows in shard order. The
build metadata rides in the commit (:mod:`storage.metadata`). All file access goes through
URIs (``deltalake`` and ``pyarrow.fs``, see :mod:`storage.uris`) with ``storage_options``
passed through, so an ``s3://`` root is configuration, not a code change.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from storage.commit import CommitTarget, ShardSource, commit_shards
from storage.deltalog import first_damage, first_line, list_log
from storage.metadata import decode_metadata, decode_rows
from storage.names import (
    Ref,
    StoreError,
    parse_ref,
    validate_name,
    validate_split,
    validate_tag,
)
from storage.s3 import describe, fsspec_options, is_remote, s3_options
from storage.uris import filesystem, local_path, normalize_root

if TYPE_CHECKING:
    import datasets
    import pandas as pd
    import polars as pl

    from storage.diff import DatasetDiff

ENV_STORE = "ALIGNCURATE_STORE"
DEFAULT_STORE = "./datasets"
BATCH_ROWS = 32_768
"""Rows per streamed batch on commit and read: bounds memory, keeps Arrow kernels busy."""
TARGET_FILE_BYTES = 128 * 1024 * 1024
"""A commit starts a new data file once the current one reaches this size. Both values are
read on every commit and handed to the commit writer (:func:`storage.commit.commit_shards`)."""

TAGS_FILE = "_aligncurate/tags.json"
F = TypeVar("F", bound=Callable[..., Any])


def _remote_errors(fn: F) -> F:
    """Turn a failed request to a remote store (``OSError`` from deltalake or pyarrow)
    into a :class:`StoreError` that says what to check (endpoint, credentials, bucket)."""

    def wrapper(self: DatasetStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except OSError as exc:
            if not is_remote(self.root):
                raise
            raise describe(self.root, self.storage_options, exc) from exc

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper  # type: ignore[return-value]


def default_store() -> str:
    """The store root: ``$ALIGNCURATE_STORE`` or ``./datasets``; local paths made absolute."""
    return normalize_root(os.environ.get(ENV_STORE) or DEFAULT_STORE)


@dataclass(frozen=True)
class VersionInfo:
    """One committed version: when, the build's metadata, its tags and rows per split."""

    version: int
    timestamp: datetime
    metadata: dict[str, Any]
    tags: list[str]
    rows: dict[str, int] = field(default_factory=dict)


_BATCH_READAHEAD = 2  # batches of one file read ahead by DatasetStore.batches
_FRAGMENT_READAHEAD = 1  # files read ahead


class DatasetStore:
    """Versioned datasets under one root. The constructor does no I/O.

    An ``s3://bucket/prefix`` root takes its options from the ``AWS_*`` variables
    (``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``, credentials, region) with
    ``storage_options`` on top, and commits atomically through S3 conditional writes
    (see :mod:`storage.s3`).
    """

    def __init__(self, root: str | None = None, storage_options: dict[str, str] | None = None):
        self.root = normalize_root(root) if root else default_store()
        self.storage_options = s3_options(self.root, storage_options)

    @property
    def remote(self) -> bool:
        """Whether the root is an object store (``s3://``) rather than a local folder."""
        return is_remote(self.root)

    def fsspec_options(self) -> dict[str, Any]:
        """``storage_options`` for fsspec readers (s3fs) of :meth:`files`, e.g.
        ``datasets.load_dataset("parquet", data_files=..., storage_options=...)``."""
        return fsspec_options(self.storage_options)

    @_remote_errors
    def check(self) -> None:
        """Fail fast, with a clear :class:`StoreError`, when the root cannot be listed
        (unreachable endpoint, refused credentials, missing bucket)."""
        fs, base = self._fs
        fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))

    def __repr__(self) -> str:
        return f"DatasetStore({self.root!r})"

    # -- locations ---------------------------------------------------------------------

    def uri(self, name: str) -> str:
        """The table URI of dataset ``name`` (validated)."""
        return f"{self.root}/{validate_name(name)}"

    @cached_property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return filesystem(self.root, self.storage_options)

    def table_location(self, name: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem and path of dataset ``name``'s table folder (validated)."""
        return self._fs[0], self._path(validate_name(name))

    def _path(self, *parts: str) -> str:
        """A path on :attr:`_fs` below the root."""
        return "/".join([self._fs[1].rstrip("/"), *parts])

    # -- datasets and versions -----------------------------------------------------------

    @_remote_errors
    def exists(self, name: str) -> bool:
        """Whether ``name`` has at least one committed version."""
        return DeltaTable.is_deltatable(self.uri(name), self.storage_options)

    @_remote_errors
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
            raise self._load_error(name, version, exc) from exc

    def _load_error(self, name: str, version: int | None, exc: DeltaError) -> StoreError:
        """Why ``name`` (at ``version``) cannot be loaded, naming the damaged log entry
        when there is one (deltalake names no file, and its message ends in a backtrace)."""
        what = "the latest version" if version is None else f"version {version}"
        fs, table = self.table_location(name)
        damaged = first_damage(fs, table, version)
        if damaged is None:
            return StoreError(
                f"{what} of dataset {name!r} ({self.uri(name)}) cannot be loaded: {first_line(exc)}"
            )
        older = (
            f"versions before it can still be read, e.g. {name}@{damaged.version - 1}"
            if damaged.version > 0
            else "no version can be read"
        )
        return StoreError(
            f"{what} of dataset {name!r} cannot be loaded: its log entry "
            f"{self.uri(name)}/{damaged.name} (version {damaged.version}) is unusable: "
            f"{damaged.problem}; "
            f"{older}; `aligncurate doctor {name}` says how to recover"
        )

    @_remote_errors
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
                metadata=decode_metadata(entry),
                tags=sorted(by_version.get(int(entry["version"]), [])),
                rows=decode_rows(entry),
            )
            for entry in history
        ]
        return sorted(infos, key=lambda info: info.version)

    @_remote_errors
    def resolve(self, ref: Ref | str) -> tuple[str, int]:
        """The dataset name and concrete version a reference points at.

        Raises:
            StoreError: unknown dataset, version or tag, or bad reference syntax.
        """
        ref = parse_ref(ref)
        if ref.version is None and ref.tag is None:
            return ref.name, self._table(ref.name).version()
        # A version or tag opens without reading the log: a damaged latest entry leaves
        # the older versions readable.
        latest = self._latest_entry(ref.name)
        if ref.tag is not None:
            tags = self.tags(ref.name)
            if ref.tag not in tags:
                known = ", ".join(sorted(tags)) or "none"
                raise StoreError(f"unknown tag {ref.tag!r} of dataset {ref.name!r} (tags: {known})")
            return ref.name, tags[ref.tag]
        if ref.version > latest:
            raise StoreError(
                f"unknown version {ref.version} of dataset {ref.name!r}; versions are 0..{latest}"
            )
        return ref.name, ref.version

    def _latest_entry(self, name: str) -> int:
        """The newest version in ``name``'s log, from a listing of it (no entry read)."""
        latest = list_log(*self.table_location(name)).latest
        return self._table(name).version() if latest is None else latest  # unknown: raises

    def _open(self, ref: Ref | str) -> tuple[str, int, DeltaTable]:
        name, version = self.resolve(ref)
        return name, version, self._table(name, version)

    # -- commit --------------------------------------------------------------------------

    @_remote_errors
    def commit(
        self,
        name: str,
        train_files: Sequence[str],
        rejected_files: Sequence[str],
        metadata: Mapping[str, Any],
        threads: int = 1,
    ) -> int:
        """Commit one build as a new version: all shards in one atomic Delta commit.

        The shards (Parquet or Arrow IPC files: ``train`` ones with the canonical schema plus stage
        columns, ``rejected`` ones with the rejected schema) are read footer-first to
        unify their schemas (see :func:`storage.commit.unify_schemas`); then their batches
        are streamed through pyarrow's Parquet writer into the table's data files (bounded
        memory, no whole table in RAM) and the files are committed in one Delta
        transaction. The new version replaces the whole dataset (``mode="overwrite"``) and
        may change its schema. If anything fails, no version is created; data files
        written before a failure are removed again.

        Args:
            name: dataset name.
            train_files, rejected_files: shard paths or URIs: Parquet files, or Arrow IPC
                files (``.arrow``).
            metadata: build metadata; non-string values are stored as JSON.
            threads: runs of consecutive shards written into data files at once.

        Returns:
            The new version number.

        Raises:
            StoreError: bad name or metadata, unreadable shard, incompatible column
                types, or a failed write.
        """
        name = validate_name(name)
        shards = [
            ShardSource(split, path, *self._shard_fs(path))
            for split, paths in (("train", train_files), ("rejected", rejected_files))
            for path in paths
        ]
        target = CommitTarget(
            name=name,
            uri=self.uri(name),
            filesystem=self._fs[0],
            path=self._path(name),
            storage_options=self.storage_options,
            open_table=lambda: self._table(name),
        )
        return commit_shards(
            target,
            shards,
            metadata,
            batch_rows=BATCH_ROWS,
            target_file_bytes=TARGET_FILE_BYTES,
            threads=threads,
        )

    def _shard_fs(self, path: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem of a shard: the store's own one when the shard lives under it."""
        local = local_path(path)
        if local is not None:
            return pafs.LocalFileSystem(), local
        if path.startswith(self.root + "/"):
            return self._fs[0], self._path(path[len(self.root) + 1 :])
        return pafs.FileSystem.from_uri(path)

    # -- reading -------------------------------------------------------------------------

    @_remote_errors
    def schema(self, ref: Ref | str) -> pa.Schema:
        """The Arrow schema of a version, including the ``split`` column."""
        return self._dataset(ref, None).schema

    def batches(
        self,
        ref: Ref | str,
        split: str | None = "train",
        columns: list[str] | None = None,
        batch_size: int = BATCH_ROWS,
    ) -> Iterator[pa.RecordBatch]:
        """Stream a version's rows in batches (bounded memory). ``split=None``: both
        splits, with the ``split`` column. pyarrow reads ahead 2 batches of 1 file (its
        defaults, 16 batches of 4 files, held most of a report's peak memory)."""
        dataset = self._dataset(ref, split)
        selected = _select_columns(dataset.schema, columns, with_split=split is None)
        return dataset.to_batches(
            columns=selected,
            batch_size=batch_size,
            batch_readahead=_BATCH_READAHEAD,
            fragment_readahead=_FRAGMENT_READAHEAD,
        )

    @_remote_errors
    def read(
        self, ref: Ref | str, split: str | None = "train", columns: list[str] | None = None
    ) -> pa.Table:
        """A version's rows as a table. ``split=None``: both splits, with ``split``."""
        dataset = self._dataset(ref, split)
        selected = _select_columns(dataset.schema, columns, with_split=split is None)
        return dataset.to_table(columns=selected)

    def _dataset(self, ref: Ref | str, split: str | None) -> pads.Dataset:
        """A version as a pyarrow dataset whose data files are read through the store's
        own Arrow filesystem (:attr:`_fs`, the one the commit wrote them with).

        deltalake's default is a ``PyFileSystem`` over its Python ``DeltaStorageHandler``:
        every read on Arrow's I/O threads then takes the GIL and hands back Python-owned
        buffers. A reader's cached ranges can outlive ``to_table`` (or a dropped
        :meth:`batches` stream) on those threads; released during interpreter shutdown,
        their destructor's ``PyGILState_Ensure`` ends the thread through a C++
        ``noexcept`` frame and the process aborts ("terminate called without an active
        exception"), or hangs or crashes when read-ahead is still running. The table's
        files are relative paths below its folder (:mod:`storage.commit`), so a
        ``SubTreeFileSystem`` at the table's path resolves them, locally and on S3.
        """
        if split is not None:
            validate_split(split)
        name, _, table = self._open(ref)
        predicate = [("split", "=", split)] if split is not None else None
        files = pafs.SubTreeFileSystem(self._path(name), self._fs[0])
        return table.to_pyarrow_dataset(filesystem=files, file_pruning_predicate=predicate)

    @_remote_errors
    def files(self, ref: Ref | str, split: str = "train") -> list[str]:
        """The Parquet file URIs holding exactly one version's split.

        ``datasets.load_dataset("parquet", data_files=store.files("sft@prod"))`` loads
        that version (the files lack the ``split`` partition column).
        """
        validate_split(split)
        table = self._open(ref)[2]
        return table.file_uris(file_pruning_predicate=[("split", "=", split)])

    def load(self, ref: Ref | str, split: str = "train", **kwargs: Any) -> datasets.Dataset:
        """One version's ``split`` as a Hugging Face :class:`datasets.Dataset`.

        ``load_dataset("parquet", data_files=self.files(ref, split))``, with
        :meth:`fsspec_options` for an ``s3://`` store; ``kwargs`` go to ``load_dataset``
        (``cache_dir``, ``num_proc``, ...). The rows lack the ``split`` column. An empty
        split gives an empty dataset with the version's columns.
        """
        import datasets

        files = self.files(ref, split)
        if not files:
            schema = pa.schema([f for f in self.schema(ref) if f.name != "split"])
            return datasets.Dataset(schema.empty_table())
        if self.remote:
            kwargs.setdefault("storage_options", self.fsspec_options())
        return datasets.load_dataset("parquet", data_files=files, split="train", **kwargs)

    def to_pandas(self, ref: Ref | str, split: str | None = "train") -> pd.DataFrame:
        """One version's ``split`` as a pandas DataFrame (``split=None``: both splits, with
        the ``split`` column); read as :meth:`read` reads it."""
        return self.read(ref, split).to_pandas()

    def to_polars(self, ref: Ref | str, split: str | None = "train") -> pl.DataFrame:
        """One version's ``split`` as a polars DataFrame, as :meth:`to_pandas`.

        Raises:
            ImportError: polars is not installed (it is not a dependency of aligncurate).
        """
        try:
            import polars
        except ImportError as exc:
            raise ImportError(
                "DatasetStore.to_polars needs polars, which is not installed: "
                "pip install polars (or use to_pandas, load or read)"
            ) from exc
        return polars.from_arrow(self.read(ref, split))

    # -- tags ----------------------------------------------------------------------------

    @_remote_errors
    def tags(self, name: str) -> dict[str, int]:
        """Tag -> version for dataset ``name``."""
        return {tag: entry["version"] for tag, entry in self._read_tags(name).items()}

    @_remote_errors
    def tag(self, ref: Ref | str, tag: str) -> int:
        """Point ``tag`` at the version ``ref`` resolves to (moving it if it exists).

        Returns:
            The tagged version.
        """
        return self.set_tag(ref, tag)[1]

    @_remote_errors
    def set_tag(self, ref: Ref | str, tag: str) -> tuple[int | None, int]:
        """Like :meth:`tag`, and say where the tag was before.

        Returns:
            ``(previous, version)``: the version ``tag`` pointed at before (None when the
            tag is new) and the version it points at now.
        """
        validate_tag(tag)
        name, version = self.resolve(ref)
        tags = self._read_tags(name)
        previous = int(tags[tag]["version"]) if tag in tags else None
        tags[tag] = {"version": version, "tagged_at": datetime.now(UTC).isoformat()}
        self._write_tags(name, tags)
        return previous, version

    @_remote_errors
    def untag(self, name: str, tag: str) -> int:
        """Remove ``tag`` from dataset ``name``; returns the version it pointed at."""
        tags = self._read_tags(name)
        if tag not in tags:
            raise StoreError(f"unknown tag {tag!r} of dataset {name!r}")
        version = int(tags.pop(tag)["version"])
        self._write_tags(name, tags)
        return version

    def _tags_path(self, name: str) -> str:
        return self._path(validate_name(name), TAGS_FILE)

    def _read_tags(self, name: str) -> dict[str, dict[str, Any]]:
        fs, path = self._fs[0], self._tags_path(name)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return {}
        with fs.open_input_stream(path) as stream:
            return dict(json.loads(stream.read().decode("utf-8"))["tags"])

    def _write_tags(self, name: str, tags: Mapping[str, Any]) -> None:
        """Write the tags file via a temporary file and a rename (atomic locally and on S3).

        Not :mod:`storage.atomic`: the store may be ``s3://``, so this writes and moves
        through the store's pyarrow filesystem, which :mod:`storage.atomic`'s local paths
        cannot address."""
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


# -- helpers ---------------------------------------------------------------------------


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


def _is_valid_name(name: str) -> bool:
    try:
        validate_name(name)  # also rejects the reserved _work and _cache
    except StoreError:
        return False
    return True
