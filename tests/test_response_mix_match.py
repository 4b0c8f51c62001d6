"""refusal_mix and match_distribution on the real corpora."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from transforms.ingest import read_source
from transforms.response.match import (
    MatchParams,
    distribution,
    featurize,
    kl,
    match_distribution,
    read_target,
    texts_of,
)
from transforms.response.refusal_mix import (
    SOURCE_URL,
    RefusalMixParams,
    count_to_add,
    refusal_mix,
    refusal_pool,
)

PATTERN = re.compile(r"\b(ai|sorry)\b", re.IGNORECASE)


def rows_of(path: Path) -> pa.Table:
    return pa.concat_tables(r.kept for r in read_source(path))


@pytest.fixture(scope="module")
def gsm8k(shared_data: Path) -> pa.Table:
    return rows_of(shared_data / "instructions" / "gsm8k_train_alpaca.json").slice(0, 600)


@pytest.fixture(scope="module")
def safety(shared_data: Path) -> str:
    """Response Tuning's refusal source (CC BY-NC, not bundled: every spec names it)."""
    return str(shared_data / "safety" / "safety_only_data_Instructions.json")


def mix(safety: str, **params: float) -> RefusalMixParams:
    return RefusalMixParams(source_path=safety, **params)


def test_default_pool_is_the_papers_1829_of_2483(safety: str) -> None:
    assert len(json.loads(Path(safety).read_text())) == 2483
    pool = refusal_pool(mix(safety, n=1))
    assert pool.num_rows == 1829
    assert all(PATTERN.search(r) for r in pool.column("response").to_pylist())


@pytest.mark.parametrize("params", [{"n": 1}, {"n": 1, "source_path": None}])
def test_source_is_required_and_the_error_says_where_to_get_it(params: dict) -> None:
    """The safety set is CC BY-NC: not bundled, so there is no default to fall back on."""
    with pytest.raises(ValidationError) as caught:
        RefusalMixParams.model_validate(params)
    message = str(caught.value)
    assert "source_path is required" in message
    assert SOURCE_URL in message and "safety-tuned-llamas" in message
    assert "CC BY-NC" in message


def test_refusal_mix_adds_exactly_n_matching_rows(gsm8k: pa.Table, safety: str) -> None:
    out = refusal_mix(gsm8k, mix(safety, n=37, seed=1))
    assert out.counts(gsm8k.num_rows) == {"in": 600, "kept": 637, "rejected": 0, "added": 37}
    added = out.kept.filter(pa.compute.equal(out.kept.column("origin"), "refusal_mix"))
    assert added.num_rows == 37
    assert all(PATTERN.search(r) for r in added.column("response").to_pylist())
    assert set(added.column("source").to_pylist()) == {"safety_only_data_Instructions"}
    assert len(set(out.kept.column("id").to_pylist())) == 637
    assert out.kept.slice(0, 600).equals(gsm8k)  # the incoming rows are untouched
    again = refusal_mix(gsm8k, mix(safety, n=37, seed=1))
    other = refusal_mix(gsm8k, mix(safety, n=37, seed=2))
    assert again.kept.column("id").equals(out.kept.column("id"))  # seeded
    assert not other.kept.column("id").equals(out.kept.column("id"))


def test_refusal_mix_as_a_share_of_the_final_set(gsm8k: pa.Table, safety: str) -> None:
    assert count_to_add(600, 0.2) == 150
    out = refusal_mix(gsm8k, mix(safety, n=0.2))
    assert out.added == 150 and out.kept.num_rows == 750
    assert out.stats["share"] == pytest.approx(0.2)


def test_refusal_mix_refuses_more_than_the_pool(gsm8k: pa.Table, safety: str) -> None:
    with pytest.raises(ValueError, match="1829 rows matching"):
        refusal_mix(gsm8k, mix(safety, n=2000))


@pytest.fixture(scope="module")
def candidates_and_target(shared_data: Path, gsm8k: pa.Table, tmp_path_factory) -> tuple:
    """Candidates: 600 GSM8K + 600 roleplay rows; target: 1,000 other roleplay rows, as a
    file of their own (Alpaca JSON)."""
    path = shared_data / "instructions" / "gpteacher_roleplay.json"
    records = json.loads(path.read_text())
    target = tmp_path_factory.mktemp("target") / "roleplay_target.json"
    target.write_text(json.dumps(records[2000:3000]))
    roleplay = rows_of(path).slice(0, 600)
    return pa.concat_tables([gsm8k, roleplay]), target


@pytest.mark.parametrize("method", ["dsir", "discriminative"])
def test_matching_moves_the_distance_toward_the_target(candidates_and_target, method) -> None:
    table, target = candidates_and_target
    out = match_distribution(table, MatchParams(target_path=str(target), size=0.5, method=method))
    assert out.counts(table.num_rows) == {"in": 1200, "kept": 600, "rejected": 600, "added": 0}
    stats = out.stats
    assert stats["target_rows"] == 1000
    # Toward the target: as close as keeping exactly the 600 roleplay rows would be.
    params = MatchParams(target_path=str(target), size=0.5)
    p = distribution(featurize(texts_of(read_target(params), "response"), params), 1.0)
    roleplay_only = featurize(texts_of(table.slice(600), "response"), params)
    ideal = kl(p, distribution(roleplay_only, 1.0))
    assert stats["kl_after"] < stats["kl_before"]
    assert stats["kl_after"] < 1.25 * ideal < stats["kl_before"]
    roleplay_share = out.kept.column("source").to_pylist().count("gpteacher_roleplay") / 600
    assert roleplay_share > 0.8
    assert set(out.rejected.column("reject_reason").to_pylist()) == {f"not_selected:{method}"}
    assert "match_log_weight" in out.kept.column_names
    hist = stats["length_histogram"]
    assert sum(hist["before"].values()) == 1200 and sum(hist["after"].values()) == 600
    assert sum(hist["target"].values()) == 1000


def test_absolute_size_and_seed(candidates_and_target) -> None:
    table, target = candidates_and_target
    params = MatchParams(target_path=str(target), size=100, seed=3)
    first = match_distribution(table, params)
    second = match_distribution(table, params)
    assert first.kept.num_rows == 100
    assert first.kept.column("id").equals(second.kept.column("id"))


def test_empty_input(candidates_and_target, safety: str) -> None:
    table, target = candidates_and_target
    empty = table.slice(0, 0)
    out = match_distribution(empty, MatchParams(target_path=str(target), size=0.5))
    assert out.counts(0) == {"in": 0, "kept": 0, "rejected": 0, "added": 0}
    assert refusal_mix(empty, mix(safety, n=3)).counts(0)["kept"] == 3
