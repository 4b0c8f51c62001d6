"""The Prefect flow ``build_dataset``: ingest → stages → one atomic commit.

Tasks pass shard paths, never rows. Ingest runs one task per source; each ordered stage
(exact dedup) runs as one task over the shards in order, after its per-shard ``prepare``
step (near dedup's signatures), if it has one, has run as one task per shard; with
``partitions`` (the default under ``--runner dask``) exact and near dedup run as
partitioned tasks instead (:mod:`pipelines.partitioned`). Every task
is cached on a key made of its input fingerprints, its stage parameters and the stage
code versions, with the result persisted under ``<store>/_work``: a build rerun after a
crash reuses every task that had finished and redoes only the rest.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError
from prefect.filesystems import LocalFileSystem
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.failures import clear_failures, clear_task_failures, record_failure
from pipelines.fingerprint import code_version, file_fingerprint, fresh, key_of
from pipelines.parallel import ordered_map, shard_threads
from pipelines.partitioned import partitionable, run_partitioned
from pipelines.progress import emit
from pipelines.report import ReportResult, publish_report
from pipelines.segments import (
    ChainStep,
    Counts,
    SegmentOutput,
    ShardWriter,
    add_counts,
    content_ids,
    merge_counts,
    read_columns,
    read_prepared,
    read_shard,
    read_shards,
    run_chain,
    shard_rows,
    split_segments,
    write_prepared,
)
from pipelines.spec import BuildSpec, SourceSpec, check_sources, load_spec
from storage.dataset import DatasetStore, default_store
from storage.gencache import cache_dir
from storage.uris import work_dir
from transforms import dedup
from transforms.ingest import Batch, IngestError, IngestParams, source_batches
from transforms.registry import StageContext
from transforms.response.stats import shard_stats
from transforms.stage import StageResult


class AccountingError(RuntimeError):
    """Rows in != rows kept + rows rejected: the build refuses to commit."""


def _task_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["key"]


CACHED: dict[str, Any] = {
    "cache_key_fn": _task_key,
    "persist_result": True,
    "on_failure": [record_failure],  # pickled failures are deleted once stale
    "on_completion": [clear_task_failures],
}


def _run_id() -> str | None:
    return flow_run.id


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run; a plain logger when a task's ``.fn`` is called."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("aligncurate")


@task(name="ingest", **CACHED)
def ingest_source(
    key: str,
    source: SourceSpec,
    ingest: IngestParams,
    chain: list[ChainStep],
    folder: str,
    fingerprint: str | None = None,
    final: bool = False,
) -> SegmentOutput:
    """Read one source, run the leading local stages, write shards. ``fingerprint``: the
    source's, as in the key; the task fails (and caches nothing) if the bytes it read differ.
    ``final``: no segment follows, so the train shards are written as the table's data files
    (not in the key: the rows are the same either way, see :mod:`pipelines.segments`)."""
    logger = _logger()
    writer = ShardWriter(folder, final=final)

    def shard(indexed: tuple[int, Batch]) -> tuple[Counts, tuple[str, str | None]]:
        index, build = indexed
        result = build()  # canonical rows built here, on the shard threads
        part: Counts = {}
        add_counts(part, "ingest", result.counts(result.stats["rows_read"]))
        kept, rejected = run_chain(result, chain, part)
        return part, writer.write_shard(index, kept, rejected)

    batches = source_batches(
        source.path,
        format=source.format,
        source=source.name,
        params=ingest,
        fingerprint=fingerprint,
    )
    with contextlib.closing(batches):  # the source file is closed on an error too
        for counts in writer.record(ordered_map(shard, enumerate(batches))):
            logger.info("%s: %d rows read", source.path, counts["ingest"]["in"])
            emit("read", source.path, counts["ingest"]["in"])
    return SegmentOutput(key, writer.train, writer.rejected, writer.counts, produced_by=_run_id())


PREPARE_ROWS = 65_536
"""Rows of consecutive shards one prepare task works on: small shards share a task (each
task run costs Prefect's orchestration, tens of milliseconds)."""


@task(name="prepare", **CACHED)
def prepare_shards(key: str, shards: list[str], step: ChainStep, folder: str) -> list[str]:
    """An ordered stage's per-shard work (its ``prepare``) on each of ``shards``, written
    to ``folder``; returns the files' paths, in order."""
    assert step.definition.prepare is not None
    paths = []
    for index, shard in enumerate(shards):  # shards of two sources may share a name
        table = read_shard(shard)
        arrays = step.definition.prepare(table, step.params)
        paths.append(write_prepared(folder, f"{index:05d}", table, arrays))
    return paths


@task(name="ordered-segment", **CACHED)
def run_segment(
    key: str,
    shards: list[str],
    chain: list[ChainStep],
    folder: str,
    context: StageContext,
    prepared: list[str] | None = None,
    final: bool = False,
    ids_are_keys: bool = False,
) -> SegmentOutput:
    """Run an ordered stage over the shards in order (or a whole-table stage over all of
    them at once), then the local stages after it. ``prepared``: the ordered stage's
    ``prepare`` output for each shard, from :func:`prepare_shards`; ``final``: the chain's
    last segment (not in the key), whose train shards are written as the table's data files;
    ``ids_are_keys``: the rows' ids hash their content under one source
    (:func:`pipelines.segments.content_ids`; not in the key: the rows are the same)."""
    logger = _logger()
    writer = ShardWriter(folder, final=final)
    states: dict[str, Any] = {}
    if ids_are_keys and chain[0].definition.name == dedup.STAGE:
        states[dedup.STAGE] = {dedup.ID_KEYS: True}
    stats: dict[str, Any] = {}
    inputs = read_shards(shards)
    if chain[0].definition.whole:
        tables = [r.kept for r in inputs]
        inputs = iter([StageResult(kept=pa.concat_tables(tables, promote_options="permissive"))])

    def heads() -> Iterator[tuple[int, tuple[pa.Table, list[pa.Table], Counts]]]:
        """The ordered (or whole-table) stage, shard after shard, on this thread."""
        for index, result in enumerate(inputs):
            arrays = read_prepared(prepared[index], result.kept) if prepared else None
            part: Counts = {}
            kept, rejected = run_chain(result, chain[:1], part, states, context, stats, arrays)
            yield index, (kept, rejected, part)

    def tail(
        item: tuple[int, tuple[pa.Table, list[pa.Table], Counts]],
    ) -> tuple[Counts, tuple[str, str | None]]:
        """The local stages after it and the shard's files, on the shard threads."""
        index, (table, rejected, part) = item
        kept, more = run_chain(StageResult(kept=table), chain[1:], part)
        return part, writer.write_shard(index, kept, [*rejected, *more])

    for i, _ in enumerate(writer.record(ordered_map(tail, heads())), 1):
        logger.info("%s: shard %d/%d", chain[0].definition.name, i, len(shards))
        emit("stage", chain[0].definition.name, i, len(shards))
    return SegmentOutput(
        key, writer.train, writer.rejected, writer.counts, produced_by=_run_id(), stats=stats
    )


@task(name="commit")
def commit_version(
    store: DatasetStore, name: str, train: list[str], rejected: list[str], metadata: dict[str, Any]
) -> int:
    """One atomic Delta commit of the train and rejected shards (written on the shard
    threads)."""
    return store.commit(name, train, rejected, metadata, threads=shard_threads())


def _chain_identity(chain: list[ChainStep]) -> list[Any]:
    return [
        [s.definition.name, s.definition.version, s.params.model_dump(mode="json")] for s in chain
    ]


def _engine_stats(outputs: list[SegmentOutput]) -> dict[str, int]:
    """Generation-cache hits, misses and engine calls of this run's model-backed stages
    (a task reused from an earlier run made no calls now)."""
    total = {"hits": 0, "misses": 0, "engine_calls": 0}
    for out in outputs:
        if out.produced_by != _run_id():
            continue
        for stage_stats in out.stats.values():
            for name, value in stage_stats.items():
                if name.startswith("engine_") and isinstance(value, dict):
                    for k in total:
                        total[k] += value.get(k, 0)
    return total


def _prepare(
    step: ChainStep, shards: list[str], work: Path, storage: LocalFileSystem
) -> list[str] | None:
    """Run ``step``'s ``prepare`` on every shard, :data:`PREPARE_ROWS` rows of consecutive
    shards per task (in parallel, on the flow's task runner); ``None`` when the stage has
    none."""
    if step.definition.prepare is None:
        return None
    prepare = prepare_shards.with_options(result_storage=storage)
    identity = _chain_identity([step])
    futures = []
    for group in _row_groups(shards, PREPARE_ROWS):  # a shard's path names the task that
        key = key_of("prepare", code_version(), group, identity)  # wrote it: a content key
        folder = work / "prepared" / key
        futures.append(fresh(prepare, folder).submit(key, group, step, str(folder)))
    return [path for future in futures for path in future.result()]


def _row_groups(shards: list[str], rows: int) -> list[list[str]]:
    """``shards`` in runs of consecutive shards of at least ``rows`` rows (the last may
    hold fewer)."""
    groups: list[list[str]] = [[]]
    held = 0
    for shard in shards:
        if held >= rows:
            groups.append([])
            held = 0
        groups[-1].append(shard)
        held += _rows([shard])
    return [group for group in groups if group]


def _rows(paths: list[str]) -> int:
    return sum(map(shard_rows, paths))


def _check_not_empty(spec: BuildSpec, ingested: list[SegmentOutput]) -> None:
    """Fail a build whose sources hold no rows at all, unless the spec says
    ``allow_empty: true``: an empty version would replace ``latest``."""
    if spec.allow_empty or any(o.counts.get("ingest", {}).get("in", 0) for o in ingested):
        return
    raise IngestError(
        ", ".join(s.path for s in spec.sources),
        "no rows to build from (no records, e.g. a CSV holding only its header, an empty "
        "JSON-lines file or an empty array); set `allow_empty: true` in the spec to commit "
        "an empty version",
    )


def _warnings(rows: dict[str, int]) -> list[str]:
    """What the build summary warns about."""
    if rows["train"]:
        return []
    return [f"0 train rows: the version holds only {rows['rejected']} rejected rows"]


def _result_storage(work: Path) -> LocalFileSystem:
    block = LocalFileSystem(basepath=str(work / "results"))
    slug = "aligncurate-" + key_of(str(work))[:16]
    block.save(slug, overwrite=True)
    return block


def default_task_runner() -> ThreadPoolTaskRunner:
    """Threads: ``PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS`` when set, else one per core
    this process may use (at least 2). Shard-level tasks run at once up to that, so a build
    of many shards holds a bounded number of them in memory (Prefect's own default pool is
    unbounded)."""
    configured = get_current_settings().tasks.runner.thread_pool_max_workers
    return ThreadPoolTaskRunner(max_workers=configured or max(2, len(os.sched_getaffinity(0))))


@flow(name="build_dataset", task_runner=default_task_runner())
def build_dataset(spec_path: str, store: str | None = None, partitions: int = 0) -> dict[str, Any]:
    """Build a new version of the dataset that the spec at ``spec_path`` describes.

    ``partitions``: when positive, exact and near dedup run as tasks over that many key
    partitions (:mod:`pipelines.partitioned`; the same rows and reasons) instead of one
    ordered pass in the flow's process."""
    started = datetime.now(UTC)
    spec = load_spec(spec_path)
    check_sources(spec, spec_path)
    root = store or spec.store or default_store()
    datasets = DatasetStore(root)
    datasets.check()  # an unreachable or refused store fails now, not at commit
    work = work_dir(datasets.root, spec.name)
    storage = _result_storage(work)
    segments = split_segments([ChainStep.of(s.name, s.params) for s in spec.stages])

    ingest = ingest_source.with_options(result_storage=storage)
    fingerprints = {s.path: file_fingerprint(s.path) for s in spec.sources}
    lead = _chain_identity(segments[0])
    # Whether a segment is the chain's last decides only how its shards are written (data
    # files of the table, or scratch files), not their rows, so it is not in the keys: a
    # stage added to the spec, or the last one removed, reuses every finished segment (the
    # commit reads scratch shards, a later segment reads data files).
    last = len(segments) == 1  # ingest's train shards are the version's
    futures = []
    for source in spec.sources:
        key = key_of(
            "ingest",
            code_version(),
            fingerprints[source.path],
            source.model_dump(),
            spec.ingest.model_dump(mode="json"),
            lead,
        )
        folder = work / "shards" / key
        futures.append(
            fresh(ingest, folder).submit(
                key, source, spec.ingest, segments[0], str(folder), fingerprints[source.path], last
            )
        )
    outputs = [f.result() for f in futures]
    for source, output in zip(spec.sources, outputs, strict=True):
        rows = output.counts.get("ingest", {}).get("in", 0)  # a cached task read nothing
        emit("read", source.path, rows, rows)
    _check_not_empty(spec, outputs)

    segment = run_segment.with_options(result_storage=storage)
    context = StageContext(work=work / "stages", cache_dir=cache_dir(datasets.root))
    train = [p for o in outputs for p in o.train]
    for number, chain in enumerate(segments[1:], 2):
        last = number == len(segments)
        key = key_of("segment", code_version(), [o.key for o in outputs], _chain_identity(chain))
        folder = work / "shards" / key
        if partitions > 0 and partitionable(chain[0]) and train:  # no shards: nothing to split
            scratch = work / "partitioned" / key / f"p{partitions}"
            options = {**CACHED, "result_storage": storage}
            out = run_partitioned(key, train, chain, folder, scratch, partitions, options, last)
        else:
            prepared = _prepare(chain[0], train, work, storage)
            ids = content_ids(len(spec.sources), segments, number - 1)
            out = fresh(segment, folder)(
                key, train, chain, str(folder), context, prepared, last, ids
            )
        emit("stage", chain[0].definition.name, len(train), len(train))
        outputs.append(out)
        train = out.train

    rejected = [p for o in outputs for p in o.rejected]
    counts = merge_counts(o.counts for o in outputs)
    rows = {
        "in": counts.get("ingest", {}).get("in", 0),
        "generated": sum(line.get("added", 0) for line in counts.values()),
        "train": _rows(train),
        "rejected": _rows(rejected),
    }
    if rows["in"] + rows["generated"] != rows["train"] + rows["rejected"]:
        raise AccountingError(f"rows in + generated != train + rejected: {rows}")

    metadata = {
        "build_id": str(_run_id()),
        "spec_hash": spec.spec_hash(),
        "spec_name": spec.name,
        "code_version": code_version(),
        "inputs": {s.path: fingerprints[s.path] for s in spec.sources},
        "engines": {},
        "counts": counts,
        "rows": rows,
        "reused_tasks": sum(o.produced_by != _run_id() for o in outputs),
        "reused_from": sorted({str(o.produced_by) for o in outputs if o.produced_by != _run_id()}),
    }
    emit("commit", spec.name, 0, 1)
    version = commit_version(datasets, spec.name, train, rejected, metadata)
    emit("commit", spec.name, 1, 1)
    clear_failures(work / "results", before=started)  # every task of this build succeeded
    summary = {
        "name": spec.name,
        "version": version,
        "store": datasets.root,
        **metadata,
        "cache": _engine_stats(outputs),
        "stage_stats": {name: st for o in outputs for name, st in o.stats.items()},
    }
    summary["warnings"] = _warnings(summary["rows"])
    for warning in summary["warnings"]:
        _logger().warning("%s", warning)
    report = _publish(spec, summary, work)
    # The report measured the train split already; without it, measure the shards.
    summary["report"] = report.path if report else None
    summary["dataset_stats"] = (
        report.stats
        if report
        else shard_stats(train, map_shards=ordered_map, read_columns=read_columns)
    )
    return summary


def _publish(spec: BuildSpec, summary: dict[str, Any], work: Path) -> ReportResult | None:
    """Prefect artifacts: a markdown summary, the per-stage counts table and a link to the
    version's HTML report (written under ``work/reports``; returned, None if it failed)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-") or "dataset"
    table = [{"stage": stage, **line} for stage, line in summary["counts"].items()]
    create_table_artifact(
        table=table,
        key=f"{slug}-stage-counts",
        description=f"Per-stage counts of {spec.name} v{summary['version']}",
    )
    lines = [
        f"# {spec.name} v{summary['version']}",
        "",
        f"- store: `{summary['store']}`",
        f"- rows in: {summary['rows']['in']}, generated: {summary['rows']['generated']}, "
        f"train: {summary['rows']['train']}, rejected: {summary['rows']['rejected']}",
        f"- spec hash: `{summary['spec_hash'][:16]}`, code {summary['code_version']}",
        f"- tasks reused from earlier runs: {summary['reused_tasks']}",
        *(f"- **warning**: {warning}" for warning in summary["warnings"]),
        "",
        "| stage | in | kept | rejected | added |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['stage']} | {r['in']} | {r['kept']} | {r['rejected']} | {r['added']} |"
            for r in table
        ),
    ]
    create_markdown_artifact(
        markdown="\n".join(lines),
        key=f"{slug}-build-summary",
        description=f"Build summary of {spec.name}",
    )
    report = publish_report(
        summary["store"], spec.name, summary["version"], work / "reports", f"{slug}-report"
    )
    for stage_name, stats in summary["stage_stats"].items():
        for figure, path in stats.get("figures", {}).items():
            encoded = base64.b64encode(Path(path).read_bytes()).decode()
            create_markdown_artifact(
                markdown=f"![{figure}](data:image/png;base64,{encoded})",
                key=f"{slug}-{stage_name}-{figure}".replace("_", "-"),
                description=f"{stage_name}: {figure} of {spec.name} v{summary['version']}",
            )
    return report
