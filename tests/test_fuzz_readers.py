"""Fuzzing pass over every ingest reader (#15): hostile bytes and structured mutations of
JSON arrays, JSON lines, CSV (MCQ too), Parquet and gzip/zstd input, in every format.

The property: reading a file either yields batches (kept rows plus rejected rows, each
rejection with a reason) or raises :class:`IngestError`, one line naming the file. Never
another exception (``KeyError``, ``UnicodeDecodeError``, ``RecursionError`` ...), never a
hang (bounded sizes and a per-example deadline).
"""

from __future__ import annotations

import gzip
import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from transforms.ingest import FORMATS, IngestError, IngestParams, read_source

pytestmark = pytest.mark.fast

FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
PARAMS = IngestParams()

#: Records of each format, the seeds the mutations start from.
SEEDS: dict[str, dict[str, Any]] = {
    "alpaca": {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    "sharegpt": {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    },
    "messages": {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    },
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "mcq_csv": {"question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d", "target": "A"},
    "open_qa": {"question": "who?", "answers": ["me", "you"]},
    "self_instruct": {
        "instruction": "Say hi.",
        "instances": [{"input": "", "output": "hi"}],
    },
}

HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.just("\x00"),
    st.just("\ufeff"),
    st.just("\ud800"),
    st.just("ISTRUE"),
    st.just("{[1]: 2}"),
    st.just("[" * 5000 + "]" * 5000),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.recursive(st.none(), lambda c: st.lists(c, max_size=2), max_leaves=40),
)


def _check(path: Path, format_: str | None = None) -> None:
    """The property: rows plus reasoned rejections, or one IngestError naming the file."""
    try:
        for result in read_source(path, format=format_, params=PARAMS):
            reasons = result.rejected.column("reject_reason").to_pylist()
            assert all(isinstance(r, str) and r for r in reasons), reasons
            assert result.stats["rows_read"] == result.kept.num_rows + result.rejected.num_rows
    except IngestError as exc:
        message = str(exc)
        assert "\n" not in message.strip(), message
        assert path.name in message, message


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


# --- hostile bytes -------------------------------------------------------------------------

BYTE_NOISE = st.binary(max_size=300)
SPECIALS = st.sampled_from(
    [b"", b"\x00", b"\xef\xbb\xbf", b"\xff\xfe", b"\r", b"\r\n", b"\n", b'"', b"\\", b"[", b"{"]
)
#: Bytes built from JSON-ish tokens, hostile pieces included, so that parsers get past byte 0.
TOKENS = st.lists(
    st.sampled_from(
        [
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b":",
            b'"',
            b'"instruction"',
            b'"output"',
            b'"messages"',
            b'"question"',
            b'"answers"',
            b'"a"',
            b"1e999999",
            b"-0",
            b"123456789012345678901234567890",
            b"1" * 5000,
            b"null",
            b"true",
            b"\\u0000",
            b"\\ud800",
            b"\xff",
            b"\xc3",
            b"\x00",
            b"\xef\xbb\xbf",
            b"\r",
            b"\n",
            b" ",
        ]
    ),
    max_size=80,
).map(b"".join)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
@FUZZ
@given(data=st.one_of(BYTE_NOISE, TOKENS), prefix=SPECIALS)
@example(data=b'{"instruction": "a", "output": "b"}\r{"a": 1}\r', prefix=b"\xef\xbb\xbf")
@example(data=b'[{"instruction": "a", "output": "b"', prefix=b"")
@example(data=b'{"instruction": "\xff", "output": "b"}\n', prefix=b"")
@example(data=b'{"instruction": "a\x00", "output": "b", "output": 1}\n', prefix=b"")
@example(data=b'question,A,B,C,D,target\n"unterminated,a,b,c,d,A\n', prefix=b"")
@example(data=b"question,A,B,C,D,target\r\xff,a,b,c,d,A\r", prefix=b"\xef\xbb\xbf")
@example(data=b"[" * 3000 + b"]" * 3000, prefix=b"")
@example(data=b'{"instruction": ' + b"[" * 3000 + b"]" * 3000 + b"}\n", prefix=b"")
def test_hostile_bytes(tmp_path: Path, suffix: str, data: bytes, prefix: bytes) -> None:
    _check(_write(tmp_path, "fuzz" + suffix, prefix + data))


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".json.gz", ".csv.gz"])
@FUZZ
@given(data=st.one_of(BYTE_NOISE, TOKENS), cut=st.integers(min_value=0, max_value=400))
@example(data=b'{"instruction": "a", "output": "b"}\n' * 5, cut=20)
def test_hostile_compressed(tmp_path: Path, suffix: str, data: bytes, cut: int) -> None:
    """Compressed noise, and valid compression truncated at any byte."""
    packed = gzip.compress(data) if suffix.endswith(".gz") else zstandard.compress(data)
    _check(_write(tmp_path, "fuzz" + suffix, packed[:cut] if cut < len(packed) else packed))
    _check(_write(tmp_path, "noise" + suffix, data))


# --- structured mutations ------------------------------------------------------------------


def _mutate(record: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    record = dict(record)
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=3, unique=True)):
        action = draw(st.sampled_from(["drop", "replace", "nest"]))
        if action == "drop":
            del record[key]
        elif action == "replace":
            record[key] = draw(HOSTILE_VALUES)
        else:
            record[key] = [[record[key]]]
    return record


@st.composite
def records(draw: st.DrawFn, format_: str) -> list[Any]:
    seed = SEEDS[format_]
    rows: list[Any] = [seed]
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        rows.append(_mutate(seed, draw) if draw(st.booleans()) else draw(HOSTILE_VALUES))
    return rows


def _json_text(rows: list[Any], lines: bool) -> bytes:
    if lines:
        text = "\n".join(json.dumps(r, allow_nan=True) for r in rows) + "\n"
    else:
        text = json.dumps(rows, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("format_", FORMATS)
@FUZZ
@given(data=st.data(), lines=st.booleans(), cut=st.integers(min_value=0, max_value=30))
def test_structured_json(tmp_path: Path, format_: str, data: st.DataObject, lines: bool, cut: int):
    """Seed records with fields dropped, retyped or nested, as a JSON array or JSON lines,
    the file truncated by ``cut`` bytes; with the format given and detected."""
    rows = data.draw(records(format_))
    raw = _json_text(rows, lines)
    raw = raw[: len(raw) - cut] if cut else raw
    path = _write(tmp_path, "fuzz.jsonl" if lines else "fuzz.json", raw)
    _check(path, format_)
    _check(path)


def _csv_bytes(rows: list[Any], columns: list[str]) -> bytes:
    out = io.StringIO()
    out.write(",".join(columns) + "\n")
    for row in rows:
        values = [row.get(c, "") if isinstance(row, dict) else row for c in columns]
        out.write(",".join('"' + str(v).replace('"', '""') + '"' for v in values) + "\n")
    return out.getvalue().encode("utf-8", "surrogatepass")


@FUZZ
@given(data=st.data(), cut=st.integers(min_value=0, max_value=30), crlf=st.booleans())
def test_structured_csv(tmp_path: Path, data: st.DataObject, cut: int, crlf: bool) -> None:
    rows = data.draw(records("mcq_csv"))
    raw = _csv_bytes(rows, list(SEEDS["mcq_csv"]))
    raw = raw.replace(b"\n", b"\r") if crlf else raw
    raw = raw[: len(raw) - cut] if cut else raw
    path = _write(tmp_path, "fuzz.csv", raw)
    _check(path, "mcq_csv")
    _check(path)


@pytest.mark.parametrize("format_", FORMATS)
@FUZZ
@given(data=st.data())
def test_structured_parquet(tmp_path: Path, format_: str, data: st.DataObject) -> None:
    """Columns of the right names whose values are of any type Arrow can store."""
    rows = [r if isinstance(r, dict) else {"x": r} for r in data.draw(records(format_))]
    column_values = {key: [row.get(key) for row in rows] for row in rows for key in row}
    arrays = {}
    for key, values in column_values.items():
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            arrays[key] = pa.array([json.dumps(v, allow_nan=True) for v in values])
    path = tmp_path / "fuzz.parquet"
    pq.write_table(pa.table(arrays), path)
    _check(path, format_)
    _check(path)
    # The same file truncated: a damaged footer is a file-level error.
    raw = path.read_bytes()
    _check(_write(tmp_path, "cut.parquet", raw[: data.draw(st.integers(0, len(raw) - 1))]))


# --- regressions the fuzzing found -----------------------------------------------------------

DEEP_TEXT = "[" * 100_000 + "]" * 100_000
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        # An integer literal past Python's 4300 digits: ValueError from json.loads.
        (
            "int.jsonl",
            b'{"instruction": "a", "output": ' + b"1" * 5000 + b"}\n",
            "too_large:number",
        ),
        ("int.json", b'[{"instruction": "a", "output": ' + b"1" * 5000 + b"}]", "too_large:number"),
        # NQ's answers as Python-literal text with an unhashable member: TypeError.
        (
            "qa.jsonl",
            json.dumps({"question": "q", "answers": "{[1]: 2}"}).encode(),
            "wrong_type:answers",
        ),
        ("qa.csv", b'question,answers\nq,"{[1]: 2}"\n', "wrong_type:answers"),
        # JSON *text* nested deep inside a string field: RecursionError from json.loads.
        (
            "tools.jsonl",
            json.dumps({"messages": CHAT, "tools": DEEP_TEXT}).encode(),
            "invalid_json:tools",
        ),
        (
            "call.jsonl",
            json.dumps(
                {
                    "conversations": [
                        {"from": "human", "value": "hi"},
                        {"from": "function_call", "value": DEEP_TEXT},
                    ]
                }
            ).encode(),
            "invalid_tool_call:conversations.value",
        ),
    ],
)
def test_fuzz_regressions(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    """Each was an uncaught exception; now the row is rejected with a reason."""
    results = list(read_source(_write(tmp_path, name, data)))
    reasons = [r for result in results for r in result.rejected.column("reject_reason").to_pylist()]
    assert reasons == [reason]
    assert sum(result.kept.num_rows for result in results) == 0
