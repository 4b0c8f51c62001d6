"""Training-oriented exports of real corpus versions: response-only data and the
loss-over-prompt switch (TRL / LLaMA-Factory settings in README.md and the manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from test_storage import commit_build
from trl import SFTConfig
from trl.data_utils import is_conversational

from storage import DatasetStore, export
from transforms.ingest import read_source


def rows_of(path: Path, n: int) -> pa.Table:
    return pa.concat_tables(r.kept for r in read_source(path)).slice(0, n)


@pytest.fixture(scope="module")
def store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    """nq@0: 300 NQ rows (questions longer than their answers); gsm8k@0: 3,000 GSM8K rows
    (short questions, long worked answers)."""
    tmp = tmp_path_factory.mktemp("response-export")
    store = DatasetStore(str(tmp / "store"))
    commit_build(store, "nq", tmp, rows_of(shared_data / "nq" / "dev.csv", 300))
    gsm8k = shared_data / "instructions" / "gsm8k_train_alpaca.json"
    commit_build(store, "gsm8k", tmp, rows_of(gsm8k, 3000))
    return store


def manifest(out: Path) -> dict:
    return json.loads((out / "export_manifest.json").read_text())


def test_response_only(store: DatasetStore, tmp_path: Path) -> None:
    result = export(store, "nq", "response_only", tmp_path)
    assert result.records_written == result.rows_read == 300 and result.skipped == 0
    data = datasets.load_dataset(
        "json", data_files=str(tmp_path / result.files[0]), split="train", cache_dir=str(tmp_path)
    )
    responses = store.read("nq@0", "train").column("response").to_pylist()
    assert [m for m in data["messages"]] == [
        [{"role": "assistant", "content": r}] for r in responses
    ]
    assert is_conversational(data[0])
    assert result.training == {} and not (tmp_path / "README.md").exists()


def test_explicit_switch_for_trl(store: DatasetStore, tmp_path: Path) -> None:
    result = export(store, "gsm8k", "trl_prompt_completion", tmp_path, loss_over_prompt=True)
    expected = {"loss_over_prompt": True, "trl": {"completion_only_loss": False}}
    assert result.training == expected == manifest(tmp_path)["training"]
    assert "README.md" in result.files
    readme = (tmp_path / "README.md").read_text()
    assert "SFTConfig(..., completion_only_loss=False)" in readme
    config = SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, **result.training["trl"])
    assert config.completion_only_loss is False
    messages = export(store, "gsm8k", "trl_messages", tmp_path / "m", loss_over_prompt=False)
    assert messages.training["trl"] == {"assistant_only_loss": True}
    assert SFTConfig(output_dir=str(tmp_path / "t"), use_cpu=True, assistant_only_loss=True)


def test_auto_follows_the_statistics(store: DatasetStore, tmp_path: Path) -> None:
    qa = export(store, "nq", "llamafactory_alpaca", tmp_path / "nq", loss_over_prompt="auto")
    assert qa.training == {"loss_over_prompt": True, "llamafactory": {"train_on_prompt": True}}
    readme = (tmp_path / "nq" / "README.md").read_text()
    assert "train_on_prompt: true" in readme and '"length_ratio"' in readme
    math = export(store, "gsm8k", "llamafactory_sharegpt", tmp_path / "g", loss_over_prompt="auto")
    assert math.training["llamafactory"] == {"train_on_prompt": False}
    info = json.loads((tmp_path / "g" / "dataset_info.json").read_text())
    assert list(info) == ["gsm8k_v0"]  # dataset_info keeps its LLaMA-Factory layout


def test_cli_inspect_and_export_show_the_statistics(store: DatasetStore, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["inspect", "nq", "--store", store.root, "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["instruction_response"]
    assert stats["rows"] == 300 and stats["recommendation"]["loss_over_prompt"] is True
    text = runner.invoke(app, ["inspect", "gsm8k", "--store", store.root, "--sample", "0"])
    assert text.exit_code == 0 and "recommend loss on responses only" in text.stdout
    out = tmp_path / "cli"
    args = ["export", "nq", "--format", "trl_prompt_completion", "--out", str(out)]
    done = runner.invoke(app, [*args, "--loss-over-prompt", "auto", "--store", store.root])
    assert done.exit_code == 0, done.output
    assert manifest(out)["training"]["trl"] == {"completion_only_loss": False}
    bad = runner.invoke(app, [*args, "--loss-over-prompt", "maybe", "--store", store.root])
    assert bad.exit_code != 0
