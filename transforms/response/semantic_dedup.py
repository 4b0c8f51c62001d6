"""Stage ``semantic_dedup``: drop rows whose meaning repeats an earlier row.

Embeddings of the prompt and response with sentence-transformers ``all-MiniLM-L6-v2``
(the engine :class:`engines.embeddings.Embedder`, offline, batched, which the pipeline passes
in as an :class:`engines.base.TextEmbedder`: see :mod:`pipelines.stages`); the pairs of rows
with cosine similarity ≥ ``threshold`` (default 0.95) from an HNSW graph (faiss
``IndexHNSWFlat``, :func:`index_pairs`); then a greedy pass in row order
(:func:`keep_first`): a row is a duplicate of the first earlier *kept* row it pairs with,
and goes to ``rejected`` with reason ``semantic_duplicate_of:<kept id>``. This is the SemDeDup
idea (Abbas et al. 2023, arXiv 2303.09540: keep one row per group of embeddings closer than
a threshold) without its k-means pre-clustering: the graph already avoids comparing every
row with every other.

Deviation from an exact search: the graph may miss a pair (recall below 1; on the benchmark
corpus of ``bench/semantic_dedup.py`` it found every exact pair, see docs/performance.md).
:func:`exact_pairs` is the exact O(n²) reference. faiss-cpu was chosen over usearch and
hnswlib by measurement (the benchmark and docs/performance.md): equal recall, and a
single-threaded, reproducible build.

A whole-table stage: every row must be compared with every other, across shards. Encoding
dominates its time (the index adds about 1% at 1,000 rows and stays a small share of the
encoding as rows grow, see docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from engines.base import EngineError, TextEmbedder
from transforms.response.lengths import prompt_plain
from transforms.schema import rejected
from transforms.stage import StageResult, reject_table
from transforms.text import combined

STAGE = "semantic_dedup"
TOLERANCE = 1e-6
"""Slack below the threshold for float32 rounding (a pair exactly at the threshold counts)."""
QUERY_ROWS = 1 << 16
"""Rows sent to the index at once: bounds the query copies and result arrays."""


class SemanticDedupParams(BaseModel):
    """Cosine threshold (0.95), the embedding model folder (default: the packaged
    all-MiniLM-L6-v2), how much text is embedded, and the HNSW index's shape (defaults chosen
    on ``bench/semantic_dedup.py``: M 16 / efSearch 32 missed 0.8% of the pairs at 100,000
    rows, these 0.05%)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(default=0.95, gt=0, le=1)
    embedding_dir: str | None = None
    max_chars: int = Field(default=2_000, gt=0)
    batch_size: int = Field(default=64, gt=0)
    neighbours: int = Field(default=16, ge=2)
    """Nearest rows each row asks the index for first (more when all are within the
    threshold)."""
    hnsw_m: int = Field(default=32, ge=4)
    """Links per node of the HNSW graph (faiss's ``M``)."""
    ef_construction: int = Field(default=80, ge=8)
    """Candidates kept while inserting a row into the graph (faiss's ``efConstruction``)."""
    ef_search: int = Field(default=64, ge=8)
    """Candidates kept while searching (faiss's ``efSearch``; at least the rows asked for)."""


def embedding_texts(table: pa.Table, max_chars: int) -> list[str]:
    """The text embedded for each row: the prompt's turns and the response joined by
    newlines, cut to ``max_chars`` characters."""
    text = pc.binary_join_element_wise(
        prompt_plain(table.column("prompt")),
        pc.fill_null(combined(table.column("response")), ""),
        "\n",
    )
    return pc.utf8_slice_codeunits(text, 0, max_chars).to_pylist()


def _within(sims: np.ndarray, threshold: float) -> np.ndarray:
    """Similarities at or above the threshold, less :data:`TOLERANCE` (float32 rounding)."""
    return sims >= threshold - TOLERANCE


def exact_pairs(
    vectors: np.ndarray, threshold: float, block: int = 2_048
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(i, j)``, ``i < j``, of unit vectors with cosine ≥ ``threshold``, exactly:
    a blocked matrix product (numpy's BLAS) of each block of rows with all earlier rows,
    O(n²·d) time and O(block·n) scratch. The reference :func:`index_pairs` is measured
    against (``bench/semantic_dedup.py``)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    earlier, later = [], []
    for lo in range(0, len(vectors), block):
        hi = min(lo + block, len(vectors))
        sims = vectors[lo:hi] @ vectors[:hi].T
        rows, cols = np.nonzero(_within(sims, threshold))
        rows += lo
        before = cols < rows
        earlier.append(cols[before])
        later.append(rows[before])
    if not earlier:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(earlier).astype(np.int64), np.concatenate(later).astype(np.int64)


def index_pairs(
    vectors: np.ndarray, threshold: float, params: SemanticDedupParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``(i, j)``, ``i < j``, with cosine ≥ ``threshold`` that an HNSW graph finds
    (Malkov & Yashunin 2018, arXiv 1603.09320; faiss ``IndexHNSWFlat``, inner product on unit
    vectors, so scores are exact cosines and only recall is approximate).

    Every row asks for its ``neighbours`` nearest rows; a row whose farthest answer is
    still within the threshold asks again for four times as many (a group of near-copies
    larger than ``neighbours``), until its farthest answer falls below the threshold or it
    has every row. A pair counts when either of its rows finds the other. The graph is
    built on one thread, so the same vectors give the same graph and the same pairs
    (faiss's parallel insertion depends on thread timing); queries run on all threads.
    """
    import faiss

    params = params or SemanticDedupParams()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(vectors)
    finally:
        faiss.omp_set_num_threads(threads)
    found_rows, found_cols = [], []
    ask = np.arange(n)
    k = min(params.neighbours, n)
    while len(ask):
        index.hnsw.efSearch = max(params.ef_search, k)
        again = []
        for lo in range(0, len(ask), QUERY_ROWS):
            rows = ask[lo : lo + QUERY_ROWS]
            sims, cols = index.search(vectors[rows], k)
            hit = _within(sims, threshold) & (cols >= 0)
            found_rows.append(np.broadcast_to(rows[:, None], cols.shape)[hit])
            found_cols.append(cols[hit])
            again.append(rows[hit[:, -1]])
        if k == n:
            break
        ask = np.concatenate(again)
        k = min(4 * k, n)
    a, b = np.concatenate(found_rows), np.concatenate(found_cols)
    a, b = np.minimum(a, b), np.maximum(a, b)
    pairs = np.unique(a[a < b] * n + b[a < b])
    return pairs // n, pairs % n


def keep_first(n: int, earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """For each of ``n`` rows, the first earlier *kept* row it pairs with, or -1 (kept): the
    greedy pass in row order over the pairs ``(earlier[k], later[k])``, ``earlier < later``.

    Only rows with an earlier partner are visited (in order, so every partner's fate is
    already known), with the partners of each sorted once by numpy."""
    owner = np.full(n, -1, dtype=np.int64)
    if not len(later):
        return owner
    order = np.lexsort((earlier, later))
    later, earlier = later[order], earlier[order]
    starts = np.flatnonzero(np.r_[True, later[1:] != later[:-1]])
    bounds = np.r_[starts, len(later)].tolist()
    rows = later[starts].tolist()
    partners = earlier.tolist()
    dropped: dict[int, int] = {}
    for row, lo, hi in zip(rows, bounds[:-1], bounds[1:], strict=True):
        for partner in partners[lo:hi]:
            if partner not in dropped:
                dropped[row] = partner
                break
    if dropped:
        owner[list(dropped)] = list(dropped.values())
    return owner


def semantic_dedup(
    table: pa.Table,
    params: SemanticDedupParams,
    context: Any = None,
    embedder: TextEmbedder | None = None,
) -> StageResult:
    """Embed every row with ``embedder``, then keep the first row of each group within the
    threshold. A transform never constructs an engine: without ``embedder`` this is an error
    (builds go through :mod:`pipelines.stages`, which passes the packaged MiniLM)."""
    if embedder is None:
        raise EngineError(
            "semantic_dedup needs an embedder (engines.embeddings.Embedder); "
            "run it through pipelines.stages or pass one"
        )
    texts = embedding_texts(table, params.max_chars)
    vectors = embedder.embed(texts)
    owner = keep_first(len(texts), *index_pairs(vectors, params.threshold, params))
    dup = owner >= 0
    kept_ids = table.column("id").take(pa.array(owner[dup])).to_pylist()
    reasons = [f"semantic_duplicate_of:{kept}" for kept in kept_ids]
    mask = pa.array(dup)
    return StageResult(
        kept=table.filter(pc.invert(mask)),
        rejected=reject_table(rejected(table.filter(mask), STAGE, reasons)),
        stats={"embedded": len(texts), "duplicates": int(dup.sum())},
    )
