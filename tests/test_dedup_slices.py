"""exact_dedup hashes its keys a slice of rows at a time (to bound its transient memory):
the decisions must not depend on where the slices fall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from transforms import dedup
from transforms.dedup import ExactDedupParams, exact_dedup
from transforms.ingest import read_source


def run(shards: list[pa.Table]) -> list[tuple[list[str], list[str], list[str]]]:
    state: dict = {}
    out = []
    for shard in shards:
        result = exact_dedup(shard, ExactDedupParams(), state)
        out.append(
            (
                result.kept.column("id").to_pylist(),
                result.rejected.column("id").to_pylist(),
                result.rejected.column("reject_reason").to_pylist(),
            )
        )
    return out


def test_key_slices_do_not_change_the_decisions(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = shared_data / "instructions" / "gsm8k_train_alpaca.json"
    rows = next(iter(read_source(path))).kept.slice(0, 600)
    rng = np.random.default_rng(3)
    # three shards, each with repeats of its own rows and of earlier shards' rows
    shards = [
        rows.take(pa.array(np.concatenate([np.arange(a, a + 200), rng.integers(0, a + 200, 60)])))
        for a in (0, 200, 400)
    ]
    whole = run(shards)  # every shard's keys in one slice (KEY_ROWS is larger)
    assert dedup.KEY_ROWS > 260
    monkeypatch.setattr(dedup, "KEY_ROWS", 7)
    assert run(shards) == whole
    assert sum(len(dropped) for _, dropped, _ in whole) >= 150
    assert all(len(kept) + len(dropped) == 260 for kept, dropped, _ in whole)
