"""Summaries of a curated table for ``aligncurate inspect``: counts, length statistics and
the instruction/response statistics with their loss-over-prompt recommendation."""

from __future__ import annotations

from typing import Any

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


def value_counts(table: pa.Table, column: str, top: int = 20) -> dict[str, int]:
    """The ``top`` most frequent values of a column (nulls shown as ``-``)."""
    counts = pc.value_counts(pc.fill_null(table.column(column).cast(pa.string()), "-"))
    pairs = sorted(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True),
        key=lambda kv: (-kv[1], kv[0]),
    )
    return dict(pairs[:top])


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
    out: dict[str, Any] = {"rows": table.num_rows, "counts": {}}
    for column in COUNT_COLUMNS:
        if column in table.column_names and table.num_rows:
            out["counts"][column] = value_counts(table, column, top)
    lengths: dict[str, Any] = {}
    if "prompt" in table.column_names:
        lengths["prompt_chars"] = length_stats(prompt_chars(table.column("prompt")))
    if "response" in table.column_names:
        lengths["response_chars"] = length_stats(
            pc.fill_null(pc.utf8_length(table.column("response")), 0)
        )
    out["lengths"] = lengths
    if {"prompt", "response"} <= set(table.column_names):
        out["instruction_response"] = instruction_response(table)
    return out


def instruction_response(table: pa.Table) -> dict[str, Any]:
    """The instruction/response statistics (:mod:`transforms.response.stats`) of the
    ``train`` rows (of every row when there is no ``split`` column)."""
    from transforms.response.stats import dataset_stats

    if "split" in table.column_names:
        table = table.filter(pc.equal(table.column("split"), "train"))
    return dataset_stats([table])
