"""The CRaFT stage end to end on the fact world, with real vLLM and real rehearsal."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipelines.build import build_dataset
from pipelines.craft import CraftParams, run_craft
from storage.dataset import DatasetStore
from storage.gencache import GenerationCache, cache_dir
from transforms.ingest import read_source


@pytest.fixture(scope="module")
def craft_run(fact_world, prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The CRaFT build of the fact world through the flow, twice, then the stage again."""
    folder = tmp_path_factory.mktemp("craft")
    spec = folder / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "fw-rait",
                "sources": [{"path": str(fact_world.facts_path), "format": "open_qa"}],
                "stages": [
                    {"normalize": {}},
                    {"exact_dedup": {}},
                    {"craft": {"model": str(fact_world.model_dir)}},
                ],
            }
        )
    )
    store = DatasetStore(str(folder / "store"))
    first = build_dataset(str(spec), store=store.root)
    second = build_dataset(str(spec), store=store.root)
    # The stage alone over the same rows, with the build's work folder and cache: the
    # generation cache and the rehearsed checkpoint are reused, so no model is called.
    table = pa.concat_tables(r.kept for r in read_source(fact_world.facts_path, format="open_qa"))
    again = run_craft(
        table,
        CraftParams(model=str(fact_world.model_dir)),
        Path(store.root) / "_work" / "fw-rait" / "stages",
        GenerationCache(cache_dir(store.root)),
    )
    groups = {f["question"]: f for f in fact_world.facts()}
    return {
        "first": first,
        "second": second,
        "again": again,
        "store": store,
        "groups": groups,
        "rows": table.num_rows,
    }


def test_accounting_and_reasons(craft_run: dict) -> None:
    rows = craft_run["first"]["rows"]
    assert rows["in"] == craft_run["rows"] == rows["train"] + rows["rejected"]
    rejected = craft_run["store"].read("fw-rait", "rejected")
    reasons = set(rejected.column("reject_reason").to_pylist())
    assert reasons and all(r.startswith("craft:") for r in reasons)


def test_known_facts_are_vanilla_with_gold_and_unknown_never_vanilla(craft_run: dict) -> None:
    rows = craft_run["store"].read("fw-rait", "train").to_pylist()
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
    kept = craft_run["store"].read("fw-rait", "train")
    for column in (
        "correctness_init",
        "certainty_init",
        "correctness_rehearsal",
        "knowledge_flow",
        "certainty_flow",
        "craft_label",
    ):
        assert column in kept.column_names
    assert craft_run["again"].stats["rehearsal_rows"] > 0


def test_second_build_makes_no_engine_calls(craft_run: dict) -> None:
    first, second = craft_run["first"]["cache"], craft_run["second"]["cache"]
    assert first["engine_calls"] > 0 and first["misses"] > 0
    assert second == {"hits": 0, "misses": 0, "engine_calls": 0}  # every task reused
    assert craft_run["second"]["reused_tasks"] == 3
    stats = craft_run["again"].stats  # and the stage itself is answered by the cache
    assert stats["engine_init"]["engine_calls"] == 0
    assert stats["engine_rehearsal"]["engine_calls"] == 0
    kept = craft_run["store"].read("fw-rait", "train")
    assert sorted(craft_run["again"].kept.column("id").to_pylist()) == sorted(
        kept.column("id").to_pylist()
    )
