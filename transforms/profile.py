"""Summaries of a curated table for ``aligncurate inspect``: counts, length statistics and
the instruction/response statistics with their loss-over-prompt recommendation."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.text import prompt_chars

COUNT_COLUMNS = (
    "split",
    "source",
    "task",
    "origin",
    "craft_label",
    "reject_stage",
    "reject_reason",
)


FOLDED = (("_of:[^:]*$", "_of:*"), (":[0-9.]+$", ":*"))
"""Parts of a reject reason that name a row or a measured value (``duplicate_of:<id>``,
``repetition:0.42``), replaced by ``*`` when reasons are counted, so that the counts say
how many rows each rule dropped instead of listing every kept id."""


def reason_kinds(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Reject reasons with their row ids and measured values folded (see :data:`FOLDED`)."""
    for pattern, replacement in FOLDED:
        values = pc.replace_substring_regex(values, pattern, replacement)
    return values


def value_counts(table: pa.Table, column: str, top: int = 20) -> dict[str, int]:
    """The ``top`` most frequent values of a column (nulls shown as ``-``; reject reasons
    folded by :func:`reason_kinds`)."""
    return _top(_counts(table.column(column), column), top)


def _counts(values: pa.Array | pa.ChunkedArray, column: str) -> Counter[str]:
    values = values.cast(pa.string())
    if column == "reject_reason":
        values = reason_kinds(values)
    counts = pc.value_counts(pc.fill_null(values, "-"))
    values_, counts_ = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    return Counter(dict(zip(values_, counts_, strict=True)))


def _top(counts: Counter[str], top: int) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top])


def length_stats(values: pa.Array | pa.ChunkedArray) -> dict[str, float]:
    """min / mean / p50 / p90 / max of a numeric column."""
    if len(values) == 0:
        return {}
    q = pc.quantile(values, q=[0.5, 0.9]).to_pylist()
    return {
        "min": pc.min(values).as_py(),
        "mean": round(pc.mean(values).as_py(), 1),
        "p50": q[0],
        "p90": q[1],
        "max": pc.max(values).as_py(),
    }


def profile(table: pa.Table, top: int = 20) -> dict[str, Any]:
    """Row count, value counts of the categorical columns, and character-length stats."""
    return profile_tables([table], table.column_names, top)


def profile_tables(tables: Iterable[pa.Table], columns: list[str], top: int = 20) -> dict[str, Any]:
    """:func:`profile` of the rows of ``tables`` (with ``columns``), one table at a time:
    what it keeps grows with the rows only as the distinct values counted, two int64 length
    arrays and the train rows' two token-length arrays. The result is the same as for the
    tables concatenated."""
    counted = [c for c in COUNT_COLUMNS if c in columns]
    counts: dict[str, Counter[str]] = {c: Counter() for c in counted}
    chars: dict[str, list[np.ndarray]] = {"prompt_chars": [], "response_chars": []}
    rows = 0

    def train_rows() -> Iterator[pa.Table]:  # counts as it goes, yields the train rows
        nonlocal rows
        for table in tables:
            rows += table.num_rows
            for column in counted:
                counts[column].update(_counts(table.column(column), column))
            if "prompt" in columns:
                chars["prompt_chars"].append(_numpy(prompt_chars(table.column("prompt"))))
            if "response" in columns:
                length = pc.fill_null(pc.utf8_length(table.column("response")), 0)
                chars["response_chars"].append(_numpy(length))
            if "split" in columns:
                table = table.filter(pc.equal(table.column("split"), "train"))
            yield table

    instruction = None
    if {"prompt", "response"} <= set(columns):
        from transforms.response.stats import dataset_stats

        instruction = dataset_stats(train_rows())
    else:
        deque(train_rows(), maxlen=0)
    out: dict[str, Any] = {
        "rows": rows,
        "counts": {c: _top(counts[c], top) for c in counted if rows},
        "lengths": {
            name: length_stats(pa.array(np.concatenate(parts) if parts else [], pa.int64()))
            for name, parts in chars.items()
            if name.removesuffix("_chars") in columns
        },
    }
    if instruction is not None:
        out["instruction_response"] = instruction
    return out


def _numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(np.int64)
