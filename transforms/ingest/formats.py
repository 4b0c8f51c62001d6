"""The corpus formats: their required columns, detection, and their adapters.

A format is detected from the column names of a file's first record (CSV header, Parquet
or Arrow schema, first JSON object); the first format, in :data:`DETECTION_ORDER`, whose
required columns are all present wins. ``alpaca`` and ``self_instruct`` are built by the
vectorised :mod:`~transforms.ingest.alpaca`; the others by a per-record adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transforms.ingest import chat, qa
from transforms.ingest.params import IngestParams
from transforms.ingest.readers import SourceFile, open_source, peek_columns

FORMATS = (
    "alpaca",
    "sharegpt",
    "messages",
    "prompt_completion",
    "mcq_csv",
    "open_qa",
    "self_instruct",
)
DETECTION_ORDER = (
    "sharegpt",
    "messages",
    "prompt_completion",
    "self_instruct",
    "alpaca",
    "mcq_csv",
    "open_qa",
)
"""More specific formats first: a Self-Instruct task also has an ``instruction``."""

VECTORISED = frozenset({"alpaca", "self_instruct"})
TASKS = {"mcq_csv": "mcq", "open_qa": "open_qa"}
"""Canonical ``task`` of each format; the others are ``instruction``."""

RowAdapter = Callable[[Any, IngestParams], dict[str, Any]]
ROW_ADAPTERS: dict[str, RowAdapter] = {
    "sharegpt": chat.sharegpt_row,
    "messages": chat.messages_row,
    "prompt_completion": chat.prompt_completion_row,
    "mcq_csv": qa.mcq_row,
    "open_qa": qa.open_qa_row,
}
"""Per-record adapters: a record → the row's fields, or :class:`RowReject`."""


def task_of(format_: str) -> str:
    """The canonical task of a format's rows."""
    return TASKS.get(format_, "instruction")


def required_columns(format_: str, params: IngestParams) -> tuple[str, ...]:
    """The columns a file of ``format_`` must have."""
    return {
        "alpaca": ("instruction", "output"),
        "sharegpt": (params.sharegpt_tags.messages,),
        "messages": ("messages",),
        "prompt_completion": ("prompt", "completion"),
        "mcq_csv": ("question", *qa.LETTERS, "target"),
        "open_qa": ("question", "answers"),
        "self_instruct": ("instruction", "instances"),
    }[format_]


def format_of_columns(columns: list[str], params: IngestParams) -> str | None:
    """The first format whose required columns are all in ``columns``."""
    present = set(columns)
    for format_ in DETECTION_ORDER:
        if present.issuperset(required_columns(format_, params)):
            return format_
    return None


def detect_format(path: str | Path, *, params: IngestParams | None = None) -> str:
    """The format of a corpus file, from the column names of its first record.

    Raises:
        IngestError: the file cannot be read, holds no record, or its columns match no format
            (the message lists the columns it saw).
    """
    file = open_source(path)
    format_ = detect(file, params or IngestParams())
    if format_ is None:
        raise file.error("no records to detect the format from; give the format explicitly")
    return format_


def detect(file: SourceFile, params: IngestParams) -> str | None:
    """:func:`detect_format` for an opened file; ``None`` when it holds no record (within
    the bounds)."""
    found = peek_columns(file, params.bounds)
    if found is None:
        return None
    columns, location = found
    format_ = format_of_columns(columns, params)
    if format_ is None:
        expected = "; ".join(
            f"{f}: {', '.join(required_columns(f, params))}" for f in DETECTION_ORDER
        )
        seen = ", ".join(columns) or "(none)"
        raise file.error(
            f"unknown format: columns are {seen}; expected one of {expected}", location=location
        )
    return format_


def check_columns(file: SourceFile, format_: str, params: IngestParams) -> None:
    """Check that a file given an explicit format has that format's required columns.

    Raises:
        IngestError: naming the first missing field. A file without records passes.
    """
    found = peek_columns(file, params.bounds)
    if found is None:
        return
    columns, location = found
    for name in required_columns(format_, params):
        if name not in columns:
            raise file.error(
                f"required by format {format_!r} but absent (columns: {', '.join(columns)})",
                location=location,
                field=name,
            )
