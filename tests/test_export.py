"""Exports of real Delta versions to the trainer formats, checked with TRL's own helpers
and against LLaMA-Factory's documented dataset_info layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_ingest import MESSAGES, SHAREGPT, write_jsonl
from test_storage import CALL, commit_build, ids, rejected_table
from test_storage import canonical_table as table
from trl.data_utils import is_conversational

from storage import EXPORT_FORMATS, DatasetStore, StoreError, export
from transforms.ingest import read_source

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
    assert info["format"] == "trl_messages" and info["records_written"] == ROWS
    assert info["rows_read"] == info["rows_exported"] == ROWS and "rows" not in info
    assert info["files"] == ["sft_v0.jsonl"] and info["skipped"] == 0 and info["created_at"]
    assert "prompts" not in info and "pairs" not in info  # preference counts only


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
    assert manifest(out)["rows_read"] == ROWS and manifest(out)["rows_exported"] == ROWS - TOOL_ROWS
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
        "llamafactory_kto",
    }


def ingested(path: Path) -> pa.Table:
    return pa.concat_tables([result.kept for result in read_source(path)])


def by_first_user(records: list[Any], key: str) -> dict[str, Any]:
    """Exported records by their first user turn (ShareGPT ``{from, value}`` or messages)."""
    keyed = {}
    for record in records:
        turns = record[key]
        user = next(t for t in turns if t.get("from", t.get("role")) in ("human", "user"))
        keyed[user.get("value", user.get("content"))] = record
    return keyed


def test_final_tool_call_round_trip(tmp_path: Path) -> None:
    """A conversation ending in a tool call (kept by ingest; its response is the call's
    JSON) exports as a ``function_call`` turn / an assistant message with ``tool_calls``,
    and reads back through ingest as the same rows."""
    store = DatasetStore(str(tmp_path / "store"))
    sharegpt = tmp_path / "chat.json"
    sharegpt.write_text(json.dumps(SHAREGPT), encoding="utf-8")
    rows = ingested(sharegpt)
    assert rows.num_rows == 4  # Paris (ends with gpt), Rome and Oslo (end with calls), Ada
    commit_build(store, "sg", tmp_path, rows)
    rome_call = {"name": "weather", "arguments": {"city": "Rome"}}

    out = tmp_path / "lf"
    assert export(store, "sg", "llamafactory_sharegpt", out).skipped == 0
    records = by_first_user(json.loads((out / "sg_v0.json").read_text()), "conversations")
    rome, oslo = records["Weather in Rome?"], records["Weather in Oslo and Rome?"]
    ada = records["Ada as JSON?"]
    assert [m["from"] for m in rome["conversations"]] == ["human", "function_call"]
    assert json.loads(rome["conversations"][1]["value"]) == rome_call
    assert [m["from"] for m in oslo["conversations"]] == ["human", "function_call"]
    assert len(json.loads(oslo["conversations"][1]["value"])) == 2
    assert ada["conversations"][-1] == {"from": "gpt", "value": '{"name": "Ada", "born": 1815}'}
    assert records["Weather in Paris?"]["conversations"][-1]["from"] == "gpt"
    # LLaMA-Factory's sharegpt file read back gives the stored prompt, response and tools.
    fields = ["prompt", "response", "tools"]
    assert (
        ingested(out / "sg_v0.json")
        .select(fields)
        .sort_by("response")
        .equals(store.read("sg", columns=fields).sort_by("response"))
    )

    assert export(store, "sg", "trl_messages", tmp_path / "trl").skipped == 0
    lines = (tmp_path / "trl" / "sg_v0.jsonl").read_text().splitlines()
    messages = by_first_user([json.loads(line) for line in lines], "messages")
    assert all(is_conversational(record) for record in messages.values())
    rome_message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": rome_call}],
    }
    assert messages["Weather in Rome?"]["messages"][-1] == rome_message
    assert len(messages["Weather in Oslo and Rome?"]["messages"][-1]["tool_calls"]) == 2
    assert messages["Ada as JSON?"]["messages"][-1] == {
        "role": "assistant",
        "content": '{"name": "Ada", "born": 1815}',
    }
    back = by_first_user(ingested(tmp_path / "trl" / "sg_v0.jsonl").to_pylist(), "prompt")
    assert json.loads(back["Weather in Rome?"]["response"]) == rome_message["tool_calls"]

    export(store, "sg", "trl_prompt_completion", tmp_path / "pc")
    lines = (tmp_path / "pc" / "sg_v0.jsonl").read_text().splitlines()
    completions = by_first_user([json.loads(line) for line in lines], "prompt")
    assert completions["Weather in Rome?"]["completion"] == [rome_message]

    alpaca = export(store, "sg", "llamafactory_alpaca", tmp_path / "alpaca")
    assert alpaca.rows == 1  # Ada only: alpaca has no place for tool calls
    assert alpaca.skipped_reasons == {
        "tool turns (alpaca cannot represent them; use llamafactory_sharegpt)": 3
    }


def test_final_openai_tool_calls_export(tmp_path: Path) -> None:
    """An OpenAI conversation ending in an assistant message with only ``tool_calls``
    exports with the calls as ``tool_calls`` (arguments parsed) and as ``function_call``."""
    store = DatasetStore(str(tmp_path / "store"))
    commit_build(store, "oa", tmp_path, ingested(write_jsonl(tmp_path / "m.jsonl", MESSAGES)))
    export(store, "oa", "trl_messages", tmp_path / "trl")
    lines = (tmp_path / "trl" / "oa_v0.jsonl").read_text().splitlines()
    last = [json.loads(line)["messages"][-1] for line in lines]
    calls = [m["tool_calls"] for m in last if "tool_calls" in m]
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}
    assert calls == [[call], [call]]  # rows 4 and 5 (5 has its text as the turn before)

    result = export(store, "oa", "llamafactory_sharegpt", tmp_path / "lf")
    records = json.loads((tmp_path / "lf" / "oa_v0.json").read_text())
    ends = [r["conversations"][-1] for r in records if r["conversations"][-1]["from"] != "gpt"]
    assert ends == [{"from": "function_call", "value": json.dumps(call["function"])}]
    # Row 5's assistant text followed by the call is two assistant-side turns in a row,
    # which LLaMA-Factory's sharegpt cannot hold: skipped and counted, not lost silently.
    assert result.skipped_reasons == {
        "turns do not alternate human|observation and gpt|function_call": 1
    }


def test_real_corpora_round_trip_through_trainer_formats(shared_data: Path, tmp_path: Path) -> None:
    """Real rows (GPTeacher role-play and tool use, GSM8K, MMLU, NQ) as a version, exported
    to each trainer format and read back: HF ``datasets`` loads every row, TRL sees
    conversations whose last message is the stored response, and the ShareGPT file
    re-ingests to the same prompts and responses."""
    names = [
        "instructions/gpteacher_roleplay.json",
        "instructions/gpteacher_toolformer.json",
        "instructions/gsm8k_train_alpaca.json",
        "mmlu/test/anatomy_test.csv",
        "nq/dev.csv",
    ]
    parts = [next(iter(read_source(shared_data / name))).kept.slice(0, 60) for name in names]
    rows = pa.concat_tables(parts, promote_options="permissive")
    store = DatasetStore(str(tmp_path / "store"))
    commit_build(store, "real", tmp_path, rows)
    stored = sorted(store.read("real").column("response").to_pylist())

    for fmt, key in (("trl_messages", "messages"), ("trl_prompt_completion", "completion")):
        result = export(store, "real", fmt, tmp_path / fmt)
        assert (result.rows, result.skipped) == (rows.num_rows, 0)
        loaded = load_json(tmp_path / fmt / result.files[0], tmp_path).to_list()
        assert len(loaded) == rows.num_rows
        assert all(is_conversational(record) for record in loaded)
        assert sorted(record[key][-1]["content"] for record in loaded) == stored

    out = tmp_path / "sharegpt"
    result = export(store, "real", "llamafactory_sharegpt", out)
    assert (result.rows, result.skipped) == (rows.num_rows, 0)
    assert len(load_json(out / result.files[0], tmp_path)) == rows.num_rows

    def pairs(table: pa.Table) -> list[str]:
        return sorted(json.dumps(r) for r in table.select(["prompt", "response"]).to_pylist())

    assert pairs(ingested(out / result.files[0])) == pairs(rows)


# -- judged versions: preference, KTO and CUT exports ------------------------------------

#: LLaMA-Factory's dataset_info.json schema: the entry keys, column names and sharegpt tags
#: of its data/README.md, which ``DatasetAttr.join`` (src/llamafactory/data/parser.py) reads.
LF_ENTRY_KEYS = {
    "hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name", "file_name", "formatting",
    "ranking", "subset", "split", "folder", "num_samples", "columns", "tags",
}  # fmt: skip
LF_COLUMNS = {
    "prompt", "query", "response", "history", "messages", "system", "tools", "images",
    "videos", "audios", "chosen", "rejected", "kto_tag",
}  # fmt: skip
LF_TAGS = {  # each with its default, which our entries spell out
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}  # fmt: skip


def llamafactory_examples(entry: dict[str, Any], records: list[Any], stage: str) -> list[Any]:
    """What LLaMA-Factory makes of an export for ``stage`` (its DPO workflow loads with
    ``stage="rm"``): the loader's stage check (data/loader.py) and the sharegpt converter's
    rules (data/converter.py), as (prompt roles, response roles, kind) per record.

    Raises:
        ValueError: the loader's refusal of the dataset for this stage.
    """
    assert set(entry) <= LF_ENTRY_KEYS and entry["formatting"] == "sharegpt"
    assert set(entry["columns"]) <= LF_COLUMNS and set(entry["tags"]) <= set(LF_TAGS)
    ranking = entry.get("ranking", False)
    if (stage == "rm") != (ranking is True):
        raise ValueError("The dataset is not applicable in the current training stage.")
    columns, tags = entry["columns"], entry["tags"]
    odd = (tags["user_tag"], tags.get("observation_tag", "observation"))
    even = (tags["assistant_tag"], tags.get("function_tag", "function_call"))
    examples = []
    for record in records:
        messages = record[columns["messages"]]
        roles = [m[tags["role_tag"]] for m in messages]
        assert all(isinstance(m[tags["content_tag"]], str) for m in messages)
        assert all(role in (odd, even)[i % 2] for i, role in enumerate(roles)), roles
        assert len(roles) % 2 == (1 if ranking else 0), roles  # else "Invalid message count"
        if "kto_tag" in columns:
            assert isinstance(record[columns["kto_tag"]], bool)  # else not read as KTO
            examples.append((roles[:-1], roles[-1:], "kto"))
        elif ranking:
            chosen, rejected = record[columns["chosen"]], record[columns["rejected"]]
            assert isinstance(chosen, dict) and isinstance(rejected, dict)
            assert chosen[tags["role_tag"]] in even and rejected[tags["role_tag"]] in even
            examples.append((roles, [chosen[tags["role_tag"]]] * 2, "pairwise"))
        else:
            examples.append((roles[:-1], roles[-1:], "sft"))
    return examples


WRONG = ("I do not know.", "Nobody can say.", "It was never recorded.")


def judged_rows(prompts: pa.Table) -> pa.Table:
    """The ``judge`` stage's output on ``prompts`` (open-QA rows): the prompt rows followed
    by judged responses, made as the stage makes them (``Generated`` rows through
    ``generated_tables`` with the stage's columns, judged by the reference judge). Prompt
    ``i`` gets responses by ``i % 4``: right + wrong; wrong + wrong; right + right; right +
    right + wrong. The last prompt gets a system turn after the first turn, which
    LLaMA-Factory cannot hold."""
    from pipelines.judge import EXTRA, STAGE
    from transforms.synthesis import judge as jd
    from transforms.synthesis.lineage import Generated, generated_tables

    out = []
    last = prompts.num_rows - 1
    for i, row in enumerate(prompts.to_pylist()):
        right = [f"It is {row['references'][0]}.", f"The answer: {row['references'][0]}"]
        responses = [
            [right[0], WRONG[0]],
            [WRONG[1], WRONG[2]],
            right,
            [*right, WRONG[0]],
        ][i % 4]
        prompt = row["prompt"]
        if i == last:
            later_system = [
                {"role": "assistant", "content": "?"},
                {"role": "system", "content": "!"},
            ]
            prompt = [prompt[0], *later_system, *prompt]
        for j, response in enumerate(responses):
            verdict = jd.reference_judgment(response, row["task"], row["references"])
            extra = {"judge_sample": j, "judgment": verdict.text, "judgment_ok": verdict.ok}
            extra["judge"] = jd.reference_fingerprint()
            out.append(
                Generated(
                    prompt,
                    response,
                    [row["id"]],
                    task=row["task"],
                    references=row["references"],
                    extra=extra,
                )
            )
    kept, rejected = generated_tables(out, STAGE, "test-generator", EXTRA)
    assert rejected.num_rows == 0
    return pa.concat_tables([prompts, kept], promote_options="permissive")


@pytest.fixture(scope="module")
def judged(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    """pref@0: 24 real NQ questions and their judged responses (+ 2 rejected rows)."""
    tmp = tmp_path_factory.mktemp("judged")
    store = DatasetStore(str(tmp / "store"))
    prompts = next(iter(read_source(shared_data / "nq" / "dev.csv"))).kept.slice(0, 24)
    commit_build(store, "pref", tmp, judged_rows(prompts), rejected_table(["r000", "r001"]))
    return store


def records_of(path: Path) -> list[Any]:
    text = path.read_text()
    return (
        json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines()]
    )


def expected_pairs(rows: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(pairs, positive responses left unpaired, rows of prompts without a negative) of
    judged ``rows``, counted from their judgments."""
    groups: dict[str, list[bool]] = {}
    for row in rows:
        groups.setdefault(row["lineage_parents"][0], []).append(row["judgment_ok"])
    pairs = sum(oks.count(False) for oks in groups.values())
    unpaired = sum(
        max(0, oks.count(True) - oks.count(False)) for oks in groups.values() if False in oks
    )
    no_negative = sum(len(oks) for oks in groups.values() if False not in oks)
    return pairs, unpaired, no_negative


def test_manifest_counts_rows_and_records_apart(judged: DatasetStore, tmp_path: Path) -> None:
    """On a judged version, every format's manifest adds up: ``rows_read`` is the split's
    row count and equals ``rows_exported + skipped``; ``records_written`` is the number of
    records in the file; the preference formats count prompts (and pairs) on their own."""
    split_rows = judged.versions("pref")[0].rows["train"]
    rows = judged.read("pref@0").to_pylist()
    responses = [r for r in rows if r.get("judgment_ok") is not None]
    prompt_rows = len(rows) - len(responses)
    pairs, unpaired, no_negative = expected_pairs(responses)
    assert prompt_rows == 24 and unpaired > 0 and no_negative > 0 and pairs > 0

    for fmt in EXPORT_FORMATS:
        result = export(judged, "pref@0", fmt, tmp_path / fmt)
        info = manifest(tmp_path / fmt)
        assert info == result.to_dict()
        assert info["rows_read"] == split_rows == len(rows), fmt
        assert info["rows_read"] == info["rows_exported"] + info["skipped"], fmt
        assert info["skipped"] == sum(info["skipped_reasons"].values()), fmt
        data = tmp_path / fmt / result.files[0]
        written = pq.read_metadata(data).num_rows if fmt == "parquet" else len(records_of(data))
        assert info["records_written"] == written == result.rows, fmt

    kto = manifest(tmp_path / "trl_kto")
    assert kto["records_written"] == kto["rows_exported"] == kto["judged_responses"]
    assert kto["skipped_reasons"] == {
        "not a judged response (a prompt row or a row the judge stage did not judge)": 24
    }
    assert (kto["prompts"], kto["prompts_exported"]) == (24, 24) and "pairs" not in kto

    dpo = manifest(tmp_path / "trl_preference")
    assert dpo["pairs"] == dpo["records_written"] == pairs
    assert dpo["skipped_reasons"]["no negative response"] == no_negative
    assert (
        dpo["skipped_reasons"][
            "positive response left unpaired (more positive than negative responses)"
        ]
        == unpaired
    )
    assert dpo["prompts"] == 24 and 0 < dpo["prompts_exported"] < 24
    # A pair uses two judged rows (or one and the reference): rows and records differ.
    assert dpo["rows_exported"] != dpo["records_written"]

    lf_dpo, lf_kto = (
        manifest(tmp_path / "llamafactory_preference"),
        manifest(tmp_path / "llamafactory_kto"),
    )
    system_turn = "system turn after the first turn"
    assert lf_kto["skipped_reasons"][system_turn] == 3  # the last prompt's three responses
    assert lf_kto["records_written"] == kto["records_written"] - 3
    assert lf_dpo["skipped_reasons"][system_turn] == 3 and lf_dpo["pairs"] == pairs - 1
    sft = manifest(tmp_path / "trl_messages")
    assert sft["rows_exported"] == sft["records_written"] == len(rows) and "prompts" not in sft


def test_llamafactory_kto(judged: DatasetStore, tmp_path: Path) -> None:
    """``llamafactory_kto`` is what LLaMA-Factory's ``kto`` stage loads: sharegpt with a
    boolean ``kto_tag`` and no ``ranking``; ``llamafactory_preference`` (``ranking: true``)
    is refused there and loads for ``rm``/``dpo`` only."""
    out = tmp_path / "lf"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "o.json"}}))
    result = export(judged, "pref@0", "llamafactory_kto", out)
    assert result.files == ["pref_v0.json", "dataset_info.json"]
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"other", "pref_v0"}
    entry = info["pref_v0"]
    assert entry == {
        "file_name": "pref_v0.json",
        "formatting": "sharegpt",
        "columns": {
            "messages": "conversations",
            "kto_tag": "kto_tag",
            "system": "system",
            "tools": "tools",
        },
        "tags": LF_TAGS,
    }
    records = json.loads((out / "pref_v0.json").read_text())
    examples = llamafactory_examples(entry, records, stage="kto")
    assert len(examples) == result.records_written and {e[2] for e in examples} == {"kto"}
    with pytest.raises(ValueError, match="not applicable in the current training stage"):
        llamafactory_examples(entry, records, stage="rm")

    judged_rows_ = {
        (r["prompt"][-1]["content"], r["response"]): r["judgment_ok"]
        for r in judged.read("pref@0").to_pylist()
        if r.get("judgment_ok") is not None
    }
    for record in records:
        human, gpt = record["conversations"][-2]["value"], record["conversations"][-1]["value"]
        assert record["kto_tag"] is judged_rows_[(human, gpt)]
        assert (record["system"], record["tools"]) == ("", "")
    assert {r["kto_tag"] for r in records} == {True, False}
    assert len(load_json(out / "pref_v0.json", tmp_path)) == len(records)

    pairs = tmp_path / "pairs"
    export(judged, "pref@0", "llamafactory_preference", pairs)
    entry = json.loads((pairs / "dataset_info.json").read_text())["pref_v0"]
    records = json.loads((pairs / "pref_v0.json").read_text())
    assert {e[2] for e in llamafactory_examples(entry, records, stage="rm")} == {"pairwise"}
    with pytest.raises(ValueError, match="not applicable in the current training stage"):
        llamafactory_examples(entry, records, stage="kto")
