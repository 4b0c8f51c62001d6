"""Preference, KTO and CUT exports of judged responses (the ``judge`` stage's rows).

A judged row has ``judgment_ok`` set; its prompt row is ``lineage_parents[0]``. Rows are
grouped by prompt row, in the order they are stored.

- ``trl_preference``: TRL's conversational preference type (DPO, ORPO, …), one JSON line
  ``{"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}`` per response
  judged *not ok*; ``chosen`` cycles through the responses judged ok, or is the gold
  reference (``references[0]``) when there is none. A prompt with no negative response
  yields no pair and is counted in the manifest (``skipped_reasons``), so is one with
  neither a positive response nor a reference.
- ``trl_kto``: TRL's conversational unpaired preference type (KTO), one line
  ``{"prompt": [messages], "completion": [assistant], "label": bool}`` per judged response.
- ``cut``: the layout of the CUT code's training files (``data/iter/*.json``): a JSON list of
  ``{"id", "instruction", "input", "output", "judgment", "label"}``, ``judgment`` null for
  an aligned response (the CUT loader reads a non-null judgment as negative) and
  ``label`` ``"aligned"``/``"misaligned"``; ``row_id`` is our row id.
- ``llamafactory_preference``: LLaMA-Factory's sharegpt ranking format, a JSON list of
  ``{"conversations", "chosen": {from, value}, "rejected": {from, value}, "system", "tools"}``
  (pairs as for ``trl_preference``), with a ``dataset_info.json`` entry ``"ranking": true``.
"""

from __future__ import annotations

import importlib
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from storage.names import StoreError

PREFERENCE_FORMATS = ("trl_preference", "trl_kto", "cut", "llamafactory_preference")
LIST_FORMATS = ("cut", "llamafactory_preference")
"""Formats written as one JSON list (the others as JSON lines)."""
NO_NEGATIVE = "no negative response"
NO_CHOSEN = "no positive response and no reference"
_COLUMNS = (
    "id",
    "prompt",
    "tools",
    "response",
    "references",
    "judgment",
    "judgment_ok",
    "lineage_parents",
)

Row = dict[str, Any]


def _export_module() -> Any:
    """:mod:`storage.export` (it imports this module; ``storage.export`` the attribute is the
    ``export`` function, so look the module up by name)."""
    return importlib.import_module("storage.export")


def judged_groups(batches: Iterable[pa.RecordBatch]) -> list[list[Row]]:
    """Judged rows grouped by prompt row, groups and rows in stored order.

    Raises:
        StoreError: the version holds no judged rows (no ``judge`` stage ran).
    """
    groups: dict[str, list[Row]] = {}
    for batch in batches:
        if "judgment_ok" not in batch.schema.names:
            continue
        for row in batch.select([c for c in _COLUMNS if c in batch.schema.names]).to_pylist():
            if row.get("judgment_ok") is None:
                continue
            parents = row.get("lineage_parents") or [row["id"]]
            groups.setdefault(parents[0], []).append(row)
    if not groups:
        raise StoreError(
            "no judged rows in this version: preference, KTO and CUT exports need the judge stage"
        )
    return list(groups.values())


def _pairs(group: list[Row], skipped: Counter[str]) -> list[tuple[Row, str, str]]:
    """(prompt row, chosen, rejected) for one prompt."""
    bad = [r for r in group if not r["judgment_ok"]]
    good = [r["response"] for r in group if r["judgment_ok"]]
    if not bad:
        skipped[NO_NEGATIVE] += 1
        return []
    chosen = good or [r for r in (group[0].get("references") or []) if r][:1]
    if not chosen:
        skipped[NO_CHOSEN] += 1
        return []
    return [(r, chosen[i % len(chosen)], r["response"]) for i, r in enumerate(bad)]


def _assistant(text: str) -> list[Row]:
    return [{"role": "assistant", "content": text}]


def preference_records(
    fmt: str, batches: Iterable[pa.RecordBatch], skipped: Counter[str]
) -> Iterator[Row]:
    """The records of one preference format; unrepresentable prompts are counted."""
    ex = _export_module()

    def trl_prompt(row: Row) -> Row:
        return ex._with_tools({"prompt": ex._trl_turns(row["prompt"])}, row)

    def sharegpt(row: Row, chosen: str, rejected: str) -> Row:
        record = ex._sharegpt({**row, "response": chosen})
        return {
            "conversations": record["conversations"][:-1],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
            "system": record["system"],
            "tools": record["tools"],
        }

    numbers = itertools.count()
    for group in judged_groups(batches):
        try:
            if fmt == "trl_kto":
                for row in group:
                    completion = {"completion": _assistant(row["response"])}
                    yield {**trl_prompt(row), **completion, "label": bool(row["judgment_ok"])}
            elif fmt == "cut":
                for row in group:
                    yield _cut(next(numbers), row)
            else:
                for row, chosen, rejected in _pairs(group, skipped):
                    if fmt == "trl_preference":
                        yield {
                            **trl_prompt(row),
                            "chosen": _assistant(chosen),
                            "rejected": _assistant(rejected),
                        }
                    else:
                        yield sharegpt(row, chosen, rejected)
        except ex._Skip as reason:
            skipped[str(reason)] += 1


def _cut(number: int, row: Row) -> Row:
    ex = _export_module()

    turns = [t for t in row["prompt"] if t["role"] != "system"]
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise ex._Skip("not a single user turn (CUT holds one instruction)")
    ok = bool(row["judgment_ok"])
    return {
        "id": number,
        "instruction": turns[0]["content"],
        "input": "",
        "output": row["response"],
        "judgment": None if ok else row["judgment"],
        "label": "aligned" if ok else "misaligned",
        "row_id": row["id"],
    }


def preference_dataset_info(fmt: str, file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry of ``llamafactory_preference`` (LLaMA-Factory's
    data/README.md: sharegpt formatting with ``ranking: true``)."""
    from storage.export import SHAREGPT_TAGS

    columns = {
        "messages": "conversations",
        "chosen": "chosen",
        "rejected": "rejected",
        "system": "system",
        "tools": "tools",
    }
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "ranking": True,
        "columns": columns,
        "tags": SHAREGPT_TAGS,
    }
