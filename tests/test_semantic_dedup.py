"""semantic_dedup's vector index against exact neighbours, and its keep-first pass, on real
Natural Questions rows embedded with the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import transforms.response.semantic_dedup as semantic_dedup_module
from engines.embeddings import Embedder
from transforms.ingest import read_source
from transforms.response.semantic_dedup import (
    SemanticDedupParams,
    embedding_texts,
    exact_pairs,
    index_pairs,
    keep_first,
    semantic_dedup,
)

GROUP = 40
"""Near-copies of one row: a group of 41 rows, every pair within the threshold."""


@pytest.fixture(scope="module")
def nq(shared_data: Path) -> pa.Table:
    """100 NQ rows, then GROUP copies of row 7 and one copy of each of rows 0-29, their
    responses with doubled spaces, trailing spaces or up to four added dots."""
    table = pa.concat_tables(r.kept for r in read_source(shared_data / "nq" / "dev.csv"))
    base = table.slice(0, 100)
    rows = base.to_pylist()
    copies = []
    for k, source in enumerate([7] * GROUP + list(range(30))):
        row = dict(rows[source])
        words = row["response"].split(" ") + ["."] * (k % 5)
        row["response"] = "  ".join(words) if k % 2 else " ".join(words) + " " * k
        row["id"] = f"copy-{k}"
        copies.append(row)
    return pa.concat_tables([base, pa.Table.from_pylist(copies, schema=base.schema)])


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def vectors(nq: pa.Table, embedder: Embedder) -> np.ndarray:
    return embedder.embed(embedding_texts(nq, 2_000))


def as_set(pairs: tuple[np.ndarray, np.ndarray]) -> set[tuple[int, int]]:
    return set(zip(pairs[0].tolist(), pairs[1].tolist(), strict=True))


def test_index_finds_every_exact_pair(vectors: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    exact = as_set(exact_pairs(vectors, 0.95))
    partners = np.bincount([i for pair in exact for i in pair], minlength=len(vectors))
    assert partners.max() >= GROUP
    # 170 rows make 2 lists at the default training size, so every list would be probed:
    # 4 training rows per list give 42 lists, of which a row searches its 8 (or 2) nearest.
    monkeypatch.setattr(semantic_dedup_module, "TRAIN_PER_LIST", 4)
    assert len(vectors) // 4 > 8
    assert as_set(index_pairs(vectors, 0.95)) == exact
    # fewer lists probed can only miss pairs (cosines are exact), never invent one
    assert as_set(index_pairs(vectors, 0.95, SemanticDedupParams(nprobe=2))) <= exact
    assert all(vectors[i] @ vectors[j] >= 0.95 - 1e-6 for i, j in exact)


def test_index_pairs_are_reproducible_in_any_query_chunks(
    vectors: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = SemanticDedupParams(nprobe=1)
    first = index_pairs(vectors, 0.9, small)
    monkeypatch.setattr(semantic_dedup_module, "QUERY_ROWS", 7)
    again = index_pairs(vectors, 0.9, small)
    assert len(first[0]) > 100
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_keep_first_names_the_first_kept_row() -> None:
    # 1 and 2 pair with 0; 3 pairs only with 1 (dropped), so it stays; 4 pairs with 3 and 2.
    earlier = np.array([0, 0, 1, 3, 2])
    later = np.array([1, 2, 3, 4, 4])
    assert keep_first(6, earlier, later).tolist() == [-1, 0, 0, -1, 3, -1]


def test_stage_drops_the_copies_naming_their_source(nq: pa.Table, embedder: Embedder) -> None:
    table = pa.concat_tables([nq.slice(0, 40), nq.slice(100, GROUP)])
    out = semantic_dedup(table, SemanticDedupParams(), embedder=embedder)
    ids = table.column("id").to_pylist()
    reasons = dict(
        zip(
            out.rejected.column("id").to_pylist(),
            out.rejected.column("reject_reason").to_pylist(),
            strict=True,
        )
    )
    assert out.counts(table.num_rows)["kept"] == 40
    assert reasons == {f"copy-{k}": f"semantic_duplicate_of:{ids[7]}" for k in range(GROUP)}
