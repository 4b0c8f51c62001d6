"""Exports of real Delta versions to the trainer formats, checked with TRL's own helpers
and against LLaMA-Factory's documented dataset_info layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import pytest
from test_storage import CALL, commit_build, ids, rejected_table
from test_storage import canonical_table as table
from trl.data_utils import is_conversational

from storage import EXPORT_FORMATS, DatasetStore, StoreError, export

# canonical_table cycles four shapes: 0 system+user, 1 tool exchange, 2 multi-turn, 3 MCQ.
ROWS = 8
TOOL_ROWS = 2


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    """sft@0 has a000..a007 (+ one rejected row); sft@1 (latest) has other rows."""
    store = DatasetStore(str(tmp_path / "store"))
    commit_build(store, "sft", tmp_path, table(ids("a", ROWS)), rejected_table(["r000"]))
    commit_build(store, "sft", tmp_path, table(ids("b", 3)))
    return store


def load_json(path: Path, tmp_path: Path) -> datasets.Dataset:
    return datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
    )


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "export_manifest.json").read_text())


def test_trl_messages(store: DatasetStore, tmp_path: Path) -> None:
    result = export(store, "sft@0", "trl_messages", tmp_path / "out")
    assert (result.rows, result.skipped, result.files) == (ROWS, 0, ["sft_v0.jsonl"])
    loaded = load_json(tmp_path / "out" / "sft_v0.jsonl", tmp_path)
    assert len(loaded) == ROWS
    rows = loaded.to_list()
    assert all(is_conversational(row) for row in rows)
    by_response = {row["messages"][-1]["content"]: row for row in rows}
    system_row, tool_row = by_response["ok a000"], by_response["ok a001"]
    assert [m["role"] for m in system_row["messages"]] == ["system", "user", "assistant"]
    assert system_row["messages"][-1]["content"] == "ok a000"
    assert [m["role"] for m in tool_row["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = tool_row["messages"][1]["tool_calls"][0]
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == json.loads(CALL)["arguments"]
    assert tool_row["messages"][2]["name"] == "get_weather"
    assert tool_row["tools"][0]["function"]["name"] == "get_weather"
    assert system_row["tools"] is None

    info = manifest(tmp_path / "out")
    assert info["name"] == info["dataset"] == "sft" and info["ref"] == "sft@0"
    assert info["version"] == 0 and info["split"] == "train"
    assert info["format"] == "trl_messages" and info["rows"] == ROWS
    assert info["files"] == ["sft_v0.jsonl"] and info["skipped"] == 0 and info["created_at"]


def test_trl_prompt_completion(store: DatasetStore, tmp_path: Path) -> None:
    result = export(store, "sft@0", "trl_prompt_completion", tmp_path / "out")
    rows = load_json(tmp_path / "out" / result.files[0], tmp_path).to_list()
    assert len(rows) == ROWS
    assert all(is_conversational(row) for row in rows)
    for row in rows:
        assert row["completion"][0]["role"] == "assistant"
        assert row["prompt"][-1]["role"] in {"user", "tool"}
    tool_row = next(row for row in rows if row["completion"][0]["content"] == "ok a001")
    assert tool_row["prompt"][1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_llamafactory_alpaca(store: DatasetStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = export(store, "sft@0", "llamafactory_alpaca", out)
    assert result.rows == ROWS - TOOL_ROWS
    assert result.skipped == TOOL_ROWS
    assert list(result.skipped_reasons.values()) == [TOOL_ROWS]
    assert "tool turns" in next(iter(result.skipped_reasons))

    records = json.loads((out / "sft_v0.json").read_text())
    assert isinstance(records, list) and len(records) == ROWS - TOOL_ROWS
    by_output = {record["output"]: record for record in records}
    first, multi = by_output["ok a000"], by_output["ok a002"]
    assert first == {
        "instruction": "Say hi #0",
        "input": "",
        "output": "ok a000",
        "system": "You are terse.",
        "tools": "",
        "history": [],
    }
    assert multi["history"] == [["Capital of France?", "Paris."]]
    assert multi["instruction"] == "And of Italy? #2"

    info = json.loads((out / "dataset_info.json").read_text())
    assert info == {
        "sft_v0": {
            "file_name": "sft_v0.json",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "system": "system",
                "tools": "tools",
                "history": "history",
            },
        }
    }
    loaded = load_json(out / "sft_v0.json", tmp_path)
    assert set(info["sft_v0"]["columns"].values()) <= set(loaded.column_names)
    assert manifest(out)["skipped"] == TOOL_ROWS
    assert manifest(out)["files"] == ["sft_v0.json", "dataset_info.json"]


def test_llamafactory_sharegpt(store: DatasetStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "o.json"}}))
    result = export(store, "sft@0", "llamafactory_sharegpt", out)
    assert (result.rows, result.skipped) == (ROWS, 0)

    records = json.loads((out / "sft_v0.json").read_text())
    by_output = {record["conversations"][-1]["value"]: record for record in records}
    tool, system = by_output["ok a001"], by_output["ok a000"]
    assert [m["from"] for m in tool["conversations"]] == [
        "human",
        "function_call",
        "observation",
        "gpt",
    ]
    assert json.loads(tool["conversations"][1]["value"]) == json.loads(CALL)
    assert json.loads(tool["tools"])[0]["function"]["name"] == "get_weather"
    assert system["system"] == "You are terse."
    assert [m["from"] for m in system["conversations"]] == ["human", "gpt"]
    for record in records:  # LLaMA-Factory's rule: human/observation odd, gpt/function even
        roles = [m["from"] for m in record["conversations"]]
        assert len(roles) % 2 == 0
        assert all(r in {"human", "observation"} for r in roles[0::2])
        assert all(r in {"gpt", "function_call"} for r in roles[1::2])

    info = json.loads((out / "dataset_info.json").read_text())
    assert info["other"] == {"file_name": "o.json"}  # existing entries are kept
    entry = info["sft_v0"]
    assert entry["file_name"] == "sft_v0.json"
    assert entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "conversations", "system": "system", "tools": "tools"}
    assert entry["tags"]["role_tag"] == "from" and entry["tags"]["function_tag"] == "function_call"
    assert len(load_json(out / "sft_v0.json", tmp_path)) == ROWS


def test_jsonl_and_parquet(store: DatasetStore, tmp_path: Path) -> None:
    expected = store.read("sft@0").sort_by("id")
    export(store, "sft@0", "jsonl", tmp_path / "j")
    lines = (tmp_path / "j" / "sft_v0.jsonl").read_text().splitlines()
    rows = sorted((json.loads(line) for line in lines), key=lambda r: r["id"])
    assert rows == expected.to_pylist()

    result = export(store, "sft@0", "parquet", tmp_path / "p")
    assert result.files == ["sft_v0.parquet"]
    written = pq.read_table(tmp_path / "p" / "sft_v0.parquet").sort_by("id")
    assert written.to_pylist() == expected.to_pylist()
    assert not list((tmp_path / "p").glob("*.tmp"))


def test_export_rejected_split_and_old_version(store: DatasetStore, tmp_path: Path) -> None:
    result = export(store, "sft@0", "jsonl", tmp_path / "r", split="rejected")
    assert result.files == ["sft_v0_rejected.jsonl"] and result.rows == 1
    row = json.loads((tmp_path / "r" / "sft_v0_rejected.jsonl").read_text())
    assert (row["id"], row["reject_reason"]) == ("r000", "too long")

    latest = export(store, "sft", "trl_messages", tmp_path / "latest")
    assert (latest.version, latest.rows, latest.files) == (1, 3, ["sft_v1.jsonl"])


def test_bad_format_and_ref(store: DatasetStore, tmp_path: Path) -> None:
    with pytest.raises(
        StoreError, match="unknown export format 'csv'; valid formats: trl_messages"
    ):
        export(store, "sft", "csv", tmp_path / "x")
    with pytest.raises(StoreError, match="unknown version 7"):
        export(store, "sft@7", "jsonl", tmp_path / "x")
    assert set(EXPORT_FORMATS) == {
        "trl_messages",
        "trl_prompt_completion",
        "llamafactory_alpaca",
        "llamafactory_sharegpt",
        "jsonl",
        "parquet",
        "response_only",
        "trl_preference",
        "trl_kto",
        "cut",
        "llamafactory_preference",
    }
