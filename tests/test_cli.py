"""The ``aligncurate`` CLI on the shared corpora: build, versions, inspect, diff, tag, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from conftest import build_demo_with_console_script
from servers import migrated_home
from test_storage import canonical_table, commit_build, ids, rejected_table
from typer.testing import CliRunner

from pipelines.cli import app
from storage import EXPORT_FORMATS, DatasetStore

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def cli_json(*args: str) -> object:
    code, out, err = cli(*args, "--json")
    assert code == 0, (out, err)
    return json.loads(out)


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, shared_data: Path, prefect_harness: None
) -> tuple[str, Path]:
    """Two versions of a dataset built from the shared corpora through the CLI."""
    folder = tmp_path_factory.mktemp("cli")
    store = str(folder / "store")
    sources = [
        {"path": str(shared_data / "instructions" / "gpteacher_roleplay.json")},
        {"path": str(shared_data / "mmlu" / "test" / "anatomy_test.csv")},
        {"path": str(shared_data / "nq" / "dev.csv")},
    ]
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "mix", "sources": sources}))
    first = cli_json("build", str(spec), "--store", store)
    assert first["version"] == 0
    sources.append({"path": str(shared_data / "seeds" / "self_instruct_seed_tasks.jsonl")})
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "mix",
                "sources": sources,
                "stages": [{"normalize": {}}, {"exact_dedup": {}}, {"filter": {"max_chars": 2000}}],
            }
        )
    )
    second = cli_json("build", str(spec), "--store", store)
    assert second["version"] == 1
    for summary in (first, second):  # the --json contract of `build`
        assert {
            "name",
            "version",
            "counts",
            "rows",
            "build_id",
            "hits",
            "misses",
            "engine_calls",
        } <= set(summary)
        assert summary["rows"]["in"] == summary["rows"]["train"] + summary["rows"]["rejected"]
    assert second["counts"]["filter"]["rejected"] > first["counts"]["filter"]["rejected"]
    return store, folder


def test_build_json_reports_counts_and_cache_fields(built: tuple[str, Path]) -> None:
    store, _ = built
    versions = cli_json("versions", "mix", "--store", store)
    assert [v["version"] for v in versions] == [0, 1]
    meta = versions[1]["metadata"]
    rows = meta["rows"]
    assert rows["in"] == rows["train"] + rows["rejected"]
    assert meta["counts"]["filter"]["rejected"] > 0  # roleplay answers over 2,000 chars


def test_inspect_shows_schema_counts_lengths_and_samples(built: tuple[str, Path]) -> None:
    store, _ = built
    report = cli_json("inspect", "mix@1", "--store", store, "--sample", "2")
    assert report["version"] == 1
    assert {"id", "prompt", "response", "split"} <= set(report["schema"])
    assert set(report["counts"]["task"]) == {"instruction", "mcq", "open_qa"}
    assert set(report["counts"]["split"]) == {"train", "rejected"}
    assert report["lengths"]["response_chars"]["max"] > 0
    assert len(report["sample"]) == 2
    rejected = cli_json("inspect", "mix", "--split", "rejected", "--store", store)
    assert any(r.startswith("too_long") for r in rejected["counts"]["reject_reason"])
    code, out, _ = cli("inspect", "mix@0", "--store", store)
    assert code == 0 and "by task" in out and "lengths" in out
    # inspect streams the version; the profile is the one of the whole table
    from storage.dataset import DatasetStore
    from transforms.profile import profile, profile_tables

    datasets = DatasetStore(store)
    whole = profile(datasets.read("mix@1", split=None))
    streamed = profile_tables(
        (pa.Table.from_batches([b]) for b in datasets.batches("mix@1", None, batch_size=7)),
        datasets.schema("mix@1").names,
    )
    assert streamed == whole and whole["rows"] > 7
    assert {k: v for k, v in report.items() if k in whole} == whole


def test_tag_diff_and_export(built: tuple[str, Path]) -> None:
    store, folder = built
    assert cli_json("tag", "mix@0", "baseline", "--store", store)["version"] == 0
    diff = cli_json("diff", "mix@baseline", "mix@1", "--store", store)
    assert diff["added"] > 0  # the seed tasks joined in version 1
    assert diff["removed"] == 0  # ids are stable: nothing of version 0 vanished
    assert diff["moved"] > 0  # roleplay answers over 2,000 chars moved to rejected
    assert len(diff["added_examples"]) == min(5, diff["added"])
    code, table, _ = cli("diff", "mix@baseline", "mix@1", "--store", store)
    assert code == 0 and "rows by split" in table and diff["added_examples"][0] in table
    assert f"│ added     │ {diff['added']}" in table
    out_dir = folder / "export"
    result = cli_json(
        "export",
        "mix@baseline",
        "--format",
        "trl_messages",
        "--out",
        str(out_dir),
        "--store",
        store,
    )
    lines = (out_dir / result["files"][0]).read_text().splitlines()
    assert result["records_written"] == result["rows_read"] == len(lines)
    manifest = json.loads((out_dir / "export_manifest.json").read_text())
    assert manifest["version"] == 0 and manifest["name"] == "mix"
    code, table, _ = cli(
        "export", "mix@0", "--format", "jsonl", "--out", str(folder / "plain"), "--store", store
    )
    assert (
        code == 0 and "exported mix@0 as jsonl" in table and str(result["records_written"]) in table
    )


def test_read_errors_are_clear_and_exit_nonzero(built: tuple[str, Path]) -> None:
    store, _ = built
    for args, needle in [
        (("versions", "nope"), "nope"),
        (("inspect", "mix@7"), "7"),
        (("inspect", "mix@no-such-tag"), "no-such-tag"),
        (("versions", "../etc"), "../etc"),
        (("export", "mix@0", "--format", "csv", "--out", "x"), "csv"),
    ]:
        code, _, err = cli(*args, "--store", store)
        assert code == 2, args
        assert "error:" in err and needle in err, (args, err)


def test_bad_spec_fails_before_prefect_with_the_key(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nsources: [{path: a.json}]\nstagez: []\n")
    code, _, err = cli("build", str(spec), "--store", str(tmp_path / "s"))
    assert code == 2 and "stagez" in err


def test_console_script_builds_the_shipped_demo(tmp_path: Path) -> None:
    """The installed ``aligncurate`` script, as a user runs it (own process, ephemeral Prefect)."""
    env = {**os.environ, "PREFECT_HOME": str(migrated_home(tmp_path / "prefect"))}
    summary = build_demo_with_console_script(tmp_path / "store", env)
    assert summary["name"] == "demo-sft" and summary["version"] == 0
    assert {"hits", "misses", "engine_calls"} <= set(summary)
    dedup = summary["counts"]["exact_dedup"]
    assert dedup["rejected"] == 20  # gsm8k_sample_b repeats rows 180-199 of gsm8k_sample
    assert summary["rows"]["in"] == 200 + 80 + 100 + 50 + 100


def test_reject_reasons_are_counted_by_rule_not_by_kept_id(shared_data: Path) -> None:
    """``duplicate_of:<id>`` names a different kept row on every duplicate: counted as one
    reason, ``duplicate_of:*``, so the counts say how many rows each rule dropped."""
    from transforms.dedup import ExactDedupParams, exact_dedup
    from transforms.ingest import read_source
    from transforms.profile import profile

    path = shared_data / "instructions" / "gsm8k_train_alpaca.json"
    rows = next(iter(read_source(path))).kept.slice(0, 300)
    result = exact_dedup(pa.concat_tables([rows, rows.slice(0, 120)]), ExactDedupParams(), {})
    reasons = result.rejected.column("reject_reason")
    assert len(set(reasons.to_pylist())) == 120  # one distinct reason per duplicate
    extra = pa.table({"reject_reason": ["repetition:0.41", "repetition:0.57", "empty_response"]})
    counts = profile(pa.concat_tables([result.rejected.select(["reject_reason"]), extra]))
    assert counts["counts"]["reject_reason"] == {
        "duplicate_of:*": 120,
        "repetition:*": 2,
        "empty_response": 1,
    }


@pytest.fixture
def two_versions(tmp_path: Path) -> str:
    """A store whose sft@0 has train and rejected rows and sft@1 train rows only."""
    store = DatasetStore(str(tmp_path / "store"))
    commit_build(store, "sft", tmp_path, canonical_table(ids("a", 8)), rejected_table(["r000"]))
    commit_build(store, "sft", tmp_path, canonical_table(ids("b", 3)))
    return store.root


def test_export_help_lists_the_formats() -> None:
    code, out, _ = cli("export", "--help")
    assert code == 0 and "Formats" in out
    for fmt in EXPORT_FORMATS:
        assert f"{fmt}:" in out, fmt


def test_tag_says_when_it_moves_a_tag(two_versions: str) -> None:
    store = two_versions
    assert cli("tag", "sft@0", "golden", "--store", store)[:2] == (0, "tagged sft@0 as 'golden'\n")
    code, out, _ = cli("tag", "sft@1", "golden", "--store", store)
    assert code == 0 and out == "sft: moved 'golden' from v0 to v1\n"
    code, out, _ = cli("tag", "sft@golden", "golden", "--store", store)
    assert code == 0 and out == "'golden' already tags sft@1\n"
    moved = cli_json("tag", "sft@0", "golden", "--store", store)
    assert moved == {"name": "sft", "version": 0, "tag": "golden", "previous": 1}
    new = cli_json("tag", "sft@1", "prod", "--store", store)
    assert new == {"name": "sft", "version": 1, "tag": "prod", "previous": None}
    assert DatasetStore(store).tags("sft") == {"golden": 0, "prod": 1}


def test_files_prints_exactly_one_versions_files(two_versions: str) -> None:
    datasets = DatasetStore(two_versions)
    datasets.tag("sft@0", "golden")
    code, out, _ = cli("files", "sft@golden", "--store", two_versions)
    assert code == 0 and out.splitlines() == datasets.files("sft@0") != []
    code, out, _ = cli("files", "sft", "--split", "rejected", "--store", two_versions)
    assert code == 0 and out == "" and datasets.files("sft@1", "rejected") == []
    code, out, _ = cli("files", "sft@0", "--split", "rejected", "--store", two_versions)
    assert out.splitlines() == datasets.files("sft@0", "rejected") != []
    listed = cli_json("files", "sft@golden", "--store", two_versions)
    assert listed == {
        "name": "sft",
        "version": 0,
        "split": "train",
        "files": datasets.files("sft@0"),
    }
    latest = cli_json("files", "sft", "--store", two_versions)
    assert latest["version"] == 1 and not set(latest["files"]) & set(listed["files"])
    # What a glob over the table folder would read: both versions' train files.
    table = Path(two_versions) / "sft"
    assert set(map(str, table.glob("split=train/*.parquet"))) == {
        *latest["files"],
        *listed["files"],
    }
    code, _, err = cli("files", "sft", "--split", "test", "--store", two_versions)
    assert code == 2 and "error:" in err and "test" in err
