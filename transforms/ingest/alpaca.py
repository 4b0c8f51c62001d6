"""Alpaca and Self-Instruct records → canonical rows, vectorised with ``pyarrow.compute``.

Alpaca (LLaMA-Factory style): ``instruction``, ``input``, ``output``, optional ``system`` and
``history`` (a list of ``[user, assistant]`` pairs). The user turn is the instruction, plus
``"\\n\\n" + input`` when the input is not empty; ``prompt = [system] + history + [user]`` and
``response = output``. A Self-Instruct seed task gives one such row per instance.

Every reader feeds one *raw* table (:data:`RAW_SCHEMA`: the fields, cleaned, plus the reject
reason of each row) to :func:`build`, which assembles the prompts from offsets with numpy
and Arrow kernels: there is no per-row Python on the clean path. Arrow input (Parquet,
``datasets``, JSON lines parsed by Arrow) is checked column-wise (:func:`from_columns`), and
so are Python records (JSON arrays, CSV) that Arrow can convert (:func:`from_python`); the
rest is checked row by row (:func:`from_records`), with the same reasons.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.ids import contiguous
from transforms.ingest.errors import RowReject
from transforms.ingest.fields import (
    arrow_text,
    check_text,
    invalid_utf8_rows,
    reason_where,
    record,
)
from transforms.ingest.readers import Columns, Records
from transforms.ingest.results import ROW_SCHEMA, finish
from transforms.schema import MESSAGE
from transforms.stage import StageResult

HISTORY = pa.list_(pa.list_(pa.string()))
TEXT_FIELDS = (("instruction", True), ("input", False), ("output", True), ("system", False))
"""The string fields, in the order their problems are reported, and whether required."""

JSON_SCHEMA = pa.schema(
    [*(pa.field(name, pa.string()) for name, _ in TEXT_FIELDS), ("history", HISTORY)]
)
"""What Arrow's JSON reader extracts from each alpaca line (other keys are ignored)."""

RAW_SCHEMA = pa.schema([("source_index", pa.int64()), *JSON_SCHEMA, ("reason", pa.string())])
"""A batch of alpaca-shaped records, cleaned: unusable values are null, ``reason`` says why."""

_ROLES = pa.array(["system", "user", "assistant"], pa.string())
_SYSTEM, _USER, _ASSISTANT = 0, 1, 2


# --- Arrow input -----------------------------------------------------------------------------


def from_columns(piece: Columns) -> pa.Table:
    """Check an Arrow table of alpaca records column-wise into a raw table."""
    table, n = piece.table, piece.table.num_rows
    columns: dict[str, pa.Array] = {}
    reasons: list[pa.Array] = []
    for name, required in TEXT_FIELDS:
        column = table.column(name) if name in table.column_names else None
        columns[name], reason = arrow_text(column, n, name, required=required)
        reasons.append(reason)
    history = table.column("history") if "history" in table.column_names else None
    columns["history"], reason = _arrow_history(history, n)
    reasons.append(reason)
    return _raw_table(np.arange(piece.first_index, piece.first_index + n), columns, reasons)


def _raw_table(
    index: np.ndarray, columns: dict[str, pa.Array], reasons: list[pa.Array]
) -> pa.Table:
    reason = pc.coalesce(*reasons) if len(reasons) > 1 else reasons[0]
    arrays = [pa.array(index, pa.int64()), *(columns[f.name] for f in JSON_SCHEMA), reason]
    return pa.Table.from_arrays(arrays, schema=RAW_SCHEMA)


def _arrow_history(column: pa.ChunkedArray | None, n: int) -> tuple[pa.Array, pa.Array]:
    """History column → (list<list<string>>, reasons): ``wrong_type:history`` for a non-list
    column, ``bad_history`` for pairs that are not two strings."""
    if column is None or pa.types.is_null(column.type):
        return pa.nulls(n, HISTORY), pa.nulls(n, pa.string())
    column = column.combine_chunks()
    if not _is_history_type(column.type):
        shape = "bad_history" if pa.types.is_list(column.type) else "wrong_type:history"
        return pa.nulls(n, HISTORY), reason_where(pc.is_valid(column), shape)
    history = column.cast(HISTORY)
    bad_utf8 = invalid_utf8_rows(history)
    reasons = (
        pa.nulls(n, pa.string())
        if bad_utf8 is None
        else reason_where(bad_utf8, "invalid_utf8:history")
    )
    reasons = pc.coalesce(reasons, reason_where(_bad_pairs(history), "bad_history"))
    return pc.if_else(pc.is_null(reasons), history, pa.scalar(None, HISTORY)), reasons


def _is_history_type(type_: pa.DataType) -> bool:
    def is_list(t: pa.DataType) -> bool:
        return pa.types.is_list(t) or pa.types.is_large_list(t)

    return (
        is_list(type_)
        and is_list(type_.value_type)
        and (
            pa.types.is_string(type_.value_type.value_type)
            or pa.types.is_large_string(type_.value_type.value_type)
        )
    )


def _bad_pairs(history: pa.Array) -> np.ndarray:
    """Rows whose history holds a pair that is not exactly two non-null strings."""
    pairs = pc.list_flatten(history)
    strings = pc.list_flatten(pairs)
    bad_pair = (
        pc.fill_null(pc.not_equal(pc.list_value_length(pairs), 2), True)
        .to_numpy(zero_copy_only=False)
        .copy()
    )
    null_strings = pc.list_parent_indices(pairs).to_numpy()[
        pc.is_null(strings).to_numpy(zero_copy_only=False)
    ]
    bad_pair[null_strings] = True
    rows = pc.list_parent_indices(history).to_numpy()[bad_pair]
    return np.bincount(rows, minlength=len(history)) > 0


# --- Python input ----------------------------------------------------------------------------


def from_python(piece: Records) -> pa.Table:
    """Python alpaca records into a raw table: converted by Arrow and checked column-wise
    when their shapes allow it, else (a wrong-typed value, invalid UTF-8) checked per row."""
    if _arrow_ready(piece.values):
        try:
            table = pa.Table.from_pylist(piece.values, schema=JSON_SCHEMA)
        except (pa.ArrowException, UnicodeError):
            pass
        else:
            return from_columns(Columns(piece.first_index, table))
    return from_records(piece)


def _arrow_ready(values: list[Any]) -> bool:
    """Whether ``Table.from_pylist`` converts these records exactly: it would read a record
    that is not an object as empty, and a string where a list belongs as a list of letters."""
    for value in values:
        if type(value) is not dict:
            return False
        history = value.get("history")
        if history is not None and (
            type(history) is not list or any(type(pair) is not list for pair in history)
        ):
            return False
    return True


def from_records(piece: Records, *, self_instruct: bool = False) -> pa.Table:
    """Check Python records row by row into a raw table (one row per Self-Instruct instance)."""
    expand = _instances if self_instruct else _alpaca_row
    index: list[int] = []
    rows: list[dict[str, Any]] = []
    for offset, value in enumerate(piece.values):
        for row in expand(value):
            index.append(piece.first_index + offset)
            rows.append(row)
    columns = {f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in JSON_SCHEMA}
    reason = pa.array([r.get("reason") for r in rows], pa.string())
    return _raw_table(np.array(index, np.int64), columns, [reason])


def _alpaca_row(value: Any) -> Iterator[dict[str, Any]]:
    """The checked fields of one alpaca record; ``reason`` names the first problem."""
    try:
        fields = record(value)
    except RowReject as reject:
        yield {"reason": reject.reason}
        return
    yield _checked(fields, history=True)


def _checked(fields: dict[str, Any], *, history: bool, prefix: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {}
    reasons: list[str] = []
    for name, required in TEXT_FIELDS:
        row[name], reason = check_text(fields.get(name), prefix + name, required=required)
        reasons += [reason] if reason else []
    if history:
        row["history"], reason = _check_history(fields.get("history"))
        reasons += [reason] if reason else []
    row["reason"] = reasons[0] if reasons else None
    return row


def _check_history(value: Any) -> tuple[list[list[str]] | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, list):
        return None, "wrong_type:history"
    for pair in value:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            return None, "bad_history"
        for turn in pair:
            _, reason = check_text(turn, "history")
            if reason:
                utf8 = reason.startswith("invalid_utf8")
                return None, "invalid_utf8:history" if utf8 else "bad_history"
    return [list(pair) for pair in value], None


def _instances(value: Any) -> Iterator[dict[str, Any]]:
    """Self-Instruct: one alpaca row per instance of a seed task (an empty or unusable
    instance list gives one rejected row, so the task is still accounted for)."""
    try:
        task = record(value)
    except RowReject as reject:
        yield {"reason": reject.reason}
        return
    instruction, reason = check_text(task.get("instruction"), "instruction")
    instances = task.get("instances")
    if reason is None and not isinstance(instances, list):
        reason = "missing_field:instances" if instances is None else "wrong_type:instances"
    if reason is None and not instances:
        reason = "no_instances"
    if reason is not None:
        yield {"instruction": instruction, "reason": reason}
        return
    for instance in instances:
        if not isinstance(instance, dict):
            yield {"instruction": instruction, "reason": "wrong_type:instances"}
            continue
        yield _checked({**instance, "instruction": instruction}, history=False, prefix="instances.")


# --- assembly --------------------------------------------------------------------------------


def build(raw: pa.Table, source: str, task: str = "instruction") -> StageResult:
    """Canonical kept and rejected rows from a raw table."""
    column = {name: contiguous(raw.column(name)) for name in RAW_SCHEMA.names}
    prompt = assemble_prompts(
        user_turns(column["instruction"], column["input"]), column["system"], column["history"]
    )
    instruction = column["instruction"]
    if instruction.null_count:  # rejected rows without an instruction get no prompt
        prompt = pc.if_else(pc.is_valid(instruction), prompt, pa.scalar(None, prompt.type))
    filled = {
        "source_index": column["source_index"],
        "prompt": prompt,
        "response": column["output"],
    }
    rows = pa.Table.from_arrays(
        [filled.get(f.name, pa.nulls(raw.num_rows, f.type)) for f in ROW_SCHEMA], schema=ROW_SCHEMA
    )
    return finish(rows, column["reason"], source, task)


def user_turns(instruction: pa.Array, input_: pa.Array) -> pa.Array:
    """The user turn of each row: the instruction, plus ``"\\n\\n" + input`` where the input
    is not empty. Only those rows are joined (on the instruction corpora most inputs are
    empty), so the others are not copied twice."""
    joined = pc.fill_null(pc.not_equal(input_, ""), False)
    if not pc.any(joined).as_py():
        return instruction
    both = pc.binary_join_element_wise(instruction.filter(joined), input_.filter(joined), "\n\n")
    return pc.replace_with_mask(instruction, joined, both)


def assemble_prompts(user: pa.Array, system: pa.Array, history: pa.Array) -> pa.Array:
    """``[system?] + history turns + [user]`` per row, as ``list<struct<role, content>>``.

    Each row's turns are laid out with numpy offsets, then gathered from one pool of
    strings (systems, users, history turns) with a single ``take``. Without any system
    prompt or history, each row is its one user turn, and the user strings are the
    contents as they are (no pool, no gather: two copies of the text fewer).
    """
    n = len(user)
    has_system = pc.fill_null(pc.not_equal(system, ""), False).to_numpy(zero_copy_only=False)
    pairs = (
        pc.fill_null(pc.list_value_length(history), 0)
        .to_numpy(zero_copy_only=False)
        .astype(np.int64)
    )
    if not has_system.any() and not pairs.any():
        messages = pa.StructArray.from_arrays(
            [_ROLES.take(np.full(n, _USER, np.int8)), user.cast(pa.string())],
            fields=list(MESSAGE),
        )
        offsets = pa.array(np.arange(n + 1, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, messages, type=pa.list_(MESSAGE))
    turns = has_system.astype(np.int64) + 2 * pairs + 1
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(turns, out=offsets[1:])
    pool_index = np.empty(offsets[-1], np.int64)
    role = np.empty(offsets[-1], np.int8)
    rows = np.flatnonzero(has_system)
    pool_index[offsets[rows]], role[offsets[rows]] = rows, _SYSTEM
    pool_index[offsets[1:] - 1], role[offsets[1:] - 1] = n + np.arange(n), _USER
    history_turns = pc.list_flatten(pc.list_flatten(history))
    if len(history_turns):
        owner = np.repeat(np.arange(n), 2 * pairs)
        within = np.arange(len(history_turns)) - np.repeat(offsets_of(2 * pairs), 2 * pairs)
        at = offsets[owner] + has_system[owner] + within
        pool_index[at] = 2 * n + np.arange(len(history_turns))
        role[at] = np.where(within % 2 == 0, _USER, _ASSISTANT)
    pool = pa.concat_arrays([system.cast(pa.string()), user.cast(pa.string()), history_turns])
    messages = pa.StructArray.from_arrays(
        [_ROLES.take(pa.array(role)), pool.take(pa.array(pool_index))], fields=list(MESSAGE)
    )
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), messages, type=pa.list_(MESSAGE)
    )


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Exclusive prefix sums: where each row's items start in the flattened array."""
    return (
        np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    )
