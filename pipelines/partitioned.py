"""Exact and near dedup as partitioned tasks: what ``--runner dask`` runs instead of the
ordered pass (see :mod:`transforms.partitioned_dedup` for the method and why its
decisions are the ordered pass's).

Tasks, all on the flow's task runner (Dask workers under ``--runner dask``), passing
file paths only; the files live under ``<work>/partitioned/<segment key>``:

1. ``dedup-scatter``, one per shard: the stage's keys (exact: the (prompt, response)
   digest; near: :func:`~transforms.response.near_dedup.prepare`'s band keys), each with
   its global row number, written grouped by ``key % partitions`` (``.npy``, read back
   memory-mapped, so a partition task reads only its slice); near dedup's compact
   signatures and every shard's ids, for the later tasks to gather by row;
2. ``dedup-buckets``, one per partition and round: round 1 gathers its slice of every
   shard, keeps the buckets of two rows or more (with their rows' signatures) and verifies
   each bucket's first row against the rest; later rounds verify the rows the last merge
   kept that were not verified yet. Each writes the verified edges ``(i, j)``;
3. ``dedup-merge``, one per round: keep-first over the edges so far, written as the
   dropped rows and their owners. The flow stops when a round verifies no new row (exact
   dedup: after round 1);
4. ``dedup-apply``, one per shard: the decisions for its rows, the reasons naming the
   kept rows' ids, then the local stages after the dedup stage, and the shard's files.

The flow process only submits tasks and reads their small results (counts, paths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.runtime import flow_run
from pydantic import BaseModel

from pipelines.fingerprint import fresh, key_of
from pipelines.segments import (
    ChainStep,
    Counts,
    SegmentOutput,
    ShardWriter,
    add_counts,
    read_shard,
    run_chain,
    shard_rows,
)
from storage.atomic import atomic_path
from transforms.dedup import content_words
from transforms.partitioned_dedup import (
    bucket_firsts,
    bucket_runs,
    candidate_pairs,
    dedupe_edges,
    keep_first,
    partition_entries,
)
from transforms.response.near_dedup import NearDedupParams, prepare, similar_pairs
from transforms.schema import rejected
from transforms.stage import StageResult, reject_table

Keys = tuple[np.ndarray, np.ndarray | None]
"""A shard's ``(keys (rows, bands, words) uint64, compact signatures or None)``."""


@dataclass(frozen=True)
class Method:
    """How one ordered stage is partitioned."""

    keys: Callable[[pa.Table, Any], Keys]
    reason: str
    """The reject reason's prefix (the ordered stage's): ``<reason>:<kept id>``."""
    null_id: str
    """Written for a kept row without an id (as the ordered stage writes it)."""


def _exact_keys(table: pa.Table, params: BaseModel) -> Keys:
    return content_words(table)[:, None, :], None


def _near_keys(table: pa.Table, params: NearDedupParams) -> Keys:
    arrays = prepare(table, params)
    return arrays["band_keys"][:, :, None], arrays["signatures"]


METHODS: dict[str, Method] = {
    "exact_dedup": Method(_exact_keys, "duplicate_of", "<no id>"),
    "near_dedup": Method(_near_keys, "near_duplicate_of", "None"),
}


def partitionable(step: ChainStep) -> bool:
    """Whether ``step`` has a partitioned form."""
    return step.definition.name in METHODS


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _load(path: Path | str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _stem(folder: Path, index: int) -> Path:
    return folder / "scatter" / f"{index:05d}"


@task(name="dedup-scatter")
def scatter_shard(
    key: str, shard: str, index: int, first_row: int, step: ChainStep, partitions: int, folder: str
) -> int:
    """Write shard ``index``'s keys grouped by partition, its signatures and its ids."""
    table = read_shard(shard)
    keys, sigs = METHODS[step.definition.name].keys(table, step.params)
    entries, rows, offsets = partition_entries(keys, first_row, partitions)
    stem = _stem(Path(folder), index)
    stem.parent.mkdir(parents=True, exist_ok=True)
    _save(stem.with_suffix(".keys.npy"), entries)
    _save(stem.with_suffix(".rows.npy"), rows)
    _save(stem.with_suffix(".offsets.npy"), offsets)
    if sigs is not None:
        _save(stem.with_suffix(".sigs.npy"), sigs)
    ids = table.select(["id"])
    with (
        atomic_path(stem.with_suffix(".ids.arrow")) as tmp,
        pa.ipc.new_file(str(tmp), ids.schema) as writer,
    ):
        writer.write_table(ids)
    return table.num_rows


@task(name="dedup-buckets")
def bucket_round(
    key: str,
    folder: str,
    partition: int,
    round_: int,
    first_rows: list[int],
    step: ChainStep,
    decisions: str | None,
) -> dict[str, Any]:
    """One partition's round: verify the rows to check against the later rows of their
    buckets (each distinct pair once); write the verified edges. Returns how many rows it
    checked, how many distinct pairs it verified and the edges' file."""
    base = Path(folder)
    state = base / "buckets" / f"p{partition:04d}"
    if round_ == 1:
        state.mkdir(parents=True, exist_ok=True)
        gathered = _gather(base, partition, len(first_rows), first_rows, step)
        for name, array in zip(_STATE, gathered, strict=True):
            _save(state / f"{name}.npy", array)
    rows, ends, distinct, sigs = (_load(state / f"{name}.npy") for name in _STATE)
    rows, ends = np.asarray(rows), np.asarray(ends)
    if round_ == 1:
        check = checked = bucket_firsts(ends)
    else:
        before = np.load(base / f"round-{round_ - 1}" / f"p{partition:04d}.checked.npy")
        check = _kept(rows, decisions) & ~before
        checked = before | check
    out = base / f"round-{round_}"
    out.mkdir(parents=True, exist_ok=True)
    _save(out / f"p{partition:04d}.checked.npy", checked)
    a, b = candidate_pairs(ends, check)
    i, j = dedupe_edges(rows[a], rows[b])  # a pair sharing several bands: verified once
    pairs = len(i)
    if sigs.size and pairs:  # near dedup: verify the candidates
        params: NearDedupParams = step.params  # type: ignore[assignment]
        at_i, at_j = np.searchsorted(distinct, i), np.searchsorted(distinct, j)
        hit = similar_pairs(sigs, at_i, sigs, at_j, params.signature_bits, params.threshold)
        i, j = i[hit], j[hit]
    edges = out / f"p{partition:04d}.edges.npy"
    _save(edges, np.stack([i, j]))
    return {"checked": int(check.sum()), "pairs": pairs, "edges": str(edges)}


_STATE = ("rows", "ends", "distinct", "sigs")
"""A partition's buckets, saved by round 1 for the later rounds (read memory-mapped)."""


def _gather(
    base: Path, partition: int, shards: int, first_rows: list[int], step: ChainStep
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Partition ``partition``'s entries from every shard, as buckets (rows, ends); the
    distinct rows in them and their signatures (near dedup; else empty)."""
    keys, rows = [], []
    for index in range(shards):
        stem = _stem(base, index)
        lo, hi = np.load(stem.with_suffix(".offsets.npy"))[partition : partition + 2]
        keys.append(np.asarray(_load(stem.with_suffix(".keys.npy"))[lo:hi]))
        rows.append(np.asarray(_load(stem.with_suffix(".rows.npy"))[lo:hi]))
    bucket_rows, ends = bucket_runs(np.concatenate(keys), np.concatenate(rows))
    if step.definition.name != "near_dedup":
        return bucket_rows, ends, np.zeros(0, np.int64), np.zeros((0, 0), np.uint16)
    distinct = np.unique(bucket_rows)
    starts = np.asarray(first_rows, dtype=np.int64)
    owner = np.searchsorted(starts, distinct, side="right") - 1
    parts = []
    for index in np.unique(owner).tolist():
        sigs = _load(_stem(base, index).with_suffix(".sigs.npy"))
        parts.append(sigs[distinct[owner == index] - starts[index]])
    num_perm = step.params.num_perm  # type: ignore[attr-defined]
    gathered = np.concatenate(parts) if parts else np.zeros((0, num_perm), np.uint16)
    return bucket_rows, ends, distinct, gathered


def _kept(rows: np.ndarray, decisions: str | None) -> np.ndarray:
    """Which of ``rows`` the last merge kept."""
    if decisions is None:
        return np.ones(len(rows), dtype=bool)
    dropped = np.load(Path(decisions) / "dropped.npy")
    at = np.searchsorted(dropped, rows)
    return ~((at < len(dropped)) & (dropped[np.minimum(at, len(dropped) - 1)] == rows))


@task(name="dedup-merge")
def merge_round(key: str, folder: str, round_: int, edges: list[str]) -> str:
    """Keep-first over every edge verified so far (the last merge's, kept in its folder,
    and this round's ``edges`` files); writes ``edges.npy``, ``dropped.npy`` and
    ``owners.npy`` (sorted by dropped row) into the round's folder, returned."""
    earlier = Path(folder) / f"round-{round_ - 1}" / "edges.npy"
    loaded = [np.load(path) for path in [*edges, *([earlier] if round_ > 1 else [])]]
    both = np.concatenate(loaded, axis=1) if loaded else np.zeros((2, 0), np.int64)
    i, j = dedupe_edges(both[0], both[1])
    dropped, owners = keep_first(i, j, distinct=True)
    out = Path(folder) / f"round-{round_}"
    out.mkdir(parents=True, exist_ok=True)
    _save(out / "edges.npy", np.stack([i, j]))
    _save(out / "dropped.npy", dropped)
    _save(out / "owners.npy", owners)
    return str(out)


@task(name="dedup-apply")
def apply_shard(
    key: str,
    shard: str,
    index: int,
    first_rows: list[int],
    chain: list[ChainStep],
    folder: str,
    out_folder: str,
    decisions: str,
    final: bool = False,
) -> tuple[Counts, tuple[str, str | None]]:
    """Shard ``index`` after the dedup stage and the local stages that follow it; ``final``:
    the chain's last segment (see :class:`ShardWriter`)."""
    table = read_shard(shard)
    n, start = table.num_rows, first_rows[index]
    dropped = _load(Path(decisions) / "dropped.npy")
    lo, hi = np.searchsorted(dropped, [start, start + n])
    mine = np.asarray(dropped[lo:hi]) - start
    owners = np.asarray(_load(Path(decisions) / "owners.npy")[lo:hi])
    method = METHODS[chain[0].definition.name]
    keep = np.ones(n, dtype=bool)
    keep[mine] = False
    mask = pa.array(keep)
    names = pc.fill_null(_ids(Path(folder), first_rows, owners), method.null_id)
    reasons = pc.binary_join_element_wise(method.reason, names.cast(pa.string()), ":")
    head = StageResult(
        kept=table.filter(mask),
        rejected=reject_table(
            rejected(table.filter(pc.invert(mask)), chain[0].definition.name, reasons)
        ),
    )
    part: Counts = {}
    add_counts(part, chain[0].definition.name, head.counts(n))
    kept, rejects = run_chain(head, chain[1:], part)
    return part, ShardWriter(out_folder, final=final).write_shard(index, kept, rejects)


def _ids(base: Path, first_rows: list[int], rows: np.ndarray) -> pa.Array:
    """The ids of global ``rows``, read from the shards' id files."""
    starts = np.asarray(first_rows, dtype=np.int64)
    owner = np.searchsorted(starts, rows, side="right") - 1
    out: list[pa.Array] = []
    order: list[np.ndarray] = []
    for index in np.unique(owner).tolist():
        at = np.flatnonzero(owner == index)
        with pa.memory_map(str(_stem(base, index).with_suffix(".ids.arrow"))) as source:
            ids = pa.ipc.open_file(source).read_all().column("id")
            out.append(ids.take(pa.array(rows[at] - starts[index])).combine_chunks())
        order.append(at)
    if not out:
        return pa.array([], pa.string())
    merged = pa.concat_arrays([a.cast(pa.string()) for a in out])
    return merged.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


def run_partitioned(
    key: str,
    shards: list[str],
    chain: list[ChainStep],
    out_folder: Path,
    folder: Path,
    partitions: int,
    options: dict[str, Any],
    final: bool = False,
) -> SegmentOutput:
    """The segment ``chain`` (a partitionable stage, then local ones) over ``shards`` as
    partitioned tasks; ``options``: Prefect task options (result storage, caching) for
    every task, whose cache key is its ``key`` argument; ``final``: the chain's last
    segment (not in ``key``), whose train shards are written as the table's data files."""
    first_rows = np.cumsum([0] + [shard_rows(s) for s in shards])
    starts = [int(x) for x in first_rows[:-1]]
    step = chain[0]
    base = str(folder)

    def submit(fn: Any, ident: Any, *args: Any, files: Path = folder) -> Any:
        """``fn`` on the task runner; its cache key: the segment's, the task and ``ident``;
        recomputed when ``files`` (the folder its result names) is gone."""
        task_key = key_of(key, fn.name, partitions, ident)
        return fresh(fn.with_options(**options), files).submit(task_key, *args)

    scattered = [
        submit(scatter_shard, i, shard, i, starts[i], step, partitions, base)
        for i, shard in enumerate(shards)
    ]
    for future in scattered:
        future.result()
    decisions: str | None = None
    round_ = 1
    while True:
        futures = [
            submit(bucket_round, [p, round_], base, p, round_, starts, step, decisions)
            for p in range(partitions)
        ]
        results = [f.result() for f in futures]
        if round_ > 1 and not any(r["checked"] for r in results):
            break  # nothing new verified: the last merge's decisions are final
        edges = [r["edges"] for r in results]
        decisions = submit(merge_round, round_, base, round_, edges).result()
        if step.definition.name == "exact_dedup":
            break  # every pair of a bucket is a duplicate: round 1 verified them all
        round_ += 1
    assert decisions is not None
    applied = [
        submit(
            apply_shard,
            i,
            shard,
            i,
            starts,
            chain,
            base,
            str(out_folder),
            decisions,
            final,
            files=out_folder,
        )
        for i, shard in enumerate(shards)
    ]
    writer = ShardWriter(out_folder)
    for _ in writer.record(f.result() for f in applied):
        pass
    return SegmentOutput(key, writer.train, writer.rejected, writer.counts, produced_by=flow_run.id)
