"""The Prefect build flow on the real corpora, with real Delta tables on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from pipelines.build import build_dataset
from pipelines.spec import load_spec
from storage.dataset import DatasetStore, StoreError
from transforms import dedup
from transforms.ingest import IngestError
from transforms.schema import SCHEMA, validate

pytestmark = pytest.mark.usefixtures("prefect_harness")


def write_spec(folder: Path, **spec: object) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def assert_accounting(summary: dict, store: DatasetStore) -> None:
    """rows in = train + rejected, overall and for every stage."""
    rows = summary["rows"]
    assert rows["in"] == rows["train"] + rows["rejected"]
    for stage, line in summary["counts"].items():
        assert line["in"] + line["added"] == line["kept"] + line["rejected"], stage
    ref = f"{summary['name']}@{summary['version']}"
    assert store.read(ref, "train").num_rows == rows["train"]
    assert store.read(ref, "rejected").num_rows == rows["rejected"]


def test_build_on_shared_corpora(tmp_path: Path, shared_data: Path) -> None:
    sources = [
        {"path": str(shared_data / "instructions" / "gsm8k_train_alpaca.json")},
        {"path": str(shared_data / "instructions" / "gpteacher_toolformer.json")},
        {"path": str(shared_data / "safety" / "safety_only_data_Instructions.json")},
        {"path": str(shared_data / "mmlu" / "test" / "anatomy_test.csv")},
        {"path": str(shared_data / "nq" / "dev.csv")},
        {"path": str(shared_data / "seeds" / "self_instruct_seed_tasks.jsonl")},
    ]
    spec = write_spec(tmp_path, name="corpora", sources=sources)
    store = DatasetStore(str(tmp_path / "store"))
    summary = build_dataset(str(spec), store=store.root)

    assert summary["version"] == 0
    assert_accounting(summary, store)
    seeds = shared_data / "seeds" / "self_instruct_seed_tasks.jsonl"
    instances = sum(len(json.loads(line)["instances"]) for line in seeds.open())
    assert summary["counts"]["ingest"]["in"] == 7473 + 7673 + 2483 + 135 + 3610 + instances
    assert list(summary["counts"]) == ["ingest", "normalize", "exact_dedup", "filter"]
    train = store.read("corpora", "train")
    validate(train.select(SCHEMA.names).cast(SCHEMA))
    assert set(train.column("task").to_pylist()) == {"instruction", "mcq", "open_qa"}
    assert train.num_rows == len(set(train.column("id").to_pylist()))
    # the last writer of every row wrote it as a data file: the commit linked each in
    files = [*store.files("corpora"), *store.files("corpora", split="rejected")]
    assert [os.stat(f).st_nlink for f in files] == [2] * len(files) != []

    info = store.versions("corpora")[-1]
    meta = info.metadata
    assert meta["build_id"] == summary["build_id"] != "None"
    assert meta["spec_hash"] == summary["spec_hash"]
    from pipelines.fingerprint import code_version

    assert meta["code_version"] == code_version() and "+" in meta["code_version"]
    assert set(meta["inputs"]) == {s["path"] for s in sources}
    assert list(meta["counts"]) == ["ingest", "normalize", "exact_dedup", "filter"]
    assert all(v.startswith("xxh3:") for v in meta["inputs"].values())
    assert meta["counts"] == summary["counts"]


def test_exact_duplicates_across_sources_are_rejected_with_the_kept_id(
    tmp_path: Path, shared_data: Path
) -> None:
    gsm8k = shared_data / "instructions" / "gsm8k_train_alpaca.json"
    copy = tmp_path / "gsm8k_copy.json"
    shutil.copy(gsm8k, copy)
    spec = write_spec(tmp_path, name="dups", sources=[{"path": str(gsm8k)}, {"path": str(copy)}])
    store = DatasetStore(str(tmp_path / "store"))
    summary = build_dataset(str(spec), store=store.root)

    assert_accounting(summary, store)
    dedup = summary["counts"]["exact_dedup"]
    assert dedup["in"] == 2 * 7473
    rejected = store.read("dups", "rejected")
    dup = rejected.filter(pc.equal(rejected.column("reject_stage"), "exact_dedup"))
    assert dup.num_rows == dedup["rejected"] >= 7473
    kept_ids = set(store.read("dups", "train").column("id").to_pylist())
    for reason in dup.column("reject_reason").to_pylist():
        assert reason.startswith("duplicate_of:")
        assert reason.removeprefix("duplicate_of:") in kept_ids
    assert "gsm8k_copy" in set(dup.column("source").to_pylist())


def test_one_source_is_deduplicated_by_id_and_two_by_content(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one source, ingest's ids hash the rows' content, so exact dedup keys rows by id
    and hashes no content keys; with two, the same pair has two ids, and it hashes them. The
    duplicates rejected, and their reasons, are the same either way."""
    records = json.loads((shared_data / "instructions" / "gsm8k_train_alpaca.json").read_text())
    one = tmp_path / "one.json"
    one.write_text(json.dumps([*records[:2000], *records[:300]]))
    hashed: list[int] = []
    content_words = dedup.content_words

    def counted(table: pa.Table) -> np.ndarray:
        hashed.append(table.num_rows)
        return content_words(table)

    monkeypatch.setattr(dedup, "content_words", counted)
    reasons = []
    for name, sources in (
        ("one", [one]),
        ("two", [one, shared_data / "instructions" / "gsm8k_train_alpaca.json"]),
    ):
        store = DatasetStore(str(tmp_path / name))
        spec = write_spec(tmp_path, name=name, sources=[{"path": str(p)} for p in sources])
        hashed.clear()
        summary = build_dataset(str(spec), store=store.root)
        assert_accounting(summary, store)
        rejected = store.read(name, "rejected")
        rejected = rejected.filter(pc.equal(rejected.column("source"), "one"))
        reasons.append(sorted(rejected.column("reject_reason").to_pylist()))
        assert sum(hashed) == (0 if name == "one" else summary["counts"]["exact_dedup"]["in"])
    assert len(reasons[0]) == 300 and reasons[0] == reasons[1]


def test_row_level_problems_reach_the_committed_rejected_split(
    tmp_path: Path, shared_data: Path
) -> None:
    """Each row-level problem of a real corpus file lands in the version's rejected split
    with its stage and reason; the good rows land in train."""
    rows = json.loads((shared_data / "instructions" / "gsm8k_train_alpaca.json").read_text())
    good = [json.dumps(r).encode() for r in rows[:5]]
    bad = {
        "missing_field:output": json.dumps({"instruction": "What is 2+2?", "input": ""}).encode(),
        "wrong_type:output": json.dumps({**rows[5], "output": ["4"]}).encode(),
        "empty_response": json.dumps({**rows[6], "output": "   "}).encode(),
        "invalid_utf8:output": json.dumps(rows[7])
        .encode()
        .replace(b'"output": "', b'"output": "\xff'),
    }
    lines = [*good, *bad.values(), good[0]]
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    spec = write_spec(tmp_path, name="dirty", sources=[{"path": str(path), "format": "alpaca"}])
    store = DatasetStore(str(tmp_path / "store"))
    summary = build_dataset(str(spec), store=store.root)
    assert_accounting(summary, store)
    assert summary["rows"] == {"in": 10, "generated": 0, "train": 5, "rejected": 5}
    rejected = store.read("dirty", "rejected").to_pylist()
    found = {(r["source_index"], r["reject_stage"], r["reject_reason"]) for r in rejected}
    kept_id = store.read("dirty", "train").column("id")[0].as_py()
    assert found == {
        (5, "ingest", "missing_field:output"),
        (6, "ingest", "wrong_type:output"),
        (7, "filter", "empty_response"),
        (8, "ingest", "invalid_utf8:output"),
        (9, "exact_dedup", f"duplicate_of:{kept_id}"),
    }


def test_failed_build_leaves_no_version_and_rerun_reuses_finished_shards(
    tmp_path: Path, shared_data: Path
) -> None:
    good = tmp_path / "good.json"
    shutil.copy(shared_data / "instructions" / "gpteacher_roleplay.json", good)
    bad = tmp_path / "late.jsonl"
    bad.write_text(
        '{"instruction": "a", "input": "", "output": "b"}\n'
        '{"instruction": "c", "input": "", "output": "d"}\n'
        '{"instruction": "e", "input": "", "output": \n'
    )
    spec = write_spec(tmp_path, name="resume", sources=[{"path": str(good)}, {"path": str(bad)}])
    store = DatasetStore(str(tmp_path / "store"))
    (tmp_path / "v0").mkdir()
    other = shared_data / "seeds" / "self_instruct_seed_tasks.jsonl"
    previous = write_spec(tmp_path / "v0", name="resume", sources=[{"path": str(other)}])
    first = build_dataset(str(previous), store=store.root)
    assert first["version"] == 0

    state = build_dataset(str(spec), store=store.root, return_state=True)
    assert state.is_failed()
    with pytest.raises(IngestError) as failure:
        state.result()
    message = str(failure.value)
    assert "late.jsonl" in message and "line 3" in message
    assert [v.version for v in store.versions("resume")] == [0]
    assert store.read("resume@0", "train").num_rows == first["rows"]["train"]
    failed_run = str(state.state_details.flow_run_id)

    bad.write_text(bad.read_text().replace('"output": \n', '"output": "f"}\n'))
    summary = build_dataset(str(spec), store=store.root)
    assert summary["version"] == 1
    assert_accounting(summary, store)
    # The roleplay source's ingest finished in the failed run: the rerun reuses its shards.
    assert summary["reused_tasks"] == 1
    assert summary["reused_from"] == [failed_run]
    assert summary["rows"]["in"] == 3146 + 3
    assert failed_run != summary["build_id"]


def test_a_stage_added_or_removed_reuses_the_finished_segments(
    tmp_path: Path, shared_data: Path
) -> None:
    """Whether a segment is the chain's last decides how its shards are written (the
    table's data files, or scratch files), not its key. Growing the chain reuses the
    finished segments' data files as the new segments' input; shrinking it commits their
    scratch shards, among them shards a segment wrote from data files it read (never taken
    for data files themselves). Each version equals a fresh build of its spec."""
    roleplay = shared_data / "instructions" / "gpteacher_roleplay.json"
    again = tmp_path / "again.json"  # 100 rows of the first source: exact duplicates
    again.write_text(json.dumps(json.loads(roleplay.read_text())[:100]))
    sources = [{"path": str(roleplay)}, {"path": str(again)}]
    # mid's last segment adds no column: its shards' schema is the table's
    head = [{"normalize": {}}, {"exact_dedup": {}}]
    chains = {"short": head[:1], "mid": head, "long": [*head, {"near_dedup": {}}]}
    specs = {}
    for label, stages in chains.items():
        (tmp_path / label).mkdir()
        spec = write_spec(tmp_path / label, name="grow", sources=sources, stages=stages)
        specs[label] = str(spec)
    orders = {
        "grown": ("short", "long", "mid"),  # mid: ingest and exact_dedup's segment reused
        "shrunk": ("long", "mid", "short"),
        "fresh": ("mid",),
    }
    # tasks reused: the two ingest tasks, then those and exact_dedup's segment
    reused = {("grown", "long"): 2, ("grown", "mid"): 3, ("shrunk", "mid"): 3}
    reused[("shrunk", "short")] = 2
    stores = {name: DatasetStore(str(tmp_path / name)) for name in orders}
    versions: dict[tuple[str, str], str] = {}
    for name, order in orders.items():
        for version, label in enumerate(order):
            summary = build_dataset(specs[label], store=stores[name].root)
            assert summary["version"] == version
            assert summary["reused_tasks"] == reused.get((name, label), 0), (name, label)
            assert_accounting(summary, stores[name])
            versions[name, label] = f"grow@{version}"
    firsts = {"short": "grown", "long": "shrunk", "mid": "fresh"}  # each label's fresh build
    for (name, label), ref in versions.items():
        fresh = stores[firsts[label]], versions[firsts[label], label]
        for split in ("train", "rejected"):
            assert stores[name].read(ref, split).equals(fresh[0].read(fresh[1], split)), (
                name,
                label,
                split,
            )
    stages = stores["grown"].read("grow@2", "rejected").column("reject_stage").to_pylist()
    assert stages.count("exact_dedup") == 100


def test_unknown_dataset_and_bad_spec_errors(tmp_path: Path, shared_data: Path) -> None:
    store = DatasetStore(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="nope"):
        store.versions("nope")
    from pipelines.spec import SpecError, load_spec

    bad = write_spec(tmp_path, name="x", sources=[{"path": "a.json"}], colour="red")
    with pytest.raises(SpecError, match="colour"):
        load_spec(bad)
    bad = write_spec(tmp_path, name="../x", sources=[{"path": "a.json"}])
    with pytest.raises(SpecError, match="name"):
        load_spec(bad)
    bad = write_spec(tmp_path, name="x", sources=[{"path": "a.json"}], stages=[{"shuffle": {}}])
    with pytest.raises(SpecError, match="unknown stage 'shuffle'"):
        load_spec(bad)
    bad = write_spec(
        tmp_path, name="x", sources=[{"path": "a.json"}], stages=[{"filter": {"max_chars": -3}}]
    )
    with pytest.raises(SpecError, match="max_chars"):
        load_spec(bad)
    missing = write_spec(tmp_path, name="x", sources=[{"path": "no-such-file.jsonl"}])
    with pytest.raises(SpecError, match=r"spec.yaml: sources\[0\].path: .*no-such-file.jsonl"):
        build_dataset(str(missing), store=store.root)
    assert not (tmp_path / "store" / "x").exists()


def test_deleted_shards_are_recomputed_not_reused(tmp_path: Path, shared_data: Path) -> None:
    source = {"path": str(shared_data / "seeds" / "self_instruct_seed_tasks.jsonl")}
    spec = write_spec(tmp_path, name="gc", sources=[source])
    store = DatasetStore(str(tmp_path / "store"))
    first = build_dataset(str(spec), store=store.root)
    shutil.rmtree(tmp_path / "store" / "_work" / "gc" / "shards")
    second = build_dataset(str(spec), store=store.root)
    assert second["reused_tasks"] == 0
    assert second["rows"] == first["rows"]
    assert store.read("gc@1", "train").num_rows == first["rows"]["train"]


# --- the spec hash does not depend on where the spec, its data or the checkout lie ---------

REPO = Path(__file__).resolve().parents[1]
SAFETY = Path("safety") / "safety_only_data_Instructions.json"


def spec_in(folder: Path, shared_data: Path) -> Path:
    """A spec and its data in ``folder``: the source named by an absolute path (as a tool
    writes it), the refusal source by a relative one, a model-backed stage on defaults."""
    (folder / "safety").mkdir(parents=True)
    shutil.copy(shared_data / SAFETY, folder / SAFETY)
    rows = json.loads((shared_data / "instructions" / "gsm8k_train_alpaca.json").read_text())
    (folder / "gsm8k.json").write_text(json.dumps(rows[:40]))
    stages = [
        {"normalize": {}},
        {"exact_dedup": {}},
        {"refusal_mix": {"n": 5, "seed": 1, "source_path": str(SAFETY)}},
    ]
    return write_spec(
        folder, name="portable", sources=[{"path": str(folder / "gsm8k.json")}], stages=stages
    )


def test_the_same_spec_builds_with_the_same_hash_from_two_locations(
    tmp_path: Path, shared_data: Path
) -> None:
    first, second = tmp_path / "one", tmp_path / "elsewhere" / "two"
    builds = []
    for folder in (first, second):
        spec = spec_in(folder, shared_data)
        builds.append(build_dataset(str(spec), store=str(folder / "store")))
    assert builds[0]["spec_hash"] == builds[1]["spec_hash"]
    # Each build read its own copies, and the rows are the same.
    assert set(builds[0]["inputs"]) == {str(first / "gsm8k.json")}
    assert set(builds[1]["inputs"]) == {str(second / "gsm8k.json")}
    trains = [DatasetStore(str(f / "store")).read("portable", "train") for f in (first, second)]
    assert trains[0].column("id").equals(trains[1].column("id"))
    assert builds[0]["counts"]["refusal_mix"]["added"] == 5


def test_spec_hash_is_the_same_from_another_checkout(tmp_path: Path, shared_data: Path) -> None:
    """A copy of the code elsewhere (as pip would install it) hashes a spec that uses
    stage defaults the same: no default names a file of the checkout."""
    spec = write_spec(
        tmp_path,
        name="defaults",
        sources=[{"path": "data.json"}],
        stages=[
            {"self_instruct": {"model": "model"}},
            {"match_distribution": {"target_path": "t.json", "size": 10}},
        ],
    )
    checkout = tmp_path / "site-packages"
    for package in ("pipelines", "transforms", "storage", "engines"):
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / package, checkout / package, ignore=ignore)
    script = (
        "import pipelines.spec as s, transforms.synthesis.self_instruct as si;"
        "print(s.__file__); print(len(si.load_seed_tasks()));"
        f"print(s.load_spec({str(spec)!r}).spec_hash())"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=checkout, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    where, seeds, digest = run.stdout.split()
    assert Path(where).is_relative_to(checkout)  # the copy ran, with its own package data
    assert seeds == "175"
    assert digest == load_spec(spec).spec_hash()
