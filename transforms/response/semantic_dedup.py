"""Stage ``semantic_dedup``: drop rows whose meaning repeats an earlier row.

Embeddings of the prompt and response with sentence-transformers ``all-MiniLM-L6-v2``
(the engine :class:`engines.embeddings.Embedder`, offline, which the pipeline passes in
as an :class:`engines.base.TextEmbedder`: see :mod:`pipelines.stages`), neighbours within cosine
similarity ``threshold`` (default 0.95) found with scikit-learn ``NearestNeighbors``
(cosine metric, radius ``1 - threshold``), then a greedy pass in row order: a row is a
duplicate of the first earlier *kept* row within the radius, and goes to ``rejected`` with
reason ``semantic_duplicate_of:<kept id>``. This is the SemDeDup idea (Abbas et al. 2023,
arXiv 2303.09540: keep one row per group of embeddings closer than a threshold) without
its k-means pre-clustering, which only pays off on far larger sets.

A whole-table stage: every row must be compared with every other, across shards.
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


class SemanticDedupParams(BaseModel):
    """Cosine threshold (0.95), the embedding model folder (default: the packaged
    all-MiniLM-L6-v2) and how much text is embedded."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(default=0.95, gt=0, le=1)
    embedding_dir: str | None = None
    max_chars: int = Field(default=2_000, gt=0)
    batch_size: int = Field(default=64, gt=0)


def duplicates_by_radius(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """For each row, the index of the earlier kept row it duplicates, or -1 (kept)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(vectors)
    owner = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return owner
    nn = NearestNeighbors(radius=1.0 - threshold + 1e-6, metric="cosine").fit(vectors)
    neighbours = nn.radius_neighbors(vectors, return_distance=False)
    for i in range(n):
        if owner[i] != -1:
            continue
        for j in np.sort(neighbours[i]):
            if j > i and owner[j] == -1:
                owner[j] = i
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
    text = pc.binary_join_element_wise(
        prompt_plain(table.column("prompt")),
        pc.fill_null(combined(table.column("response")), ""),
        "\n",
    )
    texts = pc.utf8_slice_codeunits(text, 0, params.max_chars).to_pylist()
    vectors = embedder.embed(texts)
    owner = duplicates_by_radius(vectors, params.threshold)
    ids = table.column("id").to_pylist()
    dup = owner >= 0
    reasons = [f"semantic_duplicate_of:{ids[o]}" for o in owner[dup]]
    mask = pa.array(dup)
    return StageResult(
        kept=table.filter(pc.invert(mask)),
        rejected=reject_table(rejected(table.filter(mask), STAGE, reasons)),
        stats={"embedded": len(texts), "duplicates": int(dup.sum())},
    )
