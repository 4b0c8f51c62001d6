"""The report page: one self-contained HTML document (inline CSS, inline SVG, data: PNG).

Nothing on the page is fetched: a Content-Security-Policy ``default-src 'none'`` lets the
browser load only inline styles and ``data:`` images, and the page has no script. Every
value that comes from the data (row text, sources, reasons, metadata) is HTML-escaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from pipelines.report.collect import ReportData
from pipelines.report.plots import knowledge_state_data_uri, length_histogram, stage_bars
from storage.names import SPLITS

TEXT_LIMIT = 2_000
"""Characters of one text shown in a sample row; the rest is cut with a note."""
TOP_REASONS = 50

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#212529;
background:#f8f9fa}
header{background:#212529;color:#f8f9fa;padding:16px 28px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:#ced4da}
nav{padding:8px 28px;background:#e9ecef;position:sticky;top:0}
nav a{margin-right:14px;color:#1c7ed6;text-decoration:none}
main{padding:8px 28px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:12px 18px;
margin:16px 0}
h2{margin:4px 0 10px;font-size:18px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px}
th,td{border:1px solid #dee2e6;padding:3px 8px;text-align:left;vertical-align:top;
overflow-wrap:anywhere}
td.n{text-align:right;font-variant-numeric:tabular-nums;overflow-wrap:normal}
th{background:#f1f3f5}
.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}
figure svg,figure img{max-width:100%;height:auto;display:block}
figcaption{color:#495057;font-size:12px}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{white-space:pre-wrap;word-break:break-word;background:#f8f9fa;padding:6px 8px;
margin:4px 0;border-radius:4px;max-height:320px;overflow:auto}
.row{border-top:1px solid #dee2e6;padding:8px 0;display:grid;
grid-template-columns:minmax(0,480px) minmax(0,1fr);gap:14px}
.row>table{width:100%;table-layout:fixed;margin:0}
.row>table th:first-child{width:36%}
.muted{color:#868e96}
.turn{margin:2px 0}
.role{font-weight:600;color:#495057}
"""


def render(data: ReportData) -> str:
    """The whole page for one version."""
    sections = [
        ("counts", "Counts", _counts(data)),
        ("lengths", "Lengths", _lengths(data)),
        ("statistics", "Instruction/response statistics", _statistics(data.stats)),
    ]
    if data.has_craft():
        sections.append(("craft", "CRaFT knowledge state", _craft(data)))
    if data.has_lineage():
        sections.append(("lineage", "Synthesis lineage", _lineage(data)))
    if data.evaluations:
        sections.append(("evaluations", "Models trained on this version", _evaluations(data)))
    sections.append(("diff", "Diff against the previous version", _diff(data)))
    sections.append(("samples", "Sample rows", _samples(data)))
    nav = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections)
    body = "".join(
        f'<section id="{key}"><h2>{escape(title)}</h2>{content}</section>'
        for key, title, content in sections
    )
    title = escape(f"{data.ref} — aligncurate report")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{CSS}</style></head><body>"
        f"{_header(data)}<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


# -- pieces ---------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    right = set(numeric)
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    lines = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{_fmt(v)}</td>' if i in right else f"<td>{_fmt(v)}</td>"
            for i, v in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if value is None:
        return '<span class="muted">–</span>'
    if isinstance(value, (dict, list)):
        return f"<code>{escape(json.dumps(value, default=str, ensure_ascii=False))}</code>"
    return escape(str(value))


def _header(data: ReportData) -> str:
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
    return (
        f"<header><h1>{escape(data.ref)}</h1>"
        f"<p>{escape(' · '.join(facts))}</p><p>{escape(' · '.join(details))}</p></header>"
    )


def _counts(data: ReportData) -> str:
    splits = data.splits
    total = sum(s.rows for s in splits.values())
    parts = [
        "<h3>By split</h3>",
        _table(
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
    ]
    counts = _stage_order(data.info.metadata.get("counts") or {})
    if counts:
        parts.append("<h3>By stage</h3>")
        parts.append(
            _table(
                ["stage", "in", "kept", "rejected", "added"],
                [
                    (stage, *(line.get(k, 0) for k in ("in", "kept", "rejected", "added")))
                    for stage, line in counts.items()
                ],
                numeric=(1, 2, 3, 4),
            )
        )
        parts.append(_plot(stage_bars(counts), "Rows kept and rejected by each stage."))
    else:
        parts.append('<p class="muted">This commit carries no per-stage counts.</p>')
    rejected = splits["rejected"]
    reasons = rejected.reasons.most_common()
    parts.append("<h3>By reject reason</h3>")
    if reasons:
        shown = reasons[:TOP_REASONS]
        parts.append(
            _table(
                ["stage", "reason", "rows", "example"],
                [
                    (st, kind, n, rejected.reason_examples.get((st, kind)))
                    for (st, kind), n in shown
                ],
                numeric=(2,),
            )
        )
        if len(reasons) > len(shown):
            rest = sum(n for _, n in reasons[len(shown) :])
            parts.append(
                f'<p class="muted">{len(reasons) - len(shown)} more reasons, {rest:,} rows.</p>'
            )
    else:
        parts.append('<p class="muted">No rejected rows.</p>')
    for column in sorted({c for s in splits.values() for c in s.counts}):
        values = sorted(
            {v for s in splits.values() for v in s.counts.get(column, {})},
            key=lambda v: -sum(s.counts.get(column, {}).get(v, 0) for s in splits.values()),
        )
        parts.append(f"<h3>By {escape(column)}</h3>")
        parts.append(
            _table(
                [column, *SPLITS],
                [
                    (v, *(splits[s].counts.get(column, {}).get(v, 0) for s in SPLITS))
                    for v in values
                ],
                numeric=(1, 2),
            )
        )
    return "".join(parts)


def _stage_order(counts: Mapping[str, Mapping[str, int]]) -> dict[str, Mapping[str, int]]:
    """The per-stage counts with ``ingest`` first (it always runs first; the rest keep the
    order the commit stored them in)."""
    return {k: counts[k] for k in sorted(counts, key=lambda k: k != "ingest")}


def _plot(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _lengths(data: ReportData) -> str:
    if "prompt" not in data.columns or "response" not in data.columns:
        return '<p class="muted">No prompt/response columns.</p>'
    plots = []
    for field in ("prompt", "response"):
        lengths = {s: getattr(d, f"{field}_tokens") for s, d in data.splits.items()}
        units = sorted({d.unit for d in data.splits.values() if d.rows})
        svg, clipped = length_histogram(lengths, field, " / ".join(units) or "whitespace")
        note = f" {clipped:,} longer rows are counted in the last bin." if clipped else ""
        plots.append(_plot(svg, f"{field.capitalize()} length per split.{note}"))
    return f'<div class="plots">{"".join(plots)}</div>'


def _statistics(stats: Mapping[str, Any]) -> str:
    """The instruction/response statistics of the train split
    (:func:`transforms.response.stats.summarize`) and the loss-over-prompt advice."""
    if not stats.get("rows"):
        return '<p class="muted">The train split is empty.</p>'
    rows = [
        (label, *(stats[key].get(k) for k in ("mean", "p50", "p90", "max")))
        for label, key in (
            (f"prompt tokens ({stats['unit']})", "prompt_tokens"),
            (f"response tokens ({stats['unit']})", "response_tokens"),
            ("prompt/response per row", "row_ratio"),
        )
    ]
    advice = stats["recommendation"]
    verdict = "loss over the prompt" if advice["loss_over_prompt"] else "loss on responses only"
    reasons = "".join(f"<li>{escape(r)}</li>" for r in advice["reasons"])
    settings = (
        f"TRL {json.dumps(advice['trl'])}, LLaMA-Factory {json.dumps(advice['llamafactory'])}"
    )
    return (
        f"<p>{stats['rows']:,} train rows; mean prompt/response length ratio "
        f"<b>{_fmt(stats['length_ratio'])}</b>.</p>"
        + _table(["field", "mean", "p50", "p90", "max"], rows, numeric=(1, 2, 3, 4))
        + f"<p>Recommendation: <b>{escape(verdict)}</b> ({escape(settings)}).</p>"
        + f"<ul>{reasons}</ul><p class='muted'>{escape(advice['source'])}</p>"
    )


def _craft(data: ReportData) -> str:
    correctness, certainty, labels = data.craft_points()
    scored = sum(s.craft.num_rows for s in data.splits.values() if s.craft is not None)
    uri = knowledge_state_data_uri(correctness, certainty, labels, f"{data.ref}: knowledge state")
    shown = f"a seeded sample of {len(labels):,} of " if len(labels) < scored else ""
    caption = (
        f"Correctness μ and certainty σ of the initial model, {shown}{scored:,} scored rows, "
        "coloured by CRaFT label (rejected rows grey). Zhu et al., CRaFT, AAAI-25."
    )
    counts = data.splits["train"].counts.get("craft_label", {})
    table = _table(["craft_label", "train rows"], sorted(counts.items()), numeric=(1,))
    return (
        f'<figure><img src="{uri}" alt="CRaFT knowledge-state scatter">'
        f"<figcaption>{escape(caption)}</figcaption></figure>{table}"
    )


def _lineage(data: ReportData) -> str:
    rows = [
        (method, round_, split, generator, n)
        for split in SPLITS
        for (method, round_, generator), n in sorted(data.splits[split].lineage.items())
    ]
    parts = [
        "<p>Rows made by synthesis stages (docs/synthesis.md), by method, round and split.</p>",
        _table(["method", "round", "split", "generator", "rows"], rows, numeric=(1, 4)),
    ]
    for split in SPLITS:
        examples = data.splits[split].lineage_examples
        if not examples:
            continue
        parts.append(f"<h3>Generated rows ({escape(split)})</h3>")
        parts.append(
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
                    for r in examples
                ],
            )
        )
    return "".join(parts)


def _evaluations(data: ReportData) -> str:
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
    note = (
        "<p>THS is against M0 asked with the BASIC prompt (Init-Basic: the bare question for "
        "open QA), as in the CRaFT paper's Table 2; every other line is asked with the RAIT "
        "prompt.</p>"
    )
    return note + _table(head, rows, numeric=range(2, 7))


def _diff(data: ReportData) -> str:
    if data.version == 0:
        return '<p class="muted">Version 0: there is no previous version.</p>'
    if data.diff is None:
        return f'<p class="muted">No diff: {escape(data.diff_error or "not computed")}.</p>'
    d = data.diff
    parts = [
        f"<p>From <code>{escape(d.a)}</code> to <code>{escape(d.b)}</code>, by row id.</p>",
        _table(
            ["added", "removed", "changed", "of which moved split", "unchanged"],
            [(d.added, d.removed, d.changed, d.moved, d.unchanged)],
            numeric=range(5),
        ),
        _table(
            ["split", "rows before", "rows after"],
            [(s, d.rows_a.get(s, 0), d.rows_b.get(s, 0)) for s in SPLITS],
            numeric=(1, 2),
        ),
    ]
    if d.columns_added or d.columns_removed:
        parts.append(
            f"<p>Columns added: {escape(', '.join(d.columns_added) or 'none')}; "
            f"removed: {escape(', '.join(d.columns_removed) or 'none')}.</p>"
        )
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
    if examples:
        parts.append(_table(["change", "example ids"], examples))
    return "".join(parts)


SAMPLE_SKIP = ("prompt", "response")


def _samples(data: ReportData) -> str:
    parts = []
    for split in SPLITS:
        rows = data.splits[split].sample
        parts.append(f"<h3>{escape(split)} ({len(rows)} of {data.splits[split].rows:,})</h3>")
        if not rows:
            parts.append('<p class="muted">No rows.</p>')
        parts.extend(sample_row(row) for row in rows)
    return "".join(parts)


def sample_row(row: Mapping[str, Any]) -> str:
    """One row: its conversation, its response and every other column, escaped."""
    turns = "".join(
        f'<div class="turn"><span class="role">{escape(str(t.get("role")))}</span>'
        f"<pre>{escape(_clip(t.get('content') or '', TEXT_LIMIT))}</pre></div>"
        for t in row.get("prompt") or []
    )
    response = escape(_clip(row.get("response") or "", TEXT_LIMIT))
    fields = [(k, v) for k, v in row.items() if k not in SAMPLE_SKIP and v is not None]
    return (
        f'<div class="row">{_table(["column", "value"], [(k, _short(v)) for k, v in fields])}'
        f'<div>{turns}<div class="turn"><span class="role">response</span><pre>{response}</pre>'
        "</div></div></div>"
    )


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
