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
  (pairs as for ``trl_preference``), with a ``dataset_info.json`` entry ``"ranking": true``:
  LLaMA-Factory's ``rm`` and ``dpo`` stages (it refuses a ranking dataset in any other).
- ``llamafactory_kto``: LLaMA-Factory's sharegpt KTO format, a JSON list of
  ``{"conversations", "kto_tag": bool, "system", "tools"}`` per judged response (the
  response is the last ``gpt`` turn), with a ``dataset_info.json`` entry whose columns name
  ``kto_tag`` and that has no ``ranking``: LLaMA-Factory's ``kto`` stage.

Counting (the export manifest, :mod:`storage.export`): every row of the split is either
exported or skipped with a reason, so ``rows_read = rows_exported + skipped``. Rows without
a judgment (the prompt rows) are skipped as ``NOT_JUDGED``; a prompt that yields no pair
skips all its judged rows; a positive response that no pair needs (more positives than
negatives) is skipped as ``UNPAIRED``. ``prompts`` counts the judged prompts and
``prompts_exported`` those with at least one record.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from storage.names import StoreError

if TYPE_CHECKING:
    from storage.export import Tally

PREFERENCE_FORMATS = {
    "trl_preference": "TRL DPO/ORPO pairs, JSONL {prompt, chosen, rejected}",
    "trl_kto": "TRL KTO, JSONL {prompt, completion, label}, one per judged response",
    "cut": "CUT's training files, a JSON list {instruction, output, judgment}",
    "llamafactory_preference": "LLaMA-Factory sharegpt ranking pairs (stage rm/dpo)",
    "llamafactory_kto": "LLaMA-Factory sharegpt with kto_tag (stage kto)",
}
"""The preference formats and what each is for (the export registry adds them)."""
PAIR_FORMATS = ("trl_preference", "llamafactory_preference")
LIST_FORMATS = ("cut", "llamafactory_preference", "llamafactory_kto")
"""Formats written as one JSON list (the others as JSON lines)."""
NO_NEGATIVE = "no negative response"
NO_CHOSEN = "no positive response and no reference"
NOT_JUDGED = "not a judged response (a prompt row or a row the judge stage did not judge)"
UNPAIRED = "positive response left unpaired (more positive than negative responses)"
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


def judged_groups(batches: Iterable[pa.RecordBatch], tally: Tally | None = None) -> list[list[Row]]:
    """Judged rows grouped by prompt row, groups and rows in stored order; the rows without
    a judgment are counted in ``tally`` as skipped (``NOT_JUDGED``).

    Raises:
        StoreError: the version holds no judged rows (no ``judge`` stage ran).
    """
    groups: dict[str, list[Row]] = {}
    unjudged = 0
    for batch in batches:
        if "judgment_ok" not in batch.schema.names:
            unjudged += batch.num_rows
            continue
        for row in batch.select([c for c in _COLUMNS if c in batch.schema.names]).to_pylist():
            if row.get("judgment_ok") is None:
                unjudged += 1
                continue
            parents = row.get("lineage_parents") or [row["id"]]
            groups.setdefault(parents[0], []).append(row)
    if not groups:
        raise StoreError(
            "no judged rows in this version: preference, KTO and CUT exports need the judge stage"
        )
    if tally is not None:
        tally.skip(NOT_JUDGED, unjudged)
    return list(groups.values())


def _pairs(group: list[Row]) -> tuple[list[tuple[Row, str, str]], int]:
    """(prompt row, chosen, rejected) for one prompt, and how many positive responses the
    pairs use (``chosen`` cycles through them)."""
    ex = _export_module()
    bad = [r for r in group if not r["judgment_ok"]]
    good = [r["response"] for r in group if r["judgment_ok"]]
    if not bad:
        raise ex._Skip(NO_NEGATIVE)
    chosen = good or [r for r in (group[0].get("references") or []) if r][:1]
    if not chosen:
        raise ex._Skip(NO_CHOSEN)
    pairs = [(r, chosen[i % len(chosen)], r["response"]) for i, r in enumerate(bad)]
    return pairs, min(len(good), len(bad))


def _assistant(text: str) -> list[Row]:
    return [{"role": "assistant", "content": text}]


def preference_records(fmt: str, batches: Iterable[pa.RecordBatch], tally: Tally) -> Iterator[Row]:
    """The records of one preference format; every row read is counted in ``tally`` as
    exported or skipped (see the module docstring)."""
    ex = _export_module()

    def trl_prompt(row: Row) -> Row:
        return ex._with_tools({"prompt": ex._trl_turns(row["prompt"])}, row)

    def sharegpt(row: Row, response: str | None = None) -> Row:
        """The row as sharegpt, the response (or ``response``) its last turn."""
        return ex._sharegpt(row if response is None else {**row, "response": response})

    def pair(row: Row, chosen: str, rejected: str) -> Row:
        if fmt == "trl_preference":
            return {
                **trl_prompt(row),
                "chosen": _assistant(chosen),
                "rejected": _assistant(rejected),
            }
        record = sharegpt(row, chosen)
        return {
            "conversations": record["conversations"][:-1],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
            "system": record["system"],
            "tools": record["tools"],
        }

    numbers = itertools.count()

    def single(row: Row) -> Row:
        """The record of one judged response (the unpaired formats)."""
        ok = bool(row["judgment_ok"])
        if fmt == "trl_kto":
            return {**trl_prompt(row), "completion": _assistant(row["response"]), "label": ok}
        if fmt == "llamafactory_kto":
            record = sharegpt(row)
            return {
                "conversations": record["conversations"],
                "kto_tag": ok,
                "system": record["system"],
                "tools": record["tools"],
            }
        return _cut(numbers, row)

    groups = judged_groups(batches, tally)
    tally.prompts, tally.prompts_exported = len(groups), 0
    tally.judged_responses = sum(len(group) for group in groups)
    for group in groups:
        if fmt in PAIR_FORMATS:
            try:
                pairs, used = _pairs(group)
                records = [pair(*p) for p in pairs]
            except ex._Skip as reason:
                tally.skip(str(reason), len(group))
                continue
            tally.rows_exported += len(pairs) + used
            tally.skip(UNPAIRED, len(group) - len(pairs) - used)
        else:
            records = []
            for row in group:
                try:
                    records.append(single(row))
                except ex._Skip as reason:
                    tally.skip(str(reason))
            tally.rows_exported += len(records)
        tally.prompts_exported += bool(records)
        yield from records


def _cut(numbers: Iterator[int], row: Row) -> Row:
    ex = _export_module()

    turns = [t for t in row["prompt"] if t["role"] != "system"]
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise ex._Skip("not a single user turn (CUT holds one instruction)")
    ok = bool(row["judgment_ok"])
    return {
        "id": next(numbers),
        "instruction": turns[0]["content"],
        "input": "",
        "output": row["response"],
        "judgment": None if ok else row["judgment"],
        "label": "aligned" if ok else "misaligned",
        "row_id": row["id"],
    }


def preference_dataset_info(fmt: str, file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry of ``llamafactory_preference`` or ``llamafactory_kto``
    (LLaMA-Factory's data/README.md: sharegpt formatting; ``ranking: true`` for pairs, a
    ``kto_tag`` column and no ``ranking`` for KTO, whose loader refuses ranking datasets)."""
    from storage.export import SHAREGPT_TAGS

    if fmt == "llamafactory_kto":
        columns = {"messages": "conversations", "kto_tag": "kto_tag"}
        ranking = {}
    else:
        columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
        ranking = {"ranking": True}
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        **ranking,
        "columns": {**columns, "system": "system", "tools": "tools"},
        "tags": SHAREGPT_TAGS,
    }
