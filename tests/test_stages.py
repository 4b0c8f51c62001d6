"""The foundation stages on real rows: normalize, exact_dedup, filter."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from transforms.dedup import ExactDedupParams, exact_dedup
from transforms.filters import FilterParams, filter_rows
from transforms.ids import row_ids
from transforms.ingest import read_source
from transforms.normalize import NormalizeParams, normalize
from transforms.schema import REJECTED_SCHEMA, validate
from transforms.text import prompt_chars


@pytest.fixture(scope="module")
def gsm8k(shared_data: Path) -> pa.Table:
    """The first 500 GSM8K rows as canonical rows."""
    path = shared_data / "instructions" / "gsm8k_train_alpaca.json"
    return next(iter(read_source(path))).kept.slice(0, 500)


def with_text(table: pa.Table, prompts: list[str], responses: list[str]) -> pa.Table:
    """``table``'s first rows with their user turn and response replaced."""
    n = len(prompts)
    head = table.slice(0, n)
    prompt = pa.array(
        [[{"role": "user", "content": p}] for p in prompts], head.schema.field("prompt").type
    )
    head = head.set_column(head.schema.get_field_index("prompt"), "prompt", prompt)
    head = head.set_column(
        head.schema.get_field_index("response"), "response", pa.array(responses, pa.string())
    )
    ids = row_ids(head.column("source"), head.column("prompt"), head.column("response"))
    return head.set_column(head.schema.get_field_index("id"), "id", ids)


def test_normalize_nfc_control_chars_and_whitespace(gsm8k: pa.Table) -> None:
    table = with_text(gsm8k, ["  Cafe\u0301 bill?\x07 ", "plain"], ["\x00 e\u0301 \n", "ok"])
    out = normalize(table, NormalizeParams())
    assert out.rejected.num_rows == 0
    rows = out.kept.to_pylist()
    assert rows[0]["prompt"][0]["content"] == "Café bill?"
    assert rows[0]["response"] == "é"
    assert rows[1] == table.slice(1, 1).to_pylist()[0]  # unchanged row keeps its id
    assert rows[0]["id"] != table.column("id")[0].as_py()
    assert (
        rows[0]["id"]
        == row_ids(
            out.kept.column("source"), out.kept.column("prompt"), out.kept.column("response")
        )[0].as_py()
    )
    off = normalize(table, NormalizeParams(nfc=False, strip_control=False, trim=False)).kept
    assert off.column("response").to_pylist() == table.column("response").to_pylist()


def test_normalize_leaves_clean_real_rows_untouched(gsm8k: pa.Table) -> None:
    out = normalize(gsm8k, NormalizeParams()).kept
    assert out.column("id").to_pylist() == gsm8k.column("id").to_pylist()
    validate(out)


def test_exact_dedup_within_and_across_shards(gsm8k: pa.Table) -> None:
    seen: dict[str, str] = {}
    first = exact_dedup(gsm8k.slice(0, 300), ExactDedupParams(), seen)
    assert first.kept.num_rows == 300 and first.rejected.num_rows == 0
    shard = pa.concat_tables([gsm8k.slice(250, 100), gsm8k.slice(340, 10)])  # 50 old + 10 repeats
    second = exact_dedup(shard, ExactDedupParams(), seen)
    assert second.counts(110) == {"in": 110, "kept": 50, "rejected": 60, "added": 0}
    assert second.rejected.schema.names == REJECTED_SCHEMA.names
    ids = set(gsm8k.column("id").to_pylist())
    reasons = second.rejected.column("reject_reason").to_pylist()
    assert all(r.startswith("duplicate_of:") and r.split(":", 1)[1] in ids for r in reasons)
    assert set(second.rejected.column("reject_stage").to_pylist()) == {"exact_dedup"}


def test_filter_reasons_in_rule_order(gsm8k: pa.Table) -> None:
    table = with_text(
        gsm8k,
        ["q1", "", "q3", "q4 \ufffd", "q5"],
        ["", "answer", "x" * 200, "fine", "fine"],
    )
    out = filter_rows(table, FilterParams(max_chars=100))
    assert out.kept.column("prompt").to_pylist()[0][0]["content"] == "q5"
    assert out.rejected.column("reject_reason").to_pylist() == [
        "empty_response",
        "empty_prompt",
        "too_long:chars>100",
        "invalid_text",
    ]
    relaxed = filter_rows(
        table,
        FilterParams(empty_response=False, empty_prompt=False, max_chars=None, invalid_text=False),
    )
    assert relaxed.kept.num_rows == 5


def test_filter_keeps_real_rows_and_accounts(gsm8k: pa.Table) -> None:
    out = filter_rows(gsm8k, FilterParams(max_chars=600))
    lengths = pc.add(pc.utf8_length(gsm8k.column("response")), prompt_chars(gsm8k["prompt"]))
    assert out.rejected.num_rows == pc.sum(pc.greater(lengths, 600)).as_py() > 0
    assert out.counts(500)["kept"] + out.rejected.num_rows == 500
