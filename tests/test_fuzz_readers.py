"""Fuzzing pass over every ingest reader (#15): hostile bytes and structured mutations of
JSON arrays, JSON lines, CSV (MCQ too), Parquet, gzip/zstd input and ``datasets``
``save_to_disk`` folders (their ``state.json`` and ``dataset_dict.json``), in every format.

The property: reading a file either yields batches (kept rows plus rejected rows, each
rejection with a reason) or raises :class:`IngestError`, one line naming the file. Never
another exception (``KeyError``, ``UnicodeDecodeError``, ``RecursionError`` ...), never a
hang (bounded sizes and a per-example deadline).
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tempfile
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


def _check(path: Path, format_: str | None = None) -> IngestError | None:
    """The property: rows plus reasoned rejections, or one IngestError naming the file
    (returned)."""
    try:
        for result in read_source(path, format=format_, params=PARAMS):
            reasons = result.rejected.column("reject_reason").to_pylist()
            assert all(isinstance(r, str) and r for r in reasons), reasons
            assert result.stats["rows_read"] == result.kept.num_rows + result.rejected.num_rows
    except IngestError as exc:
        message = str(exc)
        assert "\n" not in message.strip(), message
        assert path.name in message, message
        return exc
    return None


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


# --- datasets save_to_disk folders --------------------------------------------------------

DATA_FILE = "data-00000-of-00001.arrow"


@pytest.fixture(scope="module")
def hf_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``DatasetDict.save_to_disk`` folder (train and test splits), the seed the
    metadata mutations start from."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path_factory.mktemp("hf") / "dd"
    split = datasets.Dataset.from_list([SEEDS["alpaca"], SEEDS["alpaca"]])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(folder))
    assert json.loads((folder / "dataset_dict.json").read_text()) == {"splits": ["train", "test"]}
    assert json.loads((folder / "train" / "state.json").read_text())["_data_files"] == [
        {"filename": DATA_FILE}
    ]
    return folder


def _hf_copy(seed: Path, tmp: Path) -> Path:
    """A fresh copy of the seed folder, named ``dd`` (one per example)."""
    return Path(shutil.copytree(seed, Path(tempfile.mkdtemp(dir=tmp)) / "dd"))


HOSTILE_NAMES = st.one_of(
    HOSTILE_VALUES,
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "train",
            "test",
            "valid",
            DATA_FILE,
            "../test/" + DATA_FILE,
            "../../etc/passwd",
            "/etc/passwd",
            "state.json",
            "dataset_info.json",
            "gone.arrow",
            "a\x00b",
            "\ud800",
            "x" * 5000,
        ]
    ),
)
JSON_VALUES = st.recursive(
    st.one_of(HOSTILE_NAMES, st.floats(allow_nan=False)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def dataset_dicts(draw: st.DrawFn) -> Any:
    """``dataset_dict.json`` documents: the real one with ``splits`` dropped or retyped, or
    its names hostile, or any JSON value."""
    kind = draw(st.sampled_from(["names", "splits", "any"]))
    if kind == "names":
        return {"splits": draw(st.lists(HOSTILE_NAMES, max_size=3))}
    if kind == "splits":
        return draw(st.one_of(st.just({}), st.builds(lambda v: {"splits": v}, JSON_VALUES)))
    return draw(JSON_VALUES)


@st.composite
def states(draw: st.DrawFn) -> Any:
    """``state.json`` documents: ``_data_files`` dropped or retyped, its entries without
    ``filename`` or with hostile names, or any JSON value."""
    kind = draw(st.sampled_from(["names", "entries", "files", "any"]))
    if kind == "names":
        names = draw(st.lists(HOSTILE_NAMES, max_size=3))
        files: Any = [{"filename": name} for name in names]
    elif kind == "entries":
        files = draw(st.lists(st.one_of(JSON_VALUES, st.just({"filename": DATA_FILE}))))
    elif kind == "files":
        files = draw(JSON_VALUES)
    else:
        return draw(JSON_VALUES)
    state = {"_data_files": files, "_fingerprint": "f", "_split": None}
    if draw(st.booleans()):
        del state["_data_files"]
    return state


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(
    top=st.one_of(st.none(), dataset_dicts().map(_json_bytes), BYTE_NOISE, TOKENS),
    state=st.one_of(st.none(), states().map(_json_bytes), BYTE_NOISE, TOKENS),
    split_folder=st.booleans(),
)
@example(top=b'["train"]', state=None, split_folder=False)
@example(top=b'{"splits": "train"}', state=None, split_folder=False)
@example(top=b'{"splits": [["train"]]}', state=None, split_folder=False)
@example(top=None, state=b'{"_data_files": [{}]}', split_folder=False)
@example(top=None, state=b'{"_data_files": {"filename": "x"}}', split_folder=False)
@example(top=None, state=b'{"_data_files": [{"filename": "../../etc/passwd"}]}', split_folder=True)
def test_hostile_save_to_disk(
    tmp_path: Path, hf_seed: Path, top: bytes | None, state: bytes | None, split_folder: bool
) -> None:
    """A real ``save_to_disk`` folder whose ``dataset_dict.json`` and ``train/state.json``
    are replaced (``None``: left as written), read from the folder or from its split."""
    folder = _hf_copy(hf_seed, tmp_path)
    if top is not None:
        (folder / "dataset_dict.json").write_bytes(top)
    if state is not None:
        (folder / "train" / "state.json").write_bytes(state)
    _check(folder / "train" if split_folder else folder)


@pytest.mark.parametrize(
    ("file", "text", "field", "message"),
    [
        ("dataset_dict.json", "{splits: [train]}", None, "cannot read: Expecting property name"),
        ("dataset_dict.json", '["train"]', None, "expected a JSON object, got a list"),
        ("dataset_dict.json", "{}", "splits", "expected a list of split names, got nothing"),
        ("dataset_dict.json", '{"splits": "train"}', "splits", "got a string"),
        ("dataset_dict.json", '{"splits": {"train": 1}}', "splits", "got an object"),
        ("dataset_dict.json", '{"splits": []}', "splits", "got an empty list"),
        ("dataset_dict.json", '{"splits": [1]}', "splits[0]", "got a number"),
        ("dataset_dict.json", '{"splits": ["../test"]}', "splits[0]", "got '../test'"),
        ("dataset_dict.json", '{"splits": ["valid"]}', "splits", "'valid' is listed but has no"),
        ("train/state.json", b"\xff\xfe{", None, "cannot read: 'utf-8' codec can't decode"),
        ("train/state.json", "null", None, "expected a JSON object, got null"),
        ("train/state.json", '{"_split": null}', "_data_files", "got nothing"),
        ("train/state.json", '{"_data_files": "x.arrow"}', "_data_files", "got a string"),
        ("train/state.json", '{"_data_files": []}', "_data_files", "got an empty list"),
        ("train/state.json", '{"_data_files": ["x"]}', "_data_files[0]", "got a string"),
        (
            "train/state.json",
            '{"_data_files": [{"name": "x.arrow"}]}',
            "_data_files[0].filename",
            "expected a file name in this folder, got nothing",
        ),
        (
            "train/state.json",
            '{"_data_files": [{"filename": ["x"]}]}',
            "_data_files[0].filename",
            "got a list",
        ),
        (
            "train/state.json",
            f'{{"_data_files": [{{"filename": "../test/{DATA_FILE}"}}]}}',
            "_data_files[0].filename",
            f"got '../test/{DATA_FILE}'",
        ),
        (
            "train/state.json",
            '{"_data_files": [{"filename": "/etc/passwd"}]}',
            "_data_files[0].filename",
            "got '/etc/passwd'",
        ),
        (
            "train/state.json",
            f'{{"_data_files": [{{"filename": "{DATA_FILE}"}}, {{"filename": "gone.arrow"}}]}}',
            "_data_files[1].filename",
            "data file 'gone.arrow' is listed but missing",
        ),
        (
            "train/state.json",
            '{"_data_files": [{"filename": "x\\u0000.arrow"}]}',
            "_data_files[0].filename",
            "got 'x\\x00.arrow'",
        ),
    ],
)
def test_damaged_save_to_disk_metadata(
    tmp_path: Path, hf_seed: Path, file: str, text: str | bytes, field: str | None, message: str
) -> None:
    """Each was a ``KeyError``, ``TypeError`` or ``AttributeError`` traceback, a read outside
    the folder, or an error that named neither the metadata file nor the field."""
    folder = _hf_copy(hf_seed, tmp_path)
    target = folder / file
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    error = _check(folder)
    assert error is not None
    assert (error.path, error.field) == (str(target), field)
    assert message in error.message, error.message


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
