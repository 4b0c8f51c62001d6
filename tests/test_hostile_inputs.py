"""Hostile and careless inputs through the real ``aligncurate build`` CLI (issue #15).

Each case is data: the files of one build and what must come of it. A case that cannot be
read fails the build with exit code 2 and one ``error:`` line naming the file (and the line,
where there is one), and commits no version. A record past the bounds (nesting depth,
size) is a row-level problem: the build commits, with the row in the ``rejected`` split.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from corpora import enlarged_gsm8k
from typer.testing import CliRunner

from pipelines.build import build_dataset
from pipelines.cli import app
from storage.dataset import DatasetStore, StoreError
from transforms.ingest.readers import SourceFile

pytestmark = pytest.mark.usefixtures("prefect_harness")

GOOD = {"instruction": "What is 2 + 2?", "output": "4"}
OTHER = {"instruction": "What is 3 + 3?", "output": "6"}
DEEP = 5_000


def jsonl(*records: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def nested(depth: int) -> bytes:
    """JSON text of a list nested ``depth`` deep."""
    return b"[" * depth + b"]" * depth


def raw(fields: dict[str, Any], **deep: bytes) -> bytes:
    """A JSON object's text: ``fields`` encoded, then ``deep`` values as given."""
    pairs = [json.dumps({k: v}).encode()[1:-1] for k, v in fields.items()]
    pairs += [json.dumps(k).encode() + b": " + v for k, v in deep.items()]
    return b"{" + b", ".join(pairs) + b"}"


def zstd(data: bytes) -> bytes:
    stream = pa.BufferOutputStream()
    with pa.CompressedOutputStream(stream, "zstd") as out:
        out.write(data)
    return stream.getvalue().to_pybytes()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


DEEP_OUTPUT = raw({"instruction": "x"}, output=nested(DEEP))
MANY = jsonl(*({"instruction": f"question {i}", "output": "answer " * 8} for i in range(20_000)))


@dataclass(frozen=True)
class Case:
    """One build: ``files`` (name → bytes; each a source) and the expected outcome."""

    name: str
    files: dict[str, bytes]
    error: str | None = None
    """The build fails: its one error line holds this text (and names the file)."""
    line: int | None = None
    """... and this line of the file."""
    rejected: dict[str, int] = field(default_factory=dict)
    """The build commits, with these reject reasons (reason → rows)."""
    train: int = 0
    spec: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case(
        "deep_json_400kb",  # 22 GB resident, then killed, before #15
        {"deep.json": b"[" * 200_000 + b"]" * 200_000},
        rejected={"too_deep:record": 1},
    ),
    Case(
        "deep_json_field",
        {"deep.json": b"[%s,\n%s,\n%s]" % (jsonl(GOOD)[:-1], DEEP_OUTPUT, jsonl(OTHER)[:-1])},
        rejected={"too_deep:output": 1},
        train=2,
    ),
    Case(
        "deep_jsonl",  # a RecursionError traceback naming no file before #15
        {"deep.jsonl": jsonl(GOOD) + raw({"output": "x"}, instruction=nested(DEEP)) + b"\n"},
        rejected={"too_deep:instruction": 1},
        train=1,
    ),
    Case(
        "deep_other_key_jsonl",  # a key alpaca does not read: Arrow would skip it unchecked
        {"deep.jsonl": jsonl(GOOD) + raw(GOOD, extra=nested(DEEP)) + b"\n" + jsonl(OTHER)},
        rejected={"too_deep:extra": 1},
        train=2,
    ),
    Case(
        "deep_history_jsonl",  # deeper than the history type: Arrow's schema does not bound it
        {"deep.jsonl": jsonl(GOOD) + raw(OTHER, history=nested(DEEP)) + b"\n"},
        rejected={"too_deep:history": 1},
        train=1,
    ),
    Case(
        "deep_sharegpt_jsonl",
        {"chat.jsonl": raw({}, conversations=nested(DEEP)) + b"\n"},
        rejected={"too_deep:conversations": 1},
    ),
    Case(
        "huge_value_jsonl",
        {"huge.jsonl": jsonl(GOOD, {**GOOD, "output": "x" * 300_000})},
        rejected={"too_large:record": 1},
        train=1,
        spec={"ingest": {"max_record_bytes": 100_000}},
    ),
    Case(
        "huge_value_json",
        {"huge.json": json.dumps([GOOD, {**GOOD, "output": "x" * 300_000}]).encode()},
        rejected={"too_large:record": 1},
        train=1,
        spec={"ingest": {"max_record_bytes": 100_000}},
    ),
    Case(
        "huge_csv_field",
        {"mmlu.csv": b"question,A,B,C,D,target\nq,a,b,c,d,A\nq," + b"a" * 300_000 + b",b,c,d,A\n"},
        error="a field is longer than 100,000 characters",
        line=3,
        spec={"ingest": {"max_record_bytes": 100_000}},
    ),
    Case(
        "header_only_csv",  # committed an empty `latest` before #15
        {"mmlu.csv": b"question,A,B,C,D,target\n"},
        error="no rows to build from",
    ),
    Case("empty_jsonl", {"empty.jsonl": b"\n"}, error="no rows to build from"),
    Case("empty_json_array", {"empty.json": b"[ ]"}, error="no rows to build from"),
    Case(
        "nul_in_a_string",
        {"nul.jsonl": jsonl(GOOD) + b'{"instruction": "a\x00b", "output": "c"}\n'},
        error="invalid JSON: Invalid control character",
        line=2,
    ),
    Case(
        "nul_between_records",
        {"nul.jsonl": jsonl(GOOD) + b"\x00\x00\n" + jsonl(GOOD)},
        error="invalid JSON: Expecting value",
        line=2,
    ),
    Case(
        "bom_at_start_is_dropped",
        {"bom.jsonl": b"\xef\xbb\xbf" + jsonl(GOOD)},
        train=1,
    ),
    Case(
        "bom_inside_a_file",
        {"bom.jsonl": jsonl(GOOD) + b"\xef\xbb\xbf" + jsonl(GOOD)},
        error="Unexpected UTF-8 BOM",
        line=2,
    ),
    Case(
        "bom_inside_a_json_array",
        {"bom.json": b'[{"instruction": "a", "output": "b"},\n\xef\xbb\xbf{"x": 1}]'},
        error="invalid JSON",
        line=2,
    ),
    Case(
        "truncated_gzip_array",
        {"cut.json.gz": half(gzip.compress(json.dumps([GOOD] * 20_000, indent=1).encode()))},
        error="cannot read",
        line=None,  # the line reached depends on zlib's blocks: checked to be a line below
    ),
    Case("truncated_zstd_jsonl", {"cut.jsonl.zst": half(zstd(MANY))}, error="cannot read"),
    Case("gzip_is_read_and_fingerprinted", {"ok.jsonl.gz": gzip.compress(MANY)}, train=20_000),
    Case("zstd_is_read_and_fingerprinted", {"ok.jsonl.zst": zstd(MANY)}, train=20_000),
]


runner = CliRunner()


def write_case(folder: Path, case: Case) -> Path:
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    spec = {"name": case.name.replace("_", "-"), "sources": [{"path": n} for n in case.files]}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, **case.spec}))
    return path


@contextmanager
def console_into(buffer: io.StringIO) -> Iterator[None]:
    """Prefect's console handlers write to ``buffer`` (they hold the stderr of the session's
    start, which the runner does not capture)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    with ExitStack() as stack:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, PrefectConsoleHandler):
                stack.callback(setattr, handler.console, "file", handler.console.file)
                handler.console.file = buffer
        yield


def build(spec: Path, store: Path) -> tuple[int, str, str]:
    """The build's exit code, stdout, and stderr: the CLI's, then what Prefect's console
    handlers printed during the build."""
    console = io.StringIO()
    with console_into(console):
        result = runner.invoke(app, ["build", str(spec), "--store", str(store), "--json"])
    return result.exit_code, result.stdout, result.stderr + console.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_fails(code: int, stderr: str, files: list[str], text: str, line: int | None) -> str:
    """Exit code 2, no traceback, and one ``error:`` line that names a file of ``files`` and
    holds ``text`` (and ``line N``, or some line when the case names none but a line is
    expected)."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (message,) = error_lines(stderr)
    assert any(name in message for name in files), message
    assert text in message, message
    if line is not None:
        assert f": line {line}: " in message, message
    return message


def assert_no_version(store: Path, name: str) -> None:
    with pytest.raises(StoreError):
        DatasetStore(str(store)).versions(name)


def reject_reasons(store: Path, name: str) -> dict[str, int]:
    rejected = DatasetStore(str(store)).read(f"{name}@0", "rejected")
    counts = pc.value_counts(rejected.column("reject_reason")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(tmp_path: Path, case: Case) -> None:
    spec = write_case(tmp_path, case)
    store = tmp_path / "store"
    code, out, err = build(spec, store)
    name = case.name.replace("_", "-")
    if case.error is not None:
        message = assert_fails(code, err, list(case.files), case.error, case.line)
        if "cannot read" in case.error:
            assert ": line " in message, message
        assert_no_version(store, name)
        return
    assert code == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["version"] == 0
    assert summary["rows"]["train"] == case.train
    assert reject_reasons(store, name) == case.rejected


def test_deep_nesting_alone_commits_a_version_that_warns(tmp_path: Path) -> None:
    """Every row rejected: the version is committed, and its summary warns of 0 train rows."""
    (case,) = [c for c in CASES if c.name == "deep_json_400kb"]
    summary = build_dataset(str(write_case(tmp_path, case)), store=str(tmp_path / "store"))
    assert summary["rows"] == {"in": 1, "generated": 0, "train": 0, "rejected": 1}
    assert summary["warnings"] == ["0 train rows: the version holds only 1 rejected rows"]


def test_allow_empty_commits_an_empty_version(tmp_path: Path) -> None:
    (case,) = [c for c in CASES if c.name == "header_only_csv"]
    allowed = Case(case.name, case.files, spec={"allow_empty": True})
    summary = build_dataset(str(write_case(tmp_path, allowed)), store=str(tmp_path / "store"))
    assert (summary["version"], summary["rows"]["in"], summary["rows"]["train"]) == (0, 0, 0)
    assert summary["warnings"] == ["0 train rows: the version holds only 0 rejected rows"]
    (tmp_path / "spec.yaml").write_text(
        yaml.safe_dump({"name": "x", "sources": [{"path": "mmlu.csv"}], "allow_empty": "yes"})
    )
    code, _, err = build(tmp_path / "spec.yaml", tmp_path / "store")
    assert code == 2 and "allow_empty" in error_lines(err)[0]


class AppendOnFirstBigRead:
    """A reader's stream that runs ``action`` right after its first large read returns:
    the file changes while the build reads it, at the same point every run."""

    def __init__(self, stream: BinaryIO, action: Callable[[], None]) -> None:
        self.stream = stream
        self.action: Callable[[], None] | None = action

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.action is not None and size >= 1 << 20:  # the build's read, not detection's
            self.action, action = None, self.action
            action()
        return data

    def __enter__(self) -> AppendOnFirstBigRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()


@pytest.fixture
def appended_mid_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_data: Path
) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A 15,146-line JSONL source that gains 500 lines once its read has begun, and a
    function that restores it (as in the issue's report)."""
    source = enlarged_gsm8k(shared_data, tmp_path / "gsm8k.jsonl", 15_146)
    original = source.read_bytes()
    extra = enlarged_gsm8k(shared_data, tmp_path / "extra.jsonl", 500, start=15_146)
    real_open = SourceFile.open_bytes

    def append() -> None:
        with source.open("ab") as out:
            out.write(extra.read_bytes())

    def hooked(self: SourceFile, *args: Any, **kwargs: Any) -> Any:
        stream = real_open(self, *args, **kwargs)
        return AppendOnFirstBigRead(stream, append) if self.path == source else stream

    monkeypatch.setattr(SourceFile, "open_bytes", hooked)
    yield source, lambda: (monkeypatch.undo(), source.write_bytes(original))


def test_a_source_changed_mid_read_fails_and_caches_nothing(
    tmp_path: Path, appended_mid_read: tuple[Path, Callable[[], None]]
) -> None:
    source, restore = appended_mid_read
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "changing", "sources": [{"path": source.name}]}))
    store = tmp_path / "store"
    code, _, err = build(spec, store)
    assert_fails(code, err, [source.name], "changed while it was read", None)
    assert len(source.read_bytes().splitlines()) == 15_646  # the append did happen
    assert_no_version(store, "changing")

    restore()  # the file as fingerprinted: the rebuild reads it, with no poisoned cache
    code, out, err = build(spec, store)
    assert code == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["rows"]["in"] == 15_146
    assert DatasetStore(str(store)).versions("changing")[0].metadata["rows"]["in"] == 15_146
