"""The CRaFT stage end to end on the fact world, with real vLLM and real rehearsal."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.craft import CraftParams, run_craft
from storage.gencache import GenerationCache
from transforms.ingest import read_source


@pytest.fixture(scope="module")
def craft_run(fact_world, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("craft")
    table = pa.concat_tables(r.kept for r in read_source(fact_world.facts_path, format="open_qa"))
    params = CraftParams(model=str(fact_world.model_dir))
    result = run_craft(table, params, work, GenerationCache(work / "cache"))
    again = run_craft(table, params, work, GenerationCache(work / "cache"))
    groups = {f["question"]: f for f in fact_world.facts()}
    return {"table": table, "result": result, "again": again, "groups": groups}


def test_accounting_and_reasons(craft_run: dict) -> None:
    result = craft_run["result"]
    assert result.kept.num_rows + result.rejected.num_rows == craft_run["table"].num_rows
    reasons = set(result.rejected.column("reject_reason").to_pylist())
    assert reasons and all(r.startswith("craft:") for r in reasons)


def test_known_facts_are_vanilla_with_gold_and_unknown_never_vanilla(craft_run: dict) -> None:
    rows = craft_run["result"].kept.to_pylist()
    labels = {"vanilla": 0, "idk": 0}
    for row in rows:
        fact = craft_run["groups"][row["rait_question"]]
        labels[row["craft_label"]] += 1
        if row["craft_label"] == "vanilla":
            assert fact["group"] != "unknown"
            assert row["response"] == fact["answers"][0]
        else:
            assert fact["group"] != "known"
            assert row["response"] == "I don't know"
            assert row["original_response"] == fact["answers"][0]
            assert row["knowledge_flow"] < 0
    total = labels["vanilla"] + labels["idk"]
    assert labels["idk"] > 0
    assert abs(labels["idk"] - round(0.2 * total)) <= 1  # the default IdK share


def test_scores_are_columns(craft_run: dict) -> None:
    kept = craft_run["result"].kept
    for column in (
        "correctness_init",
        "certainty_init",
        "correctness_rehearsal",
        "knowledge_flow",
        "certainty_flow",
        "craft_label",
    ):
        assert column in kept.column_names
    assert craft_run["result"].stats["rehearsal_rows"] > 0


def test_second_run_makes_no_engine_calls(craft_run: dict) -> None:
    stats = craft_run["again"].stats
    assert stats["engine_init"]["engine_calls"] == 0
    assert stats["engine_rehearsal"]["engine_calls"] == 0
    assert craft_run["again"].kept.equals(craft_run["result"].kept)
