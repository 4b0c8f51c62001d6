"""What the report shows, gathered from a committed version in one bounded pass per split.

Each split is streamed in record batches (:meth:`storage.dataset.DatasetStore.batches`), so
a 1M-row version never becomes Python objects: per batch the pass keeps token lengths (two
int64 arrays), value counts (pyarrow ``group_by``), the CRaFT scores as Arrow columns, the
lineage counts and the few sample rows it picks at evenly spaced positions. Lengths come
from :func:`transforms.response.stats.lengths_of` and the instruction/response statistics
from :func:`transforms.response.stats.summarize`, the functions behind the build summary's
``dataset_stats``, so the report and the build agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.parallel import ordered_map
from storage.dataset import DatasetStore, VersionInfo
from storage.diff import DatasetDiff
from storage.evaluations import evaluations_of
from storage.names import SPLITS, StoreError
from transforms.craft.select import CERTAINTY, CORRECTNESS, LABEL_COLUMN
from transforms.response.stats import lengths_of, summarize

BATCH_ROWS = 8_192
"""Rows per streamed batch: bounds the memory of one step of the pass."""
SCATTER_POINTS = 5_000
"""At most this many (μ, σ) points in the CRaFT scatter (a seeded uniform sample beyond)."""
CATEGORY_COLUMNS = ("source", "task", "origin", LABEL_COLUMN)
"""Columns counted per split (when present), besides the reject stage and reason."""
ID_PATTERN = r"[0-9a-f]{16,}"
"""Row ids and content hashes inside a reject reason (ids are 32 hex digits)."""
LINEAGE_KEYS = ("lineage_method", "lineage_round", "lineage_generator")
LINEAGE_EXAMPLES = 5


@dataclass
class SplitData:
    """One split of the version, as the report needs it."""

    split: str
    rows: int = 0
    prompt_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    response_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    units: set[str] = field(default_factory=set)
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    reasons: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Rejected rows by (stage, kind of reason): the reason with row ids and hashes
    replaced by ``<id>``, so that ``duplicate_of:<id>`` is one line, not one line per row."""
    reason_examples: dict[tuple[str, str], str] = field(default_factory=dict)
    """One full reason of each (stage, kind) (the smallest), shown as an example."""
    sample: list[dict[str, Any]] = field(default_factory=list)
    craft: pa.Table | None = None
    lineage: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    lineage_examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def unit(self) -> str:
        """The length unit, joined as :func:`transforms.response.stats.dataset_stats` does."""
        return " + ".join(sorted(self.units)) or "whitespace"


@dataclass
class ReportData:
    """Everything one report shows about ``name@version``."""

    name: str
    version: int
    info: VersionInfo
    columns: list[str]
    splits: dict[str, SplitData]
    stats: dict[str, Any]
    diff: DatasetDiff | None
    diff_error: str | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """Evaluations of models trained on this version (:mod:`storage.evaluations`)."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def craft_points(self, limit: int = SCATTER_POINTS) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """μ, σ and label of the scored rows: train rows by ``craft_label``, rejected ones
        as ``rejected`` (the convention of :func:`transforms.craft.diagnostics.state_labels`);
        a seeded uniform sample of ``limit`` rows when there are more."""
        parts = []
        for split in SPLITS:
            data = self.splits[split].craft
            if data is None or not data.num_rows:
                continue
            if split == "rejected":
                data = data.set_column(2, LABEL_COLUMN, pa.array(["rejected"] * data.num_rows))
            parts.append(data)
        if not parts:
            return np.zeros(0), np.zeros(0), []
        table = pa.concat_tables(parts)
        if table.num_rows > limit:
            rng = np.random.default_rng(0)
            table = table.take(np.sort(rng.choice(table.num_rows, limit, replace=False)))
        labels = pc.fill_null(table.column(LABEL_COLUMN), "unlabelled").to_pylist()
        return (
            table.column(CORRECTNESS).to_numpy(zero_copy_only=False).astype(float),
            table.column(CERTAINTY).to_numpy(zero_copy_only=False).astype(float),
            labels,
        )

    def has_craft(self) -> bool:
        return any(s.craft is not None and s.craft.num_rows for s in self.splits.values())

    def has_lineage(self) -> bool:
        return any(s.lineage for s in self.splits.values())


def collect(store: DatasetStore, ref: str, sample: int = 5, diff: bool = True) -> ReportData:
    """Read ``ref`` (``NAME[@VERSION|@TAG]``) once per split and gather the report's data.

    Args:
        store: the dataset store.
        ref: the version to report on.
        sample: rows shown per split, at evenly spaced positions.
        diff: also compare with the previous version (:mod:`storage.diff`), when there is one.

    Raises:
        StoreError: unknown dataset, version or tag.
    """
    name, version = store.resolve(ref)
    exact = f"{name}@{version}"
    info = next(v for v in store.versions(name) if v.version == version)
    columns = [c for c in store.schema(exact).names if c != "split"]
    splits = {
        split: _scan(store, exact, split, info.rows.get(split), sample, columns) for split in SPLITS
    }
    train = splits["train"]
    stats = summarize(train.prompt_tokens, train.response_tokens, unit=train.unit)
    result, error = None, None
    if diff and version > 0:
        try:
            result = store.diff(f"{name}@{version - 1}", exact)
        except StoreError as exc:  # e.g. the previous version's files were vacuumed
            error = str(exc)
    evaluations = evaluations_of(store, name, version)
    return ReportData(name, version, info, columns, splits, stats, result, error, evaluations)


def _scan(
    store: DatasetStore,
    ref: str,
    split: str,
    expected: int | None,
    sample: int,
    columns: list[str],
) -> SplitData:
    """One streamed pass over a split."""
    data = SplitData(split)
    picks = _positions(expected, sample)
    prompts: list[np.ndarray] = []
    responses: list[np.ndarray] = []
    craft: list[pa.Table] = []
    offset = 0
    texts = {"prompt", "response"} <= set(columns)

    def measured(batch: pa.RecordBatch) -> tuple[pa.Table, tuple | None]:
        """A batch as a table with its rows' lengths (the costly part: on shard threads)."""
        table = pa.Table.from_batches([batch])
        return table, lengths_of(table) if texts else None

    batches = store.batches(ref, split=split, batch_size=BATCH_ROWS)
    for table, lengths in ordered_map(measured, batches):
        if lengths is not None:
            p, r, unit = lengths
            prompts.append(p)
            responses.append(r)
            data.units.update(unit.split(" + "))
        _count(data, table)
        if {CORRECTNESS, CERTAINTY, LABEL_COLUMN} <= set(columns):
            scored = table.select([CORRECTNESS, CERTAINTY, LABEL_COLUMN])
            valid = pc.and_(pc.is_valid(scored[CORRECTNESS]), pc.is_valid(scored[CERTAINTY]))
            craft.append(scored.filter(valid))
        if "lineage_method" in columns:
            _lineage(data, table)
        if picks is None:
            wanted = list(range(min(max(sample - len(data.sample), 0), table.num_rows)))
        else:
            wanted = [p - offset for p in picks if offset <= p < offset + table.num_rows]
        if wanted:
            data.sample.extend(table.take(wanted).to_pylist())
        offset += table.num_rows
    data.rows = offset
    if prompts:
        data.prompt_tokens = np.concatenate(prompts)
        data.response_tokens = np.concatenate(responses)
    if craft:
        data.craft = pa.concat_tables(craft)
    return data


def _positions(rows: int | None, sample: int) -> list[int] | None:
    """Evenly spaced row positions; None when the row count is unknown (then the first
    ``sample`` rows are shown)."""
    if rows is None:
        return None
    if sample <= 0 or rows <= 0:
        return []
    return sorted({int(x) for x in np.linspace(0, rows - 1, min(sample, rows))})


def _group_counts(table: pa.Table, keys: Iterable[str]) -> list[tuple[tuple[Any, ...], int]]:
    keys = list(keys)
    grouped = table.select(keys).group_by(keys, use_threads=False).aggregate([([], "count_all")])
    values = [grouped.column(k).to_pylist() for k in keys]
    return list(
        zip(zip(*values, strict=True), grouped.column("count_all").to_pylist(), strict=True)
    )


def _count(data: SplitData, table: pa.Table) -> None:
    for column in CATEGORY_COLUMNS:
        if column in table.column_names:
            filled = table.select([column]).set_column(
                0, column, pc.fill_null(table.column(column).cast(pa.string()), "-")
            )
            counter = data.counts.setdefault(column, Counter())
            for (value,), n in _group_counts(filled, [column]):
                counter[value] += n
    if {"reject_stage", "reject_reason"} <= set(table.column_names):
        reason = pc.fill_null(table.column("reject_reason").cast(pa.string()), "-")
        reasons = pa.table(
            {
                "stage": pc.fill_null(table.column("reject_stage").cast(pa.string()), "-"),
                "kind": pc.replace_substring_regex(reason, ID_PATTERN, "<id>"),
                "reason": reason,
            }
        )
        grouped = reasons.group_by(["stage", "kind"], use_threads=False).aggregate(
            [([], "count_all"), ("reason", "min")]
        )
        for stage, kind, n, example in zip(
            *(grouped.column(c).to_pylist() for c in ("stage", "kind", "count_all", "reason_min")),
            strict=True,
        ):
            data.reasons[(stage, kind)] += n
            known = data.reason_examples.get((stage, kind))
            data.reason_examples[(stage, kind)] = min(example, known) if known else example


def _lineage(data: SplitData, table: pa.Table) -> None:
    generated = table.filter(pc.is_valid(table.column("lineage_method")))
    if not generated.num_rows:
        return
    keys = [k for k in LINEAGE_KEYS if k in generated.column_names]
    for values, n in _group_counts(generated, keys):
        line = dict(zip(keys, values, strict=True))  # a column may be absent: by name
        method, round_ = line["lineage_method"], line.get("lineage_round")
        generator = line.get("lineage_generator")
        data.lineage[(str(method), int(round_ or 0), str(generator or "-"))] += n
    room = LINEAGE_EXAMPLES - len(data.lineage_examples)
    if room > 0:
        data.lineage_examples.extend(generated.slice(0, room).to_pylist())
