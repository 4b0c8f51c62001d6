"""Row-level diff of two dataset versions, keyed by row ``id`` across both splits.

A row is *added* when its id is only in ``b``, *removed* when only in ``a`` and *changed*
when the id is in both but its content differs in any column the two versions share, or it
moved between splits (*moved* counts that subset). Columns only one version has are
reported as schema changes, not as row changes: a build that adds a stage column does not
mark every row changed. An id present in both splits of one version (a duplicate kept once
and rejected once) is compared as the set of its rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.names import SPLITS, Ref, parse_ref

if TYPE_CHECKING:
    from storage.dataset import DatasetStore


@dataclass(frozen=True)
class DatasetDiff:
    """What changed from version ``a`` to version ``b``."""

    a: str
    b: str
    rows_a: dict[str, int]
    rows_b: dict[str, int]
    added: int
    removed: int
    changed: int
    moved: int
    unchanged: int
    added_examples: list[str] = field(default_factory=list)
    removed_examples: list[str] = field(default_factory=list)
    changed_examples: list[str] = field(default_factory=list)
    moved_examples: list[str] = field(default_factory=list)
    columns_added: list[str] = field(default_factory=list)
    columns_removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def diff_versions(
    store: DatasetStore, a: Ref | str, b: Ref | str, examples: int = 5
) -> DatasetDiff:
    """Compare two versions (of the same or different datasets) row by row."""
    name_a, version_a = store.resolve(parse_ref(a))
    name_b, version_b = store.resolve(parse_ref(b))
    ref_a, ref_b = f"{name_a}@{version_a}", f"{name_b}@{version_b}"
    cols_a = [c for c in store.schema(ref_a).names if c != "split"]
    cols_b = [c for c in store.schema(ref_b).names if c != "split"]
    shared = [c for c in cols_a if c in set(cols_b)]
    sig_a = _signatures(store.batches(ref_a, split=None, columns=shared))
    sig_b = _signatures(store.batches(ref_b, split=None, columns=shared))

    joined = sig_a.table.join(sig_b.table, "id", join_type="full outer", right_suffix="_b")
    in_a, in_b = pc.is_valid(joined["sig"]), pc.is_valid(joined["sig_b"])
    both = pc.and_(in_a, in_b)
    added = pc.and_not(in_b, in_a)
    removed = pc.and_not(in_a, in_b)
    changed = pc.and_(both, pc.not_equal(joined["sig"], joined["sig_b"]))
    moved = pc.and_(both, pc.not_equal(joined["splits"], joined["splits_b"]))

    def pick(mask: pa.ChunkedArray) -> tuple[int, list[str]]:
        ids = joined["id"].filter(mask)
        first = pc.sort_indices(ids)[:examples] if examples > 0 else []
        return len(ids), ids.take(first).to_pylist() if len(first) else []

    n_added, ex_added = pick(added)
    n_removed, ex_removed = pick(removed)
    n_changed, ex_changed = pick(changed)
    n_moved, ex_moved = pick(moved)
    return DatasetDiff(
        a=ref_a,
        b=ref_b,
        rows_a=sig_a.rows,
        rows_b=sig_b.rows,
        added=n_added,
        removed=n_removed,
        changed=n_changed,
        moved=n_moved,
        unchanged=pc.sum(both).as_py() - n_changed if len(joined) else 0,
        added_examples=ex_added,
        removed_examples=ex_removed,
        changed_examples=ex_changed,
        moved_examples=ex_moved,
        columns_added=[c for c in cols_b if c not in set(cols_a)],
        columns_removed=[c for c in cols_a if c not in set(cols_b)],
    )


@dataclass(frozen=True)
class _Signatures:
    table: pa.Table  # id, sig (content of all the id's rows), splits (the id's splits)
    rows: dict[str, int]


def _signatures(batches: Iterator[pa.RecordBatch]) -> _Signatures:
    """One row per id: a digest of its rows' content and splits, and the split list."""
    ids: list[pa.Array] = []
    sigs: list[pa.Array] = []
    splits: list[pa.Array] = []
    for batch in batches:
        content = [c for c in batch.schema.names if c not in ("id", "split")]
        split = batch.column("split")
        values = [batch.column(c).to_pylist() for c in content]
        rows = zip(*values, strict=True) if values else iter([()] * batch.num_rows)
        digests = [
            f"{where}:{_digest(row)}" for where, row in zip(split.to_pylist(), rows, strict=True)
        ]
        ids.append(batch.column("id"))
        sigs.append(pa.array(digests, pa.string()))
        splits.append(split)
    table = pa.table(
        {
            "id": pa.chunked_array(ids, pa.string()),
            "sig": pa.chunked_array(sigs, pa.string()),
            "split": pa.chunked_array(splits, pa.string()),
        }
    )
    counts = dict.fromkeys(SPLITS, 0)
    for entry in table["split"].value_counts().to_pylist():
        counts[entry["values"]] = entry["counts"]
    ordered = table.sort_by([("id", "ascending"), ("sig", "ascending")])
    grouped = ordered.group_by("id", use_threads=False).aggregate(
        [("sig", "list"), ("split", "list")]
    )
    per_id = pa.table(
        {
            "id": grouped["id"],
            "sig": pc.binary_join(grouped["sig_list"], "|"),
            "splits": pc.binary_join(grouped["split_list"], ","),
        }
    )
    return _Signatures(per_id, counts)


def _digest(values: tuple[Any, ...]) -> str:
    text = json.dumps(values, sort_keys=True, default=str, ensure_ascii=False)
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
