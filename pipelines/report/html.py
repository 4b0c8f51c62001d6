"""The report page: one self-contained HTML document (inline CSS, inline SVG, data: PNG).

Nothing on the page is fetched: a Content-Security-Policy ``default-src 'none'`` lets the
browser load only inline styles and ``data:`` images, and the page has no script.

The page is laid out by the Jinja2 templates in ``templates/`` (``report.html.j2``, one
macro per section in ``sections.html.j2``, the shared pieces in ``macros.html.j2``, the
style sheet ``report.css``), rendered with autoescape on: every value that comes from the
data (row text, sources, reasons, metadata) is HTML-escaped by the template engine. This
module only builds a small plain context per section (numbers, captions, :class:`Table`
heads and rows); the one thing passed as :class:`markupsafe.Markup` is the SVG markup that
matplotlib draws (:mod:`pipelines.report.plots`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape

from pipelines.report.collect import ReportData
from pipelines.report.plots import knowledge_state_data_uri, length_histogram, stage_bars
from storage.names import SPLITS

TEXT_LIMIT = 2_000
"""Characters of one text shown in a sample row; the rest is cut with a note."""
TOP_REASONS = 50

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

SAMPLE_SKIP = ("prompt", "response")
"""Columns a sample row shows as its conversation, not in its table of columns."""


@dataclass(frozen=True)
class Table:
    """One table of the page: the templates' ``table`` macro lays it out, each cell through
    :func:`fmt`; the cells of the ``numeric`` columns (0-based) are right-aligned."""

    head: Sequence[str]
    rows: Sequence[Sequence[Any]]
    numeric: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Section:
    """One section of the page: its id (also the name of its macro in
    ``sections.html.j2``), its title, and the context that macro takes."""

    key: str
    title: str
    context: Any


def fmt(value: Any) -> Markup:
    """One table cell (the templates' ``fmt`` filter): ints with thousands separators,
    floats to 4 significant digits, None as a muted dash, dicts and lists as JSON in
    ``<code>``, anything else as escaped text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return Markup(f"{value:,}")
    if isinstance(value, float):
        return Markup(f"{value:,.4g}")
    if value is None:
        return Markup('<span class="muted">–</span>')
    if isinstance(value, (dict, list)):
        return Markup("<code>{}</code>").format(json.dumps(value, default=str, ensure_ascii=False))
    return escape(str(value))


@cache
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("pipelines.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    return env


def render(data: ReportData) -> str:
    """The whole page for one version."""
    sections = [
        Section("counts", "Counts", _counts(data)),
        Section("lengths", "Lengths", _lengths(data)),
        Section("statistics", "Instruction/response statistics", _statistics(data.stats)),
    ]
    if data.has_craft():
        sections.append(Section("craft", "CRaFT knowledge state", _craft(data)))
    if data.has_lineage():
        sections.append(Section("lineage", "Synthesis lineage", _lineage(data)))
    if data.evaluations:
        sections.append(
            Section("evaluations", "Models trained on this version", _evaluations(data))
        )
    sections.append(Section("diff", "Diff against the previous version", _diff(data)))
    sections.append(Section("samples", "Sample rows", _samples(data)))
    facts, details = _header(data)
    return (
        _environment()
        .get_template("report.html.j2")
        .render(csp=CSP, ref=data.ref, facts=facts, details=details, sections=sections)
    )


def sample_row(row: Mapping[str, Any]) -> str:
    """One row: its conversation, its response and every other column, escaped."""
    macros = _environment().get_template("macros.html.j2").module
    return str(macros.sample_row(_row(row)))


# -- the sections' contexts -------------------------------------------------------------------


def _table(
    head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()
) -> Table:
    return Table(list(head), [list(r) for r in rows], frozenset(numeric))


def _header(data: ReportData) -> tuple[list[str], list[str]]:
    meta = data.info.metadata
    facts = [
        f"committed {data.info.timestamp.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"tags: {', '.join(data.info.tags) or 'none'}",
        f"build {meta.get('build_id', '–')}",
    ]
    details = [
        f"spec {meta.get('spec_name', '–')} (hash {str(meta.get('spec_hash', '–'))[:16]})",
        f"code {meta.get('code_version', '–')}",
    ]
    return facts, details


def _counts(data: ReportData) -> dict[str, Any]:
    splits = data.splits
    total = sum(s.rows for s in splits.values())
    context: dict[str, Any] = {
        "splits": _table(
            ["split", "rows", "share"],
            [
                *[
                    (s, splits[s].rows, f"{splits[s].rows / total:.1%}" if total else "–")
                    for s in SPLITS
                ],
                ("total", total, ""),
            ],
            numeric=(1, 2),
        ),
        "stages": None,
        "stage_plot": None,
        "reasons": None,
        "more_reasons": 0,
        "more_rows": 0,
    }
    counts = _stage_order(data.info.metadata.get("counts") or {})
    if counts:
        context["stages"] = _table(
            ["stage", "in", "kept", "rejected", "added"],
            [
                (stage, *(line.get(k, 0) for k in ("in", "kept", "rejected", "added")))
                for stage, line in counts.items()
            ],
            numeric=(1, 2, 3, 4),
        )
        context["stage_plot"] = Markup(stage_bars(counts))  # trusted: drawn by matplotlib
    rejected = splits["rejected"]
    reasons = rejected.reasons.most_common()
    if reasons:
        shown = reasons[:TOP_REASONS]
        context["reasons"] = _table(
            ["stage", "reason", "rows", "example"],
            [(st, kind, n, rejected.reason_examples.get((st, kind))) for (st, kind), n in shown],
            numeric=(2,),
        )
        context["more_reasons"] = len(reasons) - len(shown)
        context["more_rows"] = sum(n for _, n in reasons[len(shown) :])
    columns = []
    for column in sorted({c for s in splits.values() for c in s.counts}):
        values = sorted(
            {v for s in splits.values() for v in s.counts.get(column, {})},
            key=lambda v: -sum(s.counts.get(column, {}).get(v, 0) for s in splits.values()),
        )
        rows = [(v, *(splits[s].counts.get(column, {}).get(v, 0) for s in SPLITS)) for v in values]
        columns.append((column, _table([column, *SPLITS], rows, numeric=(1, 2))))
    context["columns"] = columns
    return context


def _stage_order(counts: Mapping[str, Mapping[str, int]]) -> dict[str, Mapping[str, int]]:
    """The per-stage counts with ``ingest`` first (it always runs first; the rest keep the
    order the commit stored them in)."""
    return {k: counts[k] for k in sorted(counts, key=lambda k: k != "ingest")}


def _lengths(data: ReportData) -> dict[str, Any]:
    if "prompt" not in data.columns or "response" not in data.columns:
        return {"plots": None}
    plots = []
    for field in ("prompt", "response"):
        lengths = {s: getattr(d, f"{field}_tokens") for s, d in data.splits.items()}
        units = sorted({d.unit for d in data.splits.values() if d.rows})
        svg, clipped = length_histogram(lengths, field, " / ".join(units) or "whitespace")
        note = f" {clipped:,} longer rows are counted in the last bin." if clipped else ""
        # trusted: drawn by matplotlib
        plots.append((Markup(svg), f"{field.capitalize()} length per split.{note}"))
    return {"plots": plots}


def _statistics(stats: Mapping[str, Any]) -> dict[str, Any] | None:
    """The instruction/response statistics of the train split
    (:func:`transforms.response.stats.summarize`) and the loss-over-prompt advice; None
    when the train split is empty."""
    if not stats.get("rows"):
        return None
    rows = [
        (label, *(stats[key].get(k) for k in ("mean", "p50", "p90", "max")))
        for label, key in (
            (f"prompt tokens ({stats['unit']})", "prompt_tokens"),
            (f"response tokens ({stats['unit']})", "response_tokens"),
            ("prompt/response per row", "row_ratio"),
        )
    ]
    advice = stats["recommendation"]
    return {
        "rows": stats["rows"],
        "ratio": stats["length_ratio"],
        "table": _table(["field", "mean", "p50", "p90", "max"], rows, numeric=(1, 2, 3, 4)),
        "verdict": (
            "loss over the prompt" if advice["loss_over_prompt"] else "loss on responses only"
        ),
        "settings": (
            f"TRL {json.dumps(advice['trl'])}, LLaMA-Factory {json.dumps(advice['llamafactory'])}"
        ),
        "reasons": list(advice["reasons"]),
        "source": advice["source"],
    }


def _craft(data: ReportData) -> dict[str, Any]:
    correctness, certainty, labels = data.craft_points()
    scored = sum(s.craft.num_rows for s in data.splits.values() if s.craft is not None)
    uri = knowledge_state_data_uri(correctness, certainty, labels, f"{data.ref}: knowledge state")
    shown = f"a seeded sample of {len(labels):,} of " if len(labels) < scored else ""
    counts = data.splits["train"].counts.get("craft_label", {})
    return {
        "uri": uri,
        "caption": (
            f"Correctness μ and certainty σ of the initial model, {shown}{scored:,} scored "
            "rows, coloured by CRaFT label (rejected rows grey). Zhu et al., CRaFT, AAAI-25."
        ),
        "table": _table(["craft_label", "train rows"], sorted(counts.items()), numeric=(1,)),
    }


def _lineage(data: ReportData) -> dict[str, Any]:
    rows = [
        (method, round_, split, generator, n)
        for split in SPLITS
        for (method, round_, generator), n in sorted(data.splits[split].lineage.items())
    ]
    examples = [
        (
            split,
            _table(
                ["id", "method", "round", "parents", "prompt", "response"],
                [
                    (
                        r.get("id"),
                        r.get("lineage_method"),
                        r.get("lineage_round"),
                        ", ".join(r.get("lineage_parents") or []),
                        _clip(_prompt_text(r.get("prompt")), 300),
                        _clip(r.get("response") or "", 300),
                    )
                    for r in data.splits[split].lineage_examples
                ],
            ),
        )
        for split in SPLITS
        if data.splits[split].lineage_examples
    ]
    return {
        "table": _table(["method", "round", "split", "generator", "rows"], rows, numeric=(1, 4)),
        "examples": examples,
    }


def _evaluations(data: ReportData) -> dict[str, Any]:
    """Pc / Pw / refusal / THS of each evaluation of a model trained on this version, with
    M0's Init-Basic and Init-Refuse lines (``aligncurate evaluate``)."""
    rows = []
    for result in data.evaluations:
        model = Path(result["model"]).name
        for name, line in result["sets"].items():
            shown = (
                ("M0 Init-Basic", line["init_basic"], line["init_basic"]["ths"]),
                ("M0 Init-Refuse", line["init_refuse"], line["init_refuse"]["ths"]),
                (model, line, line["ths"]),
            )
            for who, rates, ths in shown:
                cells = [100 * rates[k] for k in ("pc", "pw", "refusal")]
                rows.append([name, who, rates["n"], *cells, ths, result.get("created_at")])
    head = ["question set", "model", "n", "Pc %", "Pw %", "refusal %", "THS", "evaluated"]
    return {"table": _table(head, rows, numeric=range(2, 7))}


def _diff(data: ReportData) -> dict[str, Any]:
    if data.version == 0:
        return {"note": "Version 0: there is no previous version."}
    if data.diff is None:
        return {"note": f"No diff: {data.diff_error or 'not computed'}."}
    d = data.diff
    examples = [
        (kind, ", ".join(ids))
        for kind, ids in (
            ("added", d.added_examples),
            ("removed", d.removed_examples),
            ("changed", d.changed_examples),
            ("moved", d.moved_examples),
        )
        if ids
    ]
    return {
        "note": None,
        "a": d.a,
        "b": d.b,
        "changes": _table(
            ["added", "removed", "changed", "of which moved split", "unchanged"],
            [(d.added, d.removed, d.changed, d.moved, d.unchanged)],
            numeric=range(5),
        ),
        "rows": _table(
            ["split", "rows before", "rows after"],
            [(s, d.rows_a.get(s, 0), d.rows_b.get(s, 0)) for s in SPLITS],
            numeric=(1, 2),
        ),
        "columns": (
            (", ".join(d.columns_added) or "none", ", ".join(d.columns_removed) or "none")
            if d.columns_added or d.columns_removed
            else None
        ),
        "examples": _table(["change", "example ids"], examples) if examples else None,
    }


def _samples(data: ReportData) -> dict[str, Any]:
    return {
        "splits": [
            (split, [_row(row) for row in data.splits[split].sample], data.splits[split].rows)
            for split in SPLITS
        ]
    }


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The context of one sample row (the ``sample_row`` macro)."""
    fields = [(k, _short(v)) for k, v in row.items() if k not in SAMPLE_SKIP and v is not None]
    return {
        "fields": _table(["column", "value"], fields),
        "turns": [
            (str(t.get("role")), _clip(t.get("content") or "", TEXT_LIMIT))
            for t in row.get("prompt") or []
        ],
        "response": _clip(row.get("response") or "", TEXT_LIMIT),
    }


def _short(value: Any) -> Any:
    if isinstance(value, str):
        return _clip(value, 400)
    if isinstance(value, list) and len(json.dumps(value, default=str)) > 400:
        return _clip(json.dumps(value, default=str, ensure_ascii=False), 400)
    return value


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit:,} more characters]"


def _prompt_text(prompt: Any) -> str:
    return "\n".join(f"{t.get('role')}: {t.get('content')}" for t in prompt or [])
