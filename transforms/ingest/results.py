"""Ingest rows → a :class:`~transforms.stage.StageResult`: ids, constant columns, the
rejected split and the batch's accounting (``rows_read == kept + rejected``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.ids import position_ids, row_ids
from transforms.ingest.errors import RowReject
from transforms.schema import MESSAGE, SCHEMA, conform, rejected
from transforms.stage import StageResult, reject_table
from transforms.text import combined

STAGE = "ingest"
ROW_SCHEMA = pa.schema(
    [
        ("source_index", pa.int64()),
        ("prompt", pa.list_(MESSAGE)),
        ("tools", pa.string()),
        ("response", pa.string()),
        ("references", pa.list_(pa.string())),
        ("choices", pa.list_(pa.string())),
    ]
)
"""What a format adapter fills; :func:`finish` adds id, source, task and origin."""
ID_ROWS = 8192
"""Rows hashed at a time: the text an id hashes is joined into one buffer (and copied once
more to 64-bit offsets), so a 64k-row batch held two extra copies of all its text, the
peak of ingest (233 MiB of Arrow memory at 200k rows, one shard thread, before)."""

Outcome = dict[str, Any] | RowReject
"""A format adapter's answer for one record: the row's :data:`ROW_SCHEMA` fields (less
``source_index``), or why it is rejected."""


def build_rows(items: Sequence[tuple[int, Outcome]], source: str, task: str) -> StageResult:
    """A result from ``(source_index, outcome)`` pairs built in Python."""
    rows: list[dict[str, Any]] = []
    reasons: list[str | None] = []
    for index, outcome in items:
        if isinstance(outcome, RowReject):
            rows.append({**outcome.partial, "source_index": index})
            reasons.append(outcome.reason)
        else:
            rows.append({**outcome, "source_index": index})
            reasons.append(None)
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    return finish(table, pa.array(reasons, pa.string()), source, task)


def finish(
    rows: pa.Table, reasons: pa.Array | pa.ChunkedArray, source: str, task: str
) -> StageResult:
    """Split ``rows`` (:data:`ROW_SCHEMA`) on ``reasons`` (null: kept) into canonical tables."""
    ok = pc.is_null(reasons)
    n_ok = pc.sum(ok).as_py() or 0
    if n_ok == rows.num_rows:
        kept_rows, rejected_rows, reasons = rows, rows.slice(0, 0), reasons[:0]
    else:
        rejected_mask = pc.invert(ok)
        kept_rows, rejected_rows = rows.filter(ok), rows.filter(rejected_mask)
        reasons = reasons.filter(rejected_mask)
    kept = _canonical(kept_rows, source, task, with_ids=True)
    dropped = reject_table(
        rejected(_canonical(rejected_rows, source, task), STAGE, combined(reasons))
    )
    return StageResult(kept=kept, rejected=dropped, stats=_stats(rows.num_rows, kept, reasons))


def constant(value: str, n: int) -> pa.Array:
    """A string column holding ``value`` ``n`` times."""
    return pa.array([value], pa.string()).take(np.zeros(n, np.int32))


def _canonical(rows: pa.Table, source: str, task: str, *, with_ids: bool = False) -> pa.Table:
    n = rows.num_rows
    out = rows.append_column("source", constant(source, n))
    out = out.append_column("task", constant(task, n)).append_column(
        "origin", constant("corpus", n)
    )
    hash_ids = _row_ids if with_ids else _position_ids
    ids = pa.chunked_array(
        [hash_ids(out.slice(start, ID_ROWS)) for start in range(0, n, ID_ROWS)], pa.string()
    )
    out = out.append_column("id", ids)
    return conform(out, SCHEMA)


def _row_ids(rows: pa.Table) -> pa.Array:
    return row_ids(rows.column("source"), rows.column("prompt"), rows.column("response"))


def _position_ids(rows: pa.Table) -> pa.Array:
    """Rejected rows may lack the content: they are identified by position."""
    return position_ids(rows.column("source"), rows.column("source_index"))


def _stats(rows_read: int, kept: pa.Table, reasons: pa.Array | pa.ChunkedArray) -> dict[str, Any]:
    counts = pc.value_counts(combined(reasons)).to_pylist() if len(reasons) else []
    return {
        "rows_read": rows_read,
        "rows_kept": kept.num_rows,
        "rows_rejected": rows_read - kept.num_rows,
        "reject_reasons": {c["values"]: c["counts"] for c in counts},
    }
