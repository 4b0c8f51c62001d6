"""The canonical schema's validator names the column and the row of the first problem."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from transforms.ingest import read_source
from transforms.schema import MESSAGE, SCHEMA, SchemaError, validate


@pytest.fixture(scope="module")
def rows(shared_data: Path) -> pa.Table:
    """40 real GPTeacher tool-use rows as canonical rows (valid by construction)."""
    path = shared_data / "instructions" / "gpteacher_toolformer.json"
    table = next(iter(read_source(path))).kept.slice(0, 40)
    validate(table)
    return table


def replaced(table: pa.Table, name: str, values: list) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(
        index, table.schema.field(index), pa.array(values, SCHEMA.field(name).type)
    )


def test_valid_rows_pass_and_extra_stage_columns_are_allowed(rows: pa.Table) -> None:
    validate(rows.append_column("certainty", pa.array([0.5] * rows.num_rows)))


def test_a_missing_column_is_named(rows: pa.Table) -> None:
    with pytest.raises(SchemaError, match="column 'origin' is missing"):
        validate(rows.drop_columns(["origin"]))


def test_a_wrong_type_is_named(rows: pa.Table) -> None:
    index = rows.schema.get_field_index("source_index")
    as_text = rows.column("source_index").cast(pa.string())
    with pytest.raises(SchemaError, match="column 'source_index' has type string, expected int64"):
        validate(rows.set_column(index, "source_index", as_text))


def test_a_null_required_value_names_its_row(rows: pa.Table) -> None:
    responses = rows.column("response").to_pylist()
    responses[7] = None
    with pytest.raises(SchemaError, match=r"row 7, column 'response': value is required but null"):
        validate(replaced(rows, "response", responses))


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("task", "chat", r"row 12, column 'task': 'chat' is not one of instruction, mcq, open_qa"),
        ("origin", "scraped", r"row 12, column 'origin': 'scraped' is not one of corpus,"),
    ],
)
def test_an_unknown_task_or_origin_names_its_row(
    rows: pa.Table, column: str, value: str, message: str
) -> None:
    values = rows.column(column).to_pylist()
    values[12] = value
    with pytest.raises(SchemaError, match=message):
        validate(replaced(rows, column, values))


def test_an_unknown_role_names_its_row(rows: pa.Table) -> None:
    prompts = rows.column("prompt").to_pylist()
    prompts[25] = [*prompts[25], {"role": "narrator", "content": "meanwhile"}]
    table = rows.set_column(
        rows.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.list_(MESSAGE))
    )
    with pytest.raises(SchemaError, match=r"row 25, column 'prompt': role 'narrator' is not one"):
        validate(table)
