"""The canonical row schema shared by every stage (see docs/schema.md).

Everything between ingest and commit is a ``pyarrow.Table`` with these columns. Stages
add columns (``correctness_init``, ``knowledge_flow`` ...) and never rename them. Rows a
stage drops carry two more columns, ``reject_stage`` and ``reject_reason``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
"""One conversation turn. Roles: ``system``, ``user``, ``assistant``, ``tool_call``
(an assistant turn that calls a tool; content is the call as JSON) and ``tool`` (a tool's
observation)."""

ROLES = frozenset({"system", "user", "assistant", "tool_call", "tool"})
TASKS = frozenset({"instruction", "open_qa", "mcq"})
ORIGINS = frozenset({"corpus", "synthetic", "refusal_mix", "refined"})

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.list_(MESSAGE), nullable=False),
        pa.field("tools", pa.string()),
        pa.field("response", pa.string(), nullable=False),
        pa.field("references", pa.list_(pa.string())),
        pa.field("choices", pa.list_(pa.string())),
        pa.field("origin", pa.string(), nullable=False),
        pa.field("original_response", pa.string()),
    ]
)
"""Canonical columns, in order. ``nullable=False`` marks the columns a valid row must fill."""

REJECT_FIELDS = [pa.field("reject_stage", pa.string()), pa.field("reject_reason", pa.string())]
REJECTED_SCHEMA = pa.schema([*SCHEMA, *REJECT_FIELDS])
"""Schema of the ``rejected`` split: the canonical columns (possibly null) plus the reason."""


class SchemaError(ValueError):
    """A table does not follow the canonical schema. The message names the column and row."""


def empty_table(schema: pa.Schema = SCHEMA) -> pa.Table:
    """A table with no rows and the given schema."""
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema = SCHEMA) -> pa.Table:
    """Order and cast ``table`` to ``schema``: missing canonical columns become null,
    extra (stage) columns are kept after the canonical ones.

    Raises:
        SchemaError: a column cannot be cast to its canonical type.
    """
    columns: list[pa.Array | pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            if column.type != field.type:
                try:
                    column = column.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise SchemaError(
                        f"column {field.name!r} has type {column.type}, "
                        f"expected {field.type}: {exc}"
                    ) from exc
        else:
            column = pa.nulls(table.num_rows, field.type)
        columns.append(column)
        fields.append(field.with_nullable(True))
    canonical = set(schema.names)
    for name in table.column_names:
        if name not in canonical:
            columns.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def validate(table: pa.Table, schema: pa.Schema = SCHEMA) -> None:
    """Check that ``table`` follows ``schema``: column types, required values, known
    task/origin/role values.

    Raises:
        SchemaError: naming the first offending column and row, e.g.
            ``row 17, column 'task': 'chat' is not one of instruction, mcq, open_qa``.
    """
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"column {field.name!r} is missing")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(f"column {field.name!r} has type {actual}, expected {field.type}")
        if not field.nullable:
            _check_no_nulls(table, field.name)
    _check_allowed(table, "task", TASKS)
    _check_allowed(table, "origin", ORIGINS)
    roles = pc.list_flatten(table.column("prompt")).combine_chunks().field("role")
    bad = pc.invert(pc.is_in(roles, value_set=pa.array(sorted(ROLES))))
    if pc.any(pc.fill_null(bad, True)).as_py():
        offsets = pc.list_value_length(table.column("prompt")).to_numpy(zero_copy_only=False)
        flat_index = pc.index(bad, True).as_py()
        row = int((offsets.cumsum() <= flat_index).sum())
        raise SchemaError(
            f"row {row}, column 'prompt': role {roles[flat_index].as_py()!r} "
            f"is not one of {', '.join(sorted(ROLES))}"
        )


def _check_no_nulls(table: pa.Table, name: str) -> None:
    column = table.column(name)
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise SchemaError(f"row {row}, column {name!r}: value is required but null")


def _check_allowed(table: pa.Table, name: str, allowed: Iterable[str]) -> None:
    allowed = sorted(allowed)
    column = table.column(name)
    bad = pc.invert(pc.is_in(column, value_set=pa.array(allowed)))
    bad = pc.fill_null(bad, False)
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise SchemaError(
            f"row {row}, column {name!r}: {column[row].as_py()!r} "
            f"is not one of {', '.join(allowed)}"
        )


def rejected(table: pa.Table, stage: str, reasons: str | Sequence[str] | pa.Array) -> pa.Table:
    """``table`` with ``reject_stage`` and ``reject_reason`` columns set, for the rejected split."""
    n = table.num_rows
    if isinstance(reasons, str):
        reason_array = pa.array([reasons] * n, pa.string())
    else:
        reason_array = pa.array(reasons, pa.string())
    out = table
    for name in ("reject_stage", "reject_reason"):
        if name in out.column_names:
            out = out.drop_columns([name])
    out = out.append_column("reject_stage", pa.array([stage] * n, pa.string()))
    return out.append_column("reject_reason", reason_array)


def messages(rows: Iterable[dict[str, Any]]) -> pa.Array:
    """Build a ``list<MESSAGE>`` array from Python lists of ``{role, content}`` dicts."""
    return pa.array(list(rows), type=pa.list_(MESSAGE))
