"""Export one dataset version to the formats trainers read.

Formats (written to ``out_dir``, streamed batch by batch so memory stays bounded):

- ``trl_messages``: JSONL, TRL's conversational language-modelling type,
  ``{"messages": [...], "tools": [...]}``. A ``tool_call`` turn becomes an assistant
  message with ``tool_calls`` (``{"type": "function", "function": {name, arguments}}``),
  a ``tool`` turn stays a ``tool`` message. A response that is a tool call (ingest keeps
  a conversation ending in one; :func:`transforms.ingest.chat.is_tool_call`) is written the
  same way, as the last assistant message, in every trainer format.
- ``trl_prompt_completion``: JSONL, TRL's conversational prompt-completion type,
  ``{"prompt": [...], "completion": [{"role": "assistant", ...}], "tools": [...]}``.
- ``llamafactory_alpaca``: a JSON list of ``{instruction, input, output, system, tools,
  history}`` plus a ``dataset_info.json`` entry. Alpaca has no place for tool turns, so
  rows whose prompt has ``tool_call``/``tool`` turns (or whose turns do not alternate
  user/assistant) are skipped and counted in the manifest; export those with
  ``llamafactory_sharegpt``.
- ``llamafactory_sharegpt``: a JSON list of ``{conversations: [{from, value}], system,
  tools}`` (``human``/``gpt``/``function_call``/``observation``) plus a
  ``dataset_info.json`` entry with ``"formatting": "sharegpt"`` and the tags.
- ``jsonl`` / ``parquet``: the rows as they are stored (all columns).
- ``response_only``: JSONL ``{"messages": [{"role": "assistant", ...}]}``, the response
  alone (Response Tuning; see :mod:`storage.training`).
- ``trl_preference``, ``trl_kto``, ``cut``, ``llamafactory_preference``,
  ``llamafactory_kto``: the judged responses of the ``judge`` stage as preference pairs, KTO
  rows or CUT triplets (see :mod:`storage.preference`).

:data:`FORMATS` is the registry: each format's name and what it is for (the CLI's
``export --help`` lists it).

Every export writes ``export_manifest.json`` last; data files are written under a
temporary name and renamed, so a failed export leaves no file that looks complete. The
manifest counts in two units: rows of the split (``rows_read = rows_exported + skipped``,
``skipped_reasons`` by reason) and records written to the data file
(``records_written``), which differ for the preference formats (a pair is two rows, a
prompt row is no record); those also count ``prompts`` (and ``pairs``).
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_path
from storage.dataset import DatasetStore
from storage.names import Ref, StoreError, validate_split
from storage.preference import (
    LIST_FORMATS,
    PAIR_FORMATS,
    PREFERENCE_FORMATS,
    preference_dataset_info,
    preference_records,
)
from storage.training import (
    README,
    RESPONSE_ONLY,
    LossOverPrompt,
    readme_text,
    resolve_switch,
    response_only,
    trainer_settings,
)
from transforms.ingest.chat import is_tool_call

FORMATS: dict[str, str] = {
    "trl_messages": "TRL conversational LM, JSONL {messages, tools}; axolotl, OpenRLHF",
    "trl_prompt_completion": "TRL conversational prompt-completion, JSONL",
    "llamafactory_alpaca": "LLaMA-Factory alpaca (no tool turns) + dataset_info.json",
    "llamafactory_sharegpt": "LLaMA-Factory sharegpt, tool calls included + dataset_info.json",
    "jsonl": "every stored column, JSONL",
    "parquet": "every stored column, Parquet",
    RESPONSE_ONLY: "the response alone, JSONL {messages: [assistant]} (Response Tuning)",
    **PREFERENCE_FORMATS,
}
"""Every export format and what it is for."""
EXPORT_FORMATS = tuple(FORMATS)
MANIFEST = "export_manifest.json"
DATASET_INFO = "dataset_info.json"
_BATCH_ROWS = 4_096

SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
_SHAREGPT_ROLES = {
    "user": "human",
    "assistant": "gpt",
    "tool_call": "function_call",
    "tool": "observation",
}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote. ``files`` are names inside ``out_dir``.

    Rows of the split and records of the data file are counted apart:
    ``rows_read == rows_exported + skipped`` (``skipped_reasons`` sums to ``skipped``), and
    ``records_written`` is the number of records in the data file. For most formats a row
    is one record; for the preference formats a pair holds two rows and prompt rows are
    skipped, so the preference formats also count ``prompts`` (judged prompts),
    ``prompts_exported`` (those with a record), ``judged_responses`` and, for the pair
    formats, ``pairs``. Counts a format does not have are None and left out of the manifest.
    """

    name: str
    version: int
    split: str
    format: str
    out_dir: str
    files: list[str]
    rows_read: int
    rows_exported: int
    skipped: int
    records_written: int
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    prompts: int | None = None
    prompts_exported: int | None = None
    judged_responses: int | None = None
    pairs: int | None = None
    created_at: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    """Trainer settings for the loss over the prompt (see :mod:`storage.training`)."""

    @property
    def rows(self) -> int:
        """``records_written`` (the name of earlier versions, kept for callers)."""
        return self.records_written

    @property
    def manifest(self) -> Path:
        """Path of the export manifest."""
        return Path(self.out_dir) / MANIFEST

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's content); ``dataset`` repeats ``name``."""
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        return {"dataset": self.name, "ref": f"{self.name}@{self.version}", **fields}


@dataclass
class Tally:
    """What an export read, exported and skipped, in rows of the split; filled while the
    records stream (the preference formats also fill the prompt counts)."""

    rows_read: int = 0
    rows_exported: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    prompts: int | None = None
    prompts_exported: int | None = None
    judged_responses: int | None = None

    def reading(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """``batches``, counting their rows as read."""
        for batch in batches:
            self.rows_read += batch.num_rows
            yield batch

    def skip(self, reason: str, rows: int = 1) -> None:
        """Count ``rows`` rows as skipped for ``reason``."""
        if rows:
            self.skipped[reason] += rows


class _Skip(Exception):
    """A row the format cannot represent; the message is the reason counted."""


Row = dict[str, Any]


def export(
    store: DatasetStore,
    ref: Ref | str,
    fmt: str,
    out_dir: str | Path,
    split: str = "train",
    loss_over_prompt: LossOverPrompt = None,
) -> ExportResult:
    """Write one version's ``split`` in format ``fmt`` to ``out_dir``.

    ``loss_over_prompt`` (``True``, ``False`` or ``"auto"``) also writes the trainer
    settings for it into ``README.md`` and the manifest (:mod:`storage.training`).

    Raises:
        StoreError: unknown format (listing the valid ones), split or reference.
    """
    if fmt not in EXPORT_FORMATS:
        valid = ", ".join(EXPORT_FORMATS)
        raise StoreError(f"unknown export format {fmt!r}; valid formats: {valid}")
    validate_split(split)
    name, version = store.resolve(ref)
    exact = f"{name}@{version}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_v{version}" + ("" if split == "train" else f"_{split}")
    tally = Tally()
    batches = tally.reading(store.batches(exact, split=split, batch_size=_BATCH_ROWS))

    if fmt == "parquet":
        data = out / f"{stem}.parquet"
        schema = pa.schema([f for f in store.schema(exact) if f.name != "split"])
        written = tally.rows_exported = _write_parquet(batches, schema, data)
    else:
        if fmt in PREFERENCE_FORMATS:
            records = preference_records(fmt, batches, tally)
        else:
            records = _convert(batches, _CONVERTERS[fmt], tally)
        is_list = fmt.startswith("llamafactory") or fmt in LIST_FORMATS
        data = out / f"{stem}.json" if is_list else out / f"{stem}.jsonl"
        written = _write_json(records, data, as_list=is_list)
    files = [data.name]
    if fmt.startswith("llamafactory"):
        _update_dataset_info(out / DATASET_INFO, stem, _dataset_info_entry(fmt, data.name))
        files.append(DATASET_INFO)

    switch, stats = resolve_switch(
        loss_over_prompt, lambda: store.batches(exact, split=split, batch_size=_BATCH_ROWS)
    )
    training = {} if switch is None else trainer_settings(fmt, switch)
    if training:
        _atomic_write_text(out / README, readme_text(exact, fmt, training, stats))
        files.append(README)

    result = ExportResult(
        name=name,
        version=version,
        split=split,
        format=fmt,
        out_dir=str(out),
        files=files,
        rows_read=tally.rows_read,
        rows_exported=tally.rows_exported,
        skipped=sum(tally.skipped.values()),
        records_written=written,
        skipped_reasons=dict(sorted(tally.skipped.items())),
        prompts=tally.prompts,
        prompts_exported=tally.prompts_exported,
        judged_responses=tally.judged_responses,
        pairs=written if fmt in PAIR_FORMATS else None,
        created_at=datetime.now(UTC).isoformat(),
        training=training,
    )
    _atomic_write_text(result.manifest, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


# -- writers -----------------------------------------------------------------------------


def _convert(
    batches: Iterable[pa.RecordBatch], convert: Callable[[Row], Row], tally: Tally
) -> Iterator[Row]:
    for batch in batches:
        for row in batch.to_pylist():
            try:
                record = convert(row)
            except _Skip as reason:
                tally.skip(str(reason))
                continue
            tally.rows_exported += 1
            yield record


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto it when the block succeeds
    (:func:`storage.atomic.atomic_path`; removed when it fails)."""
    with atomic_path(path) as tmp:
        yield tmp


def _write_json(records: Iterable[Row], path: Path, as_list: bool) -> int:
    """JSON lines, or (``as_list``) one JSON array with a record per line."""
    count = 0
    with _replacing(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        if as_list:
            out.write("[")
        for record in records:
            if as_list:
                out.write(",\n" if count else "\n")
            out.write(_dumps(record))
            if not as_list:
                out.write("\n")
            count += 1
        if as_list:
            out.write("\n]\n")
    return count


def _write_parquet(batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: Path) -> int:
    count = 0
    with _replacing(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in batches:
            writer.write_batch(batch.select(schema.names))
            count += batch.num_rows
    return count


def _atomic_write_text(path: Path, text: str) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _dumps(record: Row) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError:  # NaN / inf in a stage column: not JSON, write null
        return json.dumps(_finite(record), ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _dataset_info_entry(fmt: str, file_name: str) -> dict[str, Any]:
    """The LLaMA-Factory ``dataset_info.json`` entry (layout of its ``data/README.md``)."""
    if fmt in PREFERENCE_FORMATS:
        return preference_dataset_info(fmt, file_name)
    if fmt == "llamafactory_alpaca":
        columns = {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "tools": "tools",
            "history": "history",
        }
        return {"file_name": file_name, "columns": columns}
    columns = {"messages": "conversations", "system": "system", "tools": "tools"}
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": columns,
        "tags": SHAREGPT_TAGS,
    }


def _update_dataset_info(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add or replace ``key`` in ``dataset_info.json``, keeping the other datasets."""
    info = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    info[key] = entry
    _atomic_write_text(path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")


# -- row converters ----------------------------------------------------------------------


def _parse_tools(row: Row) -> Any:
    if row.get("tools") is None:
        return None
    try:
        return json.loads(row["tools"])
    except json.JSONDecodeError as exc:
        raise _Skip("tools is not valid JSON") from exc


def _parse_calls(content: str | None) -> list[dict[str, Any]]:
    """A ``tool_call`` turn's JSON as ``[{"name", "arguments"}]``; accepts one call or a
    list, OpenAI-style ``{"function": {...}}`` wrappers and stringified arguments."""
    try:
        data = json.loads(content or "")
    except json.JSONDecodeError as exc:
        raise _Skip("tool_call content is not valid JSON") from exc
    calls = []
    for item in data if isinstance(data, list) else [data]:
        call = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise _Skip("tool_call content has no function name")
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise _Skip("tool_call arguments are not valid JSON") from exc
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


def _response_turn(row: Row) -> Row:
    """The response as a turn: ``tool_call`` when it is a call's JSON, else ``assistant``."""
    role = "tool_call" if is_tool_call(row["response"]) else "assistant"
    return {"role": role, "content": row["response"]}


def _trl_turns(prompt: list[Row]) -> list[Row]:
    """Our turns as TRL/transformers chat messages."""
    messages: list[Row] = []
    pending: list[str] = []  # names of calls awaiting their tool message
    for turn in prompt:
        role, content = turn["role"], turn["content"]
        if role == "tool_call":
            calls = _parse_calls(content)
            pending.extend(call["name"] for call in calls)
            tool_calls = [{"type": "function", "function": call} for call in calls]
            messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
        elif role == "tool":
            message = {"role": "tool", "content": content}
            if pending:
                message["name"] = pending.pop(0)
            messages.append(message)
        else:
            messages.append({"role": role, "content": content})
    return messages


def _with_tools(record: Row, row: Row) -> Row:
    tools = _parse_tools(row)
    if tools is not None:
        record["tools"] = tools
    return record


def _trl_messages(row: Row) -> Row:
    messages = _trl_turns([*row["prompt"], _response_turn(row)])
    return _with_tools({"messages": messages}, row)


def _trl_prompt_completion(row: Row) -> Row:
    if not row["prompt"]:
        raise _Skip("empty prompt")
    record = {
        "prompt": _trl_turns(row["prompt"]),
        "completion": _trl_turns([_response_turn(row)]),
    }
    return _with_tools(record, row)


def _leading_system(prompt: list[Row]) -> tuple[str, list[Row]]:
    """The leading system prompt (or "") and the remaining turns; a later system turn
    cannot be represented by LLaMA-Factory."""
    system = ""
    if prompt and prompt[0]["role"] == "system":
        system, prompt = prompt[0]["content"] or "", prompt[1:]
    if any(turn["role"] == "system" for turn in prompt):
        raise _Skip("system turn after the first turn")
    return system, prompt


def _tools_text(row: Row) -> str:
    _parse_tools(row)  # must be valid JSON
    return row.get("tools") or ""


def _alpaca(row: Row) -> Row:
    system, turns = _leading_system(row["prompt"])
    if any(turn["role"] in ("tool_call", "tool") for turn in [*turns, _response_turn(row)]):
        raise _Skip("tool turns (alpaca cannot represent them; use llamafactory_sharegpt)")
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or len(turns) % 2 == 0 or [t["role"] for t in turns] != expected:
        raise _Skip("turns do not alternate user/assistant ending with user")
    history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    return {
        "instruction": turns[-1]["content"],
        "input": "",
        "output": row["response"],
        "system": system,
        "tools": _tools_text(row),
        "history": history,
    }


def _sharegpt(row: Row) -> Row:
    system, turns = _leading_system(row["prompt"])
    conversation = []
    for turn in [*turns, _response_turn(row)]:
        value = turn["content"]
        if turn["role"] == "tool_call":
            calls = _parse_calls(value)
            value = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
        conversation.append({"from": _SHAREGPT_ROLES[turn["role"]], "value": value})
    odd, even = ("human", "observation"), ("gpt", "function_call")
    if any(m["from"] not in (odd if i % 2 == 0 else even) for i, m in enumerate(conversation)):
        raise _Skip("turns do not alternate human|observation and gpt|function_call")
    return {"conversations": conversation, "system": system, "tools": _tools_text(row)}


def _identity(row: Row) -> Row:
    return row


_CONVERTERS: dict[str, Callable[[Row], Row]] = {
    "trl_messages": _trl_messages,
    "trl_prompt_completion": _trl_prompt_completion,
    "llamafactory_alpaca": _alpaca,
    "llamafactory_sharegpt": _sharegpt,
    "jsonl": _identity,
    RESPONSE_ONLY: response_only,
}
