"""Ingest: every format and file type on the real corpora in ../shared/data and on small
files written to tmp_path; file-level errors, row-level rejects and their accounting."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from transforms.ids import position_ids, row_ids
from transforms.ingest import (
    FORMATS,
    IngestError,
    IngestParams,
    ShareGPTTags,
    detect_format,
    jsonio,
    read_source,
    results,
    source_batches,
)
from transforms.ingest.chat import is_tool_call
from transforms.schema import REJECTED_SCHEMA, SCHEMA, validate
from transforms.stage import StageResult

GSM8K = "instructions/gsm8k_train_alpaca.json"


def read_all(path: Path | str, **kwargs: Any) -> tuple[pa.Table, pa.Table, list[StageResult]]:
    """All batches of a source, each checked: schema, accounting, ingest rejects."""
    results = list(read_source(path, **kwargs))
    for result in results:
        validate(result.kept)
        assert result.kept.schema.names == SCHEMA.names
        assert result.rejected.schema.names == REJECTED_SCHEMA.names
        assert result.counts(result.stats["rows_read"])["in"] == result.stats["rows_read"]
        assert set(result.rejected.column("reject_stage").to_pylist()) <= {"ingest"}
        assert set(result.kept.column("origin").to_pylist()) <= {"corpus"}
    kept = pa.concat_tables([r.kept for r in results]) if results else SCHEMA.empty_table()
    rejected = (
        pa.concat_tables([r.rejected for r in results])
        if results
        else REJECTED_SCHEMA.empty_table()
    )
    return kept, rejected, results


def rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def reasons(rejected: pa.Table) -> dict[int, str]:
    return dict(
        zip(
            rejected.column("source_index").to_pylist(),
            rejected.column("reject_reason").to_pylist(),
            strict=True,
        )
    )


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def gsm8k_records(shared_data: Path) -> list[dict[str, str]]:
    return json.loads((shared_data / GSM8K).read_text(encoding="utf-8"))


# --- the real corpora ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count"),
    [
        (GSM8K, 7473),
        ("instructions/gpteacher_roleplay.json", 3146),
        ("instructions/gpteacher_toolformer.json", 7673),
        ("safety/safety_only_data_Instructions.json", 2483),
    ],
)
def test_alpaca_corpora(shared_data: Path, name: str, count: int) -> None:
    path = shared_data / name
    assert detect_format(path) == "alpaca"
    kept, rejected, _ = read_all(path)
    assert (kept.num_rows, rejected.num_rows) == (count, 0)
    assert kept.column("source_index").to_pylist() == list(range(count))
    assert set(kept.column("source").to_pylist()) == {Path(name).stem}
    assert set(kept.column("task").to_pylist()) == {"instruction"}
    records = json.loads(path.read_text(encoding="utf-8"))
    for record, row in zip(records[:200], rows(kept.slice(0, 200)), strict=True):
        user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
        assert row["prompt"] == [{"role": "user", "content": user}]
        assert row["response"] == record["output"]


def test_alpaca_input_joins_the_instruction(shared_data: Path) -> None:
    kept, _, _ = read_all(shared_data / "instructions/gpteacher_toolformer.json")
    first = rows(kept.slice(0, 1))[0]
    assert first["prompt"][0]["content"].endswith(
        "based on the input event given\n\nFrench Revolution"
    )


def test_mcq_csv(shared_data: Path) -> None:
    path = shared_data / "mmlu/test/anatomy_test.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    assert detect_format(path) == "mcq_csv"
    kept, rejected, _ = read_all(path)
    assert (kept.num_rows, rejected.num_rows) == (len(records), 0) == (135, 0)
    row, record = rows(kept.slice(1, 1))[0], records[1]
    assert row["source"] == "anatomy_test" and row["task"] == "mcq"
    options = "".join(f"\n{c}. {record[c]}" for c in "ABCD")
    assert row["prompt"] == [{"role": "user", "content": record["question"] + options}]
    assert row["response"] == record["target"] == "B"
    assert row["references"] == ["B"]
    assert row["choices"] == [record[c] for c in "ABCD"]


def test_mcq_rejects(tmp_path: Path) -> None:
    path = tmp_path / "mcq.csv.gz"
    body = b"question,A,B,C,D,target\nq,a,b,c,d, b \nq,a,,c,d,A\nq,a,b,c,d,E\nq \xff,a,b,c,d,A\n"
    path.write_bytes(gzip.compress(body))
    kept, rejected, _ = read_all(path)
    assert [(r["response"], r["references"]) for r in rows(kept)] == [("B", ["B"])]
    assert reasons(rejected) == {1: "bad_choices", 2: "bad_target", 3: "invalid_utf8:question"}
    assert rows(rejected)[1]["choices"] == ["a", "b", "c", "d"]


def test_mmlu_test_split(shared_data: Path) -> None:
    total = sum(
        read_all(path)[0].num_rows for path in sorted((shared_data / "mmlu/test").glob("*.csv"))
    )
    assert total == 14_042


def test_open_qa(shared_data: Path) -> None:
    path = shared_data / "nq/dev.csv"
    assert detect_format(path) == "open_qa"
    kept, rejected, _ = read_all(path)
    assert (kept.num_rows, rejected.num_rows) == (3610, 0)
    first = rows(kept.slice(0, 1))[0]
    assert first["source"] == "dev" and first["task"] == "open_qa"
    assert first["prompt"] == [
        {"role": "user", "content": "when was the last time anyone was on the moon"}
    ]
    assert first["response"] == "14 December 1972 UTC"
    assert first["references"] == ["14 December 1972 UTC", "December 1972"]


def test_open_qa_real_alias_list_and_no_answer(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "q0", "answers": ["a", "b"]},
            {"question": "q1", "answers": "not a list ["},
            {"question": "q2", "answers": []},
        ],
    )
    kept, rejected, _ = read_all(path)
    assert [(r["response"], r["references"]) for r in rows(kept)] == [("a", ["a", "b"])]
    assert reasons(rejected) == {1: "wrong_type:answers", 2: "missing_field:answers"}


def test_self_instruct(shared_data: Path) -> None:
    path = shared_data / "seeds/self_instruct_seed_tasks.jsonl"
    tasks = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(tasks) == 175
    assert detect_format(path) == "self_instruct"
    kept, rejected, _ = read_all(path)
    assert (kept.num_rows, rejected.num_rows) == (sum(len(t["instances"]) for t in tasks), 0)
    first, instance = rows(kept.slice(0, 1))[0], tasks[0]["instances"][0]
    assert first["prompt"] == [{"role": "user", "content": tasks[0]["instruction"]}]
    assert first["response"] == instance["output"]


def test_self_instruct_instances(tmp_path: Path) -> None:
    tasks = [
        {
            "instruction": "Add.",
            "instances": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}],
        },
        {"instruction": "Nothing.", "instances": []},
        {"instruction": "Broken.", "instances": [{"input": "x"}]},
    ]
    kept, rejected, _ = read_all(write_jsonl(tmp_path / "seeds.jsonl", tasks))
    assert kept.column("source_index").to_pylist() == [0, 0]
    assert [r["prompt"][0]["content"] for r in rows(kept)] == ["Add.\n\n1 2", "Add.\n\n2 2"]
    assert reasons(rejected) == {1: "no_instances", 2: "missing_field:instances.output"}


# --- conversational formats ----------------------------------------------------------------

CALL_ROME = '{"name": "weather", "arguments": {"city": "Rome"}}'

SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {
                "from": "function_call",
                "value": '{"name": "weather", "arguments": {"city": "Paris"}}',
            },
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 degrees."},
        ],
        "system": "You are helpful.",
        "tools": '[{"name": "weather", "parameters": {"city": "string"}}]',
    },
    {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "?"},
        ]
    },
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 7}]},
    {"conversations": "hi"},
    # 5-9: conversations ending in a tool call (a target turn in LLaMA-Factory) and the
    # endings that are still rejected, or kept as plain text.
    {
        "conversations": [
            {"from": "human", "value": "Weather in Rome?"},
            {"from": "function_call", "value": CALL_ROME},
        ],
        "tools": '[{"name": "weather", "parameters": {"city": "string"}}]',
    },
    {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo and Rome?"},
            {
                "from": "function_call",
                "value": [
                    {"name": "weather", "arguments": {"city": "Oslo"}},
                    {"name": "weather", "arguments": {"city": "Rome"}},
                ],
            },
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Weather in Rome?"},
            {"from": "function_call", "value": CALL_ROME},
            {"from": "observation", "value": '{"temp": 25}'},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Weather in Rome?"},
            {"from": "function_call", "value": "weather(city='Rome')"},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Ada as JSON?"},
            {"from": "gpt", "value": '{"name": "Ada", "born": 1815}'},
        ]
    },
]


def test_sharegpt_with_tool_turns(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(SHAREGPT, indent=2), encoding="utf-8")
    assert detect_format(path) == "sharegpt"
    kept, rejected, _ = read_all(path)
    row = rows(kept)[0]
    assert [t["role"] for t in row["prompt"]] == ["system", "user", "tool_call", "tool"]
    assert row["prompt"][2]["content"] == SHAREGPT[0]["conversations"][1]["value"]
    assert row["response"] == "It is 21 degrees."
    assert json.loads(row["tools"]) == [{"name": "weather", "parameters": {"city": "string"}}]
    assert reasons(rejected) == {
        1: "no_assistant_turn",
        2: "unknown_role:bot",
        3: "wrong_type:conversations.value",
        4: "wrong_type:conversations",
        7: "no_assistant_turn",  # ends with the observation: no assistant-side turn
        8: "invalid_tool_call:conversations.value",  # not a call's JSON
    }
    assert rows(rejected)[0]["prompt"][-1] == {"role": "user", "content": "?"}
    # A final function_call is the response: the call's JSON, the turns before it the prompt.
    by_index = {r["source_index"]: r for r in rows(kept)}
    assert sorted(by_index) == [0, 5, 6, 9]
    call, parallel, plain = by_index[5], by_index[6], by_index[9]
    assert call["prompt"] == [{"role": "user", "content": "Weather in Rome?"}]
    assert call["response"] == CALL_ROME and is_tool_call(call["response"])
    assert call["tools"] == SHAREGPT[5]["tools"]
    assert json.loads(parallel["response"]) == SHAREGPT[6]["conversations"][1]["value"]
    assert is_tool_call(parallel["response"])
    # JSON that is not a call ({name} without arguments) stays a plain answer.
    assert plain["response"] == '{"name": "Ada", "born": 1815}'
    assert not is_tool_call(plain["response"]) and not is_tool_call(row["response"])


def test_sharegpt_custom_tags(tmp_path: Path) -> None:
    record = {
        "dialog": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}],
        "sys": "Be brief.",
    }
    path = write_jsonl(tmp_path / "custom.jsonl", [record])
    tags = ShareGPTTags(
        messages="dialog",
        system="sys",
        role_tag="role",
        content_tag="text",
        user_tag="user",
        assistant_tag="assistant",
    )
    params = IngestParams(sharegpt_tags=tags)
    assert detect_format(path, params=params) == "sharegpt"
    kept, _, _ = read_all(path, params=params)
    assert rows(kept)[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


OPENAI_CALL_ROME = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
}

MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "21 degrees"},
            {"role": "assistant", "content": [{"type": "text", "text": "It is 21 degrees."}]},
        ],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
    },
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "hello"}]},
    # 4-7: conversations ending in tool calls, and the endings still rejected.
    {
        "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL_ROME]},
        ],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
    },
    {
        "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [OPENAI_CALL_ROME]},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [OPENAI_CALL_ROME]},
            {"role": "tool", "content": "25 degrees"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": "weather(city='Rome')"},
        ]
    },
]


def test_messages_with_tool_calls(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "messages.jsonl", MESSAGES)
    assert detect_format(path) == "messages"
    kept, rejected, _ = read_all(path)
    row = rows(kept)[0]
    assert [t["role"] for t in row["prompt"]] == ["system", "user", "tool_call", "tool"]
    assert json.loads(row["prompt"][2]["content"]) == MESSAGES[0]["messages"][2]["tool_calls"]
    assert row["response"] == "It is 21 degrees."
    assert json.loads(row["tools"]) == MESSAGES[0]["tools"]
    assert reasons(rejected) == {
        1: "no_assistant_turn",
        2: "unknown_role:wizard",
        3: "missing_field:messages.content",
        6: "no_assistant_turn",  # ends with the tool's output
        7: "invalid_tool_call:messages.tool_calls",
    }
    # A final assistant message with only tool_calls is the response: the calls as JSON,
    # serialised as for tool calls in the prompt; its text, if any, joins the prompt.
    by_index = {r["source_index"]: r for r in rows(kept)}
    assert sorted(by_index) == [0, 4, 5]
    calls_only, with_text = by_index[4], by_index[5]
    assert calls_only["prompt"] == [{"role": "user", "content": "Weather in Rome?"}]
    assert json.loads(calls_only["response"]) == [OPENAI_CALL_ROME]
    assert is_tool_call(calls_only["response"])
    assert json.loads(calls_only["tools"]) == MESSAGES[4]["tools"]
    assert with_text["prompt"][-1] == {"role": "assistant", "content": "Let me check."}
    assert with_text["response"] == calls_only["response"]


@pytest.mark.parametrize(
    ("content", "call"),
    [
        (CALL_ROME, True),
        (json.dumps([json.loads(CALL_ROME)] * 2), True),
        (json.dumps([OPENAI_CALL_ROME]), True),
        (json.dumps({**OPENAI_CALL_ROME, "index": 0}), True),
        ('{"name": "weather", "arguments": "{}"}', True),
        ('{"name": "weather"}', False),  # no arguments: LLaMA-Factory would fail on it
        ('{"name": "weather", "parameters": {}}', False),
        ('{"name": "weather", "arguments": {}, "note": "x"}', False),
        ('{"type": "code", "function": {"name": "f", "arguments": {}}}', False),
        ('[{"name": "weather", "arguments": {}}, "x"]', False),
        ("[]", False),
        ("null", False),
        ("It is 21 degrees.", False),
        ("", False),
    ],
)
def test_is_tool_call(content: str, call: bool) -> None:
    assert is_tool_call(content) is call


def test_messages_from_parquet(tmp_path: Path) -> None:
    """Nested structs from Parquet come back with null keys; they must read like JSON."""
    path = tmp_path / "messages.parquet"
    tooled = json.loads(json.dumps(MESSAGES[0]))
    tooled["messages"][-1]["content"] = "It is 21 degrees."  # Arrow columns hold one type
    plain = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    pq.write_table(pa.Table.from_pylist([tooled, plain]), path)
    kept, rejected, _ = read_all(path)
    assert rejected.num_rows == 0
    first, second = rows(kept)
    assert [t["role"] for t in first["prompt"]] == ["system", "user", "tool_call", "tool"]
    assert second["prompt"] == [{"role": "user", "content": "hi"}] and second["response"] == "hello"


def test_prompt_completion(tmp_path: Path) -> None:
    records = [
        {"prompt": "The sky is", "completion": " blue."},
        {
            "prompt": [{"role": "user", "content": "What color is the sky?"}],
            "completion": [{"role": "assistant", "content": "It is blue."}],
        },
        {"prompt": "x", "completion": None},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    assert detect_format(path) == "prompt_completion"
    kept, rejected, _ = read_all(path)
    assert [(r["prompt"], r["response"]) for r in rows(kept)] == [
        ([{"role": "user", "content": "The sky is"}], " blue."),
        ([{"role": "user", "content": "What color is the sky?"}], "It is blue."),
    ]
    assert reasons(rejected) == {2: "missing_field:completion"}

    call = {"prompt": "Weather in Rome?", "completion": [MESSAGES[4]["messages"][1]]}
    kept, _, _ = read_all(write_jsonl(tmp_path / "call.jsonl", [call]))
    assert json.loads(rows(kept)[0]["response"]) == [OPENAI_CALL_ROME]


# --- alpaca details ------------------------------------------------------------------------

ALPACA_FULL = {
    "instruction": "And now?",
    "input": "ctx",
    "output": "done",
    "system": "Sys.",
    "history": [["q1", "a1"], ["q2", "a2"]],
}
ALPACA_FULL_PROMPT = [
    {"role": "system", "content": "Sys."},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
    {"role": "user", "content": "And now?\n\nctx"},
]


def test_alpaca_system_and_history_on_both_paths(tmp_path: Path) -> None:
    """The Arrow path (JSON lines) and the Python path (JSON array) build the same rows."""
    records = [ALPACA_FULL, {"instruction": "plain", "output": "o"}, {**ALPACA_FULL, "history": []}]
    jsonl = write_jsonl(tmp_path / "full.jsonl", records)
    array = tmp_path / "full.json"
    array.write_text(json.dumps(records), encoding="utf-8")
    from_lines, _, _ = read_all(jsonl)
    from_array, _, _ = read_all(array)
    assert rows(from_lines)[0]["prompt"] == ALPACA_FULL_PROMPT
    assert rows(from_lines)[2]["prompt"] == [ALPACA_FULL_PROMPT[0], ALPACA_FULL_PROMPT[-1]]
    assert from_lines.equals(from_array)


DIRTY_LINES = [
    b'{"instruction": "ok", "input": "", "output": "fine"}',
    b'{"instruction": "no output"}',
    b'{"instruction": "number", "output": 5}',
    b'{"instruction": "bytes", "output": "bad \xff\xfe here"}',
    b"",
    b'{"instruction": null, "output": "x"}',
    b"[1, 2]",
    b'{"instruction": "pairs", "output": "x", "history": [["only one"]]}',
    b'{"instruction": "ok too", "output": "fine", "unused": "\xff"}',
]
DIRTY_REASONS = {
    1: "missing_field:output",
    2: "wrong_type:output",
    3: "invalid_utf8:output",
    4: "missing_field:instruction",
    5: "wrong_type:record",
    6: "bad_history",
}


def test_alpaca_row_rejects_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(b"\n".join(DIRTY_LINES) + b"\n")
    kept, rejected, results = read_all(path)
    assert kept.column("source_index").to_pylist() == [0, 7]
    assert reasons(rejected) == DIRTY_REASONS
    assert sum(r.stats["rows_read"] for r in results) == 8 == kept.num_rows + rejected.num_rows
    assert set(rejected.column("source").to_pylist()) == {"dirty"}
    assert rows(rejected)[1]["prompt"] == [{"role": "user", "content": "number"}]


def test_alpaca_row_rejects_json_array(tmp_path: Path) -> None:
    """ijson stops at invalid UTF-8; the locating scanner takes over and rejects the row."""
    path = tmp_path / "dirty.json"
    path.write_bytes(b"[\n" + b",\n".join(line for line in DIRTY_LINES if line) + b"\n]\n")
    kept, rejected, _ = read_all(path)
    assert kept.column("source_index").to_pylist() == [0, 7]
    assert reasons(rejected) == DIRTY_REASONS


def test_clean_json_lines_take_the_arrow_path(
    tmp_path: Path, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a chunk Arrow cannot parse is read per line (and says so in the log)."""
    caplog.set_level(logging.INFO, logger="transforms.ingest")
    records = gsm8k_records(shared_data)
    read_all(write_jsonl(tmp_path / "clean.jsonl", records))
    assert not caplog.records
    read_all(write_jsonl(tmp_path / "typed.jsonl", [*records, {"instruction": "x", "output": 1}]))
    assert "parsing it per line" in caplog.text


def test_chunks_of_the_format_keys_alone_skip_the_nesting_scan(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrow reads a chunk whose keys are all alpaca's without the nesting scan (their types
    bound its depth). From the first chunk with another key on, every chunk is scanned first,
    and a record nested too deep under that key is rejected as before."""
    monkeypatch.setattr(jsonio, "CHUNK_BYTES", 4096)
    strict: list[tuple[int, bool]] = []  # (chunk offset, read unchecked)
    checked: list[int] = []  # chunks Arrow read after the scan
    read_strict, read_checked = jsonio.read_chunk_strict, jsonio.read_chunk_arrow

    def counted_strict(chunk: jsonio.Chunk, *args: Any) -> pa.Table | None:
        table = read_strict(chunk, *args)
        strict.append((chunk.offset, table is not None))
        return table

    def counted_checked(chunk: jsonio.Chunk, *args: Any) -> pa.Table | None:
        checked.append(chunk.offset)
        return read_checked(chunk, *args)

    monkeypatch.setattr(jsonio, "read_chunk_strict", counted_strict)
    monkeypatch.setattr(jsonio, "read_chunk_arrow", counted_checked)
    records = gsm8k_records(shared_data)[:40]
    clean = "".join(json.dumps(r) + "\n" for r in records).encode()
    deep = b'{"instruction": "x", "output": "y", "extra": ' + b"[" * 500 + b"]" * 500 + b"}\n"
    path = tmp_path / "late.jsonl"
    path.write_bytes(clean + deep + clean)
    kept, rejected, _ = read_all(path)
    assert reasons(rejected) == {len(records): "too_deep:extra"}
    assert kept.column("source_index").to_pylist() == [
        *range(len(records)),
        *range(len(records) + 1, 2 * len(records) + 1),
    ]
    *unchecked, (last, parsed) = strict
    assert len(unchecked) >= 3 and all(ok for _, ok in unchecked) and not parsed
    assert last <= len(clean) < min(checked)  # the chunk with the deep record was scanned
    assert len(checked) >= 3  # and so was every chunk after it


def test_a_chunk_starting_with_null_never_reaches_arrow(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow 26 crashes the process when the first record it reads is a bare ``null``. A
    chunk starting with one is read per line instead (``wrong_type:record``); a ``null``
    inside a chunk Arrow reads is a row of nulls (``missing_field:instruction``)."""
    monkeypatch.setattr(jsonio, "CHUNK_BYTES", 4096)
    records = gsm8k_records(shared_data)[:60]
    lines = [json.dumps(r).encode() for r in records]
    nulls = range(7, len(lines), 7)  # some chunks start with one, some hold one inside
    for at in nulls:
        lines[at] = b"null" if at % 2 else b"  null "
    path = tmp_path / "nulls.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with path.open("rb") as stream:  # the chunks (offset, end) that start with a null
        per_line = [
            (c.offset, c.offset + len(c.data))
            for c in jsonio.iter_chunks(stream, 4096)
            if jsonio.null_first(c.data)
        ]
    offsets = {at: sum(len(x) + 1 for x in lines[:at]) for at in nulls}
    python = {at for at, o in offsets.items() if any(a <= o < b for a, b in per_line)}
    assert python and set(nulls) - python  # both cases are in the file
    kept, rejected, _ = read_all(path)
    assert reasons(rejected) == {
        at: "wrong_type:record" if at in python else "missing_field:instruction" for at in nulls
    }
    assert kept.num_rows == len(lines) - len(nulls)
    assert jsonio.null_first(b"\r\n\n  null\n{}") and jsonio.null_first(memoryview(b"null"))
    assert not jsonio.null_first(b'{"a": null}\nnull\n') and not jsonio.null_first(b"  \n")


def test_a_bound_below_the_schema_depth_scans_every_chunk(tmp_path: Path) -> None:
    """History nests three deep (record, pairs, pair): under ``max_depth: 2`` Arrow's schema
    no longer bounds the depth, so each chunk is scanned and such a row rejected."""
    path = write_jsonl(
        tmp_path / "shallow.jsonl",
        [{"instruction": "q", "output": "a"}, {**ALPACA_FULL}, {"instruction": "r", "output": "b"}],
    )
    kept, rejected, _ = read_all(path, params=IngestParams(max_depth=2))
    assert reasons(rejected) == {1: "too_deep:history"}
    assert kept.column("source_index").to_pylist() == [0, 2]
    kept, rejected, _ = read_all(path)
    assert rejected.num_rows == 0 and kept.num_rows == 3


def test_missing_fields_in_a_clean_json_array(tmp_path: Path) -> None:
    """A batch Arrow can convert is checked column-wise, with the same reasons."""
    records = [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "no output"},
        {"instruction": None, "output": "x"},
        {"instruction": "pairs", "output": "x", "history": [["only one"]]},
    ]
    path = tmp_path / "gaps.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    kept, rejected, _ = read_all(path)
    assert kept.column("source_index").to_pylist() == [0]
    assert reasons(rejected) == {
        1: "missing_field:output",
        2: "missing_field:instruction",
        3: "bad_history",
    }


def test_invalid_utf8_late_in_a_large_array(tmp_path: Path, shared_data: Path) -> None:
    """The scanner re-reads past the rows ijson delivered, across many read blocks."""
    records = gsm8k_records(shared_data)
    text = json.dumps(records, indent=1).encode()
    marker = json.dumps(records[5000]["output"]).encode()
    path = tmp_path / "late.json"
    path.write_bytes(text.replace(marker, marker[:-1] + b'\xff"', 1))
    kept, rejected, _ = read_all(path)
    assert (kept.num_rows, reasons(rejected)) == (7472, {5000: "invalid_utf8:output"})


def test_wrong_typed_parquet_column_rejects_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": [1, None]}), path)
    kept, rejected, _ = read_all(path, format="alpaca")
    assert kept.num_rows == 0
    assert reasons(rejected) == {0: "wrong_type:output", 1: "missing_field:output"}


def test_invalid_utf8_in_parquet(tmp_path: Path) -> None:
    """Arrow readers do not check UTF-8: the Arrow paths find the rows themselves."""
    bad = pa.array([b"fine", b"bad \xff"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": bad}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": bad, "completion": ["x", "y"]}), tmp_path / "pc.parquet")
    assert reasons(read_all(tmp_path / "a.parquet")[1]) == {1: "invalid_utf8:output"}
    assert reasons(read_all(tmp_path / "pc.parquet")[1]) == {1: "invalid_utf8:prompt"}


# --- file types ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gsm8k_reference(shared_data: Path) -> pa.Table:
    return read_all(shared_data / GSM8K)[0]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson"])
def test_compressed_and_jsonl_files_match_the_json_array(
    tmp_path: Path, shared_data: Path, gsm8k_reference: pa.Table, suffix: str
) -> None:
    data = "".join(json.dumps(r) + "\n" for r in gsm8k_records(shared_data)).encode()
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"gsm8k_train_alpaca{suffix}"
    path.write_bytes(data)
    assert detect_format(path) == "alpaca"
    kept, _, _ = read_all(path)
    assert kept.equals(gsm8k_reference)


def test_json_lines_in_a_json_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"instruction": "a", "output": "b"}] * 3)
    kept, _, _ = read_all(path)
    assert kept.num_rows == 3


def test_parquet(tmp_path: Path, shared_data: Path, gsm8k_reference: pa.Table) -> None:
    table = pa.Table.from_pylist(gsm8k_records(shared_data)).append_column(
        "extra", pa.array(range(7473))
    )
    path = tmp_path / "gsm8k_train_alpaca.parquet"
    pq.write_table(table, path, row_group_size=1000)
    assert detect_format(path) == "alpaca"
    kept, _, _ = read_all(path)
    assert kept.equals(gsm8k_reference)


def test_hf_save_to_disk(tmp_path: Path, shared_data: Path, gsm8k_reference: pa.Table) -> None:
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list(gsm8k_records(shared_data))
    train.save_to_disk(str(tmp_path / "gsm8k_train_alpaca"))
    assert detect_format(tmp_path / "gsm8k_train_alpaca") == "alpaca"
    kept, _, _ = read_all(tmp_path / "gsm8k_train_alpaca")
    assert kept.equals(gsm8k_reference)

    test = datasets.Dataset.from_list([{"instruction": "t", "output": "u"}])
    datasets.DatasetDict({"test": test, "train": train.select(range(10))}).save_to_disk(
        str(tmp_path / "dd")
    )
    kept, _, _ = read_all(tmp_path / "dd")
    assert kept.num_rows == 10 and set(kept.column("source").to_pylist()) == {"dd"}


# --- detection, override, ids, batches -----------------------------------------------------


def test_detection_covers_every_format(tmp_path: Path) -> None:
    samples = {
        "alpaca": {"instruction": "i", "input": "", "output": "o"},
        "sharegpt": SHAREGPT[0],
        "messages": MESSAGES[0],
        "prompt_completion": {"prompt": "p", "completion": "c"},
        "mcq_csv": {"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "target": "A"},
        "open_qa": {"question": "q", "answers": ["a"]},
        "self_instruct": {"instruction": "i", "instances": [{"input": "", "output": "o"}]},
    }
    assert set(samples) == set(FORMATS)
    for name, record in samples.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [record])
        assert detect_format(path) == name
        kept, rejected, _ = read_all(path)
        assert (kept.num_rows, rejected.num_rows) == (1, 0)


def test_format_override(tmp_path: Path, shared_data: Path) -> None:
    path = write_jsonl(
        tmp_path / "both.jsonl", [{"instruction": "i", "output": "o", "instances": []}]
    )
    assert detect_format(path) == "self_instruct"
    kept, _, _ = read_all(path, format="alpaca", source="mine")
    assert rows(kept)[0]["source"] == "mine" and rows(kept)[0]["response"] == "o"
    with pytest.raises(IngestError) as error:
        read_source(shared_data / "nq/dev.csv", format="alpaca")
    assert error.value.field == "instruction"
    assert "dev.csv" in str(error.value) and "'instruction'" in str(error.value)


def test_ids_are_stable(shared_data: Path, gsm8k_reference: pa.Table) -> None:
    again = read_all(shared_data / GSM8K, params=IngestParams(batch_rows=999))[0]
    assert again.column("id").equals(gsm8k_reference.column("id"))
    assert len(set(gsm8k_reference.column("id").to_pylist())) == gsm8k_reference.num_rows
    renamed = read_all(shared_data / GSM8K, source="other")[0]
    assert set(renamed.column("id").to_pylist()).isdisjoint(
        gsm8k_reference.column("id").to_pylist()
    )


def test_ids_are_hashed_in_slices(
    tmp_path: Path, shared_data: Path, gsm8k_reference: pa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids are hashed ``ID_ROWS`` rows at a time: the same ids as one hash of the batch."""
    monkeypatch.setattr(results, "ID_ROWS", 1000)
    kept = read_all(shared_data / GSM8K)[0]
    assert kept.column("id").num_chunks == 8
    assert kept.column("id").equals(gsm8k_reference.column("id"))
    whole = row_ids(kept.column("source"), kept.column("prompt"), kept.column("response"))
    assert kept.column("id").to_pylist() == whole.to_pylist()
    monkeypatch.setattr(results, "ID_ROWS", 2)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "i", "output": 1}] * 5)
    _, rejected, _ = read_all(path)  # wrong_type:output
    where = position_ids(rejected.column("source"), rejected.column("source_index"))
    assert rejected.num_rows == 5 and rejected.column("id").to_pylist() == where.to_pylist()


@pytest.mark.parametrize("name", [GSM8K, "nq/dev.csv"])
def test_batches_are_bounded(shared_data: Path, name: str) -> None:
    _, _, results = read_all(shared_data / name, params=IngestParams(batch_rows=1000))
    sizes = [r.stats["rows_read"] for r in results]
    assert max(sizes) == 1000 and all(s == 1000 for s in sizes[:-1])


def test_arrow_jsonl_batches_are_bounded(tmp_path: Path, shared_data: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", gsm8k_records(shared_data))
    _, _, results = read_all(path, params=IngestParams(batch_rows=700))
    sizes = [r.kept.num_rows + r.rejected.num_rows for r in results]
    assert sum(sizes) == 7473 and max(sizes) == 700 and all(s == 700 for s in sizes[:-1])


@pytest.mark.parametrize("name", [GSM8K, "nq/dev.csv"])
def test_source_batches_are_read_first_and_built_on_call(
    tmp_path: Path, shared_data: Path, name: str
) -> None:
    """The whole file can be read before any batch is built, and the batches, built in any
    order, are read_source's: Arrow-parsed JSON lines and Python records (CSV) alike."""
    path = shared_data / name
    if name == GSM8K:
        path = write_jsonl(tmp_path / "g.jsonl", gsm8k_records(shared_data))
    params = IngestParams(batch_rows=700)
    built = [b() for b in reversed(list(source_batches(path, params=params)))][::-1]
    expected = list(read_source(path, params=params))
    assert len(built) == len(expected) > 1
    for got, want in zip(built, expected, strict=True):
        assert got.kept.equals(want.kept) and got.rejected.equals(want.rejected)
        assert got.stats == want.stats


# --- file-level errors ---------------------------------------------------------------------


def ingest_error(path: Path, **kwargs: Any) -> IngestError:
    with pytest.raises(IngestError) as error:
        list(read_source(path, **kwargs))
    assert path.name in str(error.value)
    return error.value


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    assert "no such file" in str(ingest_error(tmp_path / "absent.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    assert "unsupported file type" in str(ingest_error(tmp_path / "notes.txt"))
    assert "not a datasets save_to_disk" in str(ingest_error(tmp_path))


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "nq.jsonl"
    path.write_text('{"question": "a", "answers": ["x"]}\n\n{"question": "b" "answers": []}\n')
    error = ingest_error(path)
    assert error.location == "line 3"
    assert str(error).startswith(f"{path}: line 3: invalid JSON: Expecting ',' delimiter")


def test_malformed_line_deep_in_an_arrow_read_file(tmp_path: Path, shared_data: Path) -> None:
    lines = [json.dumps(r) for r in gsm8k_records(shared_data)]
    lines[6000] = lines[6000][:-1]
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert ingest_error(path).location == "line 6001"


def test_malformed_json_array(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n'
    )
    error = ingest_error(path)
    assert (error.location, error.message) == ("line 3", "invalid JSON: Expecting ',' delimiter")
    path.write_text('[{"instruction": "a", "output": "b"}] trailing')
    assert "extra data" in str(ingest_error(path))


def test_malformed_csv(tmp_path: Path) -> None:
    path = tmp_path / "mmlu.csv"
    path.write_text("question,A,B,C,D,target\nq,a,b,c,d,A\nq,a,b,c,A\n")
    error = ingest_error(path)
    assert error.location == "line 3" and "expected 6 fields, got 5" in error.message


def test_unknown_format_names_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x", "label": 1}])
    error = ingest_error(path)
    assert "unknown format" in str(error) and "text, label" in str(error)
    with pytest.raises(IngestError, match="unknown format 'yaml'"):
        read_source(path, format="yaml")


def test_corrupt_compressed_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(b"this is not gzip" * 10)
    assert "cannot read" in str(ingest_error(path, format="alpaca"))


@pytest.mark.parametrize(
    ("name", "text"), [("empty.jsonl", "\n"), ("empty.json", " [ ] "), ("blank.json", "")]
)
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    """No records is no rows, detected or not (the build decides whether that is an error)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(IngestError, match="no records"):
        detect_format(path)
    assert list(read_source(path)) == list(read_source(path, format="alpaca")) == []


def test_ingest_error_pickles() -> None:
    error = IngestError("a.jsonl", "invalid JSON: x", location="line 3", field="output")
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.location, again.field) == (str(error), "line 3", "output")
    assert str(error) == "a.jsonl: line 3: field 'output': invalid JSON: x"
