"""One real Prefect build with every response-distribution stage on real corpora."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.build import build_dataset
from storage.dataset import DatasetStore

pytestmark = pytest.mark.usefixtures("prefect_harness")
REFUSAL = re.compile(r"\b(ai|sorry)\b", re.IGNORECASE)


def typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    i = rng.choice([i for i, w in enumerate(words) if len(w) > 5 and w[2] != w[3]])
    words[i] = words[i][:2] + words[i][3] + words[i][2] + words[i][4:]
    return " ".join(words)


@pytest.fixture(scope="module")
def build(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Sources: 300 GPTeacher roleplay rows plus 20 copies with a typo, 300 GSM8K rows and
    60 safety rows (as files of their own); target: 400 other roleplay rows."""
    folder = tmp_path_factory.mktemp("response-build")
    data = shared_data / "instructions"
    safety = shared_data / "safety" / "safety_only_data_Instructions.json"
    roleplay = json.loads((data / "gpteacher_roleplay.json").read_text())
    rng = random.Random(0)
    originals = [i for i, r in enumerate(roleplay[:300]) if len(r["output"].split()) > 80][:20]
    copies = [{**roleplay[i], "output": typo(roleplay[i]["output"], rng)} for i in originals]
    files = {
        "roleplay.json": roleplay[:300] + copies,
        "gsm8k.json": json.loads((data / "gsm8k_train_alpaca.json").read_text())[:300],
        "safety.json": json.loads(safety.read_text())[:60],
        "target.json": roleplay[2000:2400],
    }
    for name, records in files.items():
        (folder / name).write_text(json.dumps(records))
    spec = {
        "name": "response-tuning",
        "sources": [{"path": n} for n in ("roleplay.json", "gsm8k.json", "safety.json")],
        "ingest": {"batch_rows": 128},  # several shards: near_dedup carries its index
        "stages": [
            {"normalize": {}},
            {"exact_dedup": {}},
            {"rule_filter": {}},
            {"near_dedup": {}},
            # The first 200 characters only: this build checks the flow and its accounting
            # (semantic dedup's decisions are test_response_dedup's and
            # test_semantic_dedup's). MiniLM's cost grows with the text: this module took
            # 141 CPU-s with the default 2,000 characters, 69 with 200 (2-core EPYC).
            {"semantic_dedup": {"max_chars": 200}},
            {"match_distribution": {"target_path": "target.json", "size": 0.75}},
            {"refusal_mix": {"n": 0.1, "seed": 3, "source_path": str(safety)}},
        ],
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    store = DatasetStore(str(folder / "store"))
    summary = build_dataset(str(folder / "spec.yaml"), store=store.root)
    return {"summary": summary, "store": store, "originals": originals}


def test_every_row_is_accounted_for(build: dict) -> None:
    summary, store = build["summary"], build["store"]
    rows = summary["rows"]
    assert rows["in"] == 320 + 300 + 60
    assert rows["in"] + rows["generated"] == rows["train"] + rows["rejected"]
    counts = summary["counts"]
    for stage, line in counts.items():
        assert line["in"] + line["added"] == line["kept"] + line["rejected"], stage
    assert list(counts) == [
        "ingest",
        "normalize",
        "exact_dedup",
        "rule_filter",
        "near_dedup",
        "semantic_dedup",
        "match_distribution",
        "refusal_mix",
    ]
    assert rows["generated"] == counts["refusal_mix"]["added"] > 0
    ref = f"{summary['name']}@{summary['version']}"
    assert store.read(ref, "train").num_rows == rows["train"]
    rejected = store.read(ref, "rejected")
    assert rejected.num_rows == rows["rejected"]
    by_stage = Counter(rejected.column("reject_stage").to_pylist())
    for stage in ("rule_filter", "near_dedup", "match_distribution"):
        assert by_stage[stage] == counts[stage]["rejected"], stage


def test_stages_did_their_work(build: dict) -> None:
    summary, store = build["summary"], build["store"]
    counts = summary["counts"]
    ref = f"{summary['name']}@{summary['version']}"
    rejected = store.read(ref, "rejected").to_pylist()
    # Every copy goes: as a near duplicate naming its original, or (when a rule already
    # dropped the original) by the same rule.
    roleplay = {r["source_index"]: r for r in rejected if r["source"] == "roleplay"}
    train = store.read(ref, "train")
    ids_of = {r["source_index"]: r["id"] for r in train.to_pylist() if r["source"] == "roleplay"}
    ids_of.update({i: r["id"] for i, r in roleplay.items()})
    near = 0
    for k, original in enumerate(build["originals"]):
        copy = roleplay[300 + k]
        if copy["reject_stage"] == "near_dedup":
            assert copy["reject_reason"] == f"near_duplicate_of:{ids_of[original]}"
            near += 1
        else:
            assert original in roleplay, (copy["reject_stage"], copy["reject_reason"])
            assert copy["reject_stage"] == roleplay[original]["reject_stage"] == "rule_filter"
    assert near == counts["near_dedup"]["rejected"] >= 15
    # The safety rows refuse a benign-looking set: rule_filter drops them.
    safety = Counter(r["reject_stage"] for r in rejected if r["source"] == "safety")
    assert safety["rule_filter"] >= 40, safety
    # Distribution matching kept 75% and moved toward the target.
    match = summary["stage_stats"]["match_distribution"]
    assert counts["match_distribution"]["kept"] == round(0.75 * counts["match_distribution"]["in"])
    assert match["kl_after"] < match["kl_before"]
    # The refusal mix: 10% of the final set, every row matching the pattern.
    mixed = train.filter(pc.equal(train.column("origin"), "refusal_mix"))
    assert mixed.num_rows == counts["refusal_mix"]["added"]
    assert mixed.num_rows == pytest.approx(0.1 * train.num_rows, abs=1)
    assert all(REFUSAL.search(r) for r in mixed.column("response").to_pylist())


def test_dataset_statistics_in_the_summary(build: dict) -> None:
    stats = build["summary"]["dataset_stats"]
    assert stats["rows"] == build["summary"]["rows"]["train"]
    assert stats["prompt_tokens"]["mean"] > 0 and stats["response_tokens"]["mean"] > 0
    assert set(stats["recommendation"]) >= {"loss_over_prompt", "trl", "llamafactory", "reasons"}


def test_example_spec_validates(shared_data: Path) -> None:
    from pipelines.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "response_tuning.yaml")
    names = [s.name for s in spec.stages]
    assert names[2:] == ["rule_filter", "near_dedup", "match_distribution", "refusal_mix"]
    match = spec.stages[4].params
    seeds = shared_data / "seeds" / "self_instruct_seed_tasks.jsonl"
    assert Path(match.target_path).resolve() == seeds.resolve()  # ../shared may be a link
    mix = spec.stages[5].params  # the CC BY-NC refusal source is named, never a default
    safety = shared_data / "safety" / "safety_only_data_Instructions.json"
    assert Path(mix.source_path).resolve() == safety.resolve()
    assert all(Path(s.path).is_file() for s in spec.sources)


def test_prepared_arrays_are_used_only_for_the_rows_they_came_from(
    shared_data: Path, tmp_path: Path
) -> None:
    """A prepared file is checked against the shard it is read with: a stale one (the shard
    rewritten with other rows) is ignored and near_dedup prepares its rows itself."""
    from pipelines.segments import read_prepared, write_prepared
    from transforms.ingest import read_source
    from transforms.response.near_dedup import NearDedupParams, near_dedup, prepare

    rows = next(read_source(shared_data / "instructions" / "gpteacher_roleplay.json")).kept
    first, other = rows.slice(0, 50), rows.slice(50, 50)
    params = NearDedupParams()
    path = write_prepared(tmp_path, "00000", first, prepare(first, params))
    arrays = read_prepared(path, first)
    assert arrays is not None and set(arrays) == {"signatures", "band_keys"}
    assert read_prepared(path, other) is None
    ahead = near_dedup(first, params, {}, arrays)
    assert ahead.kept.equals(near_dedup(first, params, {}).kept)


def test_a_prepare_task_takes_consecutive_shards_of_enough_rows(tmp_path: Path) -> None:
    """Small shards share a prepare task: runs of consecutive shards of at least the
    task's rows, in order, the last one shorter."""
    from pipelines.build import _row_groups

    paths = []
    for index, size in enumerate([3, 4, 1, 6, 2]):
        paths.append(str(tmp_path / f"train-{index}.parquet"))
        pq.write_table(pa.table({"id": [str(i) for i in range(size)]}), paths[-1])
    assert _row_groups(paths, 5) == [paths[:2], paths[2:4], paths[4:]]
    assert _row_groups(paths, 1) == [[path] for path in paths]
    assert _row_groups(paths, 100) == [paths]


def test_a_prepare_task_keeps_the_arrays_of_shards_with_one_name(
    shared_data: Path, tmp_path: Path
) -> None:
    """Shards of two sources share a name (``train-00000``): in one prepare task each keeps
    its own file, which its own rows then use."""
    from pipelines.build import prepare_shards
    from pipelines.segments import ChainStep, read_prepared
    from transforms.ingest import read_source
    from transforms.response.near_dedup import NearDedupParams

    rows = next(read_source(shared_data / "instructions" / "gpteacher_roleplay.json")).kept
    tables = [rows.slice(0, 40), rows.slice(40, 40)]
    shards = []
    for source, table in zip("ab", tables, strict=True):
        shards.append(str(tmp_path / source / "train-00000.parquet"))
        Path(shards[-1]).parent.mkdir()
        pq.write_table(table, shards[-1])
    step = ChainStep.of("near_dedup", NearDedupParams())
    paths = prepare_shards.fn("k", shards, step, str(tmp_path / "prepared"))
    assert len(set(paths)) == 2
    for path, table in zip(paths, tables, strict=True):
        assert read_prepared(path, table) is not None
