"""Pure vector math shared by stages (no model I/O)."""

from __future__ import annotations

import numpy as np


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    """Mean cosine similarity over distinct pairs (diagonal excluded) of unit vectors.

    CRaFT's open-QA certainty σ. One vector has no pairs: its certainty is 1.0.
    """
    n = len(vectors)
    if n < 2:
        return 1.0
    sims = vectors @ vectors.T
    mean = float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
    return min(1.0, max(-1.0, mean))  # float32 rounding can land just past ±1
