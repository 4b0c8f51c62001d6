"""Stage ``semantic_dedup``: drop rows whose meaning repeats an earlier row.

Embeddings of the prompt and response with sentence-transformers ``all-MiniLM-L6-v2``
(the engine :class:`engines.embeddings.Embedder`, offline, batched, which the pipeline passes
in as an :class:`engines.base.TextEmbedder`: see :mod:`pipelines.stages`); the pairs of rows
with cosine similarity ≥ ``threshold`` (default 0.95) from a faiss inverted-file index
(:func:`index_pairs`); then a greedy pass in row order (:func:`keep_first`): a row is a
duplicate of the first earlier *kept* row it pairs with, and goes to ``rejected`` with
reason ``semantic_duplicate_of:<kept id>``. This is SemDeDup (Abbas et al. 2023, arXiv
2303.09540: k-means clusters of the embeddings, one row kept per group closer than a
threshold), except that each row is compared with its ``nprobe`` nearest clusters rather
than only its own, and the kept row is the first in row order, not the one nearest the
cluster centre.

Deviation from an exact search: the index may miss a pair (recall below 1).
:func:`exact_pairs` is the exact O(n²) reference; ``bench/semantic_dedup.py`` measures the
recall against it. faiss's IVF was chosen by measurement over faiss's HNSW and usearch
(docs/performance.md): at 100,000 synthetic rows HNSW (M 32, efSearch 64) found 96.9% of the
pairs, the IVF all of them, in less time.

A whole-table stage: every row must be compared with every other, across shards. Encoding
dominates its time: on the benchmark (400 rows, 2 cores) everything else (texts, index,
pass, output tables) took 0.04–0.28 s of 11–24 s.
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
EXACT_SCRATCH = 1 << 28
"""Bytes of similarities :func:`exact_pairs` holds at once (256 MiB)."""
TRAIN_PER_LIST = 64
"""k-means training rows per cluster (64 to 128 with a strided sample; fewer clusters when
rows are few)."""


class SemanticDedupParams(BaseModel):
    """Cosine threshold (0.95), the embedding model folder (default: the packaged
    all-MiniLM-L6-v2), how much text is embedded, and the index's shape (see
    :func:`index_pairs`)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(default=0.95, gt=0, le=1)
    embedding_dir: str | None = None
    max_chars: int = Field(default=2_000, gt=0)
    batch_size: int = Field(default=64, gt=0)
    lists_per_sqrt_row: float = Field(default=4.0, gt=0)
    """k-means clusters of the index per square root of the row count."""
    nprobe: int = Field(default=8, ge=1)
    """Nearest clusters each row is compared with (all their rows, exactly)."""


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


def exact_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(i, j)``, ``i < j``, of unit vectors with cosine ≥ ``threshold``, exactly:
    a blocked matrix product (numpy's BLAS) of each block of rows with all earlier rows,
    O(n²·d) time and at most :data:`EXACT_SCRATCH` bytes of similarities at once. The
    reference :func:`index_pairs` is measured against (``bench/semantic_dedup.py``)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    block = max(1, EXACT_SCRATCH // (4 * max(1, len(vectors))))
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
    """The pairs ``(i, j)``, ``i < j``, with cosine ≥ ``threshold`` that an inverted-file
    index finds: faiss ``IndexIVFFlat`` (Jégou et al. 2011; Johnson et al. 2019, arXiv
    1702.08734) on inner products of unit vectors.

    k-means splits the rows into ``lists_per_sqrt_row · √n`` clusters (trained on an evenly
    strided sample of 64 to 128 rows per cluster, faiss's fixed seed: the same vectors give
    the same clusters), as SemDeDup does (Abbas et al. 2023); each row then compares itself
    exactly with every row of its ``nprobe`` nearest clusters (a range search), where SemDeDup
    looks only in its own. Scores are exact cosines, so only recall is approximate: a pair is
    missed only when neither row's clusters hold the other. Cost: about
    ``n · nprobe · √n / lists_per_sqrt_row`` dot products, against ``n²/2`` for
    :func:`exact_pairs`.
    """
    import faiss

    params = params or SemanticDedupParams()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lists = max(1, min(round(params.lists_per_sqrt_row * n**0.5), n // TRAIN_PER_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:: max(1, n // (TRAIN_PER_LIST * lists))])
    index.add(vectors)
    index.nprobe = min(params.nprobe, lists)
    found_rows, found_cols = [], []
    for lo in range(0, n, QUERY_ROWS):
        limits, _, cols = index.range_search(vectors[lo : lo + QUERY_ROWS], threshold - TOLERANCE)
        found_rows.append(
            lo + np.repeat(np.arange(len(limits) - 1), np.diff(limits).astype(np.int64))
        )
        found_cols.append(cols)
    a, b = np.concatenate(found_rows), np.concatenate(found_cols).astype(np.int64)
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
