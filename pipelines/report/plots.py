"""The report's plots, rendered by matplotlib without a display: inline SVG markup for the
histograms and the stage bars, and a PNG (base64 in an ``<img>``) for the CRaFT scatter,
which :func:`transforms.craft.diagnostics.knowledge_state_png` draws.

SVG output is deterministic: no date in its metadata and element ids salted by the plot's
name (so two plots on one page never share an id).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPLIT_COLOURS = {"train": "#1c7ed6", "rejected": "#e8590c"}
BINS = 40


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _svg(figure: Any, name: str) -> str:
    """The figure as ``<svg>`` markup to inline in HTML (no XML prolog, no DOCTYPE)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def length_histogram(
    lengths: Mapping[str, np.ndarray], field: str, unit: str, clip_quantile: float = 0.99
) -> tuple[str, int]:
    """Histogram of one field's lengths per split (step outlines on shared bins).

    Bins span 0 to the 99th percentile of all splits together; longer rows are counted
    in the last bin, and their number is returned with the SVG so the caption can say so.
    """
    present = {split: values for split, values in lengths.items() if len(values)}
    figure = _figure(6.0, 3.2)
    axes = figure.add_subplot()
    clipped = 0
    if present:
        everything = np.concatenate(list(present.values()))
        top = max(float(np.quantile(everything, clip_quantile)), 1.0)
        edges = np.linspace(0, top, BINS + 1)
        for split, values in present.items():
            clipped += int(np.count_nonzero(values > top))
            axes.hist(
                np.minimum(values, top),
                bins=edges,
                histtype="step",
                linewidth=1.6,
                color=SPLIT_COLOURS.get(split, "#495057"),
                label=f"{split} ({len(values):,})",
            )
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "no rows", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel(f"{field} length ({unit})")
    axes.set_ylabel("rows")
    axes.set_title(f"{field} lengths")
    figure.tight_layout()
    return _svg(figure, f"hist-{field}"), clipped


def stage_bars(counts: Mapping[str, Mapping[str, int]]) -> str:
    """Kept and rejected rows per stage (plus rows added), as horizontal stacked bars."""
    stages: Sequence[str] = list(counts)
    figure = _figure(6.0, 0.5 + 0.38 * max(len(stages), 1))
    axes = figure.add_subplot()
    y = np.arange(len(stages))[::-1]
    kept = np.array([counts[s].get("kept", 0) for s in stages], dtype=float)
    rejected = np.array([counts[s].get("rejected", 0) for s in stages], dtype=float)
    added = np.array([counts[s].get("added", 0) for s in stages], dtype=float)
    axes.barh(y, kept, color=SPLIT_COLOURS["train"], label="kept")
    axes.barh(y, rejected, left=kept, color=SPLIT_COLOURS["rejected"], label="rejected")
    if added.any():
        axes.scatter(added, y, marker="D", color="#2b8a3e", zorder=3, label="added")
    axes.set_yticks(y, labels=list(stages))
    axes.set_xlabel("rows")
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return _svg(figure, "stages")


def knowledge_state_data_uri(
    correctness: np.ndarray, certainty: np.ndarray, labels: list[str], title: str
) -> str:
    """The CRaFT μ/σ scatter coloured by label, as a ``data:image/png`` URI."""
    from transforms.craft.diagnostics import knowledge_state_png

    png = knowledge_state_png(correctness, certainty, labels, title)
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
