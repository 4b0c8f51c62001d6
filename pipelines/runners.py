"""Task runner selection for ``build_dataset``: threads (the default: one per core, at least
2) or a Dask cluster.

``--runner dask`` hands the shard-level tasks (one ingest task per source, running the
local stages that follow it: normalize, filters, ...; one ``prepare`` task per shard for
an ordered stage that has one: near dedup's signatures) to a Dask cluster through
``prefect-dask``'s ``DaskTaskRunner``: an existing scheduler (``--dask-address
tcp://host:8786``) or, without an address, a ``LocalCluster`` of ``--dask-workers``
single-threaded worker processes on this machine. Whole-table stages (CRaFT, synthesis,
semantic dedup) see every row and run in the flow's process.

Exact and near dedup run, under ``--runner dask``, partitioned by key hash
(:mod:`pipelines.partitioned`): per-shard, per-partition and per-round tasks on the
workers, with the same rows and reasons as the ordered pass; the flow's process only
submits them. :func:`dedup_partitions` says how many partitions (0: the ordered pass, one
task in the flow's process, the default on threads).

Task arguments are shard paths and parameters, never rows, so tasks travel cheaply; the
workers must see the same files (one machine, or a shared filesystem / the same mount for
the store's ``_work`` folder) and reach the same Prefect API.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RunnerName = Literal["threads", "dask"]
PARTITIONS_ENV = "ALIGNCURATE_DEDUP_PARTITIONS"
ADDRESS_PARTITIONS = 32
"""Dedup partitions on an existing cluster (its size is not known when the flow starts)."""


class RunnerError(ValueError):
    """A runner that cannot be built from the options given."""


class RunnerOptions(BaseModel):
    """Where the shard-level tasks run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    runner: RunnerName = "threads"
    dask_address: str | None = Field(
        default=None, description="scheduler of an existing Dask cluster, tcp://host:8786"
    )
    dask_workers: int = Field(
        default=2, ge=1, description="LocalCluster workers when no address is given"
    )
    partitions: int | None = Field(
        default=None,
        ge=0,
        description="key partitions of exact and near dedup; 0: the ordered pass in the "
        "flow's process; default: ALIGNCURATE_DEDUP_PARTITIONS, else 0 on threads and "
        "twice the workers on Dask",
    )


def dedup_partitions(options: RunnerOptions) -> int:
    """How many key partitions exact and near dedup use (0: the ordered pass).

    ``options.partitions``, else ``ALIGNCURATE_DEDUP_PARTITIONS``, else 0 for threads (one
    machine: the ordered pass has no task overhead) and, for Dask, twice the LocalCluster
    workers or :data:`ADDRESS_PARTITIONS` on an existing cluster (two partition tasks per
    worker even out their sizes; see docs/operations.md for when to raise it)."""
    if options.partitions is not None:
        return options.partitions
    configured = os.environ.get(PARTITIONS_ENV)
    if configured:
        try:
            return max(0, int(configured))
        except ValueError:
            raise RunnerError(
                f"{PARTITIONS_ENV}={configured!r}: expected a whole number of partitions"
            ) from None
    if options.runner == "threads":
        return 0
    return ADDRESS_PARTITIONS if options.dask_address else 2 * options.dask_workers


def task_runner(options: RunnerOptions) -> Any | None:
    """The Prefect task runner for ``options``; ``None`` keeps the flow's default."""
    if options.runner == "threads":
        if options.dask_address:
            raise RunnerError("--dask-address needs --runner dask")
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - pinned in pyproject
        raise RunnerError("--runner dask needs prefect-dask (pip install prefect-dask)") from exc
    if options.dask_address:
        if not options.dask_address.startswith(
            ("tcp://", "tls://", "ws://", "wss://", "inproc://")
        ):
            raise RunnerError(
                f"--dask-address {options.dask_address!r}: expected a scheduler URL such as "
                "tcp://host:8786"
            )
        return DaskTaskRunner(address=options.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": options.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        },
    )


def build_flow(options: RunnerOptions) -> Any:
    """``build_dataset`` with the task runner ``options`` ask for. A Dask worker that dies
    while it runs a task fails the task (after Dask's own retries on other workers), the
    flow fails before its commit, and :class:`RunnerError` says which task was lost."""
    from pipelines.build import build_dataset

    runner = task_runner(options)
    partitions = dedup_partitions(options)
    if runner is None and not partitions:
        return build_dataset
    flow = build_dataset if runner is None else build_dataset.with_options(task_runner=runner)

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("partitions", partitions)
        try:
            return flow(*args, **kwargs)
        except Exception as exc:
            if type(exc).__name__ != "KilledWorker":
                raise
            raise RunnerError(f"a Dask worker died while running a build task: {exc}") from exc

    return run
