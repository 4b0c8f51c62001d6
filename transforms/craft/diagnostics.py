"""CRaFT diagnostics: the knowledge-state scatter and the static-conflict rate.

Zhu et al., CRaFT, AAAI-25, arXiv 2410.06913:

- The knowledge-state picture (the paper's Figure 1/4): every scored row at (μ, σ) of the
  initial model, coloured by what selection made of it: vanilla, IdK or rejected.
- Static conflict, measured as CRSS (§3.2, "Conflict Rate of Similar Samples"): the share
  of IdK rows whose nearest vanilla row, by cosine similarity of the last-layer hidden
  state of the question, lies above a threshold (0.97). Such a pair teaches the model to
  answer and to refuse nearly the same representation, which is what CRaFT's certainty
  ordering is meant to avoid. The nearest neighbour comes from scikit-learn's
  ``NearestNeighbors`` with the cosine metric (exact, brute force).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa

CRSS_THRESHOLD = 0.97
"""The paper's similarity threshold for a conflicting (IdK, vanilla) pair."""

_COLOURS = {"vanilla": "#2b8a3e", "idk": "#c92a2a", "rejected": "#adb5bd"}


def static_conflict_rate(
    idk: np.ndarray, vanilla: np.ndarray, threshold: float = CRSS_THRESHOLD
) -> dict[str, Any]:
    """CRSS: the share of IdK vectors whose nearest vanilla vector has cosine > threshold.

    Returns ``{"rate", "conflicts", "idk", "vanilla", "threshold"}``; the rate is ``None``
    when either side is empty (there is nothing to conflict with).
    """
    from sklearn.neighbors import NearestNeighbors

    out: dict[str, Any] = {
        "rate": None,
        "conflicts": 0,
        "idk": len(idk),
        "vanilla": len(vanilla),
        "threshold": threshold,
    }
    if len(idk) == 0 or len(vanilla) == 0:
        return out
    index = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(vanilla)
    distance, _ = index.kneighbors(idk)
    similarity = 1.0 - distance[:, 0]
    conflicts = int(np.count_nonzero(similarity > threshold))
    return {**out, "rate": conflicts / len(idk), "conflicts": conflicts}


def state_labels(kept: pa.Table, rejected: pa.Table, label_column: str) -> list[str]:
    """One label per row, kept rows first: their selection label, then ``rejected``."""
    return [*kept.column(label_column).to_pylist(), *(["rejected"] * rejected.num_rows)]


def knowledge_state_png(
    correctness: np.ndarray, certainty: np.ndarray, labels: list[str], title: str
) -> bytes:
    """The μ/σ scatter coloured by label, as PNG bytes (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), dpi=100)
    axes = figure.add_subplot()
    rng = np.random.default_rng(0)  # jitter: μ takes few values (a fraction of N samples)
    jitter = rng.uniform(-0.01, 0.01, len(correctness))
    order = ["rejected", "vanilla", "idk"]  # rejected underneath
    for label in sorted(set(labels), key=lambda x: order.index(x) if x in order else -1):
        mask = np.array([lab == label for lab in labels])
        axes.scatter(
            correctness[mask] + jitter[mask],
            certainty[mask],
            s=12,
            alpha=0.7,
            color=_COLOURS.get(label, "#1c7ed6"),
            label=f"{label} ({int(mask.sum())})",
        )
    axes.set_xlabel("correctness μ (initial model)")
    axes.set_ylabel("certainty σ (initial model)")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
