"""``aligncurate report``: one self-contained, browsable HTML page about a dataset version.

:func:`write_report` reads the version in one bounded pass per split
(:mod:`pipelines.report.collect`), draws the plots with matplotlib
(:mod:`pipelines.report.plots`) and writes ``DIR/index.html``
(:mod:`pipelines.report.html`): counts by split, stage and reject reason, length
histograms, the instruction/response statistics, the CRaFT μ/σ scatter and synthesis
lineage when the version has those columns, the diff against the previous version and
sample rows of each split. The page fetches nothing. :func:`publish_report` is the build's
hook: it writes the report of a new version under the store's work folder and links it
as a Prefect artifact.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from storage.atomic import write_text_atomic
from storage.dataset import DatasetStore

REPORT_FILE = "index.html"


@dataclass(frozen=True)
class ReportResult:
    """Where a report went and what it covers."""

    name: str
    version: int
    path: str
    bytes: int
    rows: dict[str, int]
    sections: list[str]
    stats: dict[str, Any]
    """The train split's instruction/response statistics (as in the build summary)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_report(
    store: DatasetStore, ref: str, out_dir: str | Path, sample: int = 5, diff: bool = True
) -> ReportResult:
    """Write the report of ``ref`` (``NAME[@VERSION|@TAG]``) to ``out_dir/index.html``.

    Raises:
        StoreError: unknown dataset, version or tag.
    """
    from pipelines.report.collect import collect
    from pipelines.report.html import render

    data = collect(store, ref, sample=sample, diff=diff)
    page = render(data)
    # a unique temporary file beside it, renamed into place: concurrent writers never share
    # one, and a failed write leaves nothing behind
    path = write_text_atomic(Path(out_dir) / REPORT_FILE, page)
    return ReportResult(
        name=data.name,
        version=data.version,
        path=str(path.resolve()),
        bytes=len(page.encode("utf-8")),
        rows={split: s.rows for split, s in data.splits.items()},
        sections=re.findall(r'<section id="([a-z]+)">', page),
        stats=data.stats,
    )


def publish_report(
    root: str, name: str, version: int, folder: Path, key: str
) -> ReportResult | None:
    """The build's hook: write the report of ``name@version`` into ``folder/v<version>/``
    and create a Prefect link artifact ``key`` pointing at it. A report that cannot be
    written is logged, not raised: the version is committed by then.

    Returns:
        The report (its path and the train split's statistics), or None when it failed.
    """
    from prefect.artifacts import create_link_artifact

    logger = logging.getLogger("aligncurate")
    try:
        result = write_report(DatasetStore(root), f"{name}@{version}", folder / f"v{version}")
    except Exception as exc:  # a failed report must not fail a committed build
        logger.warning("the report of %s@%d could not be written: %s", name, version, exc)
        return None
    create_link_artifact(
        link=Path(result.path).as_uri(),
        link_text=f"{name}@{version} report",
        key=key,
        description=f"Browsable report of {name} v{version}: {result.path}",
    )
    return result
